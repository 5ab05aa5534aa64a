"""Storage backends: the protocol, the shared fsspec base, the wrapper base, the local and memory
backends."""

from commitpoint.storage.base import FsspecStorage, FsspecWriter, redact_url
from commitpoint.storage.protocol import (
    FileInfo,
    FileRecord,
    PointerState,
    PublishGuard,
    StorageBackend,
    TrackedWriter,
)
from commitpoint.storage.records import FileRecords
from commitpoint.storage.registry import (
    ENTRY_POINT_GROUP,
    available_schemes,
    open_storage,
    register_backend,
    scheme_of,
)
from commitpoint.storage.wrapper import StorageWrapper

__all__ = [
    "ENTRY_POINT_GROUP",
    "FileInfo",
    "FileRecord",
    "FileRecords",
    "FsspecStorage",
    "FsspecWriter",
    "PointerState",
    "PublishGuard",
    "StorageBackend",
    "StorageWrapper",
    "TrackedWriter",
    "available_schemes",
    "open_storage",
    "redact_url",
    "register_backend",
    "scheme_of",
]
