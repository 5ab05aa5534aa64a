"""Real gloo ranks for the DCP tests: each rank is its own process running a list of actions.

The test process calls :func:`run_ranks`, which starts ``world_size`` copies of this file (the
environment ``torchrun`` would give them: RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, a free
MASTER_PORT), waits for them within a deadline, and returns what each rank reported. Rank 0 owns
the job's in-process monitor; the other ranks write through a plain backend of the same root.

Actions (a list of dicts, run in order on every rank):
- ``{"op": "save", "step": N, "async": bool, "is_state_dict": bool, "seed": S}``: train an FSDP2
  model (seeded) one optimizer step and save model + optimizer through commitpoint.dcp;
  reports the full values it saved.
- ``{"op": "load", "step": N | None, "seed": S}``: build the model with another seed, load the
  step into model + optimizer (``get_state_dict`` / ``set_state_dict``), report what it holds.
- ``{"op": "fence"}``: rank 0 starts a second monitor on the root (a restarted job), fencing its
  own.
- ``{"op": "export", "step": N, "seed": S}``: export the trained model's weights as safetensors
  (``config.json`` included) as state-dict step N; reports the full values.
- ``{"op": "hash", "step": N}``: rank 0 reports the sha256 of every file of step N.
- ``{"op": "flip", "path": P}``: rank 0 flips one byte in the middle of file P (relative to the
  root) behind commitpoint's back; every rank waits for it.
- ``{"op": "stall", "rank": R}``: rank R's next save blocks after its first write, having
  created the file ``stalled-<R>`` beside the results, until it is killed.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

RANK_TIMEOUT_S = 20.0
"""gloo's timeout for one collective: a rank whose peer died fails within this."""


@dataclass
class Ranks:
    """What :func:`run_ranks` gives back: each rank's reports and exit code."""

    reports: list[list[dict[str, Any]]]
    returncodes: list[int | None]
    logs: list[str]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(
    world_size: int, argv: list[str], work: Path, outputs: list[str] | None = None
) -> list[subprocess.Popen[bytes]]:
    """Start ``python <argv>`` once per rank with torchrun's environment; rank r's output goes
    to ``work/rank-<r>.log`` and ``{out}`` in ``argv`` becomes ``outputs[r]``."""
    work.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    processes = []
    for rank in range(world_size):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        args = [a.replace("{out}", outputs[rank]) if outputs else a for a in argv]
        with open(work / f"rank-{rank}.log", "wb") as log:
            processes.append(
                subprocess.Popen(
                    [sys.executable, *args], env=env, stdout=log, stderr=subprocess.STDOUT
                )
            )
    return processes


def start_ranks(
    world_size: int, url: str, options: dict[str, Any], actions: list[dict[str, Any]], work: Path
) -> list[subprocess.Popen[bytes]]:
    work.mkdir(parents=True, exist_ok=True)
    spec = work / "spec.json"
    spec.write_text(json.dumps({"url": url, "options": options, "actions": actions}))
    outputs = [str(work / f"rank-{rank}.json") for rank in range(world_size)]
    return launch(world_size, [__file__, str(spec), "{out}"], work, outputs)


