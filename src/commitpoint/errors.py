"""The error tree: one base, a few groups, messages that name step, path and cause.

Every error commitpoint raises on purpose derives from :class:`CommitpointError`::

    CommitpointError
    ├── InvalidArgument (ValueError)        a value commitpoint cannot accept
    │   ├── InvalidName
    │   └── InvalidStep
    ├── BackendNotFound (LookupError)       no backend for a URL scheme
    ├── NotFound (LookupError)              a step or file that does not exist
    │   └── MonitorNotFound                 no monitor actor runs under that name
    ├── Refused                             refused to keep an invariant; nothing was written
    │   ├── CommitConflict                  a pointer changed since it was read
    │   │   ├── ForeignPointer              another writer moved a pointer past this step
    │   │   └── UnexpectedStep              it does not name the step the caller expected
    │   ├── StepRegression                  a pointer would move back
    │   ├── WriterFenced                    a newer monitor owns the root
    │   ├── MonitorRestarted                the monitor lost the step's bookkeeping
    │   ├── DuplicateWrite                  two saves of one step wrote the same file
    │   └── SaveQueueFull                   too many saves of one name are queued
    ├── CorruptCheckpoint                   committed data does not match its manifest
    │   └── UnreadableFile                  a small file that is not a regular file, or too big
    ├── StorageError (OSError)              a store operation failed after retries
    │   ├── StoragePermissionError (PermissionError)
    │   ├── StorageNotFound (FileNotFoundError)   the bucket itself does not exist
    │   └── UploadFailed                    an upload cannot go on
    ├── SaveFailed                          a save function raised
    ├── StagingError                        copying a state dict for a save failed
    │   ├── StagingFailed
    │   └── StagingTimeout (TimeoutError)
    └── SlotTimeout (TimeoutError)          no save slot within the timeout

Every error survives a pickle round trip (Ray carries them between processes). Messages never
include credentials: paths are always given relative to, or as, the backend's redacted URL.
:func:`map_errors` is the one place foreign exceptions become commitpoint errors, and
:func:`describe_exception` the one place any exception becomes text for a failure record (it
cannot fail, whatever the exception's ``__str__`` does).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

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


class RedactingFilter(logging.Filter):
    """A logging filter that replaces every registered credential in a record with ``***``.

    The CLI puts it on its handler; :func:`protect_loggers` puts it on a library's loggers
    (botocore logs signed request headers at DEBUG). Add it to your own handlers to cover every
    logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        with _SECRETS_LOCK:
            if not _SECRETS:
                return True
        try:
            message = record.getMessage()
        except Exception:
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None:
            import traceback

            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)))
            record.exc_info = None
        return True


_FILTER = RedactingFilter()


def protect_loggers(prefixes: Sequence[str]) -> None:
    """Put :class:`RedactingFilter` on the loggers named ``prefixes`` and every child of them
    that exists now (a library's modules create theirs when imported)."""
    manager = logging.Logger.manager
    names = [n for n in list(manager.loggerDict) if any(_within(n, p) for p in prefixes)]
    for name in {*prefixes, *names}:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


DESCRIPTION_LIMIT = 2000
"""Characters of an exception's text kept in a failure record (the rest is cut)."""


def safe_repr(value: object, limit: int = 200) -> str:
    """``repr(value)`` for a message, cut to ``limit`` characters; never raises (a huge int or a
    failing ``__repr__`` gives a placeholder)."""
    try:
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
            text = f"<int of {value.bit_length()} bits>"
        else:
            text = repr(value)
            if not isinstance(text, str):
                raise TypeError("__repr__ returned a non-str")
    except BaseException:  # a description must never fail
        text = f"<unprintable {_type_name(value)}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(value: object) -> str:
    try:
        return str(type(value).__name__)
    except BaseException:  # a description must never fail
        return "object"


def _exception_text(exc: BaseException) -> str:
    try:
        text = str(exc)
        if not isinstance(text, str):
            raise TypeError("__str__ returned a non-str")
    except BaseException:  # a description must never fail
        try:
            text = repr(exc)
            if not isinstance(text, str):
                raise TypeError("__repr__ returned a non-str") from None
        except BaseException:  # a description must never fail
            text = "<exception text unavailable: its __str__ and __repr__ raised>"
    if len(text) > DESCRIPTION_LIMIT:
        text = text[:DESCRIPTION_LIMIT] + f"... ({len(text) - DESCRIPTION_LIMIT} more characters)"
    return text


def describe_exception(exc: BaseException) -> str:
    """``"TypeName: message"`` for any exception, redacted and cut to a bounded length.

    The one exception-to-text path of every failure report: it never raises, whatever the
    exception holds (a ``__str__`` that raises or returns a non-str, a huge int, a message of
    gigabytes), so reporting a failure cannot itself fail.
    """
    name = _type_name(exc)
    text = _exception_text(exc)
    described = f"{name}: {text}" if text and name not in text else (text or name)
    try:
        return redact(described)
    except BaseException:  # a description must never fail
        return name


