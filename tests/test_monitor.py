"""The monitor's state machine: counting, ordering, both pointers, failures, save strategies."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from commitpoint import (
    CheckpointMonitor,
    InvalidArgument,
    InvalidStep,
    Kind,
    MonitorRestarted,
    SaveStrategy,
    WriterFenced,
)
from commitpoint.core.manifest import read_manifest
from commitpoint.storage.protocol import FileRecord
from commitpoint.testing import CheckpointRoot


@pytest.fixture
def root(memory_checkpoint_root: CheckpointRoot) -> Iterator[CheckpointRoot]:
    yield memory_checkpoint_root


def pointers(root: CheckpointRoot) -> tuple[int | None, int | None]:
    steps = root.committed_steps()
    return steps["state_dict"], steps["checkpoint"]


def write(root: CheckpointRoot, path: str, data: bytes = b"x") -> FileRecord:
    return root.open().write_bytes(path, data)


def test_state_dict_commits_only_after_all_registered_saves(root: CheckpointRoot) -> None:
    monitor = root.monitor()
    monitor.register_thread_count(1, state_dict_thread_count=3)
    monitor.monitor_step(1, is_state_dict=True)
    for i in range(2):
        monitor.notify_finished(1, True, files=[write(root, f"global_step_1/s{i}")])
        assert pointers(root) == (None, None)
    monitor.notify_finished(1, True, files=[write(root, "global_step_1/s2")])
    assert pointers(root) == (1, None)
    manifest = read_manifest(root.open(), 1, Kind.STATE_DICT)
    assert manifest is not None
    assert [f.path for f in manifest.files] == [f"global_step_1/s{i}" for i in range(3)]


def test_notifications_before_registration_still_count(root: CheckpointRoot) -> None:
    monitor = root.monitor()
    monitor.notify_finished(4, True)
    monitor.notify_finished(4, True)
    assert pointers(root) == (None, None)
    monitor.register_thread_count(4, state_dict_thread_count=2)
    assert pointers(root) == (None, None)  # not asked to be monitored yet
    monitor.monitor_step(4, is_state_dict=True)
    assert pointers(root) == (4, None)


def test_checkpoint_waits_for_state_dict_saves_and_moves_both(root: CheckpointRoot) -> None:
    monitor = root.monitor()
    monitor.register_thread_count(2, state_dict_thread_count=1, checkpoint_thread_count=2)
    monitor.monitor_step(2, is_state_dict=False)
    monitor.notify_finished(2, False)
    monitor.notify_finished(2, False)
    assert pointers(root) == (None, None)  # the state dict of step 2 is still being written
    monitor.notify_finished(2, True)
    assert pointers(root) == (2, 2)


def test_steps_in_flight_commit_independently_and_never_regress(root: CheckpointRoot) -> None:
    monitor = root.monitor()
    for step in (1, 2, 3):
        monitor.register_thread_count(step, state_dict_thread_count=1)
        monitor.monitor_step(step, is_state_dict=True)
    monitor.notify_finished(2, True)
    assert pointers(root) == (2, None)
    monitor.notify_finished(1, True)  # late finisher of an older step: manifest, no regression
    assert pointers(root) == (2, None)
    assert read_manifest(root.open(), 1, Kind.STATE_DICT) is not None
    monitor.notify_finished(3, True)
    assert pointers(root) == (3, None)
    assert monitor.latest_steps() == {"state_dict": 3, "checkpoint": None}
    assert monitor.pending_steps() == []


def test_failed_save_blocks_only_its_step(root: CheckpointRoot) -> None:
    monitor = root.monitor()
    for step in (5, 6):
        monitor.register_thread_count(step, state_dict_thread_count=2)
        monitor.monitor_step(step, is_state_dict=True)
    monitor.notify_failed(5, True, name="model", error="disk on fire")
    monitor.notify_finished(5, True)
    monitor.notify_finished(6, True)
    monitor.notify_finished(6, True)
    assert pointers(root) == (6, None)
    assert read_manifest(root.open(), 5, Kind.STATE_DICT) is None


def test_failed_checkpoint_save_keeps_the_state_dict_commit(root: CheckpointRoot) -> None:
    monitor = root.monitor()
    monitor.register_thread_count(7, state_dict_thread_count=1, checkpoint_thread_count=1)
    monitor.monitor_step(7, is_state_dict=True)
    monitor.monitor_step(7, is_state_dict=False)
    monitor.notify_failed(7, False, name="optimizer", error="boom")
    monitor.notify_finished(7, True)
    assert pointers(root) == (7, None)


def test_participants_wait_for_every_worker_registration(root: CheckpointRoot) -> None:
    monitor = root.monitor()
    # worker A registers and finishes before worker B has registered
    monitor.register_thread_count(3, state_dict_thread_count=1)
    monitor.monitor_step(3, is_state_dict=True, participants=2)
    monitor.notify_finished(3, True)
    monitor.notify_finished(3, True)  # B's save finished early, B not registered yet
    assert pointers(root) == (None, None)
    monitor.register_thread_count(3, state_dict_thread_count=1)
    monitor.monitor_step(3, is_state_dict=True, participants=2)
    assert pointers(root) == (3, None)


def test_step_with_no_saves_commits_when_monitored(root: CheckpointRoot) -> None:
    monitor = root.monitor()
    monitor.register_thread_count(9)
    monitor.monitor_step(9)
    assert pointers(root) == (9, 9)


def test_untracked_files_are_listed_and_checksummed(root: CheckpointRoot) -> None:
    storage = root.open()
    storage.fs.pipe_file(storage.full_path("global_step_1/opaque.bin"), b"written elsewhere")
    monitor = root.monitor()
    monitor.register_thread_count(1, checkpoint_thread_count=1)
    monitor.monitor_step(1)
    monitor.notify_finished(1, False, files=[write(root, "global_step_1/tracked.bin", b"ok")])
    manifest = read_manifest(storage, 1, Kind.CHECKPOINT)
    assert manifest is not None
    by_path = {f.path: f for f in manifest.files}
    assert by_path["global_step_1/tracked.bin"].tracked
    opaque = by_path["global_step_1/opaque.bin"]
    assert not opaque.tracked and opaque.size == 17 and opaque.checksum
    assert root.verify(1, Kind.CHECKPOINT).ok


def test_checkpoint_manifest_includes_earlier_state_dict_files(root: CheckpointRoot) -> None:
    monitor = root.monitor()
    monitor.register_thread_count(2, state_dict_thread_count=1)
    monitor.monitor_step(2, is_state_dict=True)
    monitor.notify_finished(2, True, files=[write(root, "global_step_2/model.pt")])
    monitor.register_thread_count(2, checkpoint_thread_count=1)
    monitor.monitor_step(2)
    monitor.notify_finished(2, False, files=[write(root, "global_step_2/optim.pt")])
    manifest = read_manifest(root.open(), 2, Kind.CHECKPOINT)
    assert manifest is not None
    assert [f.path for f in manifest.files] == ["global_step_2/model.pt", "global_step_2/optim.pt"]
    assert pointers(root) == (2, 2)


def test_restarted_monitor_recovers_pointers_and_needs_complete_steps(root: CheckpointRoot) -> None:
    first = root.monitor()
    first.register_thread_count(1, state_dict_thread_count=1)
    first.monitor_step(1, is_state_dict=True)
    first.notify_finished(1, True)
    first.register_thread_count(2, state_dict_thread_count=2)
    first.monitor_step(2, is_state_dict=True)
    first.notify_finished(2, True)  # one of two saves of step 2 finished; then the monitor dies

    second = root.monitor()
    assert second.latest_steps() == {"state_dict": 1, "checkpoint": None}
    second.notify_finished(2, True)  # the survivor reports to the new monitor
    assert pointers(root) == (1, None)  # step 2 was never seen complete
    second.register_thread_count(3, state_dict_thread_count=1)
    second.monitor_step(3, is_state_dict=True)
    second.notify_finished(3, True)
    assert pointers(root) == (3, None)


def test_older_monitor_is_fenced_by_a_newer_one(root: CheckpointRoot) -> None:
    old = root.monitor()
    new = root.monitor()
    assert new.writer_epoch() == old.writer_epoch() + 1
    old.register_thread_count(1, state_dict_thread_count=1)
    old.monitor_step(1, is_state_dict=True)
    with pytest.raises(WriterFenced):
        old.notify_finished(1, True)
    assert pointers(root) == (None, None)
    new.register_thread_count(1, state_dict_thread_count=1)
    new.monitor_step(1, is_state_dict=True)
    new.notify_finished(1, True)
    assert pointers(root) == (1, None)


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.register_thread_count(-1, state_dict_thread_count=1),
        lambda m: m.register_thread_count(1, state_dict_thread_count=-2),
        lambda m: m.monitor_step("3"),
        lambda m: m.monitor_step(True),
        lambda m: m.notify_finished(1.5),
        lambda m: m.notify_failed(-4),
    ],
)
def test_bad_steps_and_counts_are_refused(root: CheckpointRoot, call: object) -> None:
    monitor = root.monitor()
    with pytest.raises(InvalidStep):
        call(monitor)  # type: ignore[operator]


def test_unknown_strategy_is_refused(root: CheckpointRoot) -> None:
    with pytest.raises(InvalidArgument, match="save_strategy"):
        root.monitor(save_strategy="one_at_a_time")


# -- save strategies ----------------------------------------------------------------------------
def _run_saves(
    monitor: CheckpointMonitor, owners: list[tuple[str, str]], fail_first: bool = False
) -> list[tuple[str, str, float, float]]:
    """Each owner (node, process) runs a save that sleeps; returns (node, proc, start, end)."""
    spans: list[tuple[str, str, float, float]] = []
    lock = threading.Lock()

    def save(index: int, node: str, proc: str) -> None:
        monitor.notify_started(node, proc, timeout=20)
        start = time.monotonic()
        time.sleep(0.03)
        end = time.monotonic()
        with lock:
            spans.append((node, proc, start, end))
        if fail_first and index == 0:
            monitor.notify_failed(1, True, name=f"s{index}", error="injected")
        else:
            monitor.notify_finished(1, True, name=f"s{index}")

    threads = [
        threading.Thread(target=save, args=(i, node, proc)) for i, (node, proc) in enumerate(owners)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a save strategy deadlocked"
    return spans


def _overlaps(a: tuple[str, str, float, float], b: tuple[str, str, float, float]) -> bool:
    return a[2] < b[3] and b[2] < a[3]


OWNERS = [("n1", "p1"), ("n1", "p1"), ("n1", "p2"), ("n2", "p3"), ("n2", "p3"), ("n1", "p1")]


@pytest.mark.parametrize("fail_first", [False, True])
def test_single_thread_serialises_every_save(root: CheckpointRoot, fail_first: bool) -> None:
    spans = _run_saves(root.monitor(SaveStrategy.SINGLE_THREAD), OWNERS, fail_first)
    assert len(spans) == len(OWNERS)
    assert not any(_overlaps(a, b) for i, a in enumerate(spans) for b in spans[i + 1 :])


def test_single_process_allows_only_one_process_at_a_time(root: CheckpointRoot) -> None:
    spans = _run_saves(root.monitor(SaveStrategy.SINGLE_PROCESS), OWNERS, fail_first=True)
    assert len(spans) == len(OWNERS)
    for i, a in enumerate(spans):
        for b in spans[i + 1 :]:
            if _overlaps(a, b):
                assert a[:2] == b[:2]


def test_single_node_allows_only_one_node_at_a_time(root: CheckpointRoot) -> None:
    spans = _run_saves(root.monitor(SaveStrategy.SINGLE_NODE), OWNERS)
    assert len(spans) == len(OWNERS)
    for i, a in enumerate(spans):
        for b in spans[i + 1 :]:
            if _overlaps(a, b):
                assert a[0] == b[0]


def test_unrestricted_lets_saves_overlap(root: CheckpointRoot) -> None:
    spans = _run_saves(root.monitor(SaveStrategy.UNRESTRICTED), OWNERS)
    assert any(_overlaps(a, b) for i, a in enumerate(spans) for b in spans[i + 1 :])


def test_a_report_from_before_a_monitor_restart_is_refused(root: CheckpointRoot) -> None:
    monitor = root.monitor()
    monitor.register_thread_count(1, state_dict_thread_count=1)
    monitor.monitor_step(1, True)
    with pytest.raises(MonitorRestarted, match="step 1 will not be committed"):
        monitor.notify_finished(1, True, name="model", writer_epoch=monitor.writer_epoch() - 1)
    assert pointers(root) == (None, None)
