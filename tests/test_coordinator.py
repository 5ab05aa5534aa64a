"""The coordinator: background saves, same-name ordering, failures surfaced by wait_all."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from commitpoint import (
    CheckpointCoordinator,
    CheckpointMonitor,
    InvalidArgument,
    InvalidName,
    InvalidStep,
    SaveFailed,
    save_torch,
)
from commitpoint.testing import CheckpointRoot


@pytest.fixture
def setup(local_checkpoint_root: CheckpointRoot) -> tuple[CheckpointRoot, CheckpointCoordinator]:
    monitor = local_checkpoint_root.monitor()
    return local_checkpoint_root, CheckpointCoordinator(monitor)


def test_save_async_returns_before_the_save_runs(
    setup: tuple[CheckpointRoot, CheckpointCoordinator],
) -> None:
    root, coordinator = setup
    release = threading.Event()
    coordinator.save_async("model", release.wait, 1, is_state_dict=True)
    coordinator.register_and_monitor_sync(1, True, state_dict_thread_count=1)
    assert coordinator.pending() == ["model"]
    assert root.committed_steps()["state_dict"] is None
    release.set()
    coordinator.wait_all()
    assert root.committed_steps()["state_dict"] == 1
    assert coordinator.pending() == []


def test_same_name_saves_never_overlap(setup: tuple[CheckpointRoot, CheckpointCoordinator]) -> None:
    root, coordinator = setup
    order: list[tuple[int, str]] = []

    def save(step: int) -> None:
        order.append((step, "start"))
        time.sleep(0.05)
        order.append((step, "end"))

    for step in (1, 2, 3):
        coordinator.save_async("model", lambda s=step: save(s), step, is_state_dict=True)
        coordinator.register_and_monitor_sync(step, True, state_dict_thread_count=1)
    coordinator.wait_all()
    assert order == [(s, e) for s in (1, 2, 3) for e in ("start", "end")]
    assert root.committed_steps()["state_dict"] == 3


def test_failure_is_raised_by_wait_all_and_does_not_stop_the_next_step(
    setup: tuple[CheckpointRoot, CheckpointCoordinator], caplog: pytest.LogCaptureFixture
) -> None:
    root, coordinator = setup
    storage = coordinator.storage

    def broken() -> None:
        with storage.open_write("global_step_1/model.pt") as f:
            f.write(b"half")
            raise OSError("device went away")

    coordinator.save_async("model", broken, 1, is_state_dict=True)
    coordinator.register_and_monitor_sync(1, True, state_dict_thread_count=1)
    coordinator.save_async(
        "model",
        lambda: save_torch(storage, "global_step_2/model.pt", {"w": torch.ones(3)}),
        2,
        True,
    )
    coordinator.register_and_monitor_sync(2, True, state_dict_thread_count=1)
    assert any("device went away" in r.getMessage() for r in caplog.records)  # logged at once
    with pytest.raises(SaveFailed) as info:
        coordinator.wait_all()
    failure = info.value
    assert (failure.step, failure.name) == (1, "model")
    assert isinstance(failure.cause, OSError)
    assert failure.failures == [failure]
    assert root.committed_steps()["state_dict"] == 2
    coordinator.wait_all()  # each failure is raised once


def test_several_failures_are_all_reported(
    setup: tuple[CheckpointRoot, CheckpointCoordinator],
) -> None:
    _, coordinator = setup

    def fail(message: str) -> None:
        raise ValueError(message)

    coordinator.save_async("a", lambda: fail("a broke"), 1)
    coordinator.save_async("b", lambda: fail("b broke"), 1)
    with pytest.raises(SaveFailed) as info:
        coordinator.wait_all()
    assert sorted(f.name for f in info.value.failures) == ["a", "b"]


def test_save_sync_commits_and_raises(setup: tuple[CheckpointRoot, CheckpointCoordinator]) -> None:
    root, coordinator = setup
    coordinator.register_and_monitor_sync(3, False, checkpoint_thread_count=2)
    coordinator.save_sync(lambda: coordinator.storage.write_bytes("global_step_3/a", b"1"), 3)
    assert root.committed_steps()["checkpoint"] is None
    coordinator.save_sync(lambda: coordinator.storage.write_bytes("global_step_3/b", b"2"), 3)
    assert root.committed_steps() == {"state_dict": 3, "checkpoint": 3}
    with pytest.raises(SaveFailed, match="ZeroDivisionError"):
        coordinator.save_sync(lambda: 1 / 0, 4)


def test_async_register_and_monitor(setup: tuple[CheckpointRoot, CheckpointCoordinator]) -> None:
    root, coordinator = setup
    coordinator.save_async("m", lambda: None, 5, is_state_dict=True)
    asyncio.run(coordinator.register_and_monitor(5, True, state_dict_thread_count=1))
    coordinator.wait_all()
    assert root.committed_steps()["state_dict"] == 5
    assert coordinator.latest_steps()["state_dict"] == 5


def test_bad_arguments_are_typed_errors(
    setup: tuple[CheckpointRoot, CheckpointCoordinator],
) -> None:
    _, coordinator = setup
    with pytest.raises(InvalidName):
        coordinator.save_async("", lambda: None, 1)
    with pytest.raises(InvalidArgument, match="callable"):
        coordinator.save_async("m", "not callable", 1)  # type: ignore[arg-type]
    with pytest.raises(InvalidStep):
        coordinator.save_async("m", lambda: None, -1)
    with pytest.raises(InvalidStep):
        coordinator.register_and_monitor_sync(1, True, state_dict_thread_count=-1)
    with pytest.raises(InvalidArgument, match="CheckpointMonitor"):
        CheckpointCoordinator(object())
    assert coordinator.pending() == []


def test_context_manager_waits(local_checkpoint_root: CheckpointRoot) -> None:
    monitor = CheckpointMonitor(local_checkpoint_root.url)
    with CheckpointCoordinator(monitor) as coordinator:
        coordinator.save_async("m", lambda: time.sleep(0.05), 1, is_state_dict=True)
        coordinator.register_and_monitor_sync(1, True, state_dict_thread_count=1)
    assert local_checkpoint_root.committed_steps()["state_dict"] == 1


def test_saves_into_a_committed_step_are_refused_without_writing(
    setup: tuple[CheckpointRoot, CheckpointCoordinator],
) -> None:
    root, coordinator = setup
    storage = coordinator.storage
    coordinator.save_sync(lambda: storage.write_bytes("global_step_5/model.pt", b"v1"), 5, True)
    coordinator.register_and_monitor_sync(5, True, state_dict_thread_count=1)
    assert root.committed_steps()["state_dict"] == 5
    with pytest.raises(SaveFailed) as info:
        coordinator.save_sync(lambda: storage.write_bytes("global_step_4/model.pt", b"v2"), 4, True)
    assert "refusing to move pointer" in str(info.value.cause)
    assert not storage.exists("global_step_4/model.pt")
    # the same save of step 5 again is a committed re-save: not run, nothing rewritten
    coordinator.save_sync(lambda: storage.write_bytes("global_step_5/model.pt", b"v2"), 5, True)
    assert storage.read_bytes("global_step_5/model.pt") == b"v1"
    assert root.verify(5).ok
