"""Shared helpers of the benchmarks: timing statistics, state-dict factory, result files, machine.

Every figure is the median of several runs, reported with its min and max; a comparison is a ratio
of two medians measured in the same run. Rows are plain dicts with the keys ``case`` (what varies,
e.g. the size), ``method``, ``unit``, ``median``, ``min``, ``max``, ``runs`` and optionally
``ratio``/``ratio_to``, ``goal``/``met`` and ``note``; the runner renders and plots them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

MiB = 1024**2
GiB = 1024**3

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_ENV = "COMMITPOINT_BENCH_RESULTS"
SCRATCH_ENV = "COMMITPOINT_BENCH_SCRATCH"
FULL_SIZES = (256 * MiB, GiB, 2 * GiB)
QUICK_SIZES = (16 * MiB,)

Row = dict[str, Any]


# -- arguments ----------------------------------------------------------------------------------
def parse_size(text: str) -> int:
    """``"256M"``, ``"1G"``, ``"2GiB"`` or a byte count -> bytes (binary units)."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    units = {"K": 1024, "M": MiB, "G": GiB}
    if value and value[-1] in units:
        return int(float(value[:-1]) * units[value[-1]])
    return int(value)


def format_size(size: int) -> str:
    if size >= GiB and size % GiB == 0:
        return f"{size // GiB} GiB"
    if size >= MiB:
        return f"{size / MiB:g} MiB"
    return f"{size / 1024:g} KiB"


