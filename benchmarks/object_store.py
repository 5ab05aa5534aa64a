"""Upload throughput to an object-store emulator: commitpoint vs the raw clients, same bytes.

A state dict of real tensors is serialised once to a local file; every method then uploads those
exact bytes to the same emulator (moto for S3, fake-gcs-server for GCS) on 127.0.0.1:
commitpoint's tracked streaming writer (which also computes the manifest checksum) and the raw
clients' own file uploads. DCP's fsspec writer (``torch.distributed.checkpoint`` ``FsspecWriter``
with the same URL and storage options) saves the in-memory state dict instead, so its time also
covers its own serialisation; its GB/s counts the bytes it stored. Methods run in rotating order;
each figure is the median of the runs, and every ratio compares two medians of the same run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from benchmarks.common import (
    GiB,
    MiB,
    Row,
    base_parser,
    format_size,
    make_state_dict,
    parse_size,
    repeats_from,
    report,
    row,
    scratch_dir,
    throughput,
)

CHUNK = 8 * MiB
GOAL = 0.9  # commitpoint's median throughput as a share of the baseline raw client's
OURS = "commitpoint (tracked streaming write)"


@dataclass(frozen=True)
class Upload:
    """One timed upload: the serialised file, the same tensors in memory, where to put them."""

    source: str
    state_dict: Mapping[str, Any]
    key: str


Method = Callable[[Upload], int | None]
"""Uploads one :class:`Upload`; returns the bytes it stored when they differ from the file's."""


@dataclass
class Store:
    """What a store's benchmark module contributes: its extra methods and which is the baseline."""

    methods: dict[str, Method]
    baseline: str
    sizes: tuple[int, ...] = (GiB,)
    notes: dict[str, str] = field(default_factory=dict)
    only_at: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Methods run at these sizes only (comparison columns that would cost too long)."""


def stream(storage: Any, source: str, key: str) -> None:
    """commitpoint's way: a tracked streaming write of the file, in serialiser-sized pieces."""
    with open(source, "rb") as f, storage.open_write(key) as writer:
        while chunk := f.read(CHUNK):
            writer.write(chunk)


def dcp_save(url: str, options: Mapping[str, Any], upload: Upload, stored: Any) -> int:
    """Save the state dict with DCP's fsspec writer under ``url``; return the bytes it stored."""
    import torch.distributed.checkpoint as dcp

    try:
        from torch.distributed.checkpoint import FsspecWriter
    except ImportError:  # not re-exported by every torch release
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: saving in a single process"
        dcp.save(dict(upload.state_dict), storage_writer=FsspecWriter(url, **options))
    return sum(info.size for info in stored.list_files(upload.key))


@contextlib.contextmanager
def quiet(*loggers: str) -> Iterator[None]:
    """Silence chatty third-party loggers (request logs) while the methods run."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _timed(method: Method, upload: Upload, file_size: int) -> tuple[float, int]:
    start = time.perf_counter()
    stored = method(upload)
    return time.perf_counter() - start, int(stored if stored is not None else file_size)


def run(
    name: str,
    root_factory: Callable[[], Any],
    store_factory: Callable[[Any], Store],
    argv: list[str] | None,
) -> int:
    import torch

    parser = base_parser(__doc__)
    args = parser.parse_args(argv)
    repeats = repeats_from(args, full=5, quick=2)
    rows: list[Row] = []
    with (
        quiet("werkzeug", "gcsfs", "s3fs", "torch.distributed"),
        scratch_dir(name) as scratch,
        root_factory() as root,
    ):
        storage = root.open()
        store = store_factory(root)
        methods: dict[str, Method] = {
            OURS: lambda u: stream(storage, u.source, u.key),
            **store.methods,
        }
        if args.quick:
            sizes = [64 * MiB]
        elif args.sizes:
            sizes = [parse_size(s) for s in str(args.sizes).split(",") if s.strip()]
        else:
            sizes = list(store.sizes)
        for size in sizes:
            source = str(scratch / "state.pt")
            state_dict = make_state_dict(size)
            torch.save(state_dict, source)
            nbytes = os.path.getsize(source)
            here = [m for m in methods if size in store.only_at.get(m, (size,))]
            speeds: dict[str, list[float]] = {m: [] for m in here}
            failures: dict[str, list[str]] = {m: [] for m in here}
            order = list(here)
            for run_index in range(repeats):
                order = order[1:] + order[:1]
                for method in order:
                    key = f"global_step_{run_index}/m{list(methods).index(method)}.pt"
                    upload = Upload(source, state_dict, key)
                    try:
                        seconds, stored = _timed(methods[method], upload, nbytes)
                    except Exception as exc:  # a failing method must not cost the others
                        failures[method].append(f"{type(exc).__name__}: {exc}"[:200])
                        print(f"{format_size(size)} {method}: FAILED {failures[method][-1]}")
                    else:
                        speeds[method].extend(throughput(stored, [seconds]))
                        print(f"{format_size(size)} {method}: {stored / seconds / 1e9:.3f} GB/s")
                    with contextlib.suppress(Exception):
                        storage.delete(key, recursive=True)
            rows.extend(_rows(format_size(size), nbytes, store, speeds, failures))
            del state_dict
            os.unlink(source)
    return report(name, rows)


def _rows(
    case: str,
    nbytes: int,
    store: Store,
    speeds: dict[str, list[float]],
    failures: dict[str, list[str]],
) -> list[Row]:
    """One row per method: median GB/s, ratio to the baseline, goal, and any failed runs."""
    base = speeds[store.baseline]
    baseline = statistics.median(base) if base else None
    rows: list[Row] = []
    for method, samples in speeds.items():
        extra: dict[str, Any] = {}
        notes = [store.notes[method]] if method in store.notes else []
        if failures[method]:
            runs = len(samples) + len(failures[method])
            notes.append(f"{len(failures[method])} of {runs} runs failed: {failures[method][0]}")
        if notes:
            extra["note"] = "; ".join(notes)
        if not samples:
            rows.append({"case": case, "method": method, "unit": "GB/s", "runs": 0, **extra})
            continue
        if baseline:
            ratio = round(statistics.median(samples) / baseline, 3)
            extra.update(ratio=ratio, ratio_to=store.baseline)
            if method == OURS:
                extra.update(goal=f">= {GOAL}x", met=ratio >= GOAL)
        rows.append(row(case, method, "GB/s", samples, bytes=nbytes, **extra))
    return rows
