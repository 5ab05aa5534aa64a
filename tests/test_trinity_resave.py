"""Saves into committed steps, in-process: the rules behind the Trinity-RFT drop-in.

Re-save (a no-op), reopen (pointers move back before the save runs), resume (the weights pointer
moves back to the checkpoint a run starts from), another writer's pointer (a loud failure), and
``save_sync`` errors that keep the save function's own type.
"""

from __future__ import annotations

import logging
import pickle
import threading
from typing import Any

import pytest

from commitpoint import (
    CheckpointCoordinator,
    CheckpointMonitor,
    ForeignPointer,
    SaveFailed,
    StepRegression,
)
from commitpoint.core.layout import Kind
from commitpoint.core.manifest import read_manifest
from commitpoint.maintenance.rewind import read_history
from commitpoint.monitor.reopen import Action, decide
from commitpoint.testing import CheckpointRoot


def _pointers(root: CheckpointRoot) -> tuple[int | None, int | None]:
    steps = root.committed_steps()
    return steps["checkpoint"], steps["state_dict"]


def _weights(coordinator: CheckpointCoordinator, step: int, body: bytes = b"w") -> None:
    """A Trinity weight sync of ``step``: one background save, registered after it started."""
    storage = coordinator.storage
    coordinator.save_async(
        "model_state_dict",
        lambda: storage.write_bytes(f"global_step_{step}/actor/model.pt", body),
        step,
        is_state_dict=True,
    )
    coordinator.register_and_monitor_sync(step, True, state_dict_thread_count=1)
    coordinator.wait_all()


def _checkpoint(
    coordinator: CheckpointCoordinator, step: int, during: Any = None, body: bytes = b"c"
) -> None:
    """A Trinity checkpoint of ``step``: ``save_sync`` flagged as a state dict, then registered."""
    storage = coordinator.storage

    def save() -> None:
        if during is not None:
            during()
        storage.write_bytes(f"global_step_{step}/actor/model.pt", body)
        storage.write_bytes(f"global_step_{step}/actor/optim.pt", body)

    coordinator.save_sync(save, step, is_state_dict=True)
    coordinator.register_and_monitor_sync(step, state_dict_thread_count=1)


MONITORS: dict[str, CheckpointMonitor] = {}


@pytest.fixture
def setup(local_checkpoint_root: CheckpointRoot) -> tuple[CheckpointRoot, CheckpointCoordinator]:
    monitor = MONITORS[local_checkpoint_root.url] = CheckpointMonitor(local_checkpoint_root.url)
    return local_checkpoint_root, CheckpointCoordinator(monitor)


# -- the decision table --
def test_decide_names_each_case() -> None:
    sd, ck = Kind.STATE_DICT, Kind.CHECKPOINT
    latest = {ck: 4, sd: 6}
    committed = {("sync", sd)}
    assert decide(7, sd, "m", latest, set(), False).action is Action.RUN
    resave = decide(6, sd, "sync", latest, committed, False)
    assert resave.action is Action.SKIP
    forced = decide(6, sd, "sync", latest, committed, True)
    assert forced.action is Action.RUN and forced.reopen == (sd,)
    other = decide(6, sd, "model_state_dict", latest, committed, False)
    assert other.action is Action.RUN and other.reopen == (sd,)
    resumed = decide(5, sd, "m", latest, set(), False)
    assert resumed.action is Action.RUN and resumed.resume_to == 4 and not resumed.reopen
    below = decide(3, sd, "m", latest, set(), False)
    assert below.action is Action.REFUSE and below.refused_by is ck
    both = decide(4, sd, "sync", {ck: 4, sd: 4}, committed, False)
    assert both.action is Action.SKIP
    assert decide(4, sd, "x", {ck: 4, sd: 4}, committed, False).reopen == (ck, sd)


# -- re-save --
def test_a_committed_re_save_is_not_run_and_its_registration_completes(
    setup: tuple[CheckpointRoot, CheckpointCoordinator], caplog: pytest.LogCaptureFixture
) -> None:
    root, coordinator = setup
    _checkpoint(coordinator, 2)
    assert _pointers(root) == (2, 2)
    ran: list[int] = []
    with caplog.at_level(logging.INFO, logger="commitpoint"):
        _checkpoint(coordinator, 2, during=lambda: ran.append(1), body=b"other")
    assert ran == []
    assert root.open().read_bytes("global_step_2/actor/model.pt") == b"c"
    assert any("not run" in r.getMessage() and "step 2" in r.getMessage() for r in caplog.records)
    assert MONITORS[root.url].pending_steps() == []  # the skipped save counted as finished
    assert root.verify(2, "checkpoint").ok


