"""commitpoint: background checkpoint saves that become visible only once complete and durable.

The public API, documented in docs/api.md (a test holds the two together): save with
:class:`CheckpointCoordinator`, commit with :class:`CheckpointMonitor`, read with
:class:`CheckpointReader`; storage through :func:`open_storage` and the :class:`StorageBackend`
protocol; every error under :class:`CommitpointError`. Everything else lives in the packages
(``commitpoint.core``, ``.save``, ``.monitor``, ``.read``, ``.maintenance``, ``.storage``) and may
change between releases.
"""

from __future__ import annotations

import warnings
from typing import Any

from commitpoint import _moved
from commitpoint.core.layout import CHECKPOINT_POINTER, STATE_DICT_POINTER, Kind
from commitpoint.core.manifest import Manifest
from commitpoint.errors import (
    BackendNotFound,
    CommitConflict,
    CommitpointError,
    CorruptCheckpoint,
    DuplicateWrite,
    ForeignPointer,
    InvalidArgument,
    InvalidName,
    InvalidStep,
    MonitorNotFound,
    MonitorRestarted,
    NotFound,
    Refused,
    SaveFailed,
    SaveQueueFull,
    SlotTimeout,
    StagingError,
    StagingFailed,
    StagingTimeout,
    StepRegression,
    StorageError,
    StorageNotFound,
    StoragePermissionError,
    UnexpectedStep,
    UnreadableFile,
    UploadFailed,
    WriterFenced,
)
from commitpoint.maintenance.retention import RetentionPolicy, RetentionResult
from commitpoint.monitor import CheckpointMonitor, SaveStrategy
from commitpoint.read.reader import CheckpointReader
from commitpoint.read.verify import VerifyReport, verify_step
from commitpoint.save.coordinator import CheckpointCoordinator
from commitpoint.save.staging import StagedStateDict, Stager, StagingOptions, StagingStats
from commitpoint.save.torch_io import load_torch, save_torch
from commitpoint.storage import (
    FileInfo,
    FileRecord,
    PointerState,
    StorageBackend,
    open_storage,
    register_backend,
)
from commitpoint.storage.local import LocalBackend

_moved.install()

__version__ = "0.1.0"

_ELSEWHERE = {
    "advance_pointer": "commitpoint.core.pointer",
    "read_step": "commitpoint.core.pointer",
    "rewind_pointer": "commitpoint.core.pointer",
    "FsspecStorage": "commitpoint.storage",
}
"""Names once exported here that belong to a package: still importable, with a warning."""


def __getattr__(name: str) -> Any:
    module = _ELSEWHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'commitpoint' has no attribute {name!r}")
    import importlib

    warnings.warn(
        f"commitpoint.{name} is not public API; import it from {module}",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(module), name)


__all__ = [
    "CHECKPOINT_POINTER",
    "STATE_DICT_POINTER",
    "BackendNotFound",
    "CheckpointCoordinator",
    "CheckpointMonitor",
    "CheckpointReader",
    "CommitConflict",
    "CommitpointError",
    "CorruptCheckpoint",
    "DuplicateWrite",
    "FileInfo",
    "FileRecord",
    "ForeignPointer",
    "InvalidArgument",
    "InvalidName",
    "InvalidStep",
    "Kind",
    "LocalBackend",
    "Manifest",
    "MonitorNotFound",
    "MonitorRestarted",
    "NotFound",
    "PointerState",
    "Refused",
    "RetentionPolicy",
    "RetentionResult",
    "SaveFailed",
    "SaveQueueFull",
    "SaveStrategy",
    "SlotTimeout",
    "StagedStateDict",
    "Stager",
    "StagingError",
    "StagingFailed",
    "StagingOptions",
    "StagingStats",
    "StagingTimeout",
    "StepRegression",
    "StorageBackend",
    "StorageError",
    "StorageNotFound",
    "StoragePermissionError",
    "UnexpectedStep",
    "UnreadableFile",
    "UploadFailed",
    "VerifyReport",
    "WriterFenced",
    "__version__",
    "load_torch",
    "open_storage",
    "register_backend",
    "save_torch",
    "verify_step",
]
