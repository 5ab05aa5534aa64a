"""Save and load torch objects through a storage backend (torch is imported only when used).

Saves stream through the backend's tracked writer, so the manifest gets their checksums. Loads
use ``weights_only=True`` by default: a checkpoint can never run arbitrary code on the reader.

torch's zip format computes a CRC32 of every record on the saving thread, at about 1.5 GB/s: on a
fast disk that, not the disk, sets the pace of a save. commitpoint already checksums every byte
(CRC32C, several times faster, off the serialising thread) and verifies it on load, so
:func:`save_torch` turns torch's CRC32 off for its own saves. torch only has a process-wide switch
for it, read once when the zip writer is created; it is turned off just for that moment (until
the first byte is written) and then put back, so other code's ``torch.save`` calls are unaffected
but for that window of a few milliseconds. ``torch.load`` reads such files as usual.
"""

from __future__ import annotations

import threading
from typing import Any

from commitpoint.core.layout import safe_relpath
from commitpoint.storage.protocol import StorageBackend


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "saving and loading tensors needs PyTorch: `pip install torch`, or commitpoint with "
            "its torch extra from the repository (`pip install './[torch]'`)"
        ) from exc
    return torch


class _ZipCrc32Window:
    """Keeps torch's zip CRC32 switched off while at least one save is creating its zip writer.

    The switch is process-wide, so concurrent saves share it: the first to open the window turns
    it off, the last to close it puts back whatever was there before.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = 0
        self._saved: bool | None = None

    def open(self) -> bool:
        """Turn the CRC off; False when this torch has no switch for it (nothing to close)."""
        serialization = _torch().serialization
        if not hasattr(serialization, "set_crc32_options"):
            return False
        with self._lock:
            if self._open == 0:
                self._saved = bool(serialization.get_crc32_options())
                serialization.set_crc32_options(False)
            self._open += 1
        return True

    def close(self) -> None:
        with self._lock:
            self._open -= 1
            if self._open == 0 and self._saved is not None:
                _torch().serialization.set_crc32_options(self._saved)
                self._saved = None


_ZIP_CRC32 = _ZipCrc32Window()


class _FirstWriteCloses:
    """The storage writer as torch sees it; the first write (torch's zip writer exists by then)
    closes the CRC window, and so does the end of the save if nothing was written."""

    __slots__ = ("_window_open", "_writer")

    def __init__(self, writer: Any, window_open: bool) -> None:
        self._writer = writer
        self._window_open = window_open

    def close_window(self) -> None:
        if self._window_open:
            self._window_open = False
            _ZIP_CRC32.close()

    def write(self, data: Any) -> int:
        self.close_window()
        written: int = self._writer.write(data)
        return written

    def flush(self) -> None:
        self._writer.flush()


def save_torch(
    storage: StorageBackend, relpath: str, obj: object, *, zip_crc32: bool = False
) -> None:
    """``torch.save(obj)`` streamed to ``relpath`` under the storage root.

    ``zip_crc32=True`` keeps torch's own per-record CRC32 (for tools that unzip the file and
    check it); commitpoint's checksum covers the whole file either way.
    """
    torch = _torch()
    with storage.open_write(safe_relpath(relpath)) as writer:
        sink = _FirstWriteCloses(writer, window_open=not zip_crc32 and _ZIP_CRC32.open())
        try:
            torch.save(obj, sink)
        except Exception as exc:
            # torch's zip writer reports a failed write as its own RuntimeError; surface the
            # storage error that caused it (bucket, key and cause) instead.
            failure = getattr(writer, "failure", None)
            if isinstance(failure, Exception) and failure is not exc:
                raise failure from exc
            raise
        finally:
            sink.close_window()


def load_torch(
    storage: StorageBackend,
    relpath: str,
    *,
    map_location: Any = "cpu",
    weights_only: bool = True,
) -> Any:
    """``torch.load`` of ``relpath`` (tensors, plain containers and numbers only by default)."""
    torch = _torch()
    with storage.open_read(safe_relpath(relpath)) as stream:
        return torch.load(stream, map_location=map_location, weights_only=weights_only)


def load_torch_bytes(data: bytes, *, map_location: Any = "cpu", weights_only: bool = True) -> Any:
    """``torch.load`` of bytes already read (and verified) in memory."""
    import io

    return _torch().load(io.BytesIO(data), map_location=map_location, weights_only=weights_only)
