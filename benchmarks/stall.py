"""Training stall per checkpoint: how long the training loop is blocked by one save.

Compared, for each state-dict size, in the same run:

- **commitpoint** ``save_async`` (plus the step's ``register_and_monitor_sync``), after the
  caller's own copy of the state dict (``clone``), which is timed and reported on its own row;
- **torch.save** called synchronously (the loop waits for the whole write; no fsync);
- **DCP async_save** with ``FileSystemWriter`` (``no_dist=True``): its stall includes its own
  staging copy of the state dict;
- a **plain thread** running ``torch.save`` and then writing the pointer with a bare
  ``open(..., "w")`` (no fsync, no manifest: the baseline commitpoint's guarantees cost against).

The ratio column is torch.save's median divided by each method's median (higher is better).
Each background save is waited for (and its files removed) before the next run starts.
"""

from __future__ import annotations

import importlib
import shutil
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    GiB,
    Row,
    base_parser,
    clone_state_dict,
    format_size,
    make_state_dict,
    repeats_from,
    report,
    row,
    scratch_dir,
    sizes_from,
)

NAME = "stall"
STALL_GOAL_S = 1e-3
RATIO_GOAL = 100.0


def _commitpoint_stall(root: Path, sd: dict[str, Any], step: int) -> tuple[float, float]:
    """(stall of save_async + registration, seconds until the step was committed)."""
    from commitpoint import CheckpointCoordinator, CheckpointMonitor, save_torch

    monitor = CheckpointMonitor(str(root))
    coordinator = CheckpointCoordinator(monitor)
    storage = coordinator.storage
    path = f"{coordinator.step_dir(step)}/model.pt"
    start = time.perf_counter()
    coordinator.register_and_monitor_sync(step, True, state_dict_thread_count=1)
    coordinator.save_async("model", lambda: save_torch(storage, path, sd), step, True)
    stall = time.perf_counter() - start
    coordinator.wait_all()
    total = time.perf_counter() - start
    if monitor.latest_state_dict_step() != step:
        raise RuntimeError(f"step {step} was not committed under {root}")
    return stall, total


def _torch_save_stall(root: Path, sd: dict[str, Any], step: int) -> float:
    import torch

    folder = root / f"global_step_{step}"
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    torch.save(sd, folder / "model.pt")
    return time.perf_counter() - start


def _dcp_stall(root: Path, sd: dict[str, Any], step: int) -> tuple[float, float]:
    dcp: Any = importlib.import_module("torch.distributed.checkpoint")

    writer = dcp.FileSystemWriter(str(root / f"global_step_{step}"))
    start = time.perf_counter()
    future = dcp.async_save(sd, storage_writer=writer, no_dist=True)
    stall = time.perf_counter() - start
    result = getattr(future, "upload_completion", future)
    result.result()
    return stall, time.perf_counter() - start


def _thread_stall(root: Path, sd: dict[str, Any], step: int) -> tuple[float, float]:
    import torch

    folder = root / f"global_step_{step}"

    def save() -> None:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(sd, folder / "model.pt")
        with open(root / "latest_state_dict_iteration.txt", "w") as f:
            f.write(str(step))

    start = time.perf_counter()
    thread = threading.Thread(target=save, daemon=True)
    thread.start()
    stall = time.perf_counter() - start
    thread.join()
    return stall, time.perf_counter() - start


def _clear(root: Path) -> None:
    for child in root.iterdir():
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink()


def measure(size: int, repeats: int) -> list[Row]:
    sd = make_state_dict(size)
    case = format_size(size)
    samples: dict[str, list[float]] = {
        k: [] for k in ("copy", "commitpoint", "torch.save", "dcp", "thread")
    }
    totals: dict[str, list[float]] = {k: [] for k in ("commitpoint", "dcp", "thread")}
    with scratch_dir(NAME) as scratch:
        for run in range(repeats):
            step = run + 1
            for method in ("commitpoint", "torch.save", "dcp", "thread"):
                root = scratch / method.replace(".", "_")
                root.mkdir(exist_ok=True)
                start = time.perf_counter()
                copy = clone_state_dict(sd)
                copied = time.perf_counter() - start
                if method == "commitpoint":
                    samples["copy"].append(copied)
                    stall, total = _commitpoint_stall(root, copy, step)
                elif method == "torch.save":
                    stall = _torch_save_stall(root, sd, step)
                    total = stall
                elif method == "dcp":
                    stall, total = _dcp_stall(root, sd, step)
                else:
                    stall, total = _thread_stall(root, copy, step)
                samples[method].append(stall)
                if method in totals:
                    totals[method].append(total)
                del copy
                _clear(root)
    base = statistics.median(samples["torch.save"])
    rows: list[Row] = []
    labels = {
        "copy": "caller's copy (clone), all methods",
        "commitpoint": "commitpoint save_async + register",
        "torch.save": "torch.save (synchronous)",
        "dcp": "DCP async_save (incl. its staging)",
        "thread": "plain thread + bare open()",
    }
    for method, values in samples.items():
        extra: dict[str, Any] = {}
        median = statistics.median(values)
        if method != "copy":
            extra["ratio"] = base / median if median else None
            extra["ratio_to"] = "torch.save / this"
        if method in totals:
            extra["save_done_s"] = statistics.median(totals[method])
        if method == "commitpoint":
            extra["goal"] = f"< {STALL_GOAL_S * 1e3:g} ms"
            r = row(case, labels[method], "s", values, **extra)
            r["met"] = r["median"] < STALL_GOAL_S
            rows.append(r)
            if size == GiB:
                rows.append(
                    row(
                        case,
                        "commitpoint vs torch.save",
                        "x",
                        [base / v for v in values],
                        goal=f">= {RATIO_GOAL:g}x at 1 GiB",
                        met=bool(extra["ratio"] and extra["ratio"] >= RATIO_GOAL),
                        note="ratio per run: torch.save median / commitpoint run",
                    )
                )
            continue
        rows.append(row(case, labels[method], "s", values, **extra))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = base_parser(__doc__).parse_args(argv)
    repeats = repeats_from(args)
    rows: list[Row] = []
    for size in sizes_from(args):
        rows += measure(size, repeats)
    return report(NAME, rows)


if __name__ == "__main__":
    raise SystemExit(main())
