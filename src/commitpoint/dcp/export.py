"""Weights-only export in safetensors: a committed state-dict step that loads as a model folder.

transformers (``from_pretrained(folder)``) and vLLM read a folder holding ``model.safetensors``
and ``config.json``. :func:`export_safetensors` writes exactly that into ``global_step_<N>/``
and commits it as a state dict, so weight consumers that watch the state-dict pointer can load
each new step as it appears. Sharded (DTensor, FSDP2) weights are gathered one tensor at a time
on every rank and written by the coordinator rank only, streaming through the backend's writer
(checksummed like every other file). The safetensors format (an 8-byte little-endian header
length, a JSON header, then the raw tensor bytes) is written directly, so no extra package is
needed to export; the ``safetensors`` package reads the result.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from commitpoint.core.layout import Kind, check_name, check_step, safe_relpath, step_dir
from commitpoint.dcp._report import SAVE_NAME, StepReport, refuse_if_committed, refuse_if_fenced
from commitpoint.dcp.writer import storage_of
from commitpoint.errors import InvalidArgument, SaveFailed
from commitpoint.save.coordinator import CheckpointCoordinator
from commitpoint.storage.protocol import FileRecord, StorageBackend

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def _header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """The safetensors header for ``tensors`` (global shapes), padded to 8 bytes."""
    body: dict[str, Any] = {"__metadata__": {"format": "pt", **metadata}}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        body[name] = {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header = json.dumps(body, separators=(",", ":")).encode()
    header += b" " * (-(8 + len(header)) % 8)
    return struct.pack("<Q", len(header)) + header


def _check_weights(state_dict: object) -> dict[str, torch.Tensor]:
    if not isinstance(state_dict, Mapping):
        raise InvalidArgument(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    weights: dict[str, torch.Tensor] = {}
    for name, value in state_dict.items():
        check_name(name, "tensor name")
        if not isinstance(value, torch.Tensor):
            raise InvalidArgument(
                f"safetensors holds tensors only; {name!r} is a {type(value).__name__} (export "
                "the model's state dict, e.g. get_model_state_dict(model))"
            )
        if value.dtype not in _DTYPES:
            raise InvalidArgument(f"{name!r} has dtype {value.dtype}, which safetensors lacks")
        weights[name] = value
    return weights


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on CPU, contiguous (a DTensor is gathered: every rank takes part)."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu().contiguous()


def _agree(outcome: BaseException | None, coordinating: bool, group: Any) -> None:
    """Broadcast the coordinator rank's outcome; every rank raises the same error."""
    if dist.is_available() and dist.is_initialized():
        shared: list[BaseException | None] = [outcome if coordinating else None]
        dist.broadcast_object_list(
            shared, src=dist.get_global_rank(group, 0) if group else 0, group=group
        )
        outcome = shared[0]
    if outcome is not None:
        raise outcome


def export_safetensors(
    state_dict: Mapping[str, torch.Tensor],
    coordinator: CheckpointCoordinator | StorageBackend,
    global_step: int,
    *,
    config: Mapping[str, Any] | None = None,
    filename: str = "model.safetensors",
    metadata: Mapping[str, str] | None = None,
    process_group: Any = None,
) -> None:
    """Write ``state_dict`` (model weights, plain tensors or DTensors) as
    ``global_step_<N>/<filename>`` (plus ``config.json`` from ``config``) and commit it as a
    state-dict step.

    Call it on every rank, like :func:`commitpoint.dcp.save`; rank 0 of ``process_group`` needs
    a :class:`CheckpointCoordinator`. A committed step or a fenced writer is refused before any
    byte is written, on every rank alike (:class:`SaveFailed`).
    """
    check_step(global_step)
    safe_relpath(filename)
    weights = _check_weights(state_dict)
    user_metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    config_bytes = None if config is None else json.dumps(dict(config), indent=2).encode()
    owner, storage = storage_of(coordinator)
    distributed = dist.is_available() and dist.is_initialized()
    coordinating = not distributed or dist.get_rank(process_group) == 0
    report: StepReport | None = None
    refusal: BaseException | None = None
    if coordinating:
        try:
            if owner is None:
                raise InvalidArgument("the coordinator rank of an export needs a coordinator")
            report = StepReport(owner, global_step, Kind.STATE_DICT)
            admission = report.admit()
        except Exception as exc:
            refusal = SaveFailed(global_step, SAVE_NAME, exc)
    _agree(refusal, coordinating, process_group)

    failure: BaseException | None = None
    folder = step_dir(global_step)
    writer = None
    try:
        if coordinating:
            writer = storage.open_write(f"{folder}/{filename}", track=False)
            writer.write(_header(weights, user_metadata))
        for tensor in weights.values():
            full = _full(tensor)  # a collective for DTensors: every rank, same order
            if writer is not None:
                writer.write(full.reshape(-1).view(torch.uint8).numpy().data)
            del full
    except Exception as exc:
        failure = exc
    if coordinating:
        assert report is not None
        try:
            if failure is not None:
                raise failure
            assert writer is not None
            records: list[FileRecord] = []
            refuse_if_fenced(storage, admission.writer_epoch)
            refuse_if_committed(storage, global_step, Kind.STATE_DICT)
            writer.close()
            assert writer.record is not None
            records.append(writer.record)
            if config_bytes is not None:
                records.append(
                    storage.write_bytes(f"{folder}/config.json", config_bytes, track=False)
                )
            report.commit(records)
        except Exception as exc:
            if writer is not None:
                writer.abort()
            report.fail(exc)
            failure = SaveFailed(global_step, SAVE_NAME, exc)
        else:
            failure = None
    elif failure is not None:
        failure = SaveFailed(global_step, SAVE_NAME, failure)
    _agree(failure if coordinating else None, coordinating, process_group)
    if failure is not None:  # this rank's own gather failed; the coordinator saw it too
        raise failure
