"""A torch.distributed.checkpoint ``StorageWriter`` over any commitpoint backend.

DCP drives it (see the call order in ``torch.distributed.checkpoint.storage.StorageWriter``):

0. every rank: ``reset`` / ``set_up_storage_writer`` / ``prepare_local_plan``;
1. coordinator rank: ``prepare_global_plan`` takes the save slot and decides whether the step
   may be written at all (already committed: :class:`StepRegression`; fenced writer:
   :class:`WriterFenced`). DCP hands the error to every rank before any of them writes a byte;
2. every rank: ``write_data`` streams its ``__<rank>_0.distcp`` through the backend's writer, so
   each byte is checksummed as it goes out; the file's record rides back in the write results;
3. coordinator rank: ``finish`` writes ``.metadata`` the same way and reports the step, with
   every rank's records, to the monitor, which commits it. DCP calls ``finish`` only after
   every rank's ``write_data`` succeeded.

The ``.metadata`` and ``.distcp`` files are DCP's own format: a committed local step also loads
with ``torch.distributed.checkpoint.FileSystemReader``.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import uuid
from dataclasses import dataclass
from typing import IO, Any, cast

import torch
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter as _DcpStorageWriter
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from commitpoint.core.layout import Kind, check_step, step_dir
from commitpoint.dcp._report import Admission, StepReport, refuse_if_committed, refuse_if_fenced
from commitpoint.errors import InvalidArgument
from commitpoint.save.coordinator import CheckpointCoordinator
from commitpoint.save.torch_io import _ZIP_CRC32, _FirstWriteCloses
from commitpoint.storage.protocol import FileRecord, StorageBackend, TrackedWriter

METADATA_FILE = ".metadata"
DATA_SUFFIX = ".distcp"


@dataclass(frozen=True)
class _RankPlan:
    """What the coordinator rank tells each rank in the global plan."""

    prefix: str
    admission: Admission


@dataclass(frozen=True)
class _Written:
    """A write result's storage data on its way to the coordinator rank: DCP's own
    ``_StorageInfo`` (what ``.metadata`` keeps) plus, once per file, the file's record."""

    info: _StorageInfo
    record: FileRecord | None = None


def storage_of(coordinator: object) -> tuple[CheckpointCoordinator | None, StorageBackend]:
    """The coordinator (if any) and the backend a rank writes through."""
    if isinstance(coordinator, CheckpointCoordinator):
        return coordinator, coordinator.storage
    if isinstance(coordinator, StorageBackend):
        return None, coordinator
    raise InvalidArgument(
        "coordinator must be a CheckpointCoordinator (on the coordinator rank) or, on the other "
        f"ranks, a CheckpointCoordinator or StorageBackend; got {type(coordinator).__name__}"
    )


