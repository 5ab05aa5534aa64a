"""The coordinator under careless and hostile use (issue 18 items 3-7, 12, 14; issue 19 item 11):
concurrent callers of one name, non-blocking queued saves, failures that cannot be printed, the
end of the process with saves in flight, the publish guard across kinds and saves."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from commitpoint import CheckpointCoordinator, CheckpointMonitor, SaveFailed, save_torch
from commitpoint.errors import DuplicateWrite, InvalidStep, SaveQueueFull, StepRegression
from commitpoint.save.coordinator import EXIT_SAVES_LOST
from commitpoint.testing import CheckpointRoot, commit_step

GUARD_S = 60.0
"""Only a guard against a hang (the regression itself); never a performance assertion."""


@pytest.fixture
def root(any_checkpoint_root: CheckpointRoot) -> CheckpointRoot:
    return any_checkpoint_root


@pytest.fixture
def coordinator(root: CheckpointRoot) -> Iterator[CheckpointCoordinator]:
    monitor = root.monitor()
    yield CheckpointCoordinator(monitor)
    monitor.close()


@pytest.fixture
def memory_coordinator(memory_checkpoint_root: CheckpointRoot) -> Iterator[CheckpointCoordinator]:
    monitor = memory_checkpoint_root.monitor()
    yield CheckpointCoordinator(monitor)
    monitor.close()


# -- one name, many callers (item 5) and the non-blocking queue (issue 19 item 11) -----------
def test_concurrent_callers_of_one_name_are_serialised_and_all_waited_for(
    memory_coordinator: CheckpointCoordinator,
) -> None:
    lock = threading.Lock()
    state = {"running": 0, "most": 0, "done": 0}
    go = threading.Barrier(8)
    errors: list[BaseException] = []

    def save() -> None:
        with lock:
            state["running"] += 1
            state["most"] = max(state["most"], state["running"])
        threading.Event().wait(0.01)
        with lock:
            state["running"] -= 1
            state["done"] += 1

    def caller(i: int) -> None:
        try:
            go.wait()
            memory_coordinator.save_async("model", save, 1 + i % 2, block=i % 2 == 0)
        except BaseException as exc:
            errors.append(exc)

    callers = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
    for thread in callers:
        thread.start()
    for thread in callers:
        thread.join(GUARD_S)
    assert errors == [] or all(isinstance(e, SaveQueueFull) for e in errors)
    memory_coordinator.wait_all()
    assert state["most"] == 1
    assert state["done"] == 8 - len(errors)
    assert memory_coordinator.pending() == []


def test_block_false_queues_behind_the_running_save_and_bounds_the_queue(
    root: CheckpointRoot, coordinator: CheckpointCoordinator
) -> None:
    release = threading.Event()
    order: list[int] = []
    storage = coordinator.storage

    def save(step: int, wait: bool) -> None:
        if wait:
            assert release.wait(GUARD_S)
        save_torch(storage, f"global_step_{step}/model.pt", {"w": torch.full((4,), step)})
        order.append(step)

    coordinator.save_async("model", lambda: save(1, True), 1, is_state_dict=True)
    coordinator.register_and_monitor_sync(1, True, state_dict_thread_count=1)
    # returns although save 1 is still blocked: it only queues behind it
    coordinator.save_async("model", lambda: save(2, False), 2, is_state_dict=True, block=False)
    coordinator.register_and_monitor_sync(2, True, state_dict_thread_count=1)
    with pytest.raises(SaveQueueFull, match="1 saves of 'model' are already queued"):
        coordinator.save_async("model", lambda: save(3, False), 3, True, block=False)
    assert order == [] and coordinator.pending() == ["model"]
    release.set()
    coordinator.wait_all()
    assert order == [1, 2]
    assert root.committed_steps()["state_dict"] == 2


# -- failures that cannot be printed (item 6) ------------------------------------------------
class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")

    def __repr__(self) -> str:
        raise RuntimeError("no repr either")


@pytest.mark.parametrize(
    "error", [Unprintable(), ValueError(10**5000), OSError("x" * 10_000_000)], ids=str.__name__
)
def test_a_failure_that_cannot_be_printed_still_reaches_wait_all(
    memory_coordinator: CheckpointCoordinator, error: Exception
) -> None:
    def save() -> None:
        raise error

    memory_coordinator.save_async("model", save, 1, is_state_dict=True)
    with pytest.raises(SaveFailed) as caught:
        memory_coordinator.wait_all()
    assert caught.value.cause is error
    assert len(str(caught.value)) < 5000


def test_a_step_beyond_64_bits_is_refused_at_the_call(
    memory_coordinator: CheckpointCoordinator,
) -> None:
    with pytest.raises(InvalidStep, match="at most 2\\*\\*63 - 1"):
        memory_coordinator.save_async("model", lambda: None, 10**5000)


# -- save_sync lets KeyboardInterrupt and SystemExit through (item 14) -----------------------
@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_save_sync_reports_an_interrupt_and_lets_it_through(
    memory_coordinator: CheckpointCoordinator, interrupt: type[BaseException]
) -> None:
    def save() -> None:
        raise interrupt()

    with pytest.raises(interrupt):
        memory_coordinator.save_sync(save, 1, True)
    memory_coordinator.save_sync(lambda: None, 2, True)  # the coordinator still works


# -- the publish guard: the other kind, and a second save of one file (items 3 and 4) -------
def test_a_full_checkpoint_never_replaces_its_steps_committed_state_dict(
    root: CheckpointRoot, coordinator: CheckpointCoordinator
) -> None:
    commit_step(coordinator, 1)
    coordinator = CheckpointCoordinator(root.monitor())  # another process's, say
    storage = coordinator.storage
    before = root.manifest(1).files
    coordinator.save_async(
        "optim",
        lambda: save_torch(storage, "global_step_1/model.pt", {"w": torch.ones(3)}),
        1,
    )
    try:
        coordinator.wait_all()
    except SaveFailed as exc:  # refused at publish: the committed file stands
        assert isinstance(exc.cause, StepRegression)
        assert root.verify(1).ok and root.manifest(1).files == before
    else:  # the monitor reopened the step for the save: no manifest vouches for stale bytes
        assert (
            not root.open().exists(
                ".commitpoint-manifest.state_dict.json".join(["global_step_1/", ""])
            )
            or root.verify(1).ok
        )
    # a full checkpoint may still add its own files to a step whose state dict is committed
    commit_step(coordinator, 2)
    coordinator.save_async(
        "optim", lambda: save_torch(storage, "global_step_2/optim.pt", {"s": 1}), 2
    )
    coordinator.register_and_monitor_sync(2, False, checkpoint_thread_count=1)
    coordinator.wait_all()
    assert root.committed_steps() == {"state_dict": 2, "checkpoint": 2}


def test_two_saves_of_one_step_writing_one_file_fail_the_second(
    root: CheckpointRoot, coordinator: CheckpointCoordinator
) -> None:
    """While save a has written the file but not reported it, save b may not replace it (the
    manifest could vouch for either content); b fails, the step never commits, a's bytes stay."""
    storage = coordinator.storage
    written, release = threading.Event(), threading.Event()

    def save(value: float) -> None:
        save_torch(storage, "global_step_1/model.pt", {"w": torch.full((4,), value)})

    def first() -> None:
        save(1.0)
        written.set()
        assert release.wait(30)

    coordinator.save_async("a", first, 1, is_state_dict=True)
    assert written.wait(30)
    coordinator.save_async("b", lambda: save(2.0), 1, is_state_dict=True)
    coordinator.register_and_monitor_sync(1, True, state_dict_thread_count=2)
    while "b" in coordinator.pending():
        time.sleep(0.01)
    release.set()
    with pytest.raises(SaveFailed) as caught:
        coordinator.wait_all()
    assert isinstance(caught.value.cause, DuplicateWrite)
    assert root.committed_steps()["state_dict"] is None
    loaded = torch.load(root.open().open_read("global_step_1/model.pt"), weights_only=True)
    assert loaded["w"][0].item() == 1.0


