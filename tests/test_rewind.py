"""Rewind: pointers move back only on purpose, only to a step that verifies, with an audit line."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from commitpoint import (
    CheckpointCoordinator,
    CheckpointMonitor,
    CorruptCheckpoint,
    InvalidArgument,
    Kind,
    SaveFailed,
    StepRegression,
    UnexpectedStep,
)
from commitpoint.core.manifest import manifest_path
from commitpoint.core.pointer import advance_pointer
from commitpoint.maintenance.rewind import RewindRecord, append_history, read_history, rewind
from commitpoint.storage.protocol import StorageBackend
from commitpoint.testing import CheckpointRoot, commit_step, memory_root


@pytest.fixture
def root(any_checkpoint_root: CheckpointRoot) -> CheckpointRoot:
    """Every backend; S3/GCS skip (with the reason) when their plug-ins are not installed."""
    return any_checkpoint_root


commit = commit_step


@pytest.fixture
def trained(root: CheckpointRoot) -> Iterator[CheckpointRoot]:
    """Steps 1..10 committed; full checkpoints at 5 and 10."""
    monitor = CheckpointMonitor(root.url, root.storage_options)
    coordinator = CheckpointCoordinator(monitor)
    for step in range(1, 11):
        commit(coordinator, step, checkpoint=step % 5 == 0)
    assert root.committed_steps() == {"state_dict": 10, "checkpoint": 10}
    yield root
    monitor.close()


def test_rewind_both_then_training_commits_again(trained: CheckpointRoot) -> None:
    storage = trained.open()
    records = rewind(storage, "both", 5)
    assert [(r.kind, r.from_step, r.to_step) for r in records] == [
        (Kind.CHECKPOINT, 10, 5),
        (Kind.STATE_DICT, 10, 5),
    ]
    assert trained.committed_steps() == {"state_dict": 5, "checkpoint": 5}

    history = read_history(storage)
    assert [(h["kind"], h["from"], h["to"]) for h in history] == [
        ("checkpoint", 10, 5),
        ("state_dict", 10, 5),
    ]
    assert all(h["host"] == socket.gethostname() and h["pid"] == os.getpid() for h in history)
    assert all(isinstance(h["time"], float) for h in history)

    # The normal commit path still refuses to go back.
    with pytest.raises(StepRegression):
        advance_pointer(storage, Kind.STATE_DICT.pointer, 4)

    # The restarted job trains steps 6, 7, ... again; they commit normally.
    monitor = CheckpointMonitor(trained.url, trained.storage_options)
    coordinator = CheckpointCoordinator(monitor)
    commit(coordinator, 6, value=100.0)
    assert trained.committed_steps() == {"state_dict": 6, "checkpoint": 5}
    commit(coordinator, 7, checkpoint=True, value=100.0)
    assert trained.committed_steps() == {"state_dict": 7, "checkpoint": 7}
    reader = trained.reader()
    assert reader.load(6, "model.pt")["w"][0].item() == 106.0  # the new timeline's weights
    assert reader.verify(7, Kind.CHECKPOINT).ok
    monitor.close()


def test_rewind_state_dict_only(trained: CheckpointRoot) -> None:
    records = rewind(trained.open(), Kind.STATE_DICT, 8, expected_current=10)
    assert [(r.kind, r.from_step, r.to_step) for r in records] == [(Kind.STATE_DICT, 10, 8)]
    assert trained.committed_steps() == {"state_dict": 8, "checkpoint": 10}


def test_a_live_monitor_refuses_saves_into_steps_it_saw_committed(
    trained: CheckpointRoot,
) -> None:
    """A monitor started before the rewind still believes step 10 is committed: saves of 6..10
    are refused (a typed error), so rewinds belong before the job (re)starts, as the demo does."""
    monitor = CheckpointMonitor(trained.url, trained.storage_options)
    rewind(trained.open(), "both", 5)
    coordinator = CheckpointCoordinator(monitor)
    with pytest.raises(SaveFailed) as info:
        commit(coordinator, 6)
    assert isinstance(info.value.cause, StepRegression)
    assert trained.committed_steps() == {"state_dict": 5, "checkpoint": 5}
    monitor.close()


def test_rewind_refuses_a_step_that_does_not_verify(trained: CheckpointRoot) -> None:
    storage = trained.open()
    storage.write_bytes("global_step_4/model.pt", b"not the weights", track=False)
    with pytest.raises(CorruptCheckpoint, match=r"global_step_4/model.pt: size"):
        rewind(storage, Kind.STATE_DICT, 4)
    storage.delete(manifest_path(3, Kind.STATE_DICT))
    with pytest.raises(CorruptCheckpoint, match="no state_dict manifest"):
        rewind(storage, Kind.STATE_DICT, 3)
    assert trained.committed_steps() == {"state_dict": 10, "checkpoint": 10}
    assert read_history(storage) == []


def test_both_needs_a_full_checkpoint_at_the_target(trained: CheckpointRoot) -> None:
    with pytest.raises(CorruptCheckpoint, match="no checkpoint manifest"):
        rewind(trained.open(), "both", 7)
    assert trained.committed_steps() == {"state_dict": 10, "checkpoint": 10}


def test_expected_current_is_compare_and_swap(trained: CheckpointRoot) -> None:
    with pytest.raises(UnexpectedStep, match="names step 10, not step 9 as expected"):
        rewind(trained.open(), Kind.STATE_DICT, 5, expected_current=9)
    assert trained.committed_steps()["state_dict"] == 10


def test_rewind_only_moves_back(trained: CheckpointRoot) -> None:
    storage = trained.open()
    rewind(storage, Kind.STATE_DICT, 5)
    with pytest.raises(InvalidArgument, match="only moves back"):
        rewind(storage, Kind.STATE_DICT, 8)
    with memory_root() as empty, pytest.raises(InvalidArgument, match="nothing is committed"):
        rewind(empty.open(), Kind.STATE_DICT, 1)
    with pytest.raises(InvalidArgument, match="kind must be"):
        rewind(storage, "weights", 1)


def test_history_appends_from_many_threads_keep_every_line(root: CheckpointRoot) -> None:
    storage = root.open()
    barrier = threading.Barrier(4)

    def append(worker: int) -> None:
        barrier.wait()
        for i in range(5):
            record = RewindRecord(Kind.STATE_DICT, 100 + worker, i, 0.0, "host", worker)
            append_history(storage, [record])

    threads = [threading.Thread(target=append, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    entries = read_history(storage)
    if root.backend == "local":  # O_APPEND: every line, always
        assert sorted((e["pid"], e["to"]) for e in entries) == [
            (w, i) for w in range(4) for i in range(5)
        ]
    else:  # read-modify-write, confirmed by reading back: every line in practice
        assert len(entries) >= 1
        assert all(set(e) == {"time", "kind", "from", "to", "host", "pid"} for e in entries)


class _DeletesTargetOnMove:
    """The real backend; right after a pointer write, step 4's manifest disappears (as if
    retention deleted it at that instant)."""

    def __init__(self, inner: StorageBackend) -> None:
        self._inner = inner
        self.armed = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def write_pointer_if(self, name: str, value: int, token: str | None) -> str:
        new_token = self._inner.write_pointer_if(name, value, token)
        if self.armed:
            self.armed = False
            self._inner.delete(manifest_path(4, Kind.STATE_DICT))
        return new_token


def test_a_target_deleted_during_the_rewind_puts_the_pointer_back(
    trained: CheckpointRoot,
) -> None:
    racing: Any = _DeletesTargetOnMove(trained.open())
    with pytest.raises(CorruptCheckpoint, match="no state_dict manifest"):
        rewind(racing, Kind.STATE_DICT, 4)
    assert trained.committed_steps() == {"state_dict": 10, "checkpoint": 10}
    assert read_history(trained.open()) == []
