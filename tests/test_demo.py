"""The demo (the project's main job) trains, checkpoints, resumes, and proves the restore."""

from __future__ import annotations

from typing import Any

import pytest

from commitpoint import CheckpointReader
from commitpoint.cli.demo import main


def test_demo_runs_resumes_and_rewinds(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "ckpt")
    assert main(["--storage", root, "--steps", "25", "--hidden", "16"]) == 0
    first = capsys.readouterr().out
    assert "starting a new run" in first
    assert "restored weights and optimizer state equal the saved ones" in first
    reader = CheckpointReader(root)
    assert (reader.latest_state_dict_step(), reader.latest_checkpoint_step()) == (25, 20)

    assert main(["--storage", root, "--steps", "20", "--hidden", "16"]) == 0
    second = capsys.readouterr().out
    assert "rewound the weights pointer from step 25 to checkpoint step 20" in second
    assert "resuming from" in second and "(step 20)" in second
    assert (reader.latest_state_dict_step(), reader.latest_checkpoint_step()) == (40, 40)
    assert reader.verify(40, "checkpoint").ok


def test_demo_rejects_bad_arguments(tmp_path: Any) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--storage", str(tmp_path), "--steps", "0"])
    assert info.value.code == 2
