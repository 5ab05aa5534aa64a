"""The compare-and-swap loop that moves pointers, written once for every backend.

A commit reads the pointer and its version token, decides, and writes conditionally on that token;
if another writer got there first (:class:`CommitConflict`) it re-reads and decides again. Moving a
pointer forward is the only thing the commit path does: a lower step raises
:class:`StepRegression`. Moving back is :func:`rewind_pointer`, a separate, explicit operation.
"""

from __future__ import annotations

import enum
import logging
import random
import time
from collections.abc import Callable

from commitpoint.errors import CommitConflict, StepRegression
from commitpoint.layout import check_step
from commitpoint.storage.protocol import StorageBackend

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 64


class Advance(enum.Enum):
    """What :func:`advance_pointer` did."""

    MOVED = "moved"
    ALREADY_THERE = "already there"


def read_step(storage: StorageBackend, name: str) -> int | None:
    """The step a pointer names, or None if it does not exist."""
    return storage.read_pointer(name).value


def _backoff(attempt: int) -> None:
    time.sleep(min(0.05, 0.0005 * 2**attempt) * random.random())


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
    for attempt in range(MAX_ATTEMPTS):
        state = storage.read_pointer(name)
        if state.value is not None:
            if step < state.value:
                raise StepRegression(storage.url_for(name), state.value, step)
            if step == state.value:
                return Advance.ALREADY_THERE
        if before_write is not None:
            before_write()
        try:
            storage.write_pointer_if(name, step, state.token)
        except CommitConflict:
            logger.debug("pointer %s changed under us; re-reading", storage.url_for(name))
            _backoff(attempt)
            continue
        return Advance.MOVED
    raise CommitConflict(storage.url_for(name), f"still contended after {MAX_ATTEMPTS} attempts")


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
    for attempt in range(MAX_ATTEMPTS):
        state = storage.read_pointer(name)
        value = (state.value or 0) + 1
        try:
            storage.write_pointer_if(name, value, state.token)
        except CommitConflict:
            _backoff(attempt)
            continue
        return value
    raise CommitConflict(storage.url_for(name), f"still contended after {MAX_ATTEMPTS} attempts")
