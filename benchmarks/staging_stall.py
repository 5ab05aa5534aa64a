"""Staging stall per checkpoint: how long training is blocked to snapshot live tensors.

A background save needs a copy of the tensors the next ``optimizer.step()`` will change. For each
state-dict size (float32 CPU tensors shaped like a transformer), every run measures, in turn:

- **staged, behind compute**: ``coordinator.stage()`` + ``save_staged_async`` + registration,
  then a simulated forward/backward lasting twice the copy time, then ``wait()`` before the
  optimizer step; the stall is the time in those calls, not the compute. The compute either
  leaves the CPU free (``sleep``: the host thread waiting on a GPU) or keeps both cores busy
  (matrix products on the same cores as the copy);
- **staged, no compute**: ``wait()`` right after ``stage()`` (the whole copy, into reused
  buffers); and the **first checkpoint**, whose buffers are still to be allocated;
- **DCP async_save** (``FileSystemWriter``, ``no_dist=True``): by default, its call includes
  its staging copy (the reference of the ratios); and with its asynchronous staging (one
  ``DefaultStager`` reused for every save, no pinned or shared memory, which need an
  accelerator), behind the same CPU-free compute, waiting for ``staging_completion`` before the
  optimizer step (``cache_staged_state_dict=True`` needs an accelerator too, so it is left out);
- **torch.save**, synchronous.

``ratio`` is each median over DCP async_save's default median (lower is better). Every save is
waited for (and its files removed) before the next measurement; each method is run once untimed
first.
"""

from __future__ import annotations

import importlib
import shutil
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.common import (
    GiB,
    MiB,
    Row,
    base_parser,
    format_size,
    make_state_dict,
    repeats_from,
    report,
    row,
    scratch_dir,
    sizes_from,
)

NAME = "staging_stall"
SIZES = (256 * MiB, GiB)
QUICK_SIZES = (16 * MiB,)
COMPUTE_PER_COPY = 2.0
"""The simulated step lasts this many times the copy (no compute) median."""
MIN_COMPUTE_S = 0.005
HIDDEN_GOAL = 0.05
"""Goal: behind compute, the stall is at most 5% of DCP async_save's."""

LABELS = {
    "idle": "staged, behind compute leaving the CPU free (sleep)",
    "busy": "staged, behind CPU-bound compute (matmul on the same cores)",
    "bare": "staged, no compute (stage then wait)",
    "first": "staged, first checkpoint (allocates its buffers), no compute",
    "dcp": "DCP async_save (default: staging copy in the call)",
    "dcp_async": "DCP async_save, async staging, behind compute leaving the CPU free (sleep)",
    "torch_save": "torch.save (synchronous)",
}


def _cpu_bound_step(seconds: float) -> None:
    """Matrix products for ``seconds``: a forward/backward competing with the copy for cores."""
    import torch

    a = torch.randn(384, 384)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a @ a


class _StagedSaves:
    """One coordinator and monitor on ``root``; each call stages, saves and commits a step."""

    def __init__(self, root: Path) -> None:
        from commitpoint import CheckpointCoordinator, CheckpointMonitor

        self.root = root
        self.monitor = CheckpointMonitor(str(root))
        self.coordinator = CheckpointCoordinator(self.monitor)
        self.step = 0

    def run(
        self,
        sd: dict[str, Any],
        compute: Callable[[], None] | None,
        coordinator: Any = None,
    ) -> float:
        """Stall of one checkpoint: stage + save_staged_async + register + wait."""
        from commitpoint import save_torch

        coordinator = coordinator or self.coordinator
        self.step += 1
        step = self.step
        save = partial(save_torch, coordinator.storage, f"{coordinator.step_dir(step)}/model.pt")
        start = time.perf_counter()
        staged = coordinator.stage(sd)
        coordinator.save_staged_async("model", staged, save, step, True)
        coordinator.register_and_monitor_sync(step, True, state_dict_thread_count=1)
        stall = time.perf_counter() - start
        if compute is not None:
            compute()
        start = time.perf_counter()
        staged.wait()
        stall += time.perf_counter() - start
        coordinator.wait_all()
        if self.monitor.latest_state_dict_step() != step:
            raise RuntimeError(f"step {step} was not committed under {self.root}")
        shutil.rmtree(self.root / coordinator.step_dir(step), ignore_errors=True)
        return stall

    def first(self, sd: dict[str, Any]) -> float:
        """A checkpoint by a fresh coordinator, whose stager has no buffers yet."""
        from commitpoint import CheckpointCoordinator

        fresh = CheckpointCoordinator(self.monitor)
        try:
            return self.run(sd, None, fresh)
        finally:
            fresh.stager.close()


