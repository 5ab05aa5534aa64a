"""The commitpoint command: output, --json, and the exit codes scripts rely on."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
import torch

from commitpoint import CheckpointCoordinator, CheckpointMonitor, Kind, save_torch
from commitpoint.cli import CORRUPT, NOT_FOUND, OK, STORAGE, USAGE, main
from commitpoint.core.layout import step_dir
from commitpoint.maintenance.rewind import read_history
from commitpoint.testing import CheckpointRoot, commit_step


@pytest.fixture(params=["local", "memory"])
def root(request: pytest.FixtureRequest) -> CheckpointRoot:
    found: CheckpointRoot = request.getfixturevalue(f"{request.param}_checkpoint_root")
    return found


@pytest.fixture
def trained(root: CheckpointRoot) -> Iterator[CheckpointRoot]:
    """Steps 1..6 committed; full checkpoints at 3 and 6."""
    monitor = CheckpointMonitor(root.url, root.storage_options)
    coordinator = CheckpointCoordinator(monitor)
    storage = coordinator.storage
    for step in range(1, 7):
        folder = step_dir(step)
        weights = {"w": torch.full((32,), float(step))}
        coordinator.save_async(
            "model", partial(save_torch, storage, f"{folder}/model.pt", weights), step, True
        )
        if step % 3 == 0:
            coordinator.save_async(
                "optim", partial(save_torch, storage, f"{folder}/optim.pt", {"s": step}), step
            )
            coordinator.register_and_monitor_sync(
                step, False, state_dict_thread_count=1, checkpoint_thread_count=1
            )
        else:
            coordinator.register_and_monitor_sync(step, True, state_dict_thread_count=1)
    coordinator.wait_all()
    yield root
    monitor.close()


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_ls_table_and_json(trained: CheckpointRoot) -> None:
    code, out, err = run("ls", trained.url)
    assert code == OK and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["STEP", "KINDS", "FILES", "BYTES", "VERIFIED", "LATEST"]
    assert len(lines) == 7
    assert lines[3].split()[:3] == ["3", "state_dict,checkpoint", "2"]
    assert lines[6].split()[-1] == "state_dict,checkpoint"
    assert all(line.split()[4] == "ok" for line in lines[1:])
    column = lines[0].index("VERIFIED")
    assert all(line[column : column + 2] == "ok" for line in lines[1:])  # aligned columns

    code, out, _ = run("ls", trained.url, "--json")
    data = json.loads(out)
    assert code == OK
    assert data["latest"] == {"state_dict": 6, "checkpoint": 6}
    assert [s["step"] for s in data["steps"]] == [1, 2, 3, 4, 5, 6]
    size = sum(f.size for f in trained.list_files("global_step_2") if "manifest" not in f.path)
    assert data["steps"][1] == {
        "step": 2,
        "kinds": ["state_dict"],
        "files": 1,
        "bytes": size,
        "verified": True,
        "problems": [],
        "latest": [],
    }


def test_latest(trained: CheckpointRoot) -> None:
    code, out, _ = run("latest", trained.url, "--kind", "checkpoint")
    assert (code, out) == (OK, "6\n")
    code, out, _ = run("latest", trained.url, "--json")
    assert json.loads(out)["latest"] == {"state_dict": 6, "checkpoint": 6}


def test_nothing_committed_is_exit_3(tmp_path: Any) -> None:
    empty = str(tmp_path / "empty")
    for argv in (
        ("latest", empty),
        ("verify", empty),
        ("ls", empty),
        ("rewind", empty, "--to", "1"),
    ):
        code, _, err = run(*argv)
        assert code == NOT_FOUND, argv
    code, _, err = run("verify", empty, "--step", "4")
    assert code == NOT_FOUND and "step 4 does not exist" in err


def test_verify_reports_corruption_with_exit_1(trained: CheckpointRoot) -> None:
    assert run("verify", trained.url)[0] == OK
    storage = trained.open()
    data = bytearray(storage.read_bytes("global_step_5/model.pt"))
    data[100] ^= 1
    storage.write_bytes("global_step_5/model.pt", bytes(data), track=False)

    code, out, _ = run("verify", trained.url, "--step", "5")
    assert code == CORRUPT
    assert out.splitlines()[0] == "step 5 (state_dict): 1 of 1 files FAILED verification"
    assert out.splitlines()[1].startswith("  global_step_5/model.pt: ")
    code, out, _ = run("verify", trained.url, "--step", "5", "--json")
    problems = json.loads(out)["problems"]
    assert code == CORRUPT and [p["path"] for p in problems] == ["global_step_5/model.pt"]
    code, out, _ = run("ls", trained.url)
    assert code == CORRUPT
    assert [line.split()[4] for line in out.splitlines()[1:]] == ["ok"] * 4 + ["FAILED", "ok"]
    assert run("verify", trained.url, "--kind", "checkpoint")[0] == OK


def test_gc_dry_run_then_for_real(trained: CheckpointRoot) -> None:
    code, out, _ = run("gc", trained.url, "--keep-last", "2", "--keep-every", "3", "--dry-run")
    assert code == OK
    assert out.splitlines()[:3] == [
        "would delete steps: 1 2 4",
        "would delete uncommitted folders: (none)",
        "kept steps: 3 5 6",
    ]
    assert len(trained.list_files("global_step_1")) == 2  # file + manifest, untouched
    code, out, _ = run("gc", trained.url, "--keep-last", "2", "--keep-every", "3", "--json")
    data = json.loads(out)
    assert code == OK and data["deleted"] == [1, 2, 4] and data["dry_run"] is False
    assert trained.list_files("global_step_1") == []


def test_rewind(trained: CheckpointRoot) -> None:
    code, out, _ = run("rewind", trained.url, "--to", "3")
    assert code == OK
    assert out.splitlines() == [
        "rewound checkpoint pointer from step 6 to step 3",
        "rewound state_dict pointer from step 6 to step 3",
    ]
    assert trained.committed_steps() == {"state_dict": 3, "checkpoint": 3}
    assert len(read_history(trained.open())) == 2
    code, _, err = run("rewind", trained.url, "--to", "5", "--kind", "state_dict")
    assert code == USAGE and "only moves back" in err
    code, _, err = run("rewind", trained.url, "--to", "2", "--kind", "checkpoint")
    assert code == CORRUPT and "no checkpoint manifest" in err
    code, _, err = run("rewind", trained.url, "--to", "2", "--kind", "state_dict", "--expect", "9")
    assert code == STORAGE
    assert "the state_dict pointer names step 3, not step 9 as expected; nothing was moved" in err
    assert "changed since it was read" not in err
    assert trained.committed_steps() == {"state_dict": 3, "checkpoint": 3}


def test_usage_errors_are_exit_2_with_one_line(trained: CheckpointRoot) -> None:
    for argv in (
        ("frobnicate", trained.url),
        ("gc", trained.url, "--keep-last", "0"),
        ("verify", trained.url, "--step", "-1"),
        ("rewind", trained.url),
        ("ls", trained.url, "--option", "novalue"),
        ("ls", "nosuchscheme://x"),
    ):
        code, _, err = run(*argv)
        assert code == USAGE, argv
        assert len(err.strip().splitlines()) == 1, err


def test_storage_error_is_exit_4_without_traceback(tmp_path: Any) -> None:
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "latest_state_dict_iteration.txt").mkdir()  # a folder where a pointer should be
    code, out, err = run("latest", str(blocked), "--json")
    assert code == STORAGE
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert json.loads(out)["exit_code"] == STORAGE


def test_debug_shows_the_traceback(tmp_path: Any) -> None:
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "latest_checkpointed_iteration.txt").mkdir()
    code, _, err = run("latest", str(blocked), "--debug")
    assert code == STORAGE
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("commitpoint latest: ")


def test_unparsable_pointer_is_exit_1(trained: CheckpointRoot) -> None:
    trained.open().write_bytes(Kind.STATE_DICT.pointer, b"garbage", track=False)
    code, _, err = run("latest", trained.url)
    assert code == CORRUPT and "not a decimal step" in err


def test_python_dash_m_in_a_subprocess(tmp_path: Any) -> None:
    root = str(tmp_path / "ckpt")
    monitor = CheckpointMonitor(root)
    coordinator = CheckpointCoordinator(monitor)
    coordinator.save_async(
        "model",
        partial(save_torch, coordinator.storage, "global_step_2/model.pt", {"w": torch.ones(4)}),
        2,
        True,
    )
    coordinator.register_and_monitor_sync(2, True, state_dict_thread_count=1)
    coordinator.wait_all()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-m", "commitpoint", "latest", root, "--kind", "state_dict"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert (done.returncode, done.stdout) == (0, "2\n"), done.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "commitpoint", "verify", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert missing.returncode == NOT_FOUND
    assert missing.stderr.startswith("commitpoint verify: nothing is committed")


def test_demo_is_delegated(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--storage", str(tmp_path / "d"), "--steps", "0"]) == USAGE
    code = main(["demo", "--storage", str(tmp_path / "d"), "--steps", "10", "--hidden", "8"])
    assert code == OK
    assert "loaded from step 10 equal the saved ones" in capsys.readouterr().out


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal(trained: CheckpointRoot) -> None:
    out, err = io.StringIO(), _Terminal()
    assert main(["verify", trained.url, "--kind", "checkpoint"], stdout=out, stderr=err) == OK
    assert "step 6 [##############################] 100.0%" in err.getvalue()
    assert err.getvalue().endswith("\r")  # the bar is erased once done
    code, _, plain = run("verify", trained.url, "--kind", "checkpoint")
    assert (code, plain) == (OK, "")


def _cli_options(root: CheckpointRoot) -> list[str]:
    """The root's storage options as ``--option`` arguments (structured values as JSON)."""
    args: list[str] = []
    for key, value in root.storage_options.items():
        shown = value if isinstance(value, str) else json.dumps(value)
        args += ["--option", f"{key}={shown}"]
    return args