def wait_ranks(
    processes: list[subprocess.Popen[bytes]], work: Path, timeout: float = 90.0
) -> Ranks:
    """Wait for every rank; kill whatever is still running at the deadline (a hang)."""
    deadline = time.monotonic() + timeout
    codes: list[int | None] = []
    for process in processes:
        try:
            codes.append(process.wait(max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
            codes.append(None)
    reports = []
    logs = []
    for rank in range(len(processes)):
        path = work / f"rank-{rank}.json"
        reports.append(json.loads(path.read_text()) if path.exists() else [])
        logs.append((work / f"rank-{rank}.log").read_text(errors="replace")[-3000:])
    return Ranks(reports, codes, logs)


def run_ranks(
    world_size: int,
    url: str,
    options: dict[str, Any],
    actions: list[dict[str, Any]],
    work: Path,
    timeout: float = 90.0,
) -> Ranks:
    return wait_ranks(start_ranks(world_size, url, options, actions, work), work, timeout)


# -- inside a rank ----------------------------------------------------------------------------
def build_model(seed: int) -> Any:
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def train_one_step(model: Any, seed: int) -> Any:
    import torch

    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    torch.manual_seed(seed + 1)
    batch = torch.randn(4, 8)
    model(batch).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return optimizer


def full_values(state: Any) -> Any:
    """Plain nested lists of ``state`` with every DTensor gathered: comparable across ranks."""
    import torch
    from torch.distributed.tensor import DTensor

    if isinstance(state, DTensor):
        state = state.full_tensor()
    if isinstance(state, torch.Tensor):
        return state.detach().to(torch.float64).flatten().tolist()
    if isinstance(state, dict):
        return {str(k): full_values(v) for k, v in sorted(state.items(), key=lambda i: str(i[0]))}
    if isinstance(state, list | tuple):
        return [full_values(v) for v in state]
    return state


def _sharded(seed: int) -> tuple[Any, Any]:
    from torch.distributed.fsdp import fully_shard

    model = build_model(seed)
    for layer in model:
        if list(layer.parameters()):
            fully_shard(layer)
    fully_shard(model)
    return model, train_one_step(model, seed)


def _describe(exc: BaseException) -> dict[str, Any]:
    cause = getattr(exc, "cause", None)
    return {
        "ok": False,
        "error": type(exc).__name__,
        "cause": type(cause).__name__ if cause is not None else None,
        "message": str(exc)[:500],
    }


def _stall_after_first_write(storage: Any, marker: Path) -> None:
    """Make this rank's next tracked file block after its first write (to be killed there)."""
    original = storage.open_write

    def open_write(relpath: str, **kwargs: Any) -> Any:
        writer = original(relpath, **kwargs)
        if not relpath.endswith(".distcp"):
            return writer
        write = writer.write

        def stalling_write(data: Any) -> int:
            write(data)
            marker.write_text(str(os.getpid()))
            while True:
                time.sleep(1)

        writer.write = stalling_write
        return writer

    storage.open_write = open_write


def rank_main(spec_path: str, out_path: str) -> None:
    warnings.simplefilter("ignore")
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_state_dict,
    )

    import commitpoint.dcp as cdcp
    from commitpoint import CheckpointCoordinator, CheckpointMonitor, open_storage

    spec = json.loads(Path(spec_path).read_text())
    url, options = spec["url"], spec["options"]
    dist.init_process_group("gloo", timeout=timedelta(seconds=RANK_TIMEOUT_S))
    rank = dist.get_rank()
    if rank == 0:
        target: Any = CheckpointCoordinator(
            CheckpointMonitor(url, options), node_id=socket.gethostname()
        )
        storage = target.storage
    else:
        target = storage = open_storage(url, **options)
    reports: list[dict[str, Any]] = []
    out = Path(out_path)

    def record(report: dict[str, Any]) -> None:
        reports.append(report)
        out.write_text(json.dumps(reports))

    for action in spec["actions"]:
        op = action["op"]
        report: dict[str, Any] = {"op": op, "ok": True}
        try:
            if op == "save":
                model, optimizer = _sharded(action.get("seed", 0))
                model_sd, optim_sd = get_state_dict(model, optimizer)
                state = {"model": model_sd, "optim": optim_sd}
                report["values"] = full_values(state)
                kwargs = {"is_state_dict": action.get("is_state_dict", False)}
                if action.get("async"):
                    future = cdcp.async_save(state, target, action["step"], **kwargs)
                    future.result(timeout=60)
                else:
                    cdcp.save(state, target, action["step"], **kwargs)
            elif op == "load":
                model, optimizer = _sharded(action.get("seed", 99))
                model_sd, optim_sd = get_state_dict(model, optimizer)
                state = {"model": model_sd, "optim": optim_sd}
                report["step"] = cdcp.load(state, url, action.get("step"), **options)
                set_state_dict(
                    model,
                    optimizer,
                    model_state_dict=state["model"],
                    optim_state_dict=state["optim"],
                )
                model_sd, optim_sd = get_state_dict(model, optimizer)
                report["values"] = full_values({"model": model_sd, "optim": optim_sd})
            elif op == "export":
                model, _ = _sharded(action.get("seed", 0))
                weights = get_model_state_dict(model)
                report["values"] = full_values(weights)
                cdcp.export_safetensors(
                    weights, target, action["step"], config={"model_type": "toy"}
                )
            elif op == "hash" and rank == 0:
                plain = open_storage(url, **options)
                report["hashes"] = {
                    info.path: hashlib.sha256(plain.read_bytes(info.path)).hexdigest()
                    for info in plain.list_files(f"global_step_{action['step']}")
                }
            elif op == "flip":
                if rank == 0:
                    plain = open_storage(url, **options)
                    data = bytearray(plain.read_bytes(action["path"]))
                    data[len(data) // 2] ^= 0x01
                    plain.write_bytes(action["path"], bytes(data), track=False)
                dist.barrier()
            elif op == "fence" and rank == 0:
                CheckpointMonitor(url, options)
            elif op == "stall" and rank == action["rank"]:
                _stall_after_first_write(storage, out.parent / f"stalled-{rank}")
        except Exception as exc:
            report.update(_describe(exc))
        record(report)
    out.write_text(json.dumps(reports))
    dist.destroy_process_group()


if __name__ == "__main__":
    rank_main(sys.argv[1], sys.argv[2])
