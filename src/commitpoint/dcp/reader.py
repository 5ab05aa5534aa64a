"""A torch.distributed.checkpoint ``StorageReader`` that serves only verified bytes.

It reads committed steps only: the step a pointer names (or one the caller names that has a
manifest). Every file DCP asks for is read whole once, its size and checksum compared with the
step's manifest, and only then are slices of it handed to DCP's planner; a mismatch raises
:class:`CorruptCheckpoint` and nothing of that file is loaded. ``.metadata`` (a pickle) is
verified the same way and unpickled with a loader that accepts DCP's metadata classes only.
Resharding (loading with another number of ranks) is DCP's planner's job, as for any reader.
"""

from __future__ import annotations

import io
import os
import pickle
import uuid
from collections.abc import Mapping
from typing import IO, Any, cast

import torch
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader as _DcpStorageReader
from torch.futures import Future

from commitpoint.core.checksum import Checksum
from commitpoint.core.layout import Kind, check_step, step_dir
from commitpoint.core.manifest import Manifest, read_manifest
from commitpoint.dcp.writer import METADATA_FILE
from commitpoint.errors import CorruptCheckpoint, InvalidArgument, StorageError
from commitpoint.read.reader import CheckpointReader
from commitpoint.storage.protocol import FileRecord, StorageBackend
from commitpoint.storage.registry import open_storage

_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata and nothing else: no other global can be reached."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP metadata")


