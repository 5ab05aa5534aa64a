"""The pieces of an object-store upload (S3 parts, GCS chunks): the buffer a piece fills, and the
request body it is sent as.

A streaming writer copies incoming bytes into a :class:`Piece` until it holds one part, then
sends it as a :class:`BufferBody`: HTTP clients (aiohttp under s3fs and gcsfs) stream such a body
in slices of the buffer itself, where given the buffer directly they would join and re-buffer the
whole part on the event-loop thread. No other copy of a part is made for the request.
"""

from __future__ import annotations

import io
import os
from typing import Any


class Piece:
    """The part or chunk being filled: a buffer that grows to one piece, then can be reused."""

    __slots__ = ("buffer", "filled")

    def __init__(self, buffer: bytearray | None = None) -> None:
        self.buffer = buffer if buffer is not None else bytearray()
        self.filled = 0

    def fill(self, view: memoryview, size: int) -> memoryview:
        """Copy from ``view`` until the piece holds ``size`` bytes; return what did not fit."""
        take = min(len(view), size - self.filled)
        if self.filled == len(self.buffer):
            self.buffer += view[:take]
        else:
            self.buffer[self.filled : self.filled + take] = view[:take]
        self.filled += take
        return view[take:]

    def data(self) -> memoryview:
        """The bytes filled so far (a view of the buffer, no copy)."""
        return memoryview(self.buffer)[: self.filled]


class BufferBody(io.BytesIO):
    """``data`` as a file the client reads from (and seeks in, to retry or sign it)."""

    SLICE = 1024 * 1024  # what one read returns at least: fewer event-loop turns per body

    def __init__(self, data: memoryview) -> None:
        super().__init__()
        self._data = data
        self._pos = 0

    def read(self, size: int | None = -1) -> Any:
        end = len(self._data)
        if size is not None and size >= 0:
            end = min(end, self._pos + max(size, self.SLICE))
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: len(self._data)}[whence]
        self._pos = max(0, min(len(self._data), base + offset))
        return self._pos

    def tell(self) -> int:
        return self._pos

    def getbuffer(self) -> memoryview:
        return memoryview(self._data)

    def getvalue(self) -> bytes:
        return bytes(self._data)

    def write(self, data: Any) -> int:
        raise io.UnsupportedOperation("a request body is read-only")
