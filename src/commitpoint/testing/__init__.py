"""Testing kit: ready checkpoint roots on local disk, moto-mocked S3 and emulated GCS.

Use the context managers directly (``local_root()``, ``commitpoint.testing.s3.s3_root()``,
``commitpoint.testing.gcs.gcs_root()``) or the pytest fixtures of
:mod:`commitpoint.testing.pytest_plugin`, which pytest loads automatically once commitpoint is
installed. Emulator servers bind 127.0.0.1 on a free port, start once per process, are reused,
and are stopped at the end of the test session (or at interpreter exit); each root gets its own
bucket or folder.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from commitpoint.core.layout import Kind
from commitpoint.core.manifest import Manifest
from commitpoint.monitor import CheckpointMonitor
from commitpoint.monitor.slots import SaveStrategy
from commitpoint.read.reader import CheckpointReader
from commitpoint.read.verify import VerifyReport
from commitpoint.save.coordinator import CheckpointCoordinator
from commitpoint.storage.protocol import FileInfo, StorageBackend
from commitpoint.storage.registry import open_storage


class MissingTestDependency(ImportError):
    """An optional test dependency is not installed; the message names the extra to install."""

    def __init__(self, what: str, extra: str) -> None:
        self.extra = extra
        super().__init__(
            f"{what} is not installed; install it from commitpoint's repository with "
            f"`pip install '{extra}'`"
        )


@dataclass(frozen=True)
class CheckpointRoot:
    """A checkpoint root ready for a test: URL, options, and helpers to use and inspect it."""

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)  # may hold secrets
    backend: str = "local"

    def open(self) -> StorageBackend:
        return open_storage(self.url, **self.storage_options)

    def reader(self) -> CheckpointReader:
        return CheckpointReader(self.url, **self.storage_options)

    def monitor(
        self, save_strategy: SaveStrategy | str = SaveStrategy.UNRESTRICTED
    ) -> CheckpointMonitor:
        return CheckpointMonitor(self.url, self.storage_options, save_strategy)

    # -- assertions helpers ---------------------------------------------------------------
    def committed_steps(self) -> dict[str, int | None]:
        """The step each pointer names (None when absent)."""
        reader = self.reader()
        return {kind.value: reader.latest_step(kind) for kind in Kind}

    def verify(self, step: int, kind: Kind | str = Kind.STATE_DICT) -> VerifyReport:
        return self.reader().verify(step, kind)

    def manifest(self, step: int, kind: Kind | str = Kind.STATE_DICT) -> Manifest:
        return self.reader().manifest(step, kind)

    def list_files(self, prefix: str = "") -> list[FileInfo]:
        return self.open().list_files(prefix)


# -- servers: started once per process, stopped at session end or exit -------------------------
_shutdowns: list[Callable[[], None]] = []
_shutdown_lock = threading.Lock()


def register_shutdown(stop: Callable[[], None]) -> None:
    """Remember how to stop a shared server (called by the server modules)."""
    with _shutdown_lock:
        _shutdowns.append(stop)


def shutdown_servers() -> None:
    """Stop every shared server this process started (idempotent)."""
    with _shutdown_lock:
        stops, _shutdowns[:] = list(_shutdowns), []
    for stop in reversed(stops):
        with contextlib.suppress(Exception):
            stop()


atexit.register(shutdown_servers)


def commit_step(
    coordinator: CheckpointCoordinator,
    step: int,
    *,
    checkpoint: bool = False,
    value: float = 0.0,
    numel: int = 16,
) -> None:
    """Commit ``step`` through the real save path, as a trainer would.

    A background save writes ``model.pt`` (a tensor of ``numel`` values ``step + value``); with
    ``checkpoint`` a second save writes ``optim.pt`` and the step commits as a full checkpoint.
    Returns once committed; a failed save raises :class:`~commitpoint.errors.SaveFailed`.
    """
    import torch

    from commitpoint.core.layout import step_dir
    from commitpoint.save.torch_io import save_torch

    storage = coordinator.storage
    folder = step_dir(step)
    weights = {"w": torch.full((numel,), step + value)}
    coordinator.save_async(
        "model", functools.partial(save_torch, storage, f"{folder}/model.pt", weights), step, True
    )
    if checkpoint:
        optim = {"step": step}
        coordinator.save_async(
            "optim", functools.partial(save_torch, storage, f"{folder}/optim.pt", optim), step
        )
        coordinator.register_and_monitor_sync(
            step, False, state_dict_thread_count=1, checkpoint_thread_count=1
        )
    else:
        coordinator.register_and_monitor_sync(step, True, state_dict_thread_count=1)
    coordinator.wait_all()


def unique_name(prefix: str = "cp") -> str:
    """A name no other test in this run uses (valid as a bucket name)."""
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


@contextlib.contextmanager
def local_root(parent: str | None = None) -> Iterator[CheckpointRoot]:
    """A fresh local folder as a checkpoint root, removed afterwards."""
    folder = tempfile.mkdtemp(prefix="commitpoint-", dir=parent)
    try:
        yield CheckpointRoot(folder, {}, "local")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def memory_root() -> Iterator[CheckpointRoot]:
    """A fresh in-memory root (this process only), removed afterwards."""
    root = CheckpointRoot(f"memory://{unique_name()}", {}, "memory")
    try:
        yield root
    finally:
        _drop_memory(root.url)


def _drop_memory(url: str) -> None:
    from fsspec.implementations.memory import MemoryFileSystem

    fs = MemoryFileSystem()
    path = "/" + url.split("://", 1)[1]
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)


__all__ = [
    "CheckpointRoot",
    "MissingTestDependency",
    "commit_step",
    "local_root",
    "memory_root",
    "register_shutdown",
    "shutdown_servers",
    "unique_name",
]