class StorageWriter(_DcpStorageWriter):
    """Writes one DCP checkpoint as commitpoint step ``global_step`` (``global_step_<N>/``).

    ``coordinator`` is this rank's :class:`CheckpointCoordinator`. The coordinator rank (rank 0
    of the process group) needs one; it alone talks to the monitor. Other ranks may pass a
    plain :class:`StorageBackend` of the same root instead (``open_storage(url, ...)``), so a
    ``torchrun`` job needs no shared monitor. ``is_state_dict`` commits the step as weights
    (``latest_state_dict_iteration.txt``) instead of as a full checkpoint.
    """

    def __init__(
        self,
        coordinator: CheckpointCoordinator | StorageBackend,
        global_step: int,
        *,
        is_state_dict: bool = False,
    ) -> None:
        super().__init__()
        self._coordinator, self._storage = storage_of(coordinator)
        self._step = check_step(global_step)
        self._kind = Kind.of(bool(is_state_dict))
        self._folder = step_dir(self._step)
        self.save_id = str(uuid.uuid4())
        self._is_coordinator = False
        self._report: StepReport | None = None
        self._admission: Admission | None = None

    # -- what the commitpoint wrappers look at --------------------------------------------
    @property
    def global_step(self) -> int:
        return self._step

    @property
    def kind(self) -> Kind:
        return self._kind

    @property
    def checkpoint_id(self) -> str:
        """The URL of the step folder (safe to print)."""
        return self._storage.url_for(self._folder)

    def abandon(self, error: BaseException) -> None:
        """Report the save as failed, if the coordinator rank admitted it (the wrappers call
        this when DCP raised after planning)."""
        if self._report is not None:
            self._report.fail(error)

    # -- DCP's StorageWriter --------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None and os.fspath(checkpoint_id) not in (
            self.checkpoint_id,
            self._folder,
        ):
            raise InvalidArgument(
                f"this StorageWriter writes step {self._step} ({self.checkpoint_id}); "
                f"checkpoint_id {os.fspath(checkpoint_id)!r} names another place"
            )
        self.save_id = str(uuid.uuid4())
        self._report = None
        self._admission = None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if not kwargs.get("use_collectives", True):
            raise InvalidArgument(
                "commitpoint.dcp needs use_collectives=True: the ranks agree on refusals and the "
                "commit through DCP's collectives"
            )
        self._is_coordinator = bool(is_coordinator)
        if self._is_coordinator and self._coordinator is None:
            raise InvalidArgument(
                "the coordinator rank of a DCP save needs a CheckpointCoordinator, not only a "
                "storage backend: it reports the step to the monitor"
            )

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        assert self._coordinator is not None  # set_up_storage_writer checked it
        self._report = StepReport(self._coordinator, self._step, self._kind)
        admission = self._report.admit()  # raising here reaches every rank before any write
        self._admission = admission
        return [
            dataclasses.replace(plan, storage_data=_RankPlan(f"__{rank}_", admission))
            for rank, plan in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        rank_plan = plan.storage_data
        if not isinstance(rank_plan, _RankPlan):
            raise InvalidArgument("the global plan did not come from commitpoint's StorageWriter")
        results: list[WriteResult] = []
        if plan.items:
            name = f"{rank_plan.prefix}0{DATA_SUFFIX}"
            results = self._write_file(name, plan, planner, rank_plan.admission)
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        assert self._report is not None and self._admission is not None
        records: list[FileRecord] = []
        storage_data: dict[Any, Any] = {}
        for rank_results in results:
            for result in rank_results:
                data = result.storage_data
                if isinstance(data, _Written):
                    storage_data[result.index] = data.info
                    if data.record is not None:
                        records.append(data.record)
                else:
                    storage_data[result.index] = data
        metadata.version = CURRENT_DCP_VERSION
        metadata.storage_data = storage_data
        metadata.storage_meta = self.storage_meta()
        with self._open(METADATA_FILE) as writer:
            pickle.dump(metadata, writer)
            self._before_publish(writer, self._admission)
        assert writer.record is not None
        records.append(writer.record)
        self._report.commit(records)

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.checkpoint_id, save_id=self.save_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False  # never picked by DCP on its own: it needs a coordinator and a step

    # -- writing ----------------------------------------------------------------------------
    def _open(self, name: str) -> TrackedWriter:
        # Untracked: this code collects each record itself and sends it to the coordinator rank.
        return self._storage.open_write(f"{self._folder}/{name}", track=False)

    def _before_publish(self, writer: TrackedWriter, admission: Admission) -> None:
        """Right before a file becomes visible: still not committed by anyone, still ours."""
        refuse_if_fenced(self._storage, admission.writer_epoch)
        refuse_if_committed(self._storage, self._step, self._kind)

    def _write_file(
        self, name: str, plan: SavePlan, planner: SavePlanner, admission: Admission
    ) -> list[WriteResult]:
        items = sorted(plan.items, key=lambda item: item.type != WriteItemType.BYTE_IO)
        results: list[WriteResult] = []
        with self._open(name) as writer:
            for item in items:
                offset = writer.tell()
                data = planner.resolve_data(item)
                if isinstance(data, io.BytesIO):
                    writer.write(data.getbuffer())
                else:
                    _save_tensor(writer, _plain_cpu(data))
                length = writer.tell() - offset
                results.append(
                    WriteResult(item.index, length, _Written(_StorageInfo(name, offset, length)))
                )
            self._before_publish(writer, admission)
        record = writer.record
        first = results[0]
        results[0] = WriteResult(
            first.index, first.size_in_bytes, _Written(first.storage_data.info, record)
        )
        return results


def _plain_cpu(data: Any) -> torch.Tensor:
    """The tensor to save: on CPU, owning exactly its bytes (``torch.save`` of a view would
    write the whole storage behind it)."""
    if not isinstance(data, torch.Tensor):
        raise InvalidArgument(f"a tensor write item resolved to {type(data).__name__}")
    tensor = data.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


def _save_tensor(writer: TrackedWriter, tensor: torch.Tensor) -> None:
    """``torch.save`` of one item, without torch's zip CRC32 (commitpoint's checksum covers the
    file and is verified on load; see :mod:`commitpoint.torch_io`)."""
    sink = _FirstWriteCloses(writer, window_open=_ZIP_CRC32.open())
    try:
        torch.save(tensor, cast(IO[bytes], sink))
    except Exception as exc:
        failure = getattr(writer, "failure", None)
        if isinstance(failure, Exception) and failure is not exc:
            raise failure from exc
        raise
    finally:
        sink.close_window()
