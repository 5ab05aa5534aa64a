"""Smoke test of the benchmark runner: ``python -m benchmarks --quick --only stall`` end to end.

It checks that the runner writes the JSON rows and the markdown document with the expected rows
into the folder given by ``--out`` (never docs/). No timing is asserted: figures go to docs only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytest.importorskip("torch")
pytest.importorskip("matplotlib")


def test_quick_stall_run_writes_rows_and_markdown(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    env = dict(os.environ, COMMITPOINT_BENCH_SCRATCH=str(tmp_path / "scratch"))
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", "stall", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    rows = json.loads((out / "results" / "stall.json").read_text())
    methods = {row["method"] for row in rows}
    assert {
        "caller's copy (clone), all methods",
        "commitpoint save_async + register",
        "torch.save (synchronous)",
        "DCP async_save (incl. its staging)",
        "plain thread + bare open()",
    } <= methods
    for row in rows:
        assert row["case"] == "16 MiB"
        assert row["runs"] >= 3
        assert row["min"] <= row["median"] <= row["max"]
    commitpoint = next(r for r in rows if r["method"].startswith("commitpoint"))
    assert {"ratio", "goal", "met"} <= set(commitpoint)

    machine = json.loads((out / "results" / "machine.json").read_text())
    assert machine["cpu_count"] >= 1
    assert machine["disk_filesystem"]

    markdown = (out / "benchmarks.md").read_text()
    assert "## Machine" in markdown
    assert "## Goals" in markdown
    assert "| 16 MiB | commitpoint save_async + register |" in markdown
    assert "![stall](img/stall.png)" in markdown
    assert (out / "img" / "stall.png").stat().st_size > 0
    assert not list((tmp_path / "scratch").iterdir()), "benchmark files were not cleaned up"


def test_quick_staging_stall_run_compares_against_dcp_and_torch_save(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    env = dict(os.environ, COMMITPOINT_BENCH_SCRATCH=str(tmp_path / "scratch"))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--only",
            "staging_stall",
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads((out / "results" / "staging_stall.json").read_text())
    methods = {row["method"] for row in rows}
    assert "torch.save (synchronous)" in methods
    assert any(m.startswith("DCP async_save") for m in methods)
    assert any(m.startswith("staged, no compute") for m in methods)
    staged = [r for r in rows if r["method"].startswith("staged, behind")]
    assert staged and all({"ratio", "goal", "met"} <= set(r) for r in staged)
    for row in rows:
        assert row["runs"] >= 3
        assert row["min"] <= row["median"] <= row["max"]
    assert "staging_stall" in (out / "benchmarks.md").read_text()