# -- reopen --
def test_a_checkpoint_of_published_weights_moves_the_weights_pointer_back_while_it_writes(
    setup: tuple[CheckpointRoot, CheckpointCoordinator],
) -> None:
    root, coordinator = setup
    _weights(coordinator, 1)
    _weights(coordinator, 2)
    assert _pointers(root) == (None, 2)
    seen: list[tuple[int | None, int | None]] = []
    manifests: list[bool] = []

    def during() -> None:
        seen.append(_pointers(root))
        manifests.append(read_manifest(root.open(), 2, Kind.STATE_DICT) is not None)

    _checkpoint(coordinator, 2, during=during)
    assert seen == [(None, 1)] and manifests == [False]
    assert _pointers(root) == (2, 2)
    assert root.verify(2, "checkpoint").ok
    assert root.open().read_bytes("global_step_2/actor/model.pt") == b"c"
    moves = [e for e in read_history(root.open()) if e.get("reason")]
    assert moves[-1]["kind"] == "state_dict" and (moves[-1]["from"], moves[-1]["to"]) == (2, 1)
    assert "reopen step 2" in str(moves[-1]["reason"])


def test_with_no_earlier_step_the_pointer_stays_but_the_manifest_goes_while_it_writes(
    setup: tuple[CheckpointRoot, CheckpointCoordinator], caplog: pytest.LogCaptureFixture
) -> None:
    root, coordinator = setup
    _weights(coordinator, 1)
    manifests: list[bool] = []
    with caplog.at_level(logging.WARNING, logger="commitpoint"):
        _checkpoint(
            coordinator,
            1,
            during=lambda: manifests.append(read_manifest(root.open(), 1, Kind.STATE_DICT) is None),
        )
    assert manifests == [True]
    assert any("no earlier step" in r.getMessage() for r in caplog.records)
    assert _pointers(root) == (1, 1)
    assert root.verify(1, "checkpoint").ok


def test_the_weights_of_a_step_never_commit_while_its_checkpoint_save_still_writes(
    setup: tuple[CheckpointRoot, CheckpointCoordinator],
) -> None:
    """Trinity's order: the sync is registered, the checkpoint's save_sync starts before the
    sync's own save finished; the weights pointer must wait for both."""
    root, coordinator = setup
    storage = coordinator.storage
    release_sync, checkpoint_started, release_checkpoint = (threading.Event() for _ in range(3))

    def sync_save() -> None:
        release_sync.wait(30)
        storage.write_bytes("global_step_3/actor/model.pt", b"w")

    coordinator.save_async("model_state_dict", sync_save, 3, is_state_dict=True)
    coordinator.register_and_monitor_sync(3, True, state_dict_thread_count=1)

    other = CheckpointCoordinator(MONITORS[root.url])  # rank 0's checkpoint, in the worker

    def checkpoint_save() -> None:
        checkpoint_started.set()
        release_checkpoint.wait(30)
        other.storage.write_bytes("global_step_3/actor/model.pt", b"c")

    worker = threading.Thread(target=other.save_sync, args=(checkpoint_save, 3, True))
    worker.start()
    assert checkpoint_started.wait(30)
    release_sync.set()
    coordinator.wait_all()
    assert _pointers(root) == (None, None)  # the checkpoint save still writes step 3
    release_checkpoint.set()
    worker.join(30)
    assert _pointers(root) == (None, 3)
    other.register_and_monitor_sync(3, state_dict_thread_count=1)
    assert _pointers(root) == (3, 3)
    assert root.verify(3, "checkpoint").ok