@pytest.mark.parametrize("backend", ["s3", "gcs"])
def test_commands_work_on_object_stores(backend: str, request: pytest.FixtureRequest) -> None:
    root: CheckpointRoot = request.getfixturevalue(f"{backend}_checkpoint_root")
    coordinator = CheckpointCoordinator(root.monitor())
    for step in (1, 2):
        commit_step(coordinator, step, checkpoint=step == 2)
    options = _cli_options(root)

    code, out, err = run("ls", root.url, *options, "--json")
    assert code == OK, err
    data = json.loads(out)
    assert data["latest"] == {"state_dict": 2, "checkpoint": 2}
    assert [s["step"] for s in data["steps"]] == [1, 2]

    code, out, _ = run("verify", root.url, *options, "--step", "1")
    assert code == OK and "ok" in out

    code, out, _ = run("rewind", root.url, *options, "--to", "1", "--kind", "state_dict")
    assert code == OK
    assert root.committed_steps() == {"state_dict": 1, "checkpoint": 2}


def test_a_structured_option_must_be_valid_json(root: CheckpointRoot) -> None:
    code, _, err = run("ls", root.url, "--option", "client_kwargs={not json")
    assert code == USAGE
    assert "client_kwargs" in err and "not valid JSON" in err


def test_gc_names_uncommitted_folders_as_folders(trained: CheckpointRoot) -> None:
    trained.open().write_bytes("global_step_3/stray.bin", b"x")  # inside a committed step: kept
    trained.open().write_bytes("global_step_0/partial.bin", b"x")  # a save that never committed
    code, out, _ = run("gc", trained.url, "--orphan-min-age", "0", "--dry-run")
    assert code == OK
    assert "would delete uncommitted folders: global_step_0" in out.splitlines()


class _ClosedPipe(io.StringIO):
    """stdout whose reader has gone away, as after ``| head -1``."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.parametrize("json_flag", [(), ("--json",)], ids=["text", "json"])
def test_a_reader_that_stops_early_is_not_an_error(
    trained: CheckpointRoot, json_flag: tuple[str, ...]
) -> None:
    err = io.StringIO()
    code = main(["ls", trained.url, *json_flag], stdout=_ClosedPipe(), stderr=err)
    assert code == OK
    assert err.getvalue() == ""


def test_ls_into_head_exits_cleanly(local_checkpoint_root: CheckpointRoot) -> None:
    import fcntl

    coordinator = CheckpointCoordinator(local_checkpoint_root.monitor())
    for step in range(1, 31):
        commit_step(coordinator, step)
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)  # smaller than the output: the writer waits
    process = subprocess.Popen(
        [sys.executable, "-m", "commitpoint", "ls", local_checkpoint_root.url, "--json"],
        stdout=write_end,
        stderr=subprocess.PIPE,
    )
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        assert reader.readline() == b"{\n"  # what `head -1` reads before it exits
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == OK, stderr
    assert stderr == b""
