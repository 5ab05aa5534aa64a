"""``save``, ``async_save`` and ``load``: DCP's entry points with commitpoint's storage.

Each is called on every rank of the process group, like DCP's own. Failures come back as
commitpoint's errors on every rank alike: DCP gathers each rank's exception, and these wrappers
unpack the one that caused it (a refusal decided on the coordinator rank reaches every rank as
the same :class:`SaveFailed`, whose ``cause`` is the :class:`StepRegression` or
:class:`WriterFenced`).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint import state_dict_loader, state_dict_saver
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.stateful import Stateful

from commitpoint.core.layout import Kind
from commitpoint.dcp._report import SAVE_NAME
from commitpoint.dcp.reader import StorageReader
from commitpoint.dcp.writer import StorageWriter
from commitpoint.errors import CommitpointError, SaveFailed
from commitpoint.read.reader import CheckpointReader
from commitpoint.save.coordinator import CheckpointCoordinator
from commitpoint.save.staging import Stager
from commitpoint.storage.protocol import StorageBackend


def _rank_failure(exc: CheckpointException) -> BaseException:
    """The exception behind a DCP collective failure: a commitpoint error if any rank raised
    one (lowest rank first), else the lowest rank's exception."""
    failures = sorted(exc.failures.items())
    for _, (error, _trace) in failures:
        if isinstance(error, CommitpointError):
            return error
    return failures[0][1][0] if failures else exc


def _stateful_to_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    return {
        key: value.state_dict() if isinstance(value, Stateful) else value
        for key, value in state_dict.items()
    }


def _run_save(state_dict: Mapping[str, Any], writer: StorageWriter, process_group: Any) -> Metadata:
    try:
        metadata: Metadata = state_dict_saver.save(
            dict(state_dict), storage_writer=writer, process_group=process_group
        )
        return metadata
    except CheckpointException as exc:
        cause = _rank_failure(exc)
        writer.abandon(cause)
        if isinstance(cause, SaveFailed):
            raise cause from exc
        if not isinstance(cause, Exception):  # a rank was interrupted: report it as such
            cause = RuntimeError(f"{type(cause).__name__}: {cause}")
        raise SaveFailed(writer.global_step, SAVE_NAME, cause) from exc
    except Exception as exc:  # a local error before or after DCP's collectives
        writer.abandon(exc)
        raise SaveFailed(writer.global_step, SAVE_NAME, exc) from exc


def save(
    state_dict: Mapping[str, Any],
    coordinator: CheckpointCoordinator | StorageBackend,
    global_step: int,
    *,
    is_state_dict: bool = False,
    process_group: Any = None,
) -> Metadata:
    """``dcp.save`` of ``state_dict`` as step ``global_step``, committed once every rank's part
    is durable; returns DCP's metadata. Raises :class:`SaveFailed` (the same on every rank) if
    the step was refused or any rank failed; nothing is committed then."""
    writer = StorageWriter(coordinator, global_step, is_state_dict=is_state_dict)
    return _run_save(_stateful_to_state_dict(state_dict), writer, process_group)


# -- async_save ---------------------------------------------------------------------------------
class _LocalShard(dict[str, Any]):
    """Stands for a DTensor while staging: holds its local shard under ``"local"``; the stager
    copies it like any dict (type and ``index`` attribute kept), so the copy can be turned
    back into a DTensor."""

    index: int


def _split_dtensors(value: Any, found: list[Any]) -> Any:
    """``value`` with each DTensor replaced by a :class:`_LocalShard` of its local tensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        shard = _LocalShard(local=value.to_local())
        shard.index = len(found)
        found.append(value)
        return shard
    if isinstance(value, Mapping):
        return {key: _split_dtensors(item, found) for key, item in value.items()}
    if isinstance(value, list):
        return [_split_dtensors(item, found) for item in value]
    return value


def _join_dtensors(value: Any, originals: list[Any]) -> Any:
    """The staged copy with each :class:`_LocalShard` a DTensor again, with its original's
    mesh, placements, shape and stride (no communication)."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, _LocalShard):
        original = originals[value.index]
        return DTensor.from_local(
            value["local"],
            original.device_mesh,
            original.placements,
            run_check=False,
            shape=original.shape,
            stride=original.stride(),
        )
    if isinstance(value, Mapping):
        return {key: _join_dtensors(item, originals) for key, item in value.items()}
    if isinstance(value, list):
        return [_join_dtensors(item, originals) for item in value]
    return value