def test_a_later_save_may_rewrite_a_file_once_the_first_reported_it(
    root: CheckpointRoot, coordinator: CheckpointCoordinator
) -> None:
    """Sequential saves of one file: the later record replaces the first, so the committed
    manifest describes the bytes the file holds."""
    storage = coordinator.storage
    coordinator.save_async(
        "a", lambda: save_torch(storage, "global_step_1/model.pt", {"w": torch.ones(4)}), 1, True
    )
    coordinator.wait_all()
    coordinator.save_async(
        "b", lambda: save_torch(storage, "global_step_1/model.pt", {"w": torch.zeros(4)}), 1, True
    )
    coordinator.register_and_monitor_sync(1, True, state_dict_thread_count=2)
    coordinator.wait_all()
    assert root.committed_steps()["state_dict"] == 1
    assert root.verify(1).ok
    loaded = torch.load(root.open().open_read("global_step_1/model.pt"), weights_only=True)
    assert loaded["w"][0].item() == 0.0


# -- SINGLE_THREAD: a failed commit does not free the slot twice (item 12) -------------------
def test_a_commit_failing_in_notify_finished_releases_the_slot_once(
    memory_checkpoint_root: CheckpointRoot,
) -> None:
    monitor = CheckpointMonitor(memory_checkpoint_root.url, {}, "single_thread")
    coordinator = CheckpointCoordinator(monitor)
    storage = coordinator.storage
    a_go, b_in, b_go = threading.Event(), threading.Event(), threading.Event()

    def save_a() -> None:
        storage.write_bytes("global_step_1/model.pt", b"a")
        storage.delete("global_step_1/model.pt")  # so the commit of step 1 fails
        assert a_go.wait(GUARD_S)

    def save_b() -> None:
        b_in.set()
        assert b_go.wait(GUARD_S)

    coordinator.register_and_monitor_sync(1, True, state_dict_thread_count=1)
    a = coordinator.save_async("a", save_a, 1, is_state_dict=True)
    coordinator.save_async("b", save_b, 10, is_state_dict=True)  # waits for the slot
    a_go.set()
    a.join(GUARD_S)
    assert b_in.wait(GUARD_S)
    assert monitor._slots._users == 1  # b holds it; a's failure did not free it again
    b_go.set()
    with pytest.raises(SaveFailed) as caught:
        coordinator.wait_all()
    assert [f.name for f in caught.value.failures] == ["a"]
    monitor.close()


