"""commitpoint: background checkpoint saves that become visible only once complete and durable.

Public API: :class:`CheckpointCoordinator` (save), :class:`CheckpointMonitor` (commit),
:class:`CheckpointReader` (find, verify, load), :func:`open_storage` and the
:class:`StorageBackend` protocol, and the error classes under :class:`CommitpointError`.
"""

from commitpoint.coordinator import CheckpointCoordinator
from commitpoint.errors import (
    BackendNotFound,
    CommitConflict,
    CommitpointError,
    CorruptCheckpoint,
    InvalidArgument,
    InvalidName,
    InvalidStep,
    MonitorRestarted,
    SaveFailed,
    StagingFailed,
    StagingTimeout,
    StepRegression,
    StorageError,
    WriterFenced,
)
from commitpoint.layout import CHECKPOINT_POINTER, STATE_DICT_POINTER, Kind
from commitpoint.manifest import Manifest
from commitpoint.monitor import CheckpointMonitor
from commitpoint.pointer import advance_pointer, read_step, rewind_pointer
from commitpoint.reader import CheckpointReader
from commitpoint.retention import RetentionPolicy, RetentionResult
from commitpoint.staging import StagedStateDict, Stager, StagingOptions, StagingStats
from commitpoint.storage import (
    FileInfo,
    FileRecord,
    FsspecStorage,
    PointerState,
    StorageBackend,
    open_storage,
    register_backend,
)
from commitpoint.strategy import SaveStrategy
from commitpoint.torch_io import load_torch, save_torch
from commitpoint.verify import VerifyReport, verify_step

__version__ = "0.1.0"

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
    "FileInfo",
    "FileRecord",
    "FsspecStorage",
    "InvalidArgument",
    "InvalidName",
    "InvalidStep",
    "Kind",
    "Manifest",
    "MonitorRestarted",
    "PointerState",
    "RetentionPolicy",
    "RetentionResult",
    "SaveFailed",
    "SaveStrategy",
    "StagedStateDict",
    "Stager",
    "StagingFailed",
    "StagingOptions",
    "StagingStats",
    "StagingTimeout",
    "StepRegression",
    "StorageBackend",
    "StorageError",
    "VerifyReport",
    "WriterFenced",
    "__version__",
    "advance_pointer",
    "load_torch",
    "open_storage",
    "read_step",
    "register_backend",
    "rewind_pointer",
    "save_torch",
    "verify_step",
]
