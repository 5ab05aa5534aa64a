"""Streaming checksums for what commitpoint writes and verifies.

Every install can verify every checkpoint: CRC32C (Castagnoli, what GCS computes server-side) comes
from the ``crc32c`` package, a core dependency (hardware-accelerated where the CPU has the
instruction, its own C table code otherwise); where that package cannot be imported (no wheel for
the platform) ``google-crc32c`` is used if present, else a pure-Python table, slow but exact. zlib's
CRC32 is always there too.

The algorithm's name is stored next to every checksum, so a manifest is always verified with the
algorithm that wrote it. New files get CRC32C when a compiled implementation is present and CRC32
otherwise, so a save never runs at pure-Python speed.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from typing import BinaryIO

logger = logging.getLogger(__name__)

CHUNK_SIZE = 8 * 1024 * 1024

_Data = bytes | bytearray | memoryview
_Update = Callable[[int, _Data], int]

_CASTAGNOLI = 0x82F63B78  # the reflected CRC32C polynomial


def _table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _CASTAGNOLI if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE = _table()


def crc32c_python(crc: int, data: _Data) -> int:
    """CRC32C in pure Python (some MB/s): the last resort, so verification never fails."""
    table = _TABLE
    crc = ~crc & 0xFFFFFFFF
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return ~crc & 0xFFFFFFFF


def _compiled_crc32c() -> tuple[_Update, str] | None:
    """The fastest compiled CRC32C importable here, and a word on what it is."""
    try:
        import crc32c as _crc32c
    except ImportError:
        pass
    else:
        kind = "hardware" if getattr(_crc32c, "hardware_based", False) else "software"
        return (lambda crc, data: int(_crc32c.crc32c(data, crc))), f"crc32c package ({kind})"
    try:
        import google_crc32c as _google
    except ImportError:
        return None
    if getattr(_google, "implementation", "") != "c":
        return None  # its own pure-Python fallback: no faster than ours
    # google-crc32c takes read-only bytes only, so writable buffers are copied.
    return (lambda crc, data: int(_google.extend(crc, bytes(data)))), "google-crc32c"


_compiled = _compiled_crc32c()
CRC32C_IMPLEMENTATION = _compiled[1] if _compiled else "pure Python (slow)"
_ALGORITHMS: dict[str, _Update] = {
    "crc32": lambda crc, data: zlib.crc32(data, crc),
    "crc32c": _compiled[0] if _compiled else crc32c_python,
}
if _compiled is None:  # pragma: no cover - depends on what is installed
    logger.debug("no compiled crc32c here; crc32c manifests are verified in pure Python (slow)")

DEFAULT_ALGORITHM = "crc32c" if _compiled is not None else "crc32"


def available_algorithms() -> tuple[str, ...]:
    """Every algorithm this install can compute (and so verify): always crc32 and crc32c."""
    return tuple(_ALGORITHMS)


class Checksum:
    """An incremental checksum; ``update`` as bytes arrive, ``hexdigest`` at the end."""

    __slots__ = ("_update", "_value", "algorithm")

    def __init__(self, algorithm: str = DEFAULT_ALGORITHM) -> None:
        try:
            self._update = _ALGORITHMS[algorithm]
        except KeyError:
            raise ValueError(
                f"checksum algorithm {algorithm!r} is not known "
                f"(known: {', '.join(_ALGORITHMS)}); was this manifest written by a newer "
                "commitpoint?"
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
