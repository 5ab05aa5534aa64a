"""The storage protocol: byte I/O plus the pointer pair, the few operations that differ per store.

Everything above it (the monotonic compare-and-swap loop, manifests, verification, retention, the
writer lease) is built once in the core from these operations, and nothing above it reaches past
them to a store's own client. Paths given to a backend are always relative to its root and pass
through :func:`commitpoint.core.layout.safe_relpath` first. A wrapping backend (fault injection,
a replica tier) subclasses :class:`~commitpoint.storage.wrapper.StorageWrapper` and overrides only
what it changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Protocol, runtime_checkable

if TYPE_CHECKING:
    from types import TracebackType

    from commitpoint.storage.records import FileRecords

PublishGuard = Callable[[str], None]
"""Called with a file's path right before the file becomes visible; raising abandons the file."""


@dataclass(frozen=True)
class FileRecord:
    """A file of a checkpoint: path relative to the root, size, and checksum of its bytes.

    ``tracked`` is True when the checksum was computed while the bytes were written through the
    backend; False when the file was found by listing (written by code outside the backend).
    """

    path: str
    size: int
    checksum: str | None = None
    algorithm: str | None = None
    tracked: bool = True


@dataclass(frozen=True)
class FileInfo:
    """A listed file: path relative to the root, size in bytes, and when it last changed.

    ``modified`` is seconds since the epoch (None when the store does not say).
    """

    path: str
    size: int
    modified: float | None = None


@dataclass(frozen=True)
class PointerState:
    """A pointer as read from storage: its step (None if absent) and an opaque version token.

    The token is what :meth:`StorageBackend.write_pointer_if` compares against: an ETag on S3, a
    generation on GCS, content + inode + mtime on local disk.
    """

    value: int | None
    token: str | None


class TrackedWriter(Protocol):
    """A binary file being written; on a clean close it is durable and its record is kept."""

    path: str

    def write(self, data: bytes | bytearray | memoryview) -> int: ...

    def flush(self) -> None: ...

    def tell(self) -> int: ...

    def writable(self) -> bool: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...

    @property
    def closed(self) -> bool: ...

    @property
    def record(self) -> FileRecord | None: ...

    def __enter__(self) -> TrackedWriter: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


@runtime_checkable
class StorageBackend(Protocol):
    """What commitpoint needs from a store: byte I/O, the pointer pair, and two small holders.

    See :class:`~commitpoint.storage.base.FsspecStorage` for the shared fsspec base, which
    implements everything but the pointer pair.
    """

    # -- identity ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The root URL, safe to print (no credentials)."""

    @property
    def storage_options(self) -> dict[str, object]:
        """The options the backend was opened with (may hold credentials: never log them).

        ``open_storage(url, **storage_options)`` opens the same root again (Ray workers do)."""

    def url_for(self, relpath: str) -> str:
        """``relpath`` as a URL, safe to print."""

    # -- byte I/O ---------------------------------------------------------------------------
    def open_write(self, relpath: str, *, track: bool = True) -> TrackedWriter:
        """Open ``relpath`` for a streaming write that records size and checksum.

        With ``track`` the record is kept in :attr:`records` once the file is durable;
        commitpoint's own files (manifests, history) are written untracked.
        """

    def open_read(self, relpath: str) -> BinaryIO:
        """Open ``relpath`` for a streaming, seekable read."""

    def read_bytes(self, relpath: str) -> bytes: ...

    def read_small(self, relpath: str, limit: int) -> bytes:
        """A small file whole (pointer, manifest, lease, history), refused unread
        (:class:`~commitpoint.errors.UnreadableFile`) if it holds more than ``limit`` bytes or,
        on local disk, is not a regular file."""

    def write_bytes(self, relpath: str, data: bytes, *, track: bool = True) -> FileRecord: ...

    def exists(self, relpath: str) -> bool: ...

    def list_files(self, prefix: str = "") -> list[FileInfo]:
        """Every file below ``prefix`` (recursive), sorted by path, with size and mtime."""

    def list_dirs(self, prefix: str = "") -> list[str]:
        """Names of the folders directly below ``prefix``."""

    def delete(self, relpath: str, *, recursive: bool = False) -> None: ...

    # -- the pointer pair -------------------------------------------------------------------
    def read_pointer(self, name: str) -> PointerState: ...

    def write_pointer_if(self, name: str, value: int, token: str | None) -> str:
        """Write ``value`` to pointer ``name`` only if its version is still ``token``.

        ``token=None`` means "only if the pointer does not exist". Returns the new token, or
        raises :class:`~commitpoint.errors.CommitConflict` if the pointer changed.
        """

    # -- what the coordinator keeps with the backend ----------------------------------------
    @property
    def records(self) -> FileRecords:
        """Records of tracked files written through this backend, until a save takes them."""

    def set_publish_guard(self, guard: PublishGuard | None) -> None:
        """Run ``guard(relpath)`` right before each written file becomes visible (None: none).

        The coordinator uses it to stop a fenced writer from replacing files."""