def _dcp_stall(root: Path, sd: dict[str, Any]) -> float:
    """DCP's default: the call returns once its staging copy is made."""
    dcp: Any = importlib.import_module("torch.distributed.checkpoint")

    folder = root / "dcp"
    writer = dcp.FileSystemWriter(str(folder))
    start = time.perf_counter()
    future = dcp.async_save(sd, storage_writer=writer, no_dist=True)
    stall = time.perf_counter() - start
    getattr(future, "upload_completion", future).result()
    shutil.rmtree(folder, ignore_errors=True)
    return stall


def _dcp_async_staging_stall(
    root: Path, sd: dict[str, Any], stager: Any, compute: Callable[[], None]
) -> float:
    """DCP with asynchronous staging: call, compute, wait for the staging to complete."""
    dcp: Any = importlib.import_module("torch.distributed.checkpoint")

    folder = root / "dcp"
    writer = dcp.FileSystemWriter(str(folder))
    start = time.perf_counter()
    response = dcp.async_save(sd, storage_writer=writer, no_dist=True, async_stager=stager)
    stall = time.perf_counter() - start
    compute()
    start = time.perf_counter()
    response.staging_completion.result()
    stall += time.perf_counter() - start
    response.upload_completion.result()
    shutil.rmtree(folder, ignore_errors=True)
    return stall


def _torch_save_stall(root: Path, sd: dict[str, Any]) -> float:
    import torch

    path = root / "model.pt"
    start = time.perf_counter()
    torch.save(sd, path)
    stall = time.perf_counter() - start
    path.unlink()
    return stall


def measure(size: int, repeats: int) -> list[Row]:
    staging: Any = importlib.import_module("torch.distributed.checkpoint.staging")

    sd = make_state_dict(size)
    case = format_size(size)
    samples: dict[str, list[float]] = {key: [] for key in LABELS}
    with scratch_dir(NAME) as scratch:
        saves = _StagedSaves(scratch / "commitpoint")
        dcp_stager = staging.DefaultStager(staging.StagingOptions(False, False, True, False))
        # untimed first runs: imports, thread pools, and the buffers of the reusing methods
        for _ in range(2):
            saves.run(sd, None)
        copy_s = statistics.median(saves.run(sd, None) for _ in range(3))
        compute_s = max(MIN_COMPUTE_S, COMPUTE_PER_COPY * copy_s)
        idle_step = partial(time.sleep, compute_s)
        _dcp_stall(scratch, sd)
        _dcp_async_staging_stall(scratch, sd, dcp_stager, idle_step)
        _torch_save_stall(scratch, sd)
        methods: dict[str, Callable[[], float]] = {
            "idle": lambda: saves.run(sd, idle_step),
            "busy": lambda: saves.run(sd, partial(_cpu_bound_step, compute_s)),
            "bare": lambda: saves.run(sd, None),
            "first": lambda: saves.first(sd),
            "dcp": lambda: _dcp_stall(scratch, sd),
            "dcp_async": lambda: _dcp_async_staging_stall(scratch, sd, dcp_stager, idle_step),
            "torch_save": lambda: _torch_save_stall(scratch, sd),
        }
        for _ in range(repeats):
            for key, method in methods.items():
                samples[key].append(method())
        dcp_stager.close()
    base = statistics.median(samples["dcp"])
    rows: list[Row] = []
    for key, values in samples.items():
        median = statistics.median(values)
        extra: dict[str, Any] = {"ratio": median / base, "ratio_to": "this / DCP async_save"}
        if key == "dcp_async":
            extra["note"] = f"compute {compute_s * 1e3:.0f} ms per step, as for staged"
        if key in ("idle", "busy"):
            extra["goal"] = f"<= {HIDDEN_GOAL:.0%} of DCP async_save"
            extra["met"] = median <= HIDDEN_GOAL * base
            extra["note"] = f"compute {compute_s * 1e3:.0f} ms per step (2x the copy)"
        elif key == "bare":
            extra["goal"] = "<= DCP async_save"
            extra["met"] = median <= base
        rows.append(row(case, LABELS[key], "s", values, **extra))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__)
    args = parser.parse_args(argv)
    sizes = sizes_from(args) if args.sizes else list(QUICK_SIZES if args.quick else SIZES)
    repeats = repeats_from(args)
    rows: list[Row] = []
    for size in sizes:
        rows += measure(size, repeats)
    return report(NAME, rows)


if __name__ == "__main__":
    raise SystemExit(main())
