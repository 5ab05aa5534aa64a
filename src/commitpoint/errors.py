"""The error tree: one base, a few specific classes, messages that name step, path and cause.

Every error commitpoint raises on purpose derives from :class:`CommitpointError`, so callers can
catch one class. Messages never include credentials: paths are always given relative to, or as,
the backend's redacted URL.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

_SECRETS: set[str] = set()
_SECRETS_LOCK = threading.Lock()
_MIN_SECRET_LENGTH = 4


def register_secret(value: object) -> None:
    """Remember a credential so :func:`redact` (and every commitpoint error) hides it."""
    if isinstance(value, str) and len(value) >= _MIN_SECRET_LENGTH:
        with _SECRETS_LOCK:
            _SECRETS.add(value)


def redact(text: str) -> str:
    """``text`` with every registered credential replaced by ``***``."""
    with _SECRETS_LOCK:
        secrets = sorted(_SECRETS, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return text


class CommitpointError(Exception):
    """Base class of every error commitpoint raises deliberately.

    Its message never holds a registered credential, even when it quotes a store's own error.
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact(a) if isinstance(a, str) else a for a in args))


class InvalidArgument(CommitpointError, ValueError):
    """A caller passed a value commitpoint cannot accept (wrong type, range or form)."""


class InvalidName(InvalidArgument):
    """A save name or relative path is empty, absolute, or would escape the checkpoint root."""


class InvalidStep(InvalidArgument):
    """A global step is not a non-negative integer."""


class BackendNotFound(CommitpointError, LookupError):
    """No storage backend is registered for a URL scheme."""

    def __init__(self, scheme: str, hint: str | None = None) -> None:
        self.scheme = scheme
        message = f"no commitpoint storage backend is registered for scheme {scheme!r}"
        if hint:
            message += f"; {hint}"
        super().__init__(message)


class CommitConflict(CommitpointError):
    """A conditional pointer write lost a race: the pointer changed since it was read."""

    def __init__(self, path: str, detail: str = "") -> None:
        self.path = path
        message = f"pointer {path} changed since it was read"
        if detail:
            message += f" ({detail})"
        super().__init__(message)


class StepRegression(CommitpointError):
    """A commit asked to move a pointer to a lower step than the one it names."""

    def __init__(self, path: str, current: int, requested: int) -> None:
        self.path = path
        self.current = current
        self.requested = requested
        super().__init__(
            f"refusing to move pointer {path} back from step {current} to step {requested}; "
            "use rewind to move a pointer back on purpose"
        )


class WriterFenced(CommitpointError):
    """A newer monitor took the writer lease of this root; this monitor may no longer commit."""

    def __init__(self, root: str, own_epoch: int, current_epoch: int | None) -> None:
        self.root = root
        self.own_epoch = own_epoch
        self.current_epoch = current_epoch
        super().__init__(
            f"writer epoch {own_epoch} of {root} was superseded by epoch {current_epoch}; "
            "another monitor (a new job, or this job's monitor after a restart) now owns this "
            "checkpoint root"
        )


class MonitorRestarted(CommitpointError):
    """The monitor restarted while a step was in flight: it lost the step's bookkeeping, so the
    step is never committed. The save (or registration) that finds out fails with this error."""

    def __init__(self, step: int, seen_epoch: int, current_epoch: int) -> None:
        self.step = step
        self.seen_epoch = seen_epoch
        self.current_epoch = current_epoch
        super().__init__(
            f"step {step} began under monitor epoch {seen_epoch}, but the monitor restarted "
            f"(now epoch {current_epoch}); step {step} will not be committed"
        )


class CorruptCheckpoint(CommitpointError):
    """Something committed is unreadable, missing, or does not match its manifest."""

    def __init__(self, path: str, reason: str, problems: Sequence[str] = ()) -> None:
        self.path = path
        self.reason = reason
        self.problems = tuple(problems)
        super().__init__(f"{path}: {reason}")


class StorageError(CommitpointError, OSError):
    """A storage operation failed (after any retries the backend makes)."""

    def __init__(self, operation: str, path: str, cause: BaseException | str) -> None:
        self.operation = operation
        self.path = path
        self.cause = cause
        super().__init__(f"{operation} {path} failed: {cause}")


class SaveFailed(CommitpointError):
    """A save function raised; its step was not committed.

    ``failures`` holds every failure collected by the same :meth:`wait_all` call (this one first).
    """

    def __init__(self, step: int, name: str, cause: BaseException) -> None:
        self.step = step
        self.name = name
        self.cause = cause
        self.failures: list[SaveFailed] = [self]
        super().__init__(f"save {name!r} of step {step} failed: {type(cause).__name__}: {cause}")


class StagingFailed(CommitpointError):
    """Copying a state dict into its staging buffers failed, so none of it may be saved.

    ``tensor`` names the failing entry by its key path (e.g. ``optimizer.state.0.exp_avg``).
    """

    def __init__(self, tensor: str, cause: BaseException) -> None:
        self.tensor = tensor
        self.cause = cause
        super().__init__(f"staging tensor {tensor!r} failed: {type(cause).__name__}: {cause}")


class StagingTimeout(CommitpointError, TimeoutError):
    """Staging waited longer than allowed: for a free snapshot slot, or for a copy to finish."""
