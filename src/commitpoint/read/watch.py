"""watch: follow newly committed steps from a rollout or inference worker.

:func:`watch` (a generator) and :func:`awatch` (an async iterator) poll a pointer and yield each
newly committed step once, after it verified against its manifest. A step that fails verification
is skipped with a warning (never yielded) and watching goes on. Storage errors while polling
(:class:`StorageError`, an unreadable pointer) are logged and retried with exponential backoff;
after a successful poll the interval returns to ``interval``.

Starting point: with ``after=None`` the watch starts from the step committed when it starts and
yields it first (``include_current=True``, the default: a fresh worker wants weights at once) or
waits for the next one (``include_current=False``). With ``after=N`` it yields steps above N.

By default each poll yields the newest committed step only (a consumer wants the latest weights,
not a backlog). ``every_step=True`` yields every committed step between the last one yielded and
the pointer, in order (steps whose folder has a manifest covering the kind).

A rewind (the pointer moving below the step it named at the previous poll) is logged and the
step the pointer now names is yielded (a consumer should switch to the rewound-to weights); steps
committed again after it are yielded again, as the new commits they are.

The starting point is fixed when :func:`watch` / :func:`awatch` is called (the pointer is read
then), not when iteration begins; so is the ``timeout`` clock.

It ends when ``stop`` is set (a ``threading.Event`` or ``asyncio.Event``), after ``timeout``
seconds, or when the consumer stops iterating.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from commitpoint.core.layout import Kind, check_seconds, check_step, parse_step_dir
from commitpoint.core.manifest import manifest_path
from commitpoint.errors import (
    CorruptCheckpoint,
    InvalidArgument,
    StorageError,
    describe_exception,
    safe_repr,
)
from commitpoint.read.verify import verify_step
from commitpoint.storage.protocol import StorageBackend

logger = logging.getLogger(__name__)

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (StorageError, OSError, TimeoutError)
"""Errors a poll treats as transient: logged, backed off, retried."""
_POLL_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, CorruptCheckpoint)
"""Also an unparsable pointer (CorruptCheckpoint from the pointer read): retried the same way."""


class StopSignal(Protocol):
    """Anything with ``is_set()``: ``threading.Event`` or ``asyncio.Event``."""

    def is_set(self) -> bool: ...


@dataclass
class _Watcher:
    storage: StorageBackend
    kind: Kind
    after: int | None
    include_current: bool
    every_step: bool
    verify: bool
    interval: float
    max_interval: float
    backoff: float
    last: int | None = None
    started: bool = False
    observed: int | None = None
    """The step the pointer named at the last successful poll (a drop below it is a rewind)."""
    skipped: set[int] = field(default_factory=set)
    delay: float = 0.0

    def __post_init__(self) -> None:
        if not all(callable(getattr(self.storage, n, None)) for n in ("read_pointer", "exists")):
            raise InvalidArgument(f"watch needs a StorageBackend, got {safe_repr(self.storage)}")
        if self.after is not None:
            check_step(self.after, "after")
        for name in ("include_current", "every_step", "verify"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgument(
                    f"watch option {name} must be a bool, got {safe_repr(getattr(self, name))}"
                )
        for name in ("interval", "max_interval", "backoff"):
            check_seconds(getattr(self, name), f"watch option {name}", allow_none=False)
        if self.interval <= 0 or self.max_interval < self.interval or self.backoff < 1:
            raise InvalidArgument(
                "watch needs interval > 0, max_interval >= interval and backoff >= 1, got "
                f"{self.interval}, {self.max_interval}, {self.backoff}"
            )
        self.last = self.after
        self.started = self.after is not None
        self.delay = self.interval

    def anchor(self) -> None:
        """Fix the starting point now (with ``after=None``); retried by the first poll on error."""
        if self.started:
            return
        try:
            self._anchor(self.storage.read_pointer(self.kind.pointer).value)
        except _POLL_ERRORS as exc:
            logger.warning("watch of %s: %s; will retry", self.storage.url, exc)

    def _anchor(self, current: int | None) -> None:
        self.started = True
        if current is not None:
            # "last seen" just below the current step when it is to be yielded first
            self.last = current if not self.include_current else current - 1

    def poll(self) -> list[int]:
        """One look at storage: the steps to yield now (errors handled, delay updated)."""
        try:
            steps = self._poll()
        except _POLL_ERRORS as exc:
            self.delay = min(self.max_interval, max(self.delay, self.interval) * self.backoff)
            logger.warning("watch of %s: %s; retrying in %.3g s", self.storage.url, exc, self.delay)
            return []
        self.delay = self.interval
        return steps

    def _poll(self) -> list[int]:
        current = self.storage.read_pointer(self.kind.pointer).value
        if not self.started:
            self._anchor(current)
        if current is None:
            return []
        if self.observed is not None and current < self.observed:
            logger.warning(
                "%s pointer of %s moved back from step %d to %d (rewind); following it",
                self.kind.value,
                self.storage.url,
                self.observed,
                current,
            )
            self.skipped.clear()
            candidates = [current]
        elif self.last is not None and current <= self.last:
            self.observed = current
            return []
        else:
            candidates = self._between(current) if self.every_step else [current]
        ready: list[int] = []
        for step in candidates:
            if step in self.skipped:
                continue
            if self.verify:
                reason = self._verify(step)
                if reason is not None:
                    logger.warning(
                        "step %d of %s failed verification; skipping it: %s",
                        step,
                        self.storage.url,
                        reason,
                    )
                    self.skipped.add(step)
                    continue
            ready.append(step)
        self.last = self.observed = current
        return ready

    def _verify(self, step: int) -> str | None:
        """Why ``step`` fails verification, or None if it is sound (transient storage errors
        propagate, to be retried). Anything else a hostile manifest or file provokes skips the
        step: watching must go on."""
        try:
            report = verify_step(self.storage, step, self.kind)
        except CorruptCheckpoint as exc:
            return str(exc)
        except TRANSIENT_ERRORS:
            raise
        except Exception as exc:
            return describe_exception(exc)
        return None if report.ok else "; ".join(map(str, report.problems))

    def _between(self, current: int) -> list[int]:
        """Committed steps in (last, current], in order."""
        low = -1 if self.last is None else self.last
        found = []
        for name in self.storage.list_dirs(""):
            step = parse_step_dir(name)
            if step is None or not low < step <= current:
                continue
            if step == current or self._covered(step):
                found.append(step)
        return sorted(found)

    def _covered(self, step: int) -> bool:
        kinds = (Kind.STATE_DICT, Kind.CHECKPOINT) if self.kind is Kind.STATE_DICT else (self.kind,)
        return any(self.storage.exists(manifest_path(step, k)) for k in kinds)


def _check_stop(stop: object, timeout: object) -> None:
    if stop is not None and not callable(getattr(stop, "is_set", None)):
        raise InvalidArgument(f"watch option stop needs is_set(), got {safe_repr(stop)}")
    check_seconds(timeout, "watch option timeout")


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def watch(
    storage: StorageBackend,
    *,
    kind: Kind | str = Kind.STATE_DICT,
    after: int | None = None,
    include_current: bool = True,
    every_step: bool = False,
    verify: bool = True,
    interval: float = 1.0,
    max_interval: float = 30.0,
    backoff: float = 2.0,
    stop: StopSignal | None = None,
    timeout: float | None = None,
) -> Iterator[int]:
    """Yield each newly committed, verified step of ``kind`` (see the module docstring)."""
    watcher = _Watcher(
        storage, Kind(kind), after, include_current, every_step, verify,
        interval, max_interval, backoff,
    )  # fmt: skip
    _check_stop(stop, timeout)
    watcher.anchor()
    return _watch(watcher, stop, _deadline(timeout))


def _watch(watcher: _Watcher, stop: StopSignal | None, deadline: float | None) -> Iterator[int]:
    while stop is None or not stop.is_set():
        yield from watcher.poll()
        remaining = _remaining(deadline)
        if remaining is not None and remaining <= 0:
            return
        pause = watcher.delay if remaining is None else min(watcher.delay, remaining)
        wait = getattr(stop, "wait", None)
        if callable(wait) and not asyncio.iscoroutinefunction(wait):
            wait(pause)
        else:
            time.sleep(pause)


def awatch(
    storage: StorageBackend,
    *,
    kind: Kind | str = Kind.STATE_DICT,
    after: int | None = None,
    include_current: bool = True,
    every_step: bool = False,
    verify: bool = True,
    interval: float = 1.0,
    max_interval: float = 30.0,
    backoff: float = 2.0,
    stop: StopSignal | None = None,
    timeout: float | None = None,
) -> AsyncIterator[int]:
    """:func:`watch` as an async iterator; polls run in a worker thread (the starting point is
    read when this is called, like :func:`watch`: one small blocking read)."""
    watcher = _Watcher(
        storage, Kind(kind), after, include_current, every_step, verify,
        interval, max_interval, backoff,
    )  # fmt: skip
    _check_stop(stop, timeout)
    watcher.anchor()
    return _awatch(watcher, stop, _deadline(timeout))


async def _awatch(
    watcher: _Watcher, stop: StopSignal | None, deadline: float | None
) -> AsyncIterator[int]:
    while stop is None or not stop.is_set():
        for step in await asyncio.to_thread(watcher.poll):
            yield step
        remaining = _remaining(deadline)
        if remaining is not None and remaining <= 0:
            return
        pause = watcher.delay if remaining is None else min(watcher.delay, remaining)
        if isinstance(stop, asyncio.Event):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)
        else:
            await asyncio.sleep(pause)


__all__ = ["TRANSIENT_ERRORS", "StopSignal", "awatch", "watch"]
