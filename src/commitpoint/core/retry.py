"""One retry loop with backoff and an overall deadline, for every operation that may be retried.

Callers name what they retry (``retry_on``: exception types, or a predicate) and give a
:class:`RetryPolicy`; the loop sleeps with exponential backoff and jitter between tries, logs each
retry, and stops at whichever comes first: the last attempt or the deadline. The last error is
raised unchanged. A synchronous and an asynchronous form share the policy and the decisions; the
asynchronous form also cancels a try still running at the deadline (a store that accepts a
connection and never answers) and raises :class:`DeadlineExceeded`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from commitpoint.errors import InvalidArgument

logger = logging.getLogger(__name__)
T = TypeVar("T")

RetryOn = tuple[type[BaseException], ...] | Callable[[BaseException], bool]


class DeadlineExceeded(TimeoutError):
    """A retried operation was still running when its policy's deadline passed."""

    def __init__(self, what: str, deadline: float, attempt: int) -> None:
        self.what = what
        self.deadline = deadline
        self.attempt = attempt
        super().__init__(f"{what}: no answer within the {deadline:g} s deadline (try {attempt})")

    def __reduce__(self) -> tuple[object, ...]:
        return (DeadlineExceeded, (self.what, self.deadline, self.attempt))


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry.

    ``attempts`` counts every try (1 = no retry). The pause before retry ``n`` (from 1) is about
    ``base_delay * 2**(n-1)``, at most ``max_delay``, times a jitter factor in [0.5, 1.5)
    (``full_jitter``: in [0, 1) instead). ``deadline`` (seconds, None for none) bounds the whole
    operation: no retry starts after it, and no pause runs past it.
    """

    attempts: int = 4
    base_delay: float = 0.05
    max_delay: float = 2.0
    deadline: float | None = None
    full_jitter: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or isinstance(self.attempts, bool):
            raise InvalidArgument(f"attempts must be an int, got {self.attempts!r}")
        if self.attempts < 1:
            raise InvalidArgument(f"attempts must be at least 1, got {self.attempts}")
        for name in ("base_delay", "max_delay"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise InvalidArgument(f"{name} must be a finite number >= 0, got {value!r}")
        if self.deadline is not None and (
            not isinstance(self.deadline, int | float)
            or not math.isfinite(self.deadline)
            or self.deadline <= 0
        ):
            raise InvalidArgument(f"deadline must be a finite number > 0, got {self.deadline!r}")

    def delay(self, retry_number: int) -> float:
        """The pause before retry ``retry_number`` (from 1), jitter included."""
        pause = min(self.max_delay, self.base_delay * 2.0 ** (retry_number - 1))
        return pause * (random.random() if self.full_jitter else 0.5 + random.random())


def _should_retry(exc: BaseException, retry_on: RetryOn) -> bool:
    if isinstance(retry_on, tuple):
        return isinstance(exc, retry_on)
    return bool(retry_on(exc))


def _next_pause(
    policy: RetryPolicy, attempt: int, started: float, exc: BaseException, retry_on: RetryOn
) -> float | None:
    """The pause before the next try, or None when ``exc`` must be raised now."""
    if attempt >= policy.attempts or not _should_retry(exc, retry_on):
        return None
    pause = policy.delay(attempt)
    if policy.deadline is not None:
        left = policy.deadline - (time.monotonic() - started)
        if left <= 0:
            return None
        pause = min(pause, left)
    return pause


def _log(
    what: str, attempt: int, policy: RetryPolicy, pause: float, exc: BaseException, level: int
) -> None:
    logger.log(
        level,
        "%s failed (try %d of %d), retrying in %.2f s: %s",
        what,
        attempt,
        policy.attempts,
        pause,
        exc,
    )


def retry(
    operation: Callable[[], T],
    policy: RetryPolicy,
    *,
    retry_on: RetryOn,
    what: str = "operation",
    log_level: int = logging.WARNING,
) -> T:
    """Run ``operation()`` until it succeeds, retrying what ``retry_on`` accepts.

    Each retry is logged at ``log_level`` (expected races, like a lost compare-and-swap, use
    DEBUG)."""
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return operation()
        except Exception as exc:
            pause = _next_pause(policy, attempt, started, exc, retry_on)
            if pause is None:
                raise
            _log(what, attempt, policy, pause, exc, log_level)
            time.sleep(pause)


async def aretry(
    operation: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    retry_on: RetryOn,
    what: str = "operation",
    log_level: int = logging.WARNING,
) -> T:
    """:func:`retry` for a coroutine factory (one new awaitable per try).

    With a deadline, a try still running when it passes is cancelled: :class:`DeadlineExceeded`.
    """
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            if policy.deadline is None:
                return await operation()
            left = policy.deadline - (time.monotonic() - started)
            try:
                return await asyncio.wait_for(operation(), max(left, 0.0))
            except (TimeoutError, asyncio.TimeoutError) as exc:
                if time.monotonic() - started < policy.deadline:
                    raise  # the operation's own timeout, retried like any other error
                raise DeadlineExceeded(what, policy.deadline, attempt) from exc
        except DeadlineExceeded:
            raise
        except Exception as exc:
            pause = _next_pause(policy, attempt, started, exc, retry_on)
            if pause is None:
                raise
            _log(what, attempt, policy, pause, exc, log_level)
            await asyncio.sleep(pause)
