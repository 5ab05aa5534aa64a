"""DCP saves on 2 gloo ranks: commitpoint.dcp against DCP's own writers, and the async_save stall.

Two rank processes (gloo, CPU) each hold half of a transformer-like state dict as DTensor shards
(``Shard(0)`` over a 2-rank mesh), so each rank writes half of the total. Local disk:
``commitpoint.dcp.save`` (every byte checksummed, ``.metadata`` in the manifest, the pointer
commit) against DCP's ``FileSystemWriter`` (its defaults: one file per rank, fsync). S3 (moto)
and GCS (fake-gcs-server) on 127.0.0.1: against DCP's ``FsspecWriter`` with the same URL and
options (s3fs / gcsfs underneath); the emulators run in the benchmark's parent process. GB/s
counts the state dict's bytes over the time from a barrier before the save to a barrier after it
on both ranks (commitpoint's commit included). The async rows time how long ``async_save``
blocks the caller (the slower rank of each run): commitpoint's (a copy into its reused staging
buffers) against DCP's (``DefaultStager``'s copy into new memory), both with a local root; the
ratio there is commitpoint's stall over DCP's (lower is better). Methods alternate within each
round, after one small untimed save of each.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import (
    REPO_DIR,
    Row,
    base_parser,
    format_size,
    make_state_dict,
    repeats_from,
    report,
    row,
    scratch_dir,
    sizes_from,
    throughput,
)

NAME = "dcp_throughput"
OURS = "commitpoint.dcp.save (checksums + commit)"
OURS_ASYNC = "commitpoint.dcp.async_save"
DCP_ASYNC = "DCP async_save (FileSystemWriter)"
BASELINES = {
    "local": "DCP FileSystemWriter",
    "s3": "DCP FsspecWriter (s3fs)",
    "gcs": "DCP FsspecWriter (gcsfs)",
}
GOALS = {"local": 1.0, "s3": 1.5, "gcs": 1.5}
"""commitpoint's median GB/s over the baseline's, at least."""
STALL_GOAL = 1.0
"""commitpoint's median async_save stall over DCP's, at most."""
WORLD = 2
MAX_TRIES = 3
"""A run that fails (the emulators time out now and then under load) is retried, and counted."""


# -- the orchestrator -----------------------------------------------------------------------------
@contextlib.contextmanager
def _root(backend: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if backend == "local":
        with scratch_dir("dcp") as folder:
            yield str(folder), {}
    elif backend == "s3":
        from commitpoint.testing.s3 import s3_root

        with s3_root() as root:
            yield root.url, dict(root.storage_options)
    else:
        from commitpoint.testing.gcs import gcs_root

        with gcs_root() as root:
            yield root.url, dict(root.storage_options)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_ranks(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    port = _free_port()
    processes = []
    for rank in range(WORLD):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(WORLD),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_DIR), os.environ.get("PYTHONPATH")])),
        )
        code = "import sys; from benchmarks.dcp_throughput import rank_main; rank_main(sys.argv[1])"
        processes.append(
            subprocess.Popen([sys.executable, "-c", code, str(spec_path)], env=env, cwd=REPO_DIR)
        )
    codes = [p.wait() for p in processes]
    if any(codes):
        raise RuntimeError(f"rank processes exited with {codes}")
    return dict(json.loads((work / "samples.json").read_text()))


def _rows(backend: str, measured: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    failed: dict[str, int] = measured.get("failed", {})
    for size_text, methods in measured["samples"].items():
        size = int(size_text)
        case = f"{format_size(size)}, {backend}"
        baseline = BASELINES[backend]
        rates = {m: throughput(size, seconds) for m, seconds in methods.items() if "async" not in m}
        base = row(case, baseline, "GB/s", rates[baseline])
        ours = row(case, OURS, "GB/s", rates[OURS])
        ours["ratio"] = round(ours["median"] / base["median"], 3)
        ours["ratio_to"] = baseline
        ours["goal"] = f">= {GOALS[backend]:g}x"
        ours["met"] = ours["ratio"] >= GOALS[backend]
        rows += [ours, base]
        if OURS_ASYNC in methods:
            stall_case = f"{format_size(size)}, async stall"
            theirs = row(stall_case, DCP_ASYNC, "s", methods[DCP_ASYNC])
            mine = row(stall_case, OURS_ASYNC, "s", methods[OURS_ASYNC])
            mine["ratio"] = round(mine["median"] / theirs["median"], 3)
            mine["ratio_to"] = DCP_ASYNC
            mine["goal"] = f"<= {STALL_GOAL:g}x"
            mine["met"] = mine["ratio"] <= STALL_GOAL
            rows += [mine, theirs]
    for r in rows:
        if failed.get(r["method"]):
            r["note"] = f"{failed[r['method']]} failed run(s) retried (all sizes)"
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--backends", default="local,s3,gcs", help="e.g. local or local,s3")
    args: argparse.Namespace = parser.parse_args(argv)
    sizes = sizes_from(args)
    repeats = repeats_from(args, full=5, quick=2)
    rows: list[Row] = []
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        with _root(backend) as (url, options), scratch_dir("dcp-work") as work:
            spec = {
                "backend": backend,
                "url": url,
                "options": options,
                "sizes": sizes,
                "repeats": repeats,
                "async": backend == "local",
                "out": str(work / "samples.json"),
            }
            rows += _rows(backend, _run_ranks(spec, work))
    return report(NAME, rows)


# -- inside a rank --------------------------------------------------------------------------------
def rank_main(spec_path: str) -> None:
    """Run every case on this rank; rank 0 writes the samples (seconds per method and size)."""
    warnings.simplefilter("ignore")
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    import commitpoint.dcp as cdcp
    from commitpoint import CheckpointCoordinator, CheckpointMonitor, open_storage

    spec = json.loads(Path(spec_path).read_text())
    backend, url, options = spec["backend"], spec["url"], spec["options"]
    dist.init_process_group("gloo", timeout=timedelta(minutes=30))
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (WORLD,))
    if rank == 0:
        target: Any = CheckpointCoordinator(
            CheckpointMonitor(url, options), node_id=socket.gethostname()
        )
        storage = target.storage
    else:
        target = storage = open_storage(url, **options)
    baseline = BASELINES[backend]
    step = 0

    def dcp_writer(folder: str) -> Any:
        if backend == "local":
            return dcp.FileSystemWriter(os.path.join(url, folder))
        return FsspecWriter(f"{url}/{folder}", **options)

    def timed(save: Any) -> float:
        dist.barrier()
        start = time.perf_counter()
        save()
        dist.barrier()
        return time.perf_counter() - start

    def slowest(seconds: float) -> float:
        value = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return float(value.item())

    def stall(start_save: Any) -> float:
        dist.barrier()
        start = time.perf_counter()
        future = start_save()
        blocked = time.perf_counter() - start
        future.result()
        dist.barrier()
        return slowest(blocked)

    def clean(folder: str) -> None:
        dist.barrier()
        if rank == 0:
            storage.delete(folder, recursive=True)
        dist.barrier()

    def one_run(method: str, state: Any, folder: str, step: int) -> float:
        if method == OURS:
            return timed(functools.partial(cdcp.save, state, target, step))
        if method == baseline:
            writer = dcp_writer(folder)
            return timed(functools.partial(dcp.save, state, storage_writer=writer))
        if method == OURS_ASYNC:
            return stall(functools.partial(cdcp.async_save, state, target, step))
        writer = dcp_writer(folder)
        return stall(functools.partial(dcp.async_save, state, storage_writer=writer))

    samples: dict[str, Any] = {}
    failed: dict[str, int] = {}
    warm_up = True  # one small untimed save per method first: connections, imports, the lease
    for size in [min(spec["sizes"] + [8 * 1024**2]), *spec["sizes"]]:
        local = make_state_dict(size // WORLD, seed=rank)
        state = {
            key: DTensor.from_local(tensor, mesh, [Shard(0)], run_check=False)
            for key, tensor in local.items()
        }
        methods = [OURS, baseline] + ([OURS_ASYNC, DCP_ASYNC] if spec["async"] else [])
        found: dict[str, list[float]] = {m: [] for m in methods}
        for run in range(1 if warm_up else spec["repeats"]):
            for method in methods[run % len(methods) :] + methods[: run % len(methods)]:
                for attempt in range(1, MAX_TRIES + 1):
                    step += 1
                    ours = method in (OURS, OURS_ASYNC)
                    folder = f"global_step_{step}" if ours else f"dcp-{step}"
                    try:
                        seconds = one_run(method, state, folder, step)
                    except BaseException as exc:  # DCP's CheckpointException is a BaseException
                        if isinstance(exc, KeyboardInterrupt) or attempt == MAX_TRIES:
                            raise
                        failed[method] = failed.get(method, 0) + 1
                        print(f"rank {rank}: {method} failed, retrying: {exc!r}"[:400])
                        continue
                    finally:
                        clean(folder)
                    found[method].append(seconds)
                    break
        if not warm_up:
            samples[str(size)] = found
        warm_up = False
        del state, local
    if rank == 0:
        Path(spec["out"]).write_text(json.dumps({"samples": samples, "failed": failed}))
    dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
