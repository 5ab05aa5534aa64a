"""Streaming checksums for what commitpoint writes and verifies.

CRC32C (Castagnoli) is used when a hardware-accelerated implementation is installed (``crc32c``,
the ``fast`` extra; GCS computes the same checksum server-side). Otherwise zlib's CRC32 is used. The
algorithm's name is stored next to every checksum, so a manifest is always verified with the
algorithm that wrote it.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import BinaryIO

CHUNK_SIZE = 8 * 1024 * 1024

_Update = Callable[[int, bytes | bytearray | memoryview], int]
_ALGORITHMS: dict[str, _Update] = {"crc32": lambda crc, data: zlib.crc32(data, crc)}

try:  # pragma: no branch - depends on what is installed
    import crc32c as _crc32c

    if getattr(_crc32c, "hardware_based", False):
        _ALGORITHMS["crc32c"] = lambda crc, data: _crc32c.crc32c(data, crc)
except ImportError:  # pragma: no cover - exercised on installs without the fast extra
    pass

DEFAULT_ALGORITHM = "crc32c" if "crc32c" in _ALGORITHMS else "crc32"


def available_algorithms() -> tuple[str, ...]:
    return tuple(_ALGORITHMS)


class Checksum:
    """An incremental checksum; ``update`` as bytes arrive, ``hexdigest`` at the end."""

    __slots__ = ("_update", "_value", "algorithm")

    def __init__(self, algorithm: str = DEFAULT_ALGORITHM) -> None:
        try:
            self._update = _ALGORITHMS[algorithm]
        except KeyError:
            raise ValueError(
                f"checksum algorithm {algorithm!r} is not available here "
                f"(available: {', '.join(_ALGORITHMS)}); install commitpoint[fast] for crc32c"
            ) from None
        self.algorithm = algorithm
        self._value = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._value = self._update(self._value, data)

    def hexdigest(self) -> str:
        return f"{self._value & 0xFFFFFFFF:08x}"


def checksum_stream(stream: BinaryIO, algorithm: str = DEFAULT_ALGORITHM) -> tuple[int, str]:
    """Read ``stream`` to the end; return its size and checksum."""
    checksum = Checksum(algorithm)
    size = 0
    while chunk := stream.read(CHUNK_SIZE):
        checksum.update(chunk)
        size += len(chunk)
    return size, checksum.hexdigest()
