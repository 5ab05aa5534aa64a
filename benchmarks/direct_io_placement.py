"""Diagnostic: does the speed of O_DIRECT writes depend on when their buffers were allocated?

No commitpoint code runs here: plain ``os.pwrite`` loops write 1 GiB with ``O_DIRECT`` from four
page-aligned 4 MiB buffers (commitpoint's pipeline shape), once from buffers allocated *before*
a large state dict of torch tensors and once from buffers allocated *after* it, alternating, and
from one 8 MiB buffer allocated after it (the shape of ``local_throughput``'s limit row). Where
the medians differ, the machine, not the writer, moves ``local_throughput``'s figures from one
process to the next.

Not part of ``./run bench``; run it alone: ``./run python -m benchmarks.direct_io_placement``.
"""

from __future__ import annotations

import mmap
import os
import time
from pathlib import Path

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
)

NAME = "direct_io_placement"
TOTAL = GiB


def _buffers(count: int, size: int) -> list[mmap.mmap]:
    buffers = []
    for _ in range(count):
        buffer = mmap.mmap(-1, size)
        buffer.write(os.urandom(size))
        buffers.append(buffer)
    return buffers


def _write(path: Path, buffers: list[mmap.mmap]) -> float:
    """Seconds to write TOTAL bytes with O_DIRECT, cycling through ``buffers``, and fsync."""
    views = [memoryview(b) for b in buffers]
    size = len(views[0])
    os.sync()
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        for index in range(TOTAL // size):
            os.pwrite(fd, views[index % len(views)], index * size)
        os.fsync(fd)
    finally:
        os.close(fd)
        for view in views:
            view.release()
        path.unlink()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = base_parser(__doc__).parse_args(argv)
    repeats = repeats_from(args)
    before = _buffers(4, 4 * MiB)
    state_dict = make_state_dict(256 * MiB if args.quick else 2 * GiB)
    after = _buffers(4, 4 * MiB)
    single = _buffers(1, 8 * MiB)
    seconds: dict[str, list[float]] = {"before": [], "after": [], "single": []}
    with scratch_dir(NAME) as scratch:
        for _ in range(repeats):
            for key, buffers in (("before", before), ("after", after), ("single", single)):
                seconds[key].append(_write(scratch / key, buffers))
    del state_dict
    labels = {
        "before": "4 x 4 MiB buffers allocated before the state dict",
        "after": "4 x 4 MiB buffers allocated after it",
        "single": "1 x 8 MiB buffer allocated after it",
    }
    rows: list[Row] = [
        row("1 GiB, O_DIRECT", labels[key], "GB/s", throughput(TOTAL, values))
        for key, values in seconds.items()
    ]
    return report(NAME, rows)


if __name__ == "__main__":
    raise SystemExit(main())
