"""In-memory backend (``memory://``) for fast tests of pure logic.

It wraps fsspec's process-global memory filesystem, so every instance in one process sees the same
files. Pointer commits are serialised by a process lock and versioned by a generation counter.
"""

from __future__ import annotations

import io
import threading
from typing import Any, ClassVar

from fsspec.implementations.memory import MemoryFileSystem

from commitpoint.core.layout import POINTER_LIMIT, safe_relpath
from commitpoint.errors import CommitConflict
from commitpoint.storage.base import FsspecStorage, check_small
from commitpoint.storage.options import refuse_unknown
from commitpoint.storage.protocol import PointerState


class _BufferedWrite:
    """Bytes held aside until a clean close publishes them in one step, like a rename or a
    completed upload (fsspec's memory file is visible, and replaces the old one, from open)."""

    def __init__(self, fs: MemoryFileSystem, path: str) -> None:
        self._fs = fs
        self._path = path
        self._buffer = io.BytesIO()

    def write(self, data: Any) -> int:
        return self._buffer.write(data)

    def flush(self) -> None:
        """Nothing to flush before the close publishes."""

    def close(self) -> None:
        self._fs.pipe_file(self._path, self._buffer.getvalue())

    def discard(self) -> None:
        self._buffer = io.BytesIO()


class MemoryBackend(FsspecStorage):
    """Checkpoints in this process's memory; gone when the process exits."""

    _lock: ClassVar[threading.Lock] = threading.Lock()
    _generations: ClassVar[dict[str, int]] = {}

    def __init__(self, url: str, **storage_options: Any) -> None:
        refuse_unknown("memory", storage_options, (), ())
        fs = MemoryFileSystem(**storage_options)
        path = url.split("://", 1)[1] if "://" in url else url
        root = "/" + path.strip("/")
        super().__init__("memory://" + path.strip("/"), fs, root, **storage_options)

    def _open_raw_write(self, full: str) -> Any:
        return _BufferedWrite(self.fs, full)

    def _remove_folders(self, folders: list[str]) -> None:
        for folder in folders:
            if folder in self.fs.pseudo_dirs:
                self.fs.pseudo_dirs.remove(folder)

    def _abort_raw_write(self, raw: Any, relpath: str) -> None:
        # Nothing was published: the bytes were held aside (and an older file stays as it was).
        raw.discard()

    def _state(self, name: str) -> tuple[bytes | None, str | None]:
        path = self.full_path(name)
        try:
            data = self.fs.cat_file(path, start=0, end=POINTER_LIMIT + 1)
        except FileNotFoundError:
            return None, None
        check_small(self.url_for(name), len(data), POINTER_LIMIT)
        return data, str(self._generations.get(path, 0))

    def read_pointer(self, name: str) -> PointerState:
        with self._lock:
            data, token = self._state(name)
        if data is None:
            return PointerState(None, None)
        return PointerState(self._decode_pointer(name, data), token)

    def write_pointer_if(self, name: str, value: int, token: str | None) -> str:
        name = safe_relpath(name)
        path = self.full_path(name)
        with self._lock:
            _, current = self._state(name)
            if current != token:
                raise CommitConflict(self.url_for(name))
            generation = self._generations.get(path, 0) + 1
            self.fs.pipe_file(path, self._encode_pointer(value))
            self._generations[path] = generation
        return str(generation)
