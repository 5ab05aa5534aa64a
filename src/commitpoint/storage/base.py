"""The shared fsspec implementation of everything in the storage protocol but the pointer pair.

A backend subclasses :class:`FsspecStorage`, builds its filesystem, and supplies
``read_pointer`` / ``write_pointer_if`` (the only operation whose atomicity differs per store). It
may override ``_open_raw_write`` to tune streaming uploads, ``_translate_error`` to map the
store's errors onto :class:`~commitpoint.errors.StorageError` (every call site goes through
:meth:`FsspecStorage._errors`, i.e. :func:`~commitpoint.errors.map_errors`), and
``_fs_call`` to bound (and, where the filesystem does not, retry) every filesystem call.
The raw filesystem (:attr:`FsspecStorage.fs`) is for backends and tests only: the core uses the
protocol.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar, cast

from commitpoint.core.checksum import DEFAULT_ALGORITHM, Checksum
from commitpoint.core.layout import (
    decode_pointer,
    encode_pointer,
    owner_marker,
    safe_relpath,
    step_of_path,
)
from commitpoint.errors import (
    CommitpointError,
    StorageError,
    UnreadableFile,
    describe_exception,
    map_errors,
    register_secret,
)
from commitpoint.storage.protocol import FileInfo, FileRecord, PointerState, PublishGuard
from commitpoint.storage.records import FileRecords

if TYPE_CHECKING:
    from types import TracebackType

    from fsspec import AbstractFileSystem

logger = logging.getLogger(__name__)
T = TypeVar("T")


def _split_userinfo(url: str) -> tuple[str, str | None, str]:
    """``(scheme://, userinfo or None, rest)`` of a URL.

    A secret may hold ``/`` (AWS secrets often do), so the user part is whatever comes before the
    first ``@`` when that text holds a ``:`` (``key:secret@bucket/...``), or a ``/``-free
    ``user@`` right after the scheme.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or rest.startswith("/") or "@" not in rest:
        return url if not sep else scheme + sep, None, rest if sep else ""
    before, _, after = rest.partition("@")
    if ":" in before or "/" not in before:
        return scheme + sep, before, after
    return scheme + sep, None, rest


def redact_url(url: str) -> str:
    """Drop any ``user:password@`` part of a URL so it can be logged."""
    head, userinfo, rest = _split_userinfo(url)
    if userinfo is None:
        return url
    return f"{head}***@{rest}"


class FsspecWriter:
    """A streaming write that checksums every byte and reports a :class:`FileRecord` on close."""

    def __init__(self, storage: FsspecStorage, relpath: str, raw: Any, track: bool) -> None:
        self.path = relpath
        self._track = track
        self._storage = storage
        self._raw = raw
        # A raw file that checksums what it writes (on its own thread) saves the caller the pass.
        own = getattr(raw, "checksum", None)
        self._raw_checksums = isinstance(own, Checksum)
        self._checksum = own if isinstance(own, Checksum) else Checksum(storage.checksum_algorithm)
        self._size = 0
        self._record: FileRecord | None = None
        self._closed = False
        self.failure: Exception | None = None
        """The storage error a write raised, kept for callers (like torch's zip writer) that
        replace it with an error of their own."""

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = data if isinstance(data, bytes) else memoryview(data).cast("B").toreadonly()
        try:
            with self._storage._errors("write", self.path):
                self._raw.write(view)
        except CommitpointError as exc:
            self.failure = exc
            raise
        if not self._raw_checksums:
            self._checksum.update(view)
        self._size += len(view)
        return len(view)

    def flush(self) -> None:
        self._raw.flush()

    def tell(self) -> int:
        return self._size

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def record(self) -> FileRecord | None:
        return self._record

    def close(self) -> None:
        """Finish the write durably; only then is the file's record kept."""
        if self._closed:
            return
        self._closed = True
        try:
            self._storage._before_publish(self.path)
        except BaseException:
            self._storage._abort_raw_write(self._raw, self.path)
            raise
        with self._storage._errors("write", self.path):
            self._storage._finish_raw_write(self._raw)
        self._record = FileRecord(
            self.path, self._size, self._checksum.hexdigest(), self._checksum.algorithm
        )
        if self._track:
            self._storage.records.keep(self._record)

    def abort(self) -> None:
        """Give up the write: nothing is recorded and partial data is discarded where possible."""
        if self._closed:
            return
        self._closed = True
        try:
            self._storage._abort_raw_write(self._raw, self.path)
        except Exception:
            logger.warning(
                "could not discard partial write of %s", self._storage.url_for(self.path)
            )

    def __enter__(self) -> FsspecWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class FsspecStorage:
    """Base class of backends: every protocol operation except the pointer pair."""

    checksum_algorithm: str = DEFAULT_ALGORITHM
    writer_class: type[FsspecWriter] = FsspecWriter
    """What :meth:`open_write` wraps the raw file in; a backend that checks more on close (GCS
    compares its own CRC32C) names its subclass here."""

    def __init__(self, url: str, fs: AbstractFileSystem, root: str, **storage_options: Any):
        _register_secrets(url, storage_options)
        self._url = redact_url(url.rstrip("/"))
        self._fs = fs
        self._root = root.rstrip("/")
        self._storage_options = dict(storage_options)
        self._records = FileRecords()
        self._publish_guard: PublishGuard | None = None
        self._owned_steps: set[int] = set()
        self._owned_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._url!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Backends travel to Ray workers by URL and options, never with their live clients.
        from commitpoint.storage.registry import open_storage

        return (_reopen, (open_storage, self._url, self._storage_options))

    @property
    def url(self) -> str:
        return self._url

    @property
    def fs(self) -> AbstractFileSystem:
        return self._fs

    @property
    def root(self) -> str:
        return self._root

    @property
    def storage_options(self) -> dict[str, object]:
        return dict(self._storage_options)

    @property
    def records(self) -> FileRecords:
        return self._records

    def set_publish_guard(self, guard: PublishGuard | None) -> None:
        self._publish_guard = guard

    def full_path(self, relpath: str) -> str:
        return f"{self._root}/{safe_relpath(relpath)}"

    def url_for(self, relpath: str) -> str:
        return f"{self._url}/{safe_relpath(relpath)}"

    def _relative(self, full: str) -> str:
        full = full.rstrip("/")
        stripped = cast(str, self._fs._strip_protocol(full))
        prefix = self._root + "/"
        if not stripped.startswith(prefix):
            raise StorageError("list", self._url, f"listed path {stripped!r} is outside the root")
        return stripped[len(prefix) :]

    # -- errors and bounds -------------------------------------------------------------------
    def _translate_error(self, operation: str, relpath: str, exc: BaseException) -> Exception:
        """Map a store error to a :class:`StorageError` naming the URL (backends refine this)."""
        if isinstance(exc, CommitpointError):
            return exc
        where = self.url_for(relpath) if relpath else self._url
        if isinstance(exc, TimeoutError):
            # fsspec's sync() re-raises any timeout as a bare FSTimeoutError: name the inner one
            inner = exc.__cause__ if isinstance(exc.__cause__, TimeoutError) else exc
            return StorageError(operation, where, f"no answer in time ({_describe(inner)})")
        return StorageError(operation, where, _describe(exc))

    def _errors(self, operation: str, relpath: str = "") -> contextlib.AbstractContextManager[None]:
        """The block's foreign errors become :meth:`_translate_error`'s answer (one helper)."""
        return map_errors(lambda exc: self._translate_error(operation, relpath, exc))

    def _fs_call(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call a method of :attr:`fs`; object stores bound it by their deadline here."""
        return call(*args, **kwargs)

    # -- streaming writes -------------------------------------------------------------------
    def _open_raw_write(self, full: str) -> Any:
        parent = full.rsplit("/", 1)[0]
        self._fs.makedirs(parent, exist_ok=True)
        return self._fs.open(full, "wb")

    def _before_publish(self, relpath: str) -> None:
        """Run the publish guard right before the final upload; backends that publish by rename
        call it themselves, later (see the local backend)."""
        if self._publish_guard is not None:
            self._publish_guard(relpath)

    def _finish_raw_write(self, raw: Any) -> None:
        raw.close()

    def _abort_raw_write(self, raw: Any, relpath: str) -> None:
        discard = getattr(raw, "discard", None)
        if callable(discard):
            discard()
        else:
            raw.close()
            if self._fs_call(self._fs.exists, self.full_path(relpath)):
                self._fs_call(self._fs.rm_file, self.full_path(relpath))

    def open_write(self, relpath: str, *, track: bool = True) -> FsspecWriter:
        relpath = safe_relpath(relpath)
        step = step_of_path(relpath)
        if track and step is not None:
            self._mark_owned(step)
        with self._errors("open for write", relpath):
            raw = self._open_raw_write(self.full_path(relpath))
        return self.writer_class(self, relpath, raw, track)

    def _mark_owned(self, step: int) -> None:
        """Say, once per step and process, that commitpoint writes into ``step``'s folder (see
        :func:`owner_marker`): retention only ever collects folders it wrote."""
        with self._owned_lock:
            if step in self._owned_steps:
                return
        try:
            self.write_bytes(owner_marker(step), b"", track=False)
        except Exception as exc:
            # The safe side: an unmarked folder is never collected as an orphan. The data write
            # that follows reports its own error if the store refuses it too.
            logger.warning("could not mark step %d of %s as commitpoint's: %s", step, self.url, exc)
            return
        with self._owned_lock:
            if len(self._owned_steps) >= _OWNED_STEPS_KEPT:
                self._owned_steps.clear()
            self._owned_steps.add(step)

    def write_bytes(self, relpath: str, data: bytes, *, track: bool = True) -> FileRecord:
        with self.open_write(relpath, track=track) as writer:
            writer.write(data)
        record = writer.record
        assert record is not None
        return record

    # -- reads and listing ------------------------------------------------------------------
    def open_read(self, relpath: str) -> BinaryIO:
        with self._errors("open for read", relpath):
            return cast(BinaryIO, self._fs.open(self.full_path(relpath), "rb"))

    def read_bytes(self, relpath: str) -> bytes:
        with self._errors("read", relpath):
            return cast(bytes, self._fs_call(self._fs.cat_file, self.full_path(relpath)))

    def read_small(self, relpath: str, limit: int) -> bytes:
        """The whole of a small file (pointer, manifest, lease, history), at most ``limit`` bytes.

        The one bounded read for every small file commitpoint reads: a bigger file raises
        :class:`~commitpoint.errors.UnreadableFile` without being read whole (one ranged read on
        object stores); the local backend also refuses anything but a regular file, so a FIFO or
        a device can never block or flood a reader.
        """
        relpath = safe_relpath(relpath)
        full = self.full_path(relpath)
        with self._errors("read", relpath):
            size = int(self._fs_call(self._fs.size, full) or 0)
            check_small(self.url_for(relpath), size, limit)
            # A ranged read never takes more, even if the file grew; an empty object has no
            # range to ask for (S3 and GCS answer 416).
            data = (
                bytes(self._fs_call(self._fs.cat_file, full, start=0, end=limit + 1))
                if size
                else b""
            )
        check_small(self.url_for(relpath), len(data), limit)
        return data

    def exists(self, relpath: str) -> bool:
        with self._errors("check", relpath):
            return bool(self._fs_call(self._fs.exists, self.full_path(relpath)))

    def list_files(self, prefix: str = "") -> list[FileInfo]:
        base = self.full_path(prefix) if prefix else self._root
        with self._errors("list", prefix), _absent_is_empty():
            found = self._fs_call(self._fs.find, base, detail=True)
            return sorted(
                (
                    FileInfo(
                        self._relative(path), int(info.get("size") or 0), modified_time(info)
                    )
                    for path, info in found.items()
                    if info.get("type", "file") != "directory"
                ),
                key=lambda i: i.path,
            )
        return []

    def list_dirs(self, prefix: str = "") -> list[str]:
        base = self.full_path(prefix) if prefix else self._root
        with self._errors("list", prefix), _absent_is_empty():
            entries = self._fs_call(self._fs.ls, base, detail=True)
            return self._dir_names(entries)
        return []

    def _dir_names(self, entries: list[dict[str, Any]]) -> list[str]:
        names = {
            self._relative(e["name"]).rsplit("/", 1)[-1]
            for e in entries
            if e.get("type") == "directory"
        }
        return sorted(names)

    def delete(self, relpath: str, *, recursive: bool = False) -> None:
        """Delete one file, or with ``recursive`` every file below ``relpath``.

        Every path deleted passes :meth:`_confined` (the one confinement rule): it is listed
        exactly (no glob expansion, whatever the root's name holds) and must lie under
        ``relpath`` inside the root.
        """
        relpath = safe_relpath(relpath)
        target = self.full_path(relpath)
        with self._errors("delete", relpath), _absent_is_empty():
            if not recursive:
                self._remove_file(self._confined(target, target))
                return
            self._remove_tree(target)

    def _confined(self, path: str, target: str) -> str:
        """``path`` (a path of :attr:`fs`) if it is ``target`` or lies below it, inside the root;
        anything else raises :class:`StorageError` and nothing is deleted."""
        stripped = cast(str, self._fs._strip_protocol(path)).rstrip("/")
        root = self._root + "/"
        if stripped.startswith(root) and (stripped == target or stripped.startswith(target + "/")):
            return stripped
        raise StorageError(
            "delete", self._url, f"refusing to delete {stripped!r} outside {target!r}"
        )

    def _remove_tree(self, target: str) -> None:
        """Delete every file at or below ``target``, found by listing (never by glob), each
        checked by :meth:`_confined`; then the folders left (object stores have none)."""
        listed: dict[str, Any] = self._fs_call(self._fs.find, target, withdirs=True, detail=True)
        folders = []
        for path in sorted(listed):
            if listed[path].get("type") == "directory":
                folders.append(self._confined(path, target))
            else:
                self._remove_file(self._confined(path, target))
        self._remove_folders(sorted(folders, key=len, reverse=True))

    def _remove_file(self, path: str) -> None:
        """Delete one exact path (``rm_file`` never expands globs)."""
        self._fs_call(self._fs.rm_file, path)

    def _remove_folders(self, folders: list[str]) -> None:
        """Drop emptied folders, deepest first (a no-op where folders are not stored)."""

    # -- pointers: backends provide these ---------------------------------------------------
    def read_pointer(self, name: str) -> PointerState:
        raise NotImplementedError

    def write_pointer_if(self, name: str, value: int, token: str | None) -> str:
        raise NotImplementedError

    # helpers for backends
    def _decode_pointer(self, name: str, data: bytes) -> int:
        return decode_pointer(data, self.url_for(name))

    @staticmethod
    def _encode_pointer(value: int) -> bytes:
        return encode_pointer(value)


_SECRET_OPTION_NAMES = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "session_token",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "access_token",
        "refresh_token",
        "client_secret",
        "private_key",
    }
)


def _register_secrets(url: str, options: Any) -> None:
    """Register every credential in ``url``'s user part and in ``options`` (nested too)."""
    userinfo = _split_userinfo(url)[1] if url else None
    if userinfo is not None:
        register_secret(userinfo)
        for part in userinfo.split(":", 1):
            register_secret(part)
    if isinstance(options, dict):
        for name, value in options.items():
            if isinstance(value, dict | list | tuple):
                _register_secrets("", value)
            elif str(name).lower() in _SECRET_OPTION_NAMES and value not in ("anon", "testing"):
                register_secret(value)
    elif isinstance(options, list | tuple):
        for value in options:
            _register_secrets("", value)


@contextlib.contextmanager
def _absent_is_empty() -> Iterator[None]:
    """A missing folder lists as empty and a missing file is already deleted."""
    with contextlib.suppress(FileNotFoundError):
        yield


def modified_time(info: Mapping[str, Any]) -> float | None:
    """Modification time (epoch seconds) of a listed entry, whatever the filesystem calls it."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, _dt.datetime):
            if value.tzinfo is None:
                value = value.replace(tzinfo=_dt.timezone.utc)
            return value.timestamp()
        if isinstance(value, str):
            try:
                parsed = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=_dt.timezone.utc)
            return parsed.timestamp()
    return None


_OWNED_STEPS_KEPT = 4096
"""Steps whose owner marker this process remembers writing (then it is written again)."""


def check_small(where: str, size: int, limit: int) -> None:
    """Refuse a small file of more than ``limit`` bytes (:class:`UnreadableFile`)."""
    if size > limit:
        raise UnreadableFile(where, f"holds more than {limit} bytes; refusing to read it")


def _reopen(opener: Any, url: str, options: dict[str, Any]) -> Any:
    return opener(url, **options)


def _describe(exc: BaseException) -> str:
    return describe_exception(exc)