_SHARED_STAGER_LOCK = threading.Lock()
_BACKGROUND_GROUP: list[Any] = []


def _background_group() -> Any:
    """A gloo group of all ranks for background saves (made once; every rank calls
    :func:`async_save` at the same point, so they create it together)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    with _SHARED_STAGER_LOCK:
        if not _BACKGROUND_GROUP:
            _BACKGROUND_GROUP.append(dist.new_group(backend="gloo"))
        return _BACKGROUND_GROUP[0]


_SHARED_STAGER: list[Stager] = []


def _stager_of(coordinator: CheckpointCoordinator | StorageBackend) -> Stager:
    """The coordinator's stager; a rank with only a backend shares one per process."""
    if isinstance(coordinator, CheckpointCoordinator):
        return coordinator.stager
    with _SHARED_STAGER_LOCK:
        if not _SHARED_STAGER:
            _SHARED_STAGER.append(Stager())
        return _SHARED_STAGER[0]


def async_save(
    state_dict: Mapping[str, Any],
    coordinator: CheckpointCoordinator | StorageBackend,
    global_step: int,
    *,
    is_state_dict: bool = False,
    process_group: Any = None,
) -> Future[Metadata]:
    """Stage ``state_dict`` into the coordinator's reusable CPU buffers, then save it as
    :func:`save` does on a background thread; returns a future of DCP's metadata.

    When this returns, the tensors may be changed (the copy is done): the training stall is
    that copy only. The future raises :class:`SaveFailed` on every rank if the step was
    refused (decided before any rank writes) or failed. The save's collectives run on the
    background thread, so they must not share a group with the training loop's (FSDP's
    all-gathers): with ``process_group=None`` a gloo group of all ranks is made once, on the
    first call, and used for every async save of this process.
    """
    if process_group is None:
        process_group = _background_group()
    writer = StorageWriter(coordinator, global_step, is_state_dict=is_state_dict)
    plain = _stateful_to_state_dict(state_dict)
    dtensors: list[Any] = []
    local = _split_dtensors(plain, dtensors)
    staged = _stager_of(coordinator).stage(local)
    try:
        staged.wait()
    except BaseException:
        staged.release()
        raise
    copy = _join_dtensors(staged.state_dict(), dtensors)
    future: Future[Metadata] = Future()

    def run() -> None:
        try:
            future.set_result(_run_save(copy, writer, process_group))
        except BaseException as exc:
            future.set_exception(exc)
        finally:
            staged.release()

    threading.Thread(target=run, name=f"commitpoint-dcp-save-{global_step}", daemon=True).start()
    return future


def _agreed_latest(
    url: str | CheckpointReader | StorageBackend,
    kind: Kind | str,
    storage_options: Mapping[str, Any],
    process_group: Any,
) -> int:
    """The latest committed step as rank 0 of the group read it, on every rank: a commit landing
    while the ranks resolve "latest" must not make them load shards of different steps."""
    found: int | BaseException
    try:
        found = StorageReader(url, None, kind=kind, **storage_options).global_step
    except Exception as exc:
        found = exc
    if dist.is_available() and dist.is_initialized():
        shared: list[int | BaseException] = [found]
        source = 0 if process_group is None else dist.get_global_rank(process_group, 0)
        dist.broadcast_object_list(shared, src=source, group=process_group)
        found = shared[0]
    if isinstance(found, BaseException):
        raise found
    return found


# -- load ---------------------------------------------------------------------------------------
def load(
    state_dict: dict[str, Any],
    url: str | CheckpointReader | StorageBackend,
    global_step: int | None = None,
    *,
    kind: Kind | str = Kind.CHECKPOINT,
    process_group: Any = None,
    **storage_options: Any,
) -> int:
    """``dcp.load`` into ``state_dict`` (in place, any number of ranks) from a committed step;
    ``global_step=None`` loads the latest committed step of ``kind``. Every byte read is
    verified against the manifest first; a mismatch raises :class:`CorruptCheckpoint` on every
    rank. Returns the step loaded."""
    if global_step is None:
        global_step = _agreed_latest(url, kind, storage_options, process_group)
    reader = StorageReader(url, global_step, kind=kind, **storage_options)
    step = reader.global_step
    reader.read_metadata()  # a bad manifest or metadata raises here, typed, on each rank
    try:
        state_dict_loader.load(state_dict, storage_reader=reader, process_group=process_group)
    except CheckpointException as exc:
        cause = _rank_failure(exc)
        if isinstance(cause, CommitpointError):
            raise cause from exc
        raise
    return step
