"""The compare-and-swap loop that moves pointers, written once for every backend.

A commit reads the pointer and its version token, decides, and writes conditionally on that token;
if another writer got there first (:class:`CommitConflict`) it re-reads and decides again. Moving a
pointer forward is the only thing the commit path does: a lower step raises
:class:`StepRegression`. Moving back is :func:`rewind_pointer`, a separate, explicit operation.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from typing import TypeVar

from commitpoint.core.layout import check_step
from commitpoint.core.retry import RetryPolicy, retry
from commitpoint.errors import CommitConflict, StepRegression
from commitpoint.storage.protocol import StorageBackend

T = TypeVar("T")

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 64
CAS_RETRY = RetryPolicy(attempts=MAX_ATTEMPTS, base_delay=0.0005, max_delay=0.05, full_jitter=True)
"""A lost compare-and-swap is re-read and decided again, after a short jittered pause."""


class Advance(enum.Enum):
    """What :func:`advance_pointer` did."""

    MOVED = "moved"
    ALREADY_THERE = "already there"


def read_step(storage: StorageBackend, name: str) -> int | None:
    """The step a pointer names, or None if it does not exist."""
    return storage.read_pointer(name).value


def _compare_and_swap(storage: StorageBackend, name: str, attempt: Callable[[], T]) -> T:
    """Run one read-decide-write ``attempt`` until it does not lose a race."""
    try:
        return retry(
            attempt,
            CAS_RETRY,
            retry_on=(CommitConflict,),
            what=f"compare-and-swap of {storage.url_for(name)}",
            log_level=logging.DEBUG,
        )
    except CommitConflict:
        raise CommitConflict(
            storage.url_for(name), f"still contended after {MAX_ATTEMPTS} attempts"
        ) from None


def advance_pointer(
    storage: StorageBackend,
    name: str,
    step: int,
    before_write: Callable[[], None] | None = None,
) -> Advance:
    """Move pointer ``name`` forward to ``step`` by compare-and-swap.

    ``before_write`` runs between each read and conditional write (the monitor checks its writer
    lease there, so a fenced writer stops at the last possible moment). Raises
    :class:`StepRegression` if the pointer already names a higher step and
    :class:`CommitConflict` if it kept changing for :data:`MAX_ATTEMPTS` tries.
    """
    check_step(step)

    def attempt() -> Advance:
        state = storage.read_pointer(name)
        if state.value is not None:
            if step < state.value:
                raise StepRegression(storage.url_for(name), state.value, step)
            if step == state.value:
                return Advance.ALREADY_THERE
        if before_write is not None:
            before_write()
        storage.write_pointer_if(name, step, state.token)
        return Advance.MOVED

    return _compare_and_swap(storage, name, attempt)


def rewind_pointer(storage: StorageBackend, name: str, step: int, expected: int | None) -> None:
    """Move pointer ``name`` to ``step`` (any direction) if it still names ``expected``.

    The single conditional write either lands on the pointer version that named ``expected`` or
    raises :class:`CommitConflict`; it never overwrites a commit it has not seen.
    """
    check_step(step)
    state = storage.read_pointer(name)
    if state.value != expected:
        raise CommitConflict(
            storage.url_for(name), f"expected step {expected}, pointer names {state.value}"
        )
    storage.write_pointer_if(name, step, state.token)


def bump_counter(storage: StorageBackend, name: str) -> int:
    """Increment a counter object by compare-and-swap and return the new value."""

    def attempt() -> int:
        state = storage.read_pointer(name)
        value = (state.value or 0) + 1
        storage.write_pointer_if(name, value, state.token)
        return value

    return _compare_and_swap(storage, name, attempt)


def rewrite_pointer(storage: StorageBackend, name: str) -> None:
    """Rewrite pointer ``name`` with its own value by compare-and-swap, giving it a new version
    token (nothing to do if it does not exist)."""

    def attempt() -> None:
        state = storage.read_pointer(name)
        if state.value is not None:
            storage.write_pointer_if(name, state.value, state.token)

    _compare_and_swap(storage, name, attempt)
