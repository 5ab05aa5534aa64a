"""Monitor scaling: notification rate, concurrent saves per step, and cost as steps accumulate.

Runs against the Ray actor (``CheckpointMonitor.get_actor``, ``ray.init(num_cpus=2)`` in this
process) and, where it makes sense, the in-process monitor, on a local-disk root:

- **notifications/s**: a batch of ``notify_finished`` calls for one registered step (in flight
  together for the actor; one after the other for the in-process monitor);
- **one step, K concurrent saves** (K = 1, 8, 64, 256) spread over 4 worker processes (Ray actors,
  each with its own ``CheckpointCoordinator``): registration -> every save done -> pointer visible;
- **cost per step as steps accumulate**: steps 1..N one after the other (register, one small
  save, wait until committed); time per step in 10 windows, and the last window's median over the
  first's (flat = 1.0).
"""

from __future__ import annotations

import functools
import os
import statistics
import time
import uuid
from typing import Any

from benchmarks.common import REPO_DIR, Row, base_parser, repeats_from, report, row, scratch_dir

NAME = "monitor_scaling"
WORKERS = 4
PAYLOAD = b"x" * 4096


class SaveWorker:
    """One worker process with its own coordinator (used as a Ray actor)."""

    def __init__(self, monitor: Any) -> None:
        from commitpoint import CheckpointCoordinator

        self._coordinator = CheckpointCoordinator(monitor)

    def save(self, step: int, first: int, count: int) -> int:
        storage = self._coordinator.storage
        folder = self._coordinator.step_dir(step)
        for index in range(first, first + count):
            path = f"{folder}/part-{index}.bin"
            save = functools.partial(storage.write_bytes, path, PAYLOAD)
            self._coordinator.save_async(f"s{index}", save, step, True)
        self._coordinator.wait_all()
        return count