# -- the end of the process (item 7) ----------------------------------------------------------
SCRIPT = """
import threading, time
from commitpoint import CheckpointCoordinator, CheckpointMonitor
monitor = CheckpointMonitor({url!r})
coordinator = CheckpointCoordinator(monitor, exit_timeout={exit_timeout})
def save():
    time.sleep({sleep})
    coordinator.storage.write_bytes("global_step_1/model.pt", b"weights")
coordinator.save_async("model", save, 1, is_state_dict=True)
coordinator.register_and_monitor_sync(1, True, state_dict_thread_count=1)
print("script ends", flush=True)
"""


def run_script(url: str, exit_timeout: float, sleep: float) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(SCRIPT.format(url=url, exit_timeout=exit_timeout, sleep=sleep))
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=GUARD_S * 2
    )


def test_saves_in_flight_at_the_end_of_a_script_finish_and_commit(
    local_checkpoint_root: CheckpointRoot,
) -> None:
    done = run_script(local_checkpoint_root.url, exit_timeout=60, sleep=0.5)
    assert done.returncode == 0, done.stderr
    assert "script ends" in done.stdout
    assert "terminate called" not in done.stderr
    assert local_checkpoint_root.committed_steps()["state_dict"] == 1
    assert local_checkpoint_root.verify(1).ok


def test_a_save_that_cannot_finish_by_the_exit_bound_is_loud_and_in_the_exit_status(
    local_checkpoint_root: CheckpointRoot,
) -> None:
    done = run_script(local_checkpoint_root.url, exit_timeout=0.2, sleep=30)
    assert done.returncode == EXIT_SAVES_LOST
    assert "lost at exit: save 'model' of step 1 did not finish" in done.stderr
    assert local_checkpoint_root.committed_steps()["state_dict"] is None
