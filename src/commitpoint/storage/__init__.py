"""Storage backends: the protocol, the shared fsspec base, the local and memory backends."""

from commitpoint.storage.base import FsspecStorage, FsspecWriter, redact_url
from commitpoint.storage.protocol import (
    FileInfo,
    FileRecord,
    PointerState,
    StorageBackend,
    TrackedWriter,
)
from commitpoint.storage.registry import (
    ENTRY_POINT_GROUP,
    available_schemes,
    open_storage,
    register_backend,
    scheme_of,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "FileInfo",
    "FileRecord",
    "FsspecStorage",
    "FsspecWriter",
    "PointerState",
    "StorageBackend",
    "TrackedWriter",
    "available_schemes",
    "open_storage",
    "redact_url",
    "register_backend",
    "scheme_of",
]