def _wait_visible(reader: Any, step: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while reader.latest_state_dict_step() != step:
        if time.monotonic() > deadline:
            raise TimeoutError(f"step {step} not committed under {reader.url} in {timeout} s")
        time.sleep(0.0002)


def notify_rate(monitor: Any, remote: bool, step: int, count: int) -> float:
    """Notifications per second for ``count`` notify_finished calls of one step."""
    if remote:
        import ray

        monitor.register_thread_count.remote(step, state_dict_thread_count=count)
        ray.get(monitor.monitor_step.remote(step, True))
        start = time.perf_counter()
        ray.get([monitor.notify_finished.remote(step, True, name=f"n{i}") for i in range(count)])
    else:
        monitor.register_thread_count(step, state_dict_thread_count=count)
        monitor.monitor_step(step, True)
        start = time.perf_counter()
        for i in range(count):
            monitor.notify_finished(step, True, name=f"n{i}")
    return count / (time.perf_counter() - start)


def concurrent_step(monitor: Any, workers: list[Any], reader: Any, step: int, saves: int) -> float:
    import ray

    ray.get(monitor.register_thread_count.remote(step, state_dict_thread_count=saves))
    start = time.perf_counter()
    ray.get(monitor.monitor_step.remote(step, True))
    share, extra = divmod(saves, len(workers))
    calls, first = [], 0
    for index, worker in enumerate(workers):
        count = share + (1 if index < extra else 0)
        if count:
            calls.append(worker.save.remote(step, first, count))
            first += count
    done = sum(ray.get(calls))
    _wait_visible(reader, step)
    if done != saves:
        raise RuntimeError(f"step {step}: {done} of {saves} saves ran")
    return time.perf_counter() - start


def accumulate(monitor: Any, reader: Any, steps: int, first_step: int) -> list[float]:
    """Seconds per step for ``steps`` consecutive steps of one small save each."""
    from commitpoint import CheckpointCoordinator

    coordinator = CheckpointCoordinator(monitor)
    storage = coordinator.storage
    per_step: list[float] = []
    for step in range(first_step, first_step + steps):
        path = f"{coordinator.step_dir(step)}/model.bin"
        start = time.perf_counter()
        coordinator.register_and_monitor_sync(step, True, state_dict_thread_count=1)
        save = functools.partial(storage.write_bytes, path, PAYLOAD)
        coordinator.save_async("model", save, step, True)
        coordinator.wait_all()
        _wait_visible(reader, step)
        per_step.append(time.perf_counter() - start)
    return per_step


def window_rows(monitor_kind: str, per_step: list[float], windows: int = 10) -> list[Row]:
    size = max(1, len(per_step) // windows)
    chunks = [per_step[i : i + size] for i in range(0, size * windows, size)]
    first = statistics.median(chunks[0])
    rows = []
    for index, chunk in enumerate(chunks):
        lo, hi = index * size + 1, (index + 1) * size
        rows.append(
            row(
                f"{monitor_kind}: steps {lo}-{hi}",
                f"{monitor_kind} monitor, time per step",
                "s/step",
                chunk,
                ratio=statistics.median(chunk) / first,
                ratio_to="this window / first window",
            )
        )
    last = rows[-1]
    last["goal"] = "flat (last/first window ~ 1)"
    last["met"] = last["ratio"] < 1.5
    return rows


def main(argv: list[str] | None = None) -> int:
    args = base_parser(__doc__).parse_args(argv)
    import ray

    from commitpoint import CheckpointMonitor, CheckpointReader

    repeats = repeats_from(args)
    notifications = 200 if args.quick else 2000
    accumulate_steps = 100 if args.quick else 2000
    concurrency = (1, 8, 64) if args.quick else (1, 8, 64, 256)
    rows: list[Row] = []
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO_DIR), "RAY_USAGE_STATS_ENABLED": "0"}},
    )
    try:
        with scratch_dir(NAME) as scratch:
            # -- notifications per second --------------------------------------------------
            local_root = scratch / "notify-local"
            actor = CheckpointMonitor.get_actor(
                f"bench-{uuid.uuid4().hex[:8]}", str(scratch / "notify-ray")
            )
            in_process = CheckpointMonitor(str(local_root))
            rates: dict[str, list[float]] = {"ray actor": [], "in-process": []}
            for run in range(repeats):
                rates["ray actor"].append(notify_rate(actor, True, run + 1, notifications))
                rates["in-process"].append(notify_rate(in_process, False, run + 1, notifications))
            for kind, values in rates.items():
                rows.append(
                    row(
                        f"{notifications} notify_finished",
                        f"{kind} monitor",
                        "notifications/s",
                        values,
                    )
                )
            ray.kill(actor)

            # -- one step with K concurrent saves from 4 processes --------------------------
            root = scratch / "concurrent"
            actor = CheckpointMonitor.get_actor(f"bench-{uuid.uuid4().hex[:8]}", str(root))
            reader = CheckpointReader(str(root))
            remote_worker: Any = ray.remote(SaveWorker).options(num_cpus=0, max_concurrency=2)
            workers = [remote_worker.remote(actor) for _ in range(WORKERS)]
            step = 0
            for saves in concurrency:
                seconds = []
                for _ in range(repeats):
                    step += 1
                    seconds.append(concurrent_step(actor, workers, reader, step, saves))
                rows.append(
                    row(
                        f"{saves} saves / step",
                        f"ray actor, {WORKERS} processes",
                        "s",
                        seconds,
                        per_save_ms=statistics.median(seconds) / saves * 1e3,
                    )
                )
            for worker in workers:
                ray.kill(worker)
            ray.kill(actor)

            # -- cost per step as steps accumulate -----------------------------------------
            for kind in ("ray actor", "in-process"):
                root = scratch / f"accumulate-{kind.replace(' ', '-')}"
                monitor: Any = (
                    CheckpointMonitor.get_actor(f"bench-{uuid.uuid4().hex[:8]}", str(root))
                    if kind == "ray actor"
                    else CheckpointMonitor(str(root))
                )
                per_step = accumulate(monitor, CheckpointReader(str(root)), accumulate_steps, 1)
                rows += window_rows(kind, per_step)
                if kind == "ray actor":
                    ray.kill(monitor)
    finally:
        ray.shutdown()
    return report(NAME, rows)


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    raise SystemExit(main())
