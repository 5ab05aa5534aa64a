"""Upload throughput to an object-store emulator: commitpoint vs the raw clients, same bytes.

A state dict of real tensors is serialised once to a local file; every method then uploads those
exact bytes to the same emulator (moto for S3, fake-gcs-server for GCS) on 127.0.0.1:
commitpoint's tracked streaming writer (which also computes the manifest checksum) and the raw
client's own file upload. Methods run in rotating order; each figure is the median of the runs.
"""

from __future__ import annotations

import functools
import os
import statistics
from collections.abc import Callable
from typing import Any

from benchmarks.common import (
    GiB,
    MiB,
    Row,
    base_parser,
    make_state_dict,
    repeats_from,
    report,
    row,
    scratch_dir,
    throughput,
    timed,
)

CHUNK = 8 * MiB


def _stream(storage: Any, source: str, key: str) -> None:
    with open(source, "rb") as f, storage.open_write(key) as writer:
        while chunk := f.read(CHUNK):
            writer.write(chunk)


def run(
    name: str,
    root_factory: Callable[[], Any],
    raw_methods: Callable[[Any], dict[str, Callable[[str, str], None]]],
    argv: list[str] | None,
) -> int:
    import torch

    parser = base_parser(__doc__)
    args = parser.parse_args(argv)
    sizes = [64 * MiB] if args.quick else ([GiB] if not args.sizes else None)
    if sizes is None:
        from benchmarks.common import sizes_from

        sizes = sizes_from(args)
    repeats = repeats_from(args, full=5, quick=2)
    rows: list[Row] = []
    with scratch_dir(name) as scratch, root_factory() as root:
        storage = root.open()
        methods: dict[str, Callable[[str, str], None]] = {
            "commitpoint (tracked streaming write)": lambda src, key: _stream(storage, src, key),
            **raw_methods(root),
        }
        for size in sizes:
            source = str(scratch / "state.pt")
            torch.save(make_state_dict(size), source)
            nbytes = os.path.getsize(source)
            samples: dict[str, list[float]] = {m: [] for m in methods}
            order = list(methods)
            for run_index in range(repeats):
                order = order[1:] + order[:1]
                for method in order:
                    key = f"global_step_{run_index}/{abs(hash(method))}.pt"
                    samples[method].append(timed(functools.partial(methods[method], source, key)))
                    storage.delete(key)
            case = f"{nbytes / MiB:.0f} MiB"
            baseline = throughput(nbytes, samples[list(methods)[1]])
            for method, seconds in samples.items():
                speeds = throughput(nbytes, seconds)
                ratio = statistics.median(speeds) / statistics.median(baseline)
                rows.append(
                    row(
                        case,
                        method,
                        "GB/s",
                        speeds,
                        ratio=round(ratio, 3),
                        ratio_to=list(methods)[1],
                        bytes=nbytes,
                    )
                )
            os.unlink(source)
    return report(name, rows)