def base_parser(description: str | None) -> argparse.ArgumentParser:
    """The options every benchmark module accepts."""
    parser = argparse.ArgumentParser(description=(description or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument(
        "--sizes", default=None, help="comma-separated state-dict sizes, e.g. 256M,1G,2G"
    )
    parser.add_argument("--repeats", type=int, default=None, help="runs per figure (>= 5 full)")
    return parser


def sizes_from(args: argparse.Namespace) -> list[int]:
    if args.sizes:
        return [parse_size(s) for s in str(args.sizes).split(",") if s.strip()]
    return list(QUICK_SIZES if args.quick else FULL_SIZES)


def repeats_from(args: argparse.Namespace, full: int = 5, quick: int = 3) -> int:
    return int(args.repeats) if args.repeats else (quick if args.quick else full)


# -- timing -------------------------------------------------------------------------------------
def summarize(samples: Sequence[float]) -> dict[str, float | int]:
    """Median, min and max of ``samples`` (and how many there were)."""
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "runs": len(samples),
    }


def row(
    case: str,
    method: str,
    unit: str,
    samples: Sequence[float],
    **extra: Any,
) -> Row:
    result: Row = {"case": case, "method": method, "unit": unit, **summarize(samples)}
    result.update(extra)
    return result


def throughput(nbytes: int, seconds: Sequence[float]) -> list[float]:
    """GB/s (10^9 bytes per second) for each duration."""
    return [nbytes / s / 1e9 for s in seconds]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- state dicts --------------------------------------------------------------------------------
def make_state_dict(total_bytes: int, *, hidden: int = 1024, seed: int = 0) -> dict[str, Any]:
    """A transformer-like state dict of float32 CPU tensors adding up to ``total_bytes``.

    Each layer has attention (4 x hidden^2), MLP (2 x 4 hidden^2) and two norm vectors, so there
    are many tensors of realistic sizes (4 MiB to 16 MiB at hidden 1024) plus small ones; the
    last tensor is cut to hit the size exactly. Values are random so nothing compresses.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    shapes: list[tuple[str, tuple[int, ...]]] = []
    layer = 0
    remaining = total_bytes // 4
    while remaining > 0:
        for name, shape in (
            ("attn.q_proj.weight", (hidden, hidden)),
            ("attn.k_proj.weight", (hidden, hidden)),
            ("attn.v_proj.weight", (hidden, hidden)),
            ("attn.o_proj.weight", (hidden, hidden)),
            ("mlp.up_proj.weight", (4 * hidden, hidden)),
            ("mlp.down_proj.weight", (hidden, 4 * hidden)),
            ("input_norm.weight", (hidden,)),
            ("post_attn_norm.weight", (hidden,)),
        ):
            count = 1
            for dim in shape:
                count *= dim
            if count > remaining:
                shape = (remaining,)
                count = remaining
            shapes.append((f"layers.{layer}.{name}", shape))
            remaining -= count
            if remaining == 0:
                break
        layer += 1
    return {
        name: torch.empty(shape, dtype=torch.float32).uniform_(-1, 1, generator=generator)
        for name, shape in shapes
    }


def state_dict_bytes(state_dict: dict[str, Any]) -> int:
    return sum(int(t.numel() * t.element_size()) for t in state_dict.values())


def clone_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The caller's copy a training loop takes before saving in the background."""
    return {k: v.detach().clone() for k, v in state_dict.items()}


# -- files --------------------------------------------------------------------------------------
def results_dir() -> Path:
    """Where modules write their JSON (``$COMMITPOINT_BENCH_RESULTS`` or benchmarks/results)."""
    path = Path(os.environ.get(RESULTS_ENV) or BENCH_DIR / "results")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_results(name: str, rows: list[Row]) -> Path:
    path = results_dir() / f"{name}.json"
    path.write_text(json.dumps(rows, indent=2) + "\n")
    return path


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A fresh folder on the benchmarked disk, removed afterwards (``$COMMITPOINT_BENCH_SCRATCH``
    picks the disk; default: the system temp folder)."""
    parent = os.environ.get(SCRATCH_ENV) or None
    if parent:
        os.makedirs(parent, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"commitpoint-bench-{prefix}-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- tables -------------------------------------------------------------------------------------
def fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return "" if value is None else str(value)


def markdown_table(rows: list[Row], columns: Sequence[str] | None = None) -> str:
    """Rows as a markdown table; columns default to every key in first-seen order."""
    if not rows:
        return "_no rows_\n"
    if columns is None:
        seen: dict[str, None] = {}
        for r in rows:
            seen.update(dict.fromkeys(r))
        columns = list(seen)
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def each_size_in_own_process(module: str, sizes: Sequence[int], extra: Sequence[str]) -> list[Row]:
    """Rows of ``python -m <module> --sizes S --rows-to F <extra>`` for each size, one process
    per size: what one size leaves behind (its freed tensors, the writer's pooled buffers) must
    not change the next one's figures. On the project's VM, write buffers allocated before a
    large state dict made the same O_DIRECT writes run at half speed."""
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="commitpoint-bench-rows-") as folder:
        for size in sizes:
            out = Path(folder) / f"{size}.json"
            command = [sys.executable, "-m", module, "--sizes", str(size), "--rows-to", str(out)]
            subprocess.run([*command, *extra], check=True)
            rows += json.loads(out.read_text())
    return rows


def report(name: str, rows: list[Row]) -> int:
    """Write the rows and print them as a table (what every module's ``main`` ends with)."""
    path = write_results(name, rows)
    print(markdown_table(rows))
    print(f"wrote {path}")
    return 0


# -- machine ------------------------------------------------------------------------------------
def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _disk(path: str) -> dict[str, str]:
    found = _run(["findmnt", "-no", "SOURCE,FSTYPE", "--target", path]).split()
    source, fstype = [*found, "?", "?"][:2]
    device = os.path.basename(source)
    block = Path("/sys/block") / device.rstrip("0123456789").removesuffix("p")
    if not block.exists():
        block = Path("/sys/block") / device
    model = ""
    for candidate in (block / "device" / "model", block / "device" / "vendor"):
        with contextlib.suppress(OSError):
            model = candidate.read_text().strip()
            if model:
                break
    if device.startswith("vd"):
        model = f"virtio block device (vendor {model or '?'})"
    rotational = "?"
    with contextlib.suppress(OSError):
        rotational = (block / "queue" / "rotational").read_text().strip()
    return {
        "device": source,
        "filesystem": fstype,
        "model": model,
        "queue_rotational": rotational,
    }


def machine() -> dict[str, Any]:
    """Cores, memory, disk, filesystem and software versions of this machine."""
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": "",
        "memory_gib": 0.0,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_gib"] = round(int(line.split()[1]) / 1024**2, 1)
    scratch = os.environ.get(SCRATCH_ENV) or tempfile.gettempdir()
    info["scratch_dir"] = scratch
    info.update({f"disk_{k}": v for k, v in _disk(scratch).items()})
    with contextlib.suppress(ImportError):
        import torch

        info["torch"] = torch.__version__
    with contextlib.suppress(ImportError):
        import ray

        info["ray"] = ray.__version__
    with contextlib.suppress(ImportError):
        import commitpoint

        info["commitpoint"] = commitpoint.__version__
    return info