class _Slice(io.RawIOBase):
    """A read-only window of a verified file's bytes, without copying them."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view = view
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._view)}
        self._position = max(0, base[whence] + offset)
        return self._position

    def readinto(self, buffer: Any) -> int:
        chunk = self._view[self._position : self._position + len(buffer)]
        memoryview(buffer).cast("B")[: len(chunk)] = chunk
        self._position += len(chunk)
        return len(chunk)


def _open_backend(
    url_or_reader: str | CheckpointReader | StorageBackend, options: Mapping[str, Any]
) -> StorageBackend:
    if isinstance(url_or_reader, CheckpointReader):
        return url_or_reader.storage
    if isinstance(url_or_reader, str):
        return open_storage(url_or_reader, **options)
    if isinstance(url_or_reader, StorageBackend):
        return url_or_reader
    raise InvalidArgument(
        "url_or_reader must be a URL, a CheckpointReader or a StorageBackend, "
        f"got {type(url_or_reader).__name__}"
    )


class StorageReader(_DcpStorageReader):
    """Reads the DCP checkpoint committed as ``global_step`` under ``url_or_reader``.

    ``global_step=None`` reads the latest committed step of ``kind`` (full checkpoint by
    default; ``kind="state_dict"`` for the newest weights), resolved once per reader. Used
    directly with several ranks, give every rank the same step: :func:`commitpoint.dcp.load`
    does that for you (rank 0 resolves "latest" and tells the others).
    """

    def __init__(
        self,
        url_or_reader: str | CheckpointReader | StorageBackend,
        global_step: int | None = None,
        *,
        kind: Kind | str = Kind.CHECKPOINT,
        **storage_options: Any,
    ) -> None:
        super().__init__()
        self._storage = _open_backend(url_or_reader, storage_options)
        self._requested = None if global_step is None else check_step(global_step)
        self._kind = Kind(kind)
        self.load_id = str(uuid.uuid4())
        self._step: int | None = None
        self._records: dict[str, FileRecord] = {}
        self._metadata: Metadata | None = None
        self._storage_data: dict[Any, Any] = {}

    @property
    def global_step(self) -> int:
        """The step this reader reads (resolved from the pointer on first use)."""
        return self._resolve()

    @property
    def checkpoint_id(self) -> str:
        return self._storage.url_for(step_dir(self._resolve()))

    def _resolve(self) -> int:
        if self._step is not None:
            return self._step
        step = self._requested
        if step is None:
            step = self._storage.read_pointer(self._kind.pointer).value
            if step is None:
                raise CorruptCheckpoint(
                    self._storage.url_for(self._kind.pointer),
                    f"no {self._kind.value} step is committed",
                )
        manifest = self._manifest(step)
        self._records = {record.path: record for record in manifest.files}
        self._step = step
        return step

    def _manifest(self, step: int) -> Manifest:
        """The step's manifest for the kind asked for; for a step named by the caller, the
        other kind's too (a state-dict step has no checkpoint manifest)."""
        kinds = [self._kind]
        if self._requested is not None:
            kinds += [k for k in Kind if k is not self._kind]
        if self._kind is Kind.STATE_DICT:
            kinds.append(Kind.CHECKPOINT)  # a checkpoint's manifest covers its state dict
        for kind in kinds:
            manifest = read_manifest(self._storage, step, kind)
            if manifest is not None and any(
                r.path == f"{step_dir(step)}/{METADATA_FILE}" for r in manifest.files
            ):
                return manifest
        raise CorruptCheckpoint(
            self._storage.url_for(step_dir(step)),
            f"step {step} has no committed DCP checkpoint (no manifest lists {METADATA_FILE})",
        )

    def verified_bytes(self, name: str) -> bytes:
        """The bytes of ``name`` in the step folder, once they match the manifest."""
        step = self._resolve()
        path = f"{step_dir(step)}/{name}"
        record = self._records.get(path)
        if record is None:
            raise CorruptCheckpoint(
                self._storage.url_for(path), f"not listed in step {step}'s manifest"
            )
        try:
            data = self._storage.read_bytes(path)
        except StorageError as exc:
            if not self._storage.exists(path):
                raise CorruptCheckpoint(self._storage.url_for(path), "missing") from exc
            raise
        if len(data) != record.size:
            raise CorruptCheckpoint(
                self._storage.url_for(path), f"size {len(data)} != manifest size {record.size}"
            )
        if record.checksum is not None and record.algorithm is not None:
            checksum = Checksum(record.algorithm)
            checksum.update(data)
            if checksum.hexdigest() != record.checksum:
                raise CorruptCheckpoint(
                    self._storage.url_for(path),
                    f"{record.algorithm} {checksum.hexdigest()} != manifest {record.checksum}",
                )
        return data

    # -- DCP's StorageReader ----------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None and os.fspath(checkpoint_id) != self.checkpoint_id:
            raise InvalidArgument(
                f"this StorageReader reads {self.checkpoint_id}; checkpoint_id "
                f"{os.fspath(checkpoint_id)!r} names another place"
            )
        self.load_id = str(uuid.uuid4())

    def read_metadata(self) -> Metadata:
        if self._metadata is None:
            data = self.verified_bytes(METADATA_FILE)
            path = self._storage.url_for(f"{step_dir(self._resolve())}/{METADATA_FILE}")
            try:
                metadata = _MetadataUnpickler(io.BytesIO(data)).load()
            except Exception as exc:
                raise CorruptCheckpoint(path, f"DCP metadata is unreadable: {exc}") from exc
            if not isinstance(metadata, Metadata):
                raise CorruptCheckpoint(path, f"holds a {type(metadata).__name__}, not Metadata")
            self._metadata = metadata
        if getattr(self._metadata, "storage_meta", None) is None:
            self._metadata.storage_meta = StorageMeta()
        assert self._metadata.storage_meta is not None
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        if metadata.storage_data is None:
            raise CorruptCheckpoint(self.checkpoint_id, "DCP metadata has no storage data")
        self._storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            info = self._storage_data[item.storage_index]
            per_file.setdefault(info.relative_path, []).append(item)
        for name, items in sorted(per_file.items()):
            view = memoryview(self.verified_bytes(name))
            for item in items:
                self._load_item(view, item, planner)
            view.release()
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _load_item(self, view: memoryview, item: ReadItem, planner: LoadPlanner) -> None:
        info = self._storage_data[item.storage_index]
        where = f"{self.checkpoint_id}/{info.relative_path}"
        if getattr(info, "transform_descriptors", None):
            raise CorruptCheckpoint(where, "uses DCP stream extensions, which are not supported")
        window = view[info.offset : info.offset + info.length]
        if len(window) != info.length:
            raise CorruptCheckpoint(where, f"item {item.storage_index} lies beyond the file end")
        if item.type == LoadItemType.BYTE_IO:
            planner.load_bytes(item, io.BytesIO(window))
            return
        try:
            tensor = torch.load(
                cast(IO[bytes], _Slice(window)), map_location="cpu", weights_only=True
            )
        except Exception as exc:
            raise CorruptCheckpoint(where, f"item {item.storage_index} unreadable: {exc}") from exc
        for dim, (start, length) in enumerate(zip(item.storage_offsets, item.lengths, strict=True)):
            tensor = tensor.narrow(dim, start, length)
        target = planner.resolve_tensor(item).detach()
        if target.size() != tensor.size():
            raise CorruptCheckpoint(
                where,
                f"item {item.storage_index} has shape {tuple(tensor.size())}, the state dict "
                f"expects {tuple(target.size())}",
            )
        target.copy_(tensor)
        planner.commit_tensor(item, target)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False
