"""The testing kit used from a plain script (no pytest): its servers print nothing of their own."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

_SCRIPT = """
from commitpoint import CheckpointCoordinator
from commitpoint.testing import commit_step
from commitpoint.testing.s3 import s3_root

with s3_root() as root:
    commit_step(CheckpointCoordinator(root.monitor()), 1, checkpoint=True)
    print("committed", root.committed_steps())
"""


@pytest.mark.s3
def test_s3_root_in_a_script_prints_no_access_log() -> None:
    pytest.importorskip("moto")
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_SCRIPT)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["committed {'state_dict': 1, 'checkpoint': 1}"]
    assert done.stderr == ""
