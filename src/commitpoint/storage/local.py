"""Local-disk backend (``file://`` URLs and plain paths).

Pointer commit is an atomic rename: the new value goes to a temporary file in the same folder, is
fsynced, replaces the pointer with ``os.replace``, and the folder is fsynced so the rename itself
survives a power cut. Writers on one host are serialised by an ``flock`` on a lock file, under
which the version token (content + inode + mtime) is re-checked before the rename.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import shutil
import stat as _stat
from collections.abc import Iterator
from typing import Any, BinaryIO

from fsspec.implementations.local import LocalFileSystem

from commitpoint.core.checksum import Checksum
from commitpoint.core.layout import META_DIR, POINTER_LIMIT, safe_relpath
from commitpoint.errors import (
    CommitConflict,
    InvalidArgument,
    StorageError,
    UnreadableFile,
    safe_repr,
)
from commitpoint.storage.base import FsspecStorage, check_small
from commitpoint.storage.direct_io import DirectFile, fsync_dir
from commitpoint.storage.options import refuse_unknown
from commitpoint.storage.protocol import PointerState

_LOCAL_OPTIONS = frozenset({"auto_mkdir"})
_TRUE: tuple[object, ...] = (True, "true", "True", "1", 1)
_FALSE: tuple[object, ...] = (False, "false", "False", "0", 0)


class LocalBackend(FsspecStorage):
    """Checkpoints in a local (or network-mounted POSIX) folder."""

    def __init__(self, url: str, *, direct_io: bool = True, **storage_options: Any) -> None:
        """``direct_io`` writes large files with pipelined ``O_DIRECT`` (see direct_io.py)."""
        refuse_unknown("local", storage_options, _LOCAL_OPTIONS, ("direct_io",))
        if direct_io not in _TRUE + _FALSE:
            raise InvalidArgument(
                f"local storage option direct_io must be true or false, got {safe_repr(direct_io)}"
            )
        self._direct_io = direct_io not in _FALSE
        path = url.split("://", 1)[1] if "://" in url else url
        if url.startswith("local://"):
            url = "file://" + path
        root = os.path.abspath(os.path.expanduser(path))
        fs = LocalFileSystem(**storage_options)
        display = url if "://" in url else root
        super().__init__(display, fs, root, direct_io=self._direct_io, **storage_options)

    def _translate_error(self, operation: str, relpath: str, exc: BaseException) -> Exception:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            cause = "no space left on device"
        elif isinstance(exc, PermissionError):
            cause = "permission denied"
        elif isinstance(exc, OSError) and exc.errno == errno.EROFS:
            cause = "read-only file system"
        else:
            return super()._translate_error(operation, relpath, exc)
        where = self.url_for(relpath) if relpath else self.url
        return StorageError(operation, where, cause)

    def _open_raw_write(self, full: str) -> Any:
        os.makedirs(os.path.dirname(full), exist_ok=True)
        guard = self._publish_guard
        relpath = self._relative(full)
        before_publish = None if guard is None else (lambda: guard(relpath))
        return DirectFile(
            full,
            direct=self._direct_io,
            before_publish=before_publish,
            checksum=Checksum(self.checksum_algorithm),
        )

    def _before_publish(self, relpath: str) -> None:
        """The guard runs inside :class:`DirectFile`, just before its rename."""

    # -- reads: regular files only ----------------------------------------------------------
    def _open_regular(self, path: str, where: str) -> int:
        """A read-only descriptor of ``path``, refused unless it is a regular file.

        ``O_NONBLOCK`` makes opening a FIFO return at once instead of waiting for a writer; the
        flag is cleared again before any read.
        """
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            mode = os.fstat(fd).st_mode
            if _stat.S_ISDIR(mode):
                raise IsADirectoryError(errno.EISDIR, "Is a directory", path)
            if not _stat.S_ISREG(mode):
                raise UnreadableFile(where, "is not a regular file; refusing to read it")
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _read_regular(self, path: str, where: str, limit: int) -> tuple[bytes, os.stat_result]:
        """At most ``limit`` bytes of a regular file, and its stat (the bounded read)."""
        fd = self._open_regular(path, where)
        try:
            stat = os.fstat(fd)
            check_small(where, stat.st_size, limit)
            chunks = []
            remaining = limit + 1
            while remaining > 0:
                chunk = os.read(fd, remaining)
                if not chunk:
                    break
                chunks.append(chunk)
                remaining -= len(chunk)
        finally:
            os.close(fd)
        data = b"".join(chunks)
        check_small(where, len(data), limit)
        return data, stat

    def read_small(self, relpath: str, limit: int) -> bytes:
        relpath = safe_relpath(relpath)
        try:
            return self._read_regular(self.full_path(relpath), self.url_for(relpath), limit)[0]
        except (UnreadableFile, StorageError):
            raise
        except OSError as exc:
            raise self._translate_error("read", relpath, exc) from exc

    def open_read(self, relpath: str) -> BinaryIO:
        relpath = safe_relpath(relpath)
        try:
            fd = self._open_regular(self.full_path(relpath), self.url_for(relpath))
        except (UnreadableFile, StorageError):
            raise
        except OSError as exc:
            raise self._translate_error("open for read", relpath, exc) from exc
        return os.fdopen(fd, "rb")

    # -- deletes ----------------------------------------------------------------------------
    def _remove_tree(self, target: str) -> None:
        """``rmtree`` of the exact folder: no globs, and symlinks are removed, never followed."""
        path = self._confined(target, target)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)

    # -- pointers ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _pointer_lock(self, name: str) -> Iterator[None]:
        lock_dir = os.path.join(self.root, META_DIR, "locks")
        os.makedirs(lock_dir, exist_ok=True)
        lock_path = os.path.join(lock_dir, name.replace("/", "__") + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read_raw(self, name: str) -> tuple[bytes, str] | None:
        """Pointer bytes and their token (inode + mtime + content), or None if absent."""
        try:
            data, stat = self._read_regular(self.full_path(name), self.url_for(name), POINTER_LIMIT)
        except FileNotFoundError:
            return None
        return data, f"{stat.st_ino}:{stat.st_mtime_ns}:{data.hex()}"

    def read_pointer(self, name: str) -> PointerState:
        with self._errors("read pointer", name):
            raw = self._read_raw(name)
        if raw is None:
            return PointerState(None, None)
        return PointerState(self._decode_pointer(name, raw[0]), raw[1])

    def write_pointer_if(self, name: str, value: int, token: str | None) -> str:
        name = safe_relpath(name)
        path = self.full_path(name)
        directory = os.path.dirname(path)
        with self._errors("commit pointer", name):
            os.makedirs(directory, exist_ok=True)
            with self._pointer_lock(name):
                current = self._current_token(name)
                if current != token:
                    raise CommitConflict(self.url_for(name))
                tmp = os.path.join(
                    directory, f".{os.path.basename(path)}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
                )
                try:
                    with open(tmp, "wb") as f:
                        f.write(self._encode_pointer(value))
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, path)
                except BaseException:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
                    raise
                fsync_dir(directory)
                new_token = self._current_token(name)
        assert new_token is not None
        return new_token

    def _current_token(self, name: str) -> str | None:
        """The token of the pointer as it is now, tolerating unparsable content."""
        raw = self._read_raw(name)
        return None if raw is None else raw[1]
