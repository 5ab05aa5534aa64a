"""Commit latency: from the moment the last save of a step finished to the pointer being visible.

Per backend (local disk, memory, and S3 / GCS through the emulators of ``commitpoint.testing``
when those are installed), each step has four ``save_async`` saves of 1 MiB through an in-process
monitor, registered before the saves start. Each save records the instant its data was written
(its file closed); a reader polls the state-dict pointer (every 0.2 ms on local and memory, as fast
as a request returns on S3/GCS) until it names the step. The latency covers the last
``notify_finished``, the manifest write and the pointer's compare-and-swap, plus up to one poll.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from benchmarks.common import MiB, Row, base_parser, repeats_from, report, row

NAME = "commit_latency"
SAVES_PER_STEP = 4


def _roots() -> Iterator[tuple[str, Callable[[], Any]]]:
    """(backend, context manager factory) for every backend that can run here."""
    from commitpoint.testing import local_root, memory_root

    yield "local", local_root
    yield "memory", memory_root
    for backend, module in (("s3", "commitpoint.testing.s3"), ("gcs", "commitpoint.testing.gcs")):
        try:
            imported = __import__(module, fromlist=["x"])
            yield backend, getattr(imported, f"{backend}_root")
        except (ImportError, AttributeError) as exc:
            yield backend, _skipped(f"{type(exc).__name__}: {exc}")


def _skipped(reason: str) -> Callable[[], Any]:
    def factory() -> Any:
        raise ImportError(reason)

    return factory


def measure(backend: str, root: Any, steps: int, file_size: int) -> Row:
    from commitpoint import CheckpointCoordinator

    monitor = root.monitor()
    coordinator = CheckpointCoordinator(monitor)
    storage = coordinator.storage
    reader = root.reader()
    poll_sleep = 0.0002 if backend in ("local", "memory") else 0.0
    payload = os.urandom(file_size)
    latencies: list[float] = []
    for step in range(1, steps + 1):
        finished: list[float] = []
        coordinator.register_and_monitor_sync(step, True, state_dict_thread_count=SAVES_PER_STEP)

        def save(index: int, step: int = step, finished: list[float] = finished) -> None:
            storage.write_bytes(f"{coordinator.step_dir(step)}/part-{index}.bin", payload)
            finished.append(time.perf_counter())

        for index in range(SAVES_PER_STEP):
            coordinator.save_async(f"part{index}", functools.partial(save, index), step, True)
        deadline = time.monotonic() + 60
        while reader.latest_state_dict_step() != step:
            if time.monotonic() > deadline:
                raise TimeoutError(f"step {step} not visible on {root.url} after 60 s")
            if poll_sleep:
                time.sleep(poll_sleep)
        visible = time.perf_counter()
        coordinator.wait_all()
        latencies.append(visible - max(finished))
    return row(
        backend,
        "last save finished -> pointer visible",
        "s",
        latencies,
        note=f"{SAVES_PER_STEP} saves x {file_size // 1024} KiB per step",
    )


def main(argv: list[str] | None = None) -> int:
    args = base_parser(__doc__).parse_args(argv)
    steps = repeats_from(args, full=30, quick=5)
    file_size = 64 * 1024 if args.quick else MiB
    rows: list[Row] = []
    for backend, factory in _roots():
        try:
            context = factory()
            with contextlib.ExitStack() as stack:
                root = stack.enter_context(context)
                rows.append(measure(backend, root, steps, file_size))
        except ImportError as exc:  # includes MissingTestDependency
            rows.append({"case": backend, "method": "skipped", "unit": "", "note": str(exc)[:200]})
        except Exception as exc:  # an emulator that would not start: report, go on
            if backend in ("local", "memory"):
                raise
            note = f"{type(exc).__name__}: {exc}"[:200]
            rows.append({"case": backend, "method": "failed", "unit": "", "note": note})
    return report(NAME, rows)


if __name__ == "__main__":
    raise SystemExit(main())
