"""A backend that sits over another one and delegates every protocol member to it.

Wrappers (the testing kit's fault injector, a replica tier) subclass :class:`StorageWrapper` and
override only the operations they change. A wrapper shares its inner backend's file records and
publish guard, so tracked writes made through it are reported exactly once. It is plugged in
through the registry's wrapper hook (``commitpoint.wrappers`` entry points): the option that
names it travels in :attr:`StorageWrapper.storage_options`, so a copy sent to a Ray worker
(pickled by URL and options) is wrapped the same way.
"""

from __future__ import annotations

from typing import Any, BinaryIO

from commitpoint.storage.protocol import (
    FileInfo,
    FileRecord,
    PointerState,
    PublishGuard,
    StorageBackend,
    TrackedWriter,
)
from commitpoint.storage.records import FileRecords


class StorageWrapper:
    """Every :class:`~commitpoint.storage.protocol.StorageBackend` member, forwarded to ``inner``.

    ``option`` is the storage option the wrapper is registered under; :meth:`wrapper_option`
    gives the value that recreates it (both are added to :attr:`storage_options`).
    """

    option: str | None = None

    def __init__(self, inner: StorageBackend) -> None:
        self._inner = inner

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._inner!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Like every backend: travels by URL and options, and is reopened (and rewrapped) there.
        from commitpoint.storage.registry import open_storage

        return (_reopen, (open_storage, self.url, self.storage_options))

    @property
    def inner(self) -> StorageBackend:
        """The wrapped backend (for checks that must bypass this wrapper)."""
        return self._inner

    def wrapper_option(self) -> object:
        """The value of :attr:`option` that wraps a reopened backend the same way."""
        return True

    # -- identity ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return self._inner.url

    @property
    def storage_options(self) -> dict[str, object]:
        options = self._inner.storage_options
        if self.option is not None:
            options[self.option] = self.wrapper_option()
        return options

    def url_for(self, relpath: str) -> str:
        return self._inner.url_for(relpath)

    # -- byte I/O ---------------------------------------------------------------------------
    def open_write(self, relpath: str, *, track: bool = True) -> TrackedWriter:
        return self._inner.open_write(relpath, track=track)

    def open_read(self, relpath: str) -> BinaryIO:
        return self._inner.open_read(relpath)

    def read_bytes(self, relpath: str) -> bytes:
        return self._inner.read_bytes(relpath)

    def read_small(self, relpath: str, limit: int) -> bytes:
        return self._inner.read_small(relpath, limit)

    def write_bytes(self, relpath: str, data: bytes, *, track: bool = True) -> FileRecord:
        """Written through :meth:`open_write`, so a wrapper that perturbs writes covers both."""
        with self.open_write(relpath, track=track) as writer:
            writer.write(data)
        record = writer.record
        assert record is not None
        return record

    def exists(self, relpath: str) -> bool:
        return self._inner.exists(relpath)

    def list_files(self, prefix: str = "") -> list[FileInfo]:
        return self._inner.list_files(prefix)

    def list_dirs(self, prefix: str = "") -> list[str]:
        return self._inner.list_dirs(prefix)

    def delete(self, relpath: str, *, recursive: bool = False) -> None:
        self._inner.delete(relpath, recursive=recursive)

    # -- the pointer pair -------------------------------------------------------------------
    def read_pointer(self, name: str) -> PointerState:
        return self._inner.read_pointer(name)

    def write_pointer_if(self, name: str, value: int, token: str | None) -> str:
        return self._inner.write_pointer_if(name, value, token)

    # -- holders ----------------------------------------------------------------------------
    @property
    def records(self) -> FileRecords:
        return self._inner.records

    def set_publish_guard(self, guard: PublishGuard | None) -> None:
        self._inner.set_publish_guard(guard)


def _reopen(opener: Any, url: str, options: dict[str, Any]) -> Any:
    return opener(url, **options)