# -- resume --
def test_a_save_above_the_checkpoint_moves_published_weights_back_before_it_runs(
    setup: tuple[CheckpointRoot, CheckpointCoordinator],
) -> None:
    root, coordinator = setup
    _checkpoint(coordinator, 2)
    _weights(coordinator, 3, b"old 3")
    _weights(coordinator, 4, b"old 4")
    assert _pointers(root) == (2, 4)
    resumed = CheckpointCoordinator(CheckpointMonitor(root.url))  # a new run on the same root
    seen: list[tuple[int | None, int | None]] = []

    def save() -> None:
        seen.append(_pointers(root))
        resumed.storage.write_bytes("global_step_3/actor/model.pt", b"new 3")

    resumed.save_async("model_state_dict", save, 3, is_state_dict=True)
    resumed.register_and_monitor_sync(3, True, state_dict_thread_count=1)
    resumed.wait_all()
    assert seen == [(2, 2)]
    assert _pointers(root) == (2, 3)
    assert root.verify(3).ok
    assert read_manifest(root.open(), 4, Kind.STATE_DICT) is None  # abandoned
    move = [e for e in read_history(root.open()) if e.get("reason")][-1]
    assert (move["from"], move["to"], move["abandoned"]) == (4, 2, [3, 4])


def test_resume_from_checkpoint_moves_weights_back_and_refuses_below_the_checkpoint(
    setup: tuple[CheckpointRoot, CheckpointCoordinator],
) -> None:
    root, coordinator = setup
    _checkpoint(coordinator, 2)
    _weights(coordinator, 3)
    monitor = CheckpointMonitor(root.url)
    assert monitor.resume_from_checkpoint() == {"state_dict": 2, "checkpoint": 2}
    assert _pointers(root) == (2, 2)
    fresh = CheckpointCoordinator(monitor)
    with pytest.raises(SaveFailed) as info:
        fresh.save_sync(lambda: fresh.storage.write_bytes("global_step_1/x", b"x"), 1, True)
    assert isinstance(info.value, StepRegression)  # also the cause's own type
    assert not fresh.storage.exists("global_step_1/x")


# -- another writer's pointer --
def test_a_pointer_someone_else_moved_higher_fails_the_commit_loudly(
    setup: tuple[CheckpointRoot, CheckpointCoordinator], caplog: pytest.LogCaptureFixture
) -> None:
    root, coordinator = setup
    _weights(coordinator, 1)
    with open(root.open().full_path("latest_state_dict_iteration.txt"), "w") as f:
        f.write("9")  # verl-style plain write
    storage = coordinator.storage
    coordinator.register_and_monitor_sync(2, True, state_dict_thread_count=1)
    with caplog.at_level(logging.ERROR, logger="commitpoint"):
        coordinator.save_async(
            "m", lambda: storage.write_bytes("global_step_2/m.pt", b"x"), 2, is_state_dict=True
        )
        with pytest.raises(SaveFailed) as info:
            coordinator.wait_all()
    assert isinstance(info.value.cause, ForeignPointer)
    assert "step 2" in str(info.value.cause) and "9" in str(info.value.cause)
    assert any("never committed" in r.getMessage() for r in caplog.records)
    coordinator.save_async(
        "m", lambda: storage.write_bytes("global_step_3/m.pt", b"x"), 3, is_state_dict=True
    )
    coordinator.wait_all()
    with pytest.raises(ForeignPointer):
        coordinator.register_and_monitor_sync(3, True, state_dict_thread_count=1)
    assert _pointers(root) == (None, 9)


# -- save_sync errors --
class QuotaExceeded(Exception):
    def __init__(self, user: str) -> None:
        super().__init__(f"quota of {user}")
        self.user = user


def test_save_sync_failures_are_the_save_functions_own_type_too(
    setup: tuple[CheckpointRoot, CheckpointCoordinator],
) -> None:
    _, coordinator = setup

    def no_space() -> None:
        raise OSError(28, "No space left on device", "/ckpt/model.pt")

    with pytest.raises(OSError) as info:
        coordinator.save_sync(no_space, 4)
    error = info.value
    assert isinstance(error, SaveFailed) and error.errno == 28
    assert (error.step, error.name) == (4, "sync") and "step 4" in str(error)
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, OSError) and isinstance(copy, SaveFailed) and copy.errno == 28

    def over_quota() -> None:
        raise QuotaExceeded("alice")

    with pytest.raises(QuotaExceeded) as custom:
        coordinator.save_sync(over_quota, 5)
    assert custom.value.user == "alice" and isinstance(custom.value, SaveFailed)

    coordinator.save_async("bg", over_quota, 6)
    with pytest.raises(SaveFailed) as collected:
        coordinator.wait_all()
    assert not isinstance(collected.value, QuotaExceeded)
    assert isinstance(collected.value.cause, QuotaExceeded)