class CommitpointError(Exception):
    """Base class of every error commitpoint raises deliberately.

    Its message never holds a registered credential, even when it quotes a store's own error.
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact(a) if isinstance(a, str) else a for a in args))

    def __reduce__(self) -> tuple[Any, ...]:
        # Subclasses take their own constructor arguments; rebuild from the message and the
        # attributes instead, so every error crosses process boundaries intact. An attribute
        # that cannot be pickled travels as its description; one that refers back to this error
        # (SaveFailed.failures) travels without it.
        if id(self) in _REDUCING.ids:
            return (_rebuild, (type(self), self.args, {}))
        _REDUCING.ids.add(id(self))
        try:
            state = {k: _portable(v) for k, v in self.__dict__.items()}
        finally:
            _REDUCING.ids.discard(id(self))
        return (_rebuild, (type(self), self.args, state))


class _Reducing(threading.local):
    def __init__(self) -> None:
        self.ids: set[int] = set()


_REDUCING = _Reducing()


def _portable(value: object) -> object:
    import pickle

    try:
        pickle.dumps(value)
    except Exception:
        if isinstance(value, BaseException):
            return RuntimeError(describe_exception(value))
        return redact(safe_repr(value, DESCRIPTION_LIMIT))
    return value


def _rebuild(cls: type[CommitpointError], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


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


class NotFound(CommitpointError, LookupError):
    """A step, file or pointer that was asked for does not exist (nothing is corrupt)."""


class MonitorNotFound(NotFound):
    """No monitor actor of that name runs in the namespace (a look-up without creation args)."""

    def __init__(self, name: str, namespace: str | None) -> None:
        self.name = name
        self.namespace = namespace
        super().__init__(
            f"no monitor actor {name!r} runs in Ray namespace {namespace!r}; create it first with "
            "CheckpointMonitor.get_actor(namespace, storage_url) or default_local_dir=..."
        )


class Refused(CommitpointError):
    """commitpoint refused an operation to keep one of its invariants; nothing was written."""


class CommitConflict(Refused):
    """A conditional pointer write lost a race: the pointer changed since it was read."""

    def __init__(self, path: str, detail: str = "") -> None:
        self.path = path
        message = f"pointer {path} changed since it was read"
        if detail:
            message += f" ({detail})"
        super().__init__(message)


class ForeignPointer(CommitConflict):
    """A pointer names a later step that this monitor never committed: another writer (verl's
    own tracker write, a second job) moved it. The commit fails instead of being skipped."""

    def __init__(self, path: str, step: int, current: int, known: int | None) -> None:
        self.step = step
        self.current = current
        self.known = known
        super().__init__(
            path,
            f"it names step {current}, which this monitor never committed (it last committed "
            f"{known}); step {step} is not committed over another writer's pointer",
        )


class UnexpectedStep(CommitConflict):
    """A pointer does not name the step the caller said it would (rewind's ``expected_current``,
    ``commitpoint rewind --expect``); nothing was moved."""

    def __init__(self, path: str, kind: str, expected: int, current: int | None) -> None:
        self.path = path
        self.kind = kind
        self.expected = expected
        self.current = current
        named = "nothing" if current is None else f"step {current}"
        Refused.__init__(
            self,
            f"the {kind} pointer names {named}, not step {expected} as expected; nothing was "
            f"moved ({path})",
        )


class StepRegression(Refused):
    """A commit asked to move a pointer to a lower step than the one it names."""

    def __init__(self, path: str, current: int, requested: int) -> None:
        self.path = path
        self.current = current
        self.requested = requested
        super().__init__(
            f"refusing to move pointer {path} back from step {current} to step {requested}; "
            "use rewind to move a pointer back on purpose"
        )


class WriterFenced(Refused):
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


class MonitorRestarted(Refused):
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


class UnreadableFile(CorruptCheckpoint):
    """A small file commitpoint reads (pointer, manifest, lease, history) is not a regular file
    (a FIFO, a device, a folder) or is larger than such a file can be; it was not read."""


class DuplicateWrite(Refused):
    """Two saves of one step wrote the same file: the second is refused before its bytes become
    visible, so the file and the record the manifest keeps cannot disagree."""

    def __init__(self, path: str, owner: str, name: str) -> None:
        self.path = path
        self.owner = owner
        self.name = name
        super().__init__(
            f"{path} was already written for this step by save {owner!r}; save {name!r} may "
            "not replace it (give each save its own files)"
        )


class SaveQueueFull(Refused):
    """``save_async(..., block=False)`` found the most saves of that name already queued."""

    def __init__(self, name: str, depth: int) -> None:
        self.name = name
        self.depth = depth
        super().__init__(
            f"{depth} saves of {name!r} are already queued behind the running one; wait_all(), "
            "or raise max_queued"
        )


class StorageError(CommitpointError, OSError):
    """A storage operation failed (after any retries the backend makes)."""

    def __init__(self, operation: str, path: str, cause: BaseException | str) -> None:
        self.operation = operation
        self.path = path
        self.cause = cause
        shown = cause if isinstance(cause, str) else _exception_text(cause)
        super().__init__(f"{operation} {path} failed: {shown}")


class StoragePermissionError(StorageError, PermissionError):
    """The store refused the request: bad or expired credentials, or no permission (401/403).

    Also a :class:`PermissionError`, so ``except PermissionError`` catches it on every backend;
    ``code`` is the store's own error code (e.g. S3's ``AccessDenied``), ``status`` the HTTP
    status.
    """

    def __init__(
        self,
        operation: str,
        path: str,
        cause: BaseException | str,
        *,
        code: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(operation, path, cause)
        self.code = code
        self.status = status


class StorageNotFound(StorageError, FileNotFoundError):
    """The store itself (a bucket) does not exist: a definite answer, so it is never retried."""


class UploadFailed(StorageError):
    """An upload cannot go on (too many parts, or an earlier part failed)."""

    def __init__(self, path: str, cause: BaseException | str) -> None:
        super().__init__("upload", path, cause)


class SaveFailed(CommitpointError):
    """A save function raised; its step was not committed.

    ``failures`` holds every failure collected by the same :meth:`wait_all` call (this one first).
    """

    def __init__(self, step: int, name: str, cause: BaseException) -> None:
        self.step = step
        self.name = name
        self.cause = cause
        self.failures: list[SaveFailed] = [self]
        super().__init__(_failure_message(step, name, cause))

    @classmethod
    def like_cause(cls, step: int, name: str, cause: BaseException) -> SaveFailed:
        """A SaveFailed that is also an instance of ``type(cause)``.

        ``except SaveFailed`` and ``except <the save function's own exception type>`` both catch
        it; ``step``, ``name`` and ``cause`` are attached, and the cause's own attributes are
        copied (``errno`` of an OSError, the fields of a custom error). A plain SaveFailed when
        the two classes cannot be combined (incompatible C layouts).
        """
        combined = _combined_failure_class(type(cause))
        if combined is None:
            return cls(step, name, cause)
        # Neither class's __init__ runs: the cause's would take the message for its own fields.
        error: SaveFailed = combined.__new__(combined)
        for attr, value in vars(cause).items():
            setattr(error, attr, value)
        if isinstance(cause, OSError):
            for attr in ("errno", "strerror", "filename", "filename2"):
                setattr(error, attr, getattr(cause, attr))
        error.step, error.name, error.cause = step, name, cause
        error.failures = [error]
        error.args = (redact(_failure_message(step, name, cause)),)
        error.__cause__ = cause
        return error


def _failure_message(step: int, name: str, cause: BaseException) -> str:
    return f"save {safe_repr(name)} of step {step} failed: {describe_exception(cause)}"


_COMBINED: dict[type[BaseException], type[SaveFailed] | None] = {}
_COMBINED_LOCK = threading.Lock()


def _combined_failure_class(cause_type: type[BaseException]) -> type[SaveFailed] | None:
    if issubclass(cause_type, SaveFailed):
        return None
    with _COMBINED_LOCK:
        if cause_type not in _COMBINED:
            try:
                _COMBINED[cause_type] = type(
                    f"SaveFailed[{cause_type.__name__}]",
                    (SaveFailed, cause_type),
                    {
                        "__module__": __name__,
                        "__str__": lambda self: BaseException.__str__(self),
                        "__reduce__": _reduce_combined,
                    },
                )
            except TypeError:  # layout conflict, or a class that cannot be subclassed
                _COMBINED[cause_type] = None
        return _COMBINED[cause_type]


def _reduce_combined(self: SaveFailed) -> tuple[Any, ...]:
    # The combined class is made at run time: rebuild it from the cause on the other side.
    return (_rebuild_combined, (self.step, self.name, _portable(self.cause)))


def _rebuild_combined(step: int, name: str, cause: BaseException) -> SaveFailed:
    return SaveFailed.like_cause(step, name, cause)


class StagingError(CommitpointError):
    """Copying a state dict into staging buffers did not give a usable snapshot."""


class StagingFailed(StagingError):
    """Copying a state dict into its staging buffers failed, so none of it may be saved.

    ``tensor`` names the failing entry by its key path (e.g. ``optimizer.state.0.exp_avg``).
    """

    def __init__(self, tensor: str, cause: BaseException) -> None:
        self.tensor = tensor
        self.cause = cause
        super().__init__(f"staging tensor {safe_repr(tensor)} failed: {describe_exception(cause)}")


class StagingTimeout(StagingError, TimeoutError):
    """Staging waited longer than allowed: for a free snapshot slot, or for a copy to finish."""


class SlotTimeout(CommitpointError, TimeoutError):
    """No save slot became free within the timeout (the save strategy limits writers)."""

    def __init__(self, strategy: str, timeout: float | None) -> None:
        self.strategy = strategy
        self.timeout = timeout
        super().__init__(f"no save slot within {timeout} s ({strategy})")


Translate = Callable[[BaseException], BaseException]


@contextlib.contextmanager
def map_errors(translate: Translate) -> Iterator[None]:
    """Turn any non-commitpoint exception raised inside the block into ``translate(exc)``.

    commitpoint's own errors pass through unchanged; the original stays chained as the cause.
    This is the one place foreign errors are mapped (backends supply ``translate``).
    """
    try:
        yield
    except CommitpointError:
        raise
    except Exception as exc:
        raise translate(exc) from exc
