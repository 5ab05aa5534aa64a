"""Load throughput: ``CheckpointReader.load`` with verification on and off vs a raw ``torch.load``.

For each size a state dict is saved and committed once through commitpoint (local backend); every
run then loads the same file three ways: ``reader.load(step, "model.pt")`` (checksum verified
against the manifest while the file loads; the object is returned once both are done),
``reader.load(..., verify=False)``, and ``torch.load`` of the file's local path (the raw read).
The file stays in the page cache across runs (memory is far larger than the file), so the figures
compare the code paths, not the disk. GB/s of the file size; the ratio is each method's median
over torch.load's.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

from benchmarks.common import (
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

NAME = "load_throughput"


def measure(size: int, repeats: int) -> list[Row]:
    import torch

    from commitpoint import CheckpointCoordinator, CheckpointMonitor, CheckpointReader, save_torch

    case = format_size(size)
    seconds: dict[str, list[float]] = {k: [] for k in ("verify", "noverify", "raw")}
    with scratch_dir(NAME) as root:
        coordinator = CheckpointCoordinator(CheckpointMonitor(str(root)))
        storage = coordinator.storage
        written = make_state_dict(size)

        def save() -> None:
            save_torch(storage, "global_step_1/model.pt", written)

        coordinator.save_sync(save, 1, True)
        coordinator.register_and_monitor_sync(1, True, state_dict_thread_count=1)
        written.clear()
        path = root / "global_step_1" / "model.pt"
        nbytes = os.path.getsize(path)
        reader = CheckpointReader(str(root))
        step = reader.latest_state_dict_step()
        assert step == 1
        loads: dict[str, Any] = {
            "verify": lambda: reader.load(1, "model.pt"),
            "noverify": lambda: reader.load(1, "model.pt", verify=False),
            "raw": lambda: torch.load(path, map_location="cpu", weights_only=True),
        }
        for _ in range(repeats):
            for key, load in loads.items():
                start = time.perf_counter()
                loaded = load()
                seconds[key].append(time.perf_counter() - start)
                del loaded
    rates = {k: throughput(nbytes, v) for k, v in seconds.items()}
    raw = statistics.median(rates["raw"])
    labels = {
        "verify": "CheckpointReader.load (verify)",
        "noverify": "CheckpointReader.load (verify=False)",
        "raw": "torch.load of the local path",
    }
    return [
        row(
            case,
            labels[k],
            "GB/s",
            v,
            ratio=statistics.median(v) / raw,
            ratio_to="this / torch.load",
            bytes=nbytes,
        )
        for k, v in rates.items()
    ]


def main(argv: list[str] | None = None) -> int:
    args = base_parser(__doc__).parse_args(argv)
    repeats = repeats_from(args)
    rows: list[Row] = []
    for size in sizes_from(args):
        rows += measure(size, repeats)
    return report(NAME, rows)


if __name__ == "__main__":
    raise SystemExit(main())
