"""Small files are read bounded and parsed strictly (issue 18, items 9 and 10): a pointer or
manifest that is a FIFO, a device, too big, or hostile JSON gives a typed error in bounded time,
and ``watch`` skips such a step and goes on. Every backend the case concerns."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from commitpoint import CheckpointCoordinator, CorruptCheckpoint
from commitpoint.cli.commands import CORRUPT, main
from commitpoint.core import manifest as manifest_module
from commitpoint.core.layout import POINTER_LIMIT, STATE_DICT_POINTER, Kind
from commitpoint.core.manifest import Manifest, manifest_path
from commitpoint.errors import UnreadableFile
from commitpoint.read.watch import watch
from commitpoint.testing import CheckpointRoot, commit_step

HANG_GUARD_S = 60.0
"""Only a guard against a hang (the regression itself); never a performance assertion."""


def bounded(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on a thread; fail the test if it never returns (instead of hanging it)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG_GUARD_S)
    assert not thread.is_alive(), "the read blocked"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


@pytest.fixture
def root(any_checkpoint_root: CheckpointRoot) -> CheckpointRoot:
    return any_checkpoint_root


@pytest.fixture
def committed(root: CheckpointRoot) -> Iterator[CheckpointRoot]:
    """Steps 1 and 2 committed as state dicts."""
    monitor = root.monitor()
    coordinator = CheckpointCoordinator(monitor)
    for step in (1, 2):
        commit_step(coordinator, step, numel=8)
    yield root
    monitor.close()


# -- local disk: only regular files are read -----------------------------------------------
@pytest.mark.parametrize("what", ["fifo", "device"])
def test_a_pointer_that_is_not_a_regular_file_is_refused_at_once(
    local_checkpoint_root: CheckpointRoot, what: str
) -> None:
    path = os.path.join(local_checkpoint_root.url, STATE_DICT_POINTER)
    if what == "fifo":
        os.mkfifo(path)
    else:
        os.symlink("/dev/zero", path)
    storage = local_checkpoint_root.open()
    with pytest.raises(UnreadableFile, match="not a regular file"):
        bounded(lambda: storage.read_pointer(STATE_DICT_POINTER))
    assert bounded(lambda: main(["latest", local_checkpoint_root.url])) == CORRUPT
    assert bounded(lambda: list(watch(storage, timeout=0.2, interval=0.05))) == []


def test_a_manifest_or_data_file_that_is_a_fifo_fails_verification_without_blocking(
    local_checkpoint_root: CheckpointRoot,
) -> None:
    monitor = local_checkpoint_root.monitor()
    commit_step(CheckpointCoordinator(monitor), 1, numel=8)
    commit_step(CheckpointCoordinator(monitor), 2, numel=8)
    folder = local_checkpoint_root.url
    os.remove(os.path.join(folder, "global_step_1", "model.pt"))
    os.mkfifo(os.path.join(folder, "global_step_1", "model.pt"))
    report = bounded(lambda: local_checkpoint_root.verify(1))
    assert [p.reason for p in report.problems] == ["is not a regular file; refusing to read it"]
    manifest = os.path.join(folder, manifest_path(2, Kind.STATE_DICT))
    os.remove(manifest)
    os.mkfifo(manifest)
    with pytest.raises(UnreadableFile):
        bounded(lambda: local_checkpoint_root.verify(2))
    storage = local_checkpoint_root.open()
    assert bounded(lambda: list(watch(storage, after=1, timeout=0.2, interval=0.05))) == []
    monitor.close()


# -- every backend: a size cap, and strict parsing --------------------------------------------
def test_an_oversized_pointer_is_refused_unread(committed: CheckpointRoot) -> None:
    storage = committed.open()
    storage.write_bytes(STATE_DICT_POINTER, b"1" + b" " * (POINTER_LIMIT + 10), track=False)
    with pytest.raises(UnreadableFile, match=f"more than {POINTER_LIMIT} bytes"):
        storage.read_pointer(STATE_DICT_POINTER)


def test_an_oversized_manifest_is_refused_unread(
    committed: CheckpointRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manifest_module, "MANIFEST_LIMIT", 1024)
    storage = committed.open()
    path = manifest_path(2, Kind.STATE_DICT)
    body = json.loads(storage.read_bytes(path))
    body["padding"] = "x" * 4096
    storage.write_bytes(path, json.dumps(body).encode(), track=False)
    with pytest.raises(UnreadableFile, match="more than 1024 bytes"):
        committed.verify(2)


HOSTILE_MANIFESTS = {
    "a list": b"[]",
    "null": b"null",
    "deep nesting": b"[" * 200_000 + b"]" * 200_000,
    "a huge int": b'{"format": 1, "step": ' + b"9" * 5000 + b"}",
    "a string step": b'{"format": 1, "step": "2", "kind": "state_dict", "files": []}',
    "files not a list": b'{"format": 1, "step": 2, "kind": "state_dict", "files": {}}',
    "an escaping file": b'{"format": 1, "step": 2, "kind": "state_dict", "files": '
    b'[{"path": "../../etc/passwd", "size": 1}]}',
    "another step's file": b'{"format": 1, "step": 2, "kind": "state_dict", "files": '
    b'[{"path": "global_step_1/model.pt", "size": 1}]}',
    "a wrong step": b'{"format": 1, "step": 7, "kind": "state_dict", "files": []}',
    "a bad size": b'{"format": 1, "step": 2, "kind": "state_dict", "files": '
    b'[{"path": "global_step_2/model.pt", "size": "big"}]}',
    "not json": b"\xff\xfe garbage",
    "empty": b"",
}


@pytest.mark.parametrize("case", sorted(HOSTILE_MANIFESTS))
def test_a_hostile_manifest_is_corrupt_and_nothing_else(case: str) -> None:
    with pytest.raises(CorruptCheckpoint, match="manifest is unreadable"):
        Manifest.from_json(HOSTILE_MANIFESTS[case], "m", 2)


def test_an_unknown_checksum_algorithm_is_a_problem_not_a_crash(committed: CheckpointRoot) -> None:
    storage = committed.open()
    path = manifest_path(2, Kind.STATE_DICT)
    body = json.loads(storage.read_bytes(path))
    for entry in body["files"]:
        entry["algorithm"] = "md17"
    storage.write_bytes(path, json.dumps(body).encode(), track=False)
    report = committed.verify(2)
    assert not report.ok and "md17" in str(report.problems[0])


@pytest.mark.parametrize(
    "case", ["a list", "deep nesting", "a huge int", "an escaping file", "empty"]
)
def test_watch_skips_a_step_with_a_hostile_manifest_and_goes_on(
    committed: CheckpointRoot, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    storage = committed.open()
    storage.write_bytes(manifest_path(2, Kind.STATE_DICT), HOSTILE_MANIFESTS[case], track=False)
    with caplog.at_level(logging.WARNING, logger="commitpoint.read.watch"):
        assert list(watch(storage, after=1, timeout=0.3, interval=0.05)) == []
    assert "failed verification; skipping it" in caplog.text
    monitor = committed.monitor()
    commit_step(CheckpointCoordinator(monitor), 3, numel=8)
    monitor.close()
    assert list(watch(storage, after=1, timeout=0.3, interval=0.05)) == [3]


@pytest.mark.parametrize(
    "content",
    [b"9" * 5000, b"1" * 30, b"\x00" * 100, b"[" * 3000],
    ids=["huge", "2**99", "nul", "["],
)
def test_watch_backs_off_from_a_hostile_pointer_and_goes_on(
    committed: CheckpointRoot, content: bytes
) -> None:
    storage = committed.open()
    storage.write_bytes(STATE_DICT_POINTER, content, track=False)
    with pytest.raises(CorruptCheckpoint):
        storage.read_pointer(STATE_DICT_POINTER)
    assert list(watch(storage, after=1, timeout=0.3, interval=0.05)) == []
