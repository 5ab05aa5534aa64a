"""Run every benchmark and render ``docs/benchmarks.md`` and the plots in ``docs/img``.

    ./run bench                      # everything, full sizes (256 MiB, 1 GiB, 2 GiB), >= 5 runs
    ./run bench --quick              # small sizes, few runs (smoke check)
    ./run bench --only stall --only load_throughput
    ./run bench --sizes 256M,1G      # other state-dict sizes for the size-driven benchmarks
    ./run bench --render-only        # re-render the docs from benchmarks/results/*.json
    ./run bench --out /tmp/b         # results, markdown and plots under /tmp/b instead

Each module runs in its own process (``main(argv)`` of ``benchmarks/<name>.py``), so memory,
Ray and torch state never leak from one benchmark into the next; a module that fails is reported
in the document and the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import (
    BENCH_DIR,
    REPO_DIR,
    RESULTS_ENV,
    Row,
    fmt,
    machine,
    markdown_table,
)

MODULES = (
    "stall",
    "local_throughput",
    "commit_latency",
    "monitor_scaling",
    "load_throughput",
    "s3_throughput",
    "gcs_throughput",
    "staging_stall",
    "dcp_throughput",
    "tiered",
)
"""Every benchmark module, in the order they run and appear; missing ones are skipped."""

OURS = {
    "stall",
    "local_throughput",
    "commit_latency",
    "monitor_scaling",
    "load_throughput",
    "staging_stall",
    "dcp_throughput",
    "tiered",
}
SIZED = {"stall", "local_throughput", "load_throughput", "staging_stall", "dcp_throughput"}
PREFERRED = ("case", "method", "median", "min", "max", "unit", "runs", "ratio", "ratio_to")


def available() -> list[str]:
    return [name for name in MODULES if (BENCH_DIR / f"{name}.py").exists()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, few runs")
    parser.add_argument(
        "--only", action="append", default=[], help="run only this module (repeatable, or a,b)"
    )
    parser.add_argument("--sizes", help="state-dict sizes, e.g. 256M,1G,2G")
    parser.add_argument("--repeats", type=int, help="runs per figure")
    parser.add_argument("--out", type=Path, help="write results, markdown and plots here")
    parser.add_argument("--render-only", action="store_true", help="only re-render the docs")
    parser.add_argument("--note", default="", help="a remark to print with the machine")
    return parser.parse_args(argv)


def run_module(name: str, args: argparse.Namespace, results: Path) -> int:
    argv: list[str] = ["--quick"] if args.quick else []
    if args.sizes and name in SIZED:
        argv += ["--sizes", args.sizes]
    if args.repeats and name in OURS:
        argv += ["--repeats", str(args.repeats)]
    code = f"import sys; from benchmarks.{name} import main; sys.exit(main(sys.argv[1:]))"
    env = dict(os.environ)
    env[RESULTS_ENV] = str(results)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_DIR), env.get("PYTHONPATH")]))
    print(f"== {name} {' '.join(argv)}", flush=True)
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO_DIR, env=env).returncode


# -- rendering ----------------------------------------------------------------------------------
def _doc(name: str) -> tuple[str, str]:
    """(title, description) of a module from its docstring."""
    text = ""
    with contextlib.suppress(Exception):
        text = importlib.import_module(f"benchmarks.{name}").__doc__ or ""
    title, _, rest = text.strip().partition("\n")
    return title.strip().rstrip(".") or name, rest.strip()


def _columns(rows: list[Row]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        seen.update(dict.fromkeys(r))
    first = [c for c in PREFERRED if c in seen]
    return first + [c for c in seen if c not in first]


def _plot(name: str, rows: list[Row], img_dir: Path) -> Path | None:
    """Grouped bars (median, whiskers min..max) per case and method; one panel per unit."""
    rows = [
        r for r in rows if all(isinstance(r.get(k), int | float) for k in ("median", "min", "max"))
    ]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = list(dict.fromkeys(str(r.get("unit", "")) for r in rows))
    fig, axes = plt.subplots(len(units), 1, figsize=(10, 3.6 * len(units)), squeeze=False)
    methods = list(dict.fromkeys(str(r.get("method", "")) for r in rows))
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for ax, unit in zip(axes[:, 0], units, strict=True):
        subset = [r for r in rows if str(r.get("unit", "")) == unit]
        cases = list(dict.fromkeys(str(r.get("case", "")) for r in subset))
        labelled: set[str] = set()
        for x, case in enumerate(cases):
            in_case = [r for r in subset if str(r.get("case", "")) == case]
            width = 0.8 / len(in_case)
            for i, r in enumerate(in_case):
                method = str(r.get("method", ""))
                median = float(r["median"])
                ax.bar(
                    x - 0.4 + width * (i + 0.5),
                    median,
                    width,
                    yerr=[[median - float(r["min"])], [float(r["max"]) - median]],
                    color=colors[method],
                    capsize=2,
                    label=None if method in labelled else method,
                )
                labelled.add(method)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=20 if len(cases) > 4 else 0, ha="right", fontsize=8)
        ax.set_ylabel(unit)
        medians = [float(r["median"]) for r in subset if float(r["median"]) > 0]
        if medians and max(medians) / min(medians) > 20:
            ax.set_yscale("log")
        ax.legend(fontsize=7, loc="best")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].set_title(f"{name}: median of runs, whiskers min..max")
    fig.tight_layout()
    img_dir.mkdir(parents=True, exist_ok=True)
    path = img_dir / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(results: Path, doc_path: Path, img_dir: Path, failures: dict[str, int]) -> Path:
    """Write the markdown document (and plots) from the JSON files in ``results``."""
    meta: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        meta = json.loads((results / "machine.json").read_text())
    names = [n for n in MODULES if (results / f"{n}.json").exists()]
    names += sorted(
        p.stem for p in results.glob("*.json") if p.stem not in MODULES and p.stem != "machine"
    )
    sections: list[str] = []
    goals: list[Row] = []
    for name in names:
        try:
            rows = json.loads((results / f"{name}.json").read_text())
        except (OSError, ValueError) as exc:
            sections.append(f"## {name}\n\nresults unreadable: {exc}\n")
            continue
        rows = [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []
        title, description = _doc(name)
        for r in rows:
            if "goal" in r:
                goals.append({"benchmark": name, **r})
        image = ""
        try:
            plot = _plot(name, rows, img_dir)
            if plot is not None:
                image = f"\n![{name}]({os.path.relpath(plot, doc_path.parent)})\n"
        except Exception as exc:  # a plot must never cost the tables
            image = f"\n_plot failed: {type(exc).__name__}: {exc}_\n"
        sections.append(
            f"## {title}\n\n`benchmarks/{name}.py` — {description}\n\n"
            f"{markdown_table(rows, _columns(rows))}{image}"
        )
    lines = [
        "# Benchmarks",
        "",
        "Generated by `./run bench` (`python -m benchmarks`, see `benchmarks/README.md`); "
        "do not edit by hand. Every figure is the median of the runs shown, with min and max; "
        "every ratio compares two medians measured in the same run.",
        "",
    ]
    if meta:
        lines += ["## Machine", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {fmt(v)} |" for k, v in meta.items() if k != "modules"]
        lines.append("")
        runs = [{"module": k, **v} for k, v in dict(meta.get("modules") or {}).items()]
        if runs:
            commands = ", ".join(
                f"`{c}`" for c in dict.fromkeys(r.pop("command", "") for r in runs)
            )
            lines += [
                f"Runs ({commands}; the 1-minute load average before and after shows how busy "
                "the shared machine was; it has as many cores as `cpu_count`):",
                "",
                markdown_table(runs),
            ]
    if failures:
        failed = ", ".join(f"{k} (exit {v})" for k, v in failures.items())
        lines += [f"**Modules that failed:** {failed}", ""]
    if goals:
        lines += ["## Goals", ""]
        columns = ["benchmark", "case", "method", "median", "unit", "ratio", "goal", "met"]
        lines.append(markdown_table(goals, columns))
    lines += sections
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    doc_path.write_text("\n".join(lines).rstrip() + "\n")
    return doc_path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path | None = args.out.resolve() if args.out else None
    results = out / "results" if out else BENCH_DIR / "results"
    doc_path = out / "benchmarks.md" if out else REPO_DIR / "docs" / "benchmarks.md"
    img_dir = out / "img" if out else REPO_DIR / "docs" / "img"
    results.mkdir(parents=True, exist_ok=True)
    only = {n.strip() for item in args.only for n in item.split(",") if n.strip()}
    names = available()
    unknown = only - set(names)
    if unknown:
        print(f"unknown benchmark(s): {', '.join(sorted(unknown))}; have: {', '.join(names)}")
        return 2
    failures: dict[str, int] = {}
    if not args.render_only:
        info = machine()
        info.pop("load_average", None)  # recorded per module below
        runs: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):  # keep the runs of modules not re-run
            runs = dict(json.loads((results / "machine.json").read_text()).get("modules", {}))
        command = "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:])
        for name in names:
            if only and name not in only:
                continue
            started = datetime.datetime.now(datetime.timezone.utc)
            load_before = os.getloadavg()[0]
            code = run_module(name, args, results)
            if code:
                failures[name] = code
            runs[name] = {
                "started_utc": started.strftime("%Y-%m-%d %H:%M"),
                "seconds": round(
                    (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
                ),
                "load_1min_before": round(load_before, 2),
                "load_1min_after": round(os.getloadavg()[0], 2),
                "exit": code,
                "command": command,
            }
        if args.note:
            info["note"] = args.note
        info["modules"] = runs
        (results / "machine.json").write_text(json.dumps(info, indent=2) + "\n")
    path = render(results, doc_path, img_dir, failures)
    print(f"wrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
