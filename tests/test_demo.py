"""The demo (the project's main job) trains, checkpoints, resumes, and proves the restore."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from commitpoint import CheckpointReader
from commitpoint.cli.demo import main


def test_demo_runs_resumes_and_rewinds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "ckpt")
    assert main(["--storage", root, "--steps", "25", "--hidden", "16"]) == 0
    first = capsys.readouterr().out
    lines = first.splitlines()
    assert lines[0] == f"starting a new run; checkpoints go to {root}"
    assert "resuming from" not in first and "resumed" not in first.replace(root, "")
    assert "committed: weights -, checkpoint -" in first or "committed: weights 5" in first
    assert "None" not in first
    assert "restart check: a fresh model and optimizer loaded from step 20 equal the saved" in first
    assert lines[-1].startswith(f"inspect what was written: commitpoint ls {root}")
    reader = CheckpointReader(root)
    assert (reader.latest_state_dict_step(), reader.latest_checkpoint_step()) == (25, 20)

    assert main(["--storage", root, "--steps", "20", "--hidden", "16"]) == 0
    second = capsys.readouterr().out
    assert "rewound the weights pointer from step 25 to checkpoint step 20" in second
    assert "resuming from" in second and "(step 20)" in second
    assert (reader.latest_state_dict_step(), reader.latest_checkpoint_step()) == (40, 40)
    assert reader.verify(40, "checkpoint").ok


def test_demo_resumes_from_the_newest_checkpoint_that_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "ckpt"
    assert main(["--storage", str(root), "--steps", "30", "--hidden", "16"]) == 0
    capsys.readouterr()
    model = root / "global_step_30" / "model.pt"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the latest full checkpoint goes bad on disk
    model.write_bytes(bytes(data))

    assert main(["--storage", str(root), "--steps", "10", "--hidden", "16"]) == 0
    out = capsys.readouterr().out
    assert "the latest full checkpoint, step 30, does not verify; step 20 does" in out
    assert "rewound the checkpoint pointer from step 30 to checkpoint step 20" in out
    assert f"(as `commitpoint rewind {root} --to 20` does)" in out
    assert "resuming from" in out and "(step 20)" in out
    reader = CheckpointReader(str(root))
    assert (reader.latest_state_dict_step(), reader.latest_checkpoint_step()) == (30, 30)
    assert reader.verify(30, "checkpoint").ok  # trained again and committed afresh


def test_demo_with_no_checkpoint_that_verifies_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "ckpt"
    assert main(["--storage", str(root), "--steps", "10", "--hidden", "16"]) == 0
    (root / "global_step_10" / "optimizer.pt").write_bytes(b"broken")
    with pytest.raises(SystemExit) as info:
        main(["--storage", str(root), "--steps", "10", "--hidden", "16"])
    assert "no full checkpoint under" in str(info.value.code)
    assert f"commitpoint ls {root}" in str(info.value.code)


def test_demo_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: ./checkpoints)" in text
    assert "(default: 40)" in text and "(default: 5)" in text and "(default: 10)" in text


def test_a_relative_storage_is_where_the_demo_was_started(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-m", "commitpoint", "demo", "--storage", "here", "--steps", "10",
         "--hidden", "8"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "here" / "latest_checkpointed_iteration.txt").read_bytes() == b"10\n"
    assert f"checkpoints go to {tmp_path / 'here'}" in done.stdout


def test_demo_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--storage", str(tmp_path), "--steps", "0"])
    assert info.value.code == 2
