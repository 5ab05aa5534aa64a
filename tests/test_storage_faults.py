"""Storage faults: each kind of injected fault fails loudly or is absorbed, and never commits a
partial step; a training loop under 10% faults completes with zero silent losses."""

from __future__ import annotations

import pickle

import pytest
import torch

from commitpoint import CheckpointCoordinator, CheckpointMonitor, Kind, save_torch
from commitpoint.errors import CorruptCheckpoint, InvalidArgument, SaveFailed, StorageError
from commitpoint.storage.registry import open_storage
from commitpoint.testing import CheckpointRoot
from commitpoint.testing.fault_campaign import mixed_plan, run_campaign
from commitpoint.testing.faults import FaultPlan, FaultyStorage, InjectedFault


def _faulty_pair(
    root: CheckpointRoot, **plan: object
) -> tuple[CheckpointMonitor, CheckpointCoordinator]:
    monitor = CheckpointMonitor(root.url, {**root.storage_options, "faults": plan})
    return monitor, CheckpointCoordinator(monitor)


def _save_step(coordinator: CheckpointCoordinator, step: int) -> None:
    def save() -> None:
        save_torch(coordinator.storage, f"global_step_{step}/model.pt", {"w": torch.ones(1024)})

    coordinator.save_async("model", save, step, is_state_dict=True)
    coordinator.register_and_monitor_sync(step, True, state_dict_thread_count=1)


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ({"fail": 1.5}, "fail must be a number in [0, 1]"),
        ({"delay": -0.1}, "delay must be a number in [0, 1]"),
        ({"fail": "often"}, "fail must be a number"),
        ({"operations": ["write", "teleport"]}, "unknown operations ['teleport']"),
        ({"flakiness": 0.1}, "unknown fault options ['flakiness']"),
    ],
)
def test_bad_fault_plans_are_refused(plan: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("[", r"\[").replace("]", r"\]")):
        FaultPlan.of(plan)


def test_plan_travels_with_the_storage_options(memory_checkpoint_root: CheckpointRoot) -> None:
    root = memory_checkpoint_root
    storage = open_storage(root.url, faults={"fail": 0.25, "seed": 3})
    assert isinstance(storage, FaultyStorage)
    assert storage.storage_options["faults"]["fail"] == 0.25
    copy = pickle.loads(pickle.dumps(storage))
    assert isinstance(copy, FaultyStorage) and copy.plan == storage.plan
    monitor, coordinator = _faulty_pair(root, fail=0.0)
    assert isinstance(monitor.storage, FaultyStorage)
    assert isinstance(coordinator.storage, FaultyStorage)


def test_a_failing_write_fails_the_save_and_commits_nothing(
    memory_checkpoint_root: CheckpointRoot,
) -> None:
    root = memory_checkpoint_root
    _, coordinator = _faulty_pair(root, fail=1.0, operations=["write"])
    _save_step(coordinator, 1)
    with pytest.raises(SaveFailed) as caught:
        coordinator.wait_all()
    assert isinstance(caught.value.cause, StorageError)
    assert isinstance(caught.value.cause.cause, InjectedFault)
    assert root.committed_steps() == {"state_dict": None, "checkpoint": None}


def test_a_torn_upload_fails_the_save_and_leaves_no_record(
    memory_checkpoint_root: CheckpointRoot,
) -> None:
    root = memory_checkpoint_root
    _, coordinator = _faulty_pair(root, truncate=1.0)
    _save_step(coordinator, 1)
    with pytest.raises(SaveFailed, match="connection reset"):
        coordinator.wait_all()
    assert root.committed_steps()["state_dict"] is None
    assert coordinator.storage.records.take("global_step_1") == []


def test_a_store_that_loses_the_tail_of_an_acknowledged_write_is_caught_before_commit(
    local_checkpoint_root: CheckpointRoot,
) -> None:
    root = local_checkpoint_root
    _, coordinator = _faulty_pair(root, lose_tail=1.0, operations=["write"])

    def save() -> None:
        save_torch(coordinator.storage, "global_step_1/model.pt", {"w": torch.ones(1024)})

    coordinator.register_and_monitor_sync(1, True, state_dict_thread_count=1)
    coordinator.save_async("model", save, 1, is_state_dict=True)  # its finish triggers the commit
    with pytest.raises(SaveFailed, match="not stored whole") as caught:
        coordinator.wait_all()
    assert isinstance(caught.value.cause, CorruptCheckpoint)
    assert any("model.pt" in p for p in caught.value.cause.problems)
    # the shortened file is on disk, but no manifest and no pointer names the step
    assert [f.path for f in root.list_files("global_step_1")] == ["global_step_1/model.pt"]
    assert root.committed_steps()["state_dict"] is None


def test_an_ambiguous_pointer_write_is_retried_and_the_step_commits(
    memory_checkpoint_root: CheckpointRoot,
) -> None:
    root = memory_checkpoint_root
    monitor, coordinator = _faulty_pair(root, fail_after=0.5, operations=["write_pointer"], seed=1)
    for step in range(1, 11):
        _save_step(coordinator, step)
        coordinator.wait_all()  # a landed write reported as failed is retried, not raised
        assert root.committed_steps()["state_dict"] == step
        assert root.verify(step).ok
    assert monitor.storage.injected["fail_after:write_pointer"] >= 3  # type: ignore[attr-defined]


def test_transient_commit_failures_are_retried(memory_checkpoint_root: CheckpointRoot) -> None:
    root = memory_checkpoint_root
    plan = {"fail": 0.3, "operations": ["write_pointer", "list"], "seed": 7}
    monitor, coordinator = _faulty_pair(root, **plan)
    committed = 0
    for step in range(1, 21):
        try:
            _save_step(coordinator, step)
            coordinator.wait_all()
        except (SaveFailed, StorageError):
            assert root.committed_steps()["state_dict"] != step
            continue
        committed += 1
        assert root.committed_steps()["state_dict"] == step
    # one try in two fails, but with 4 tries per commit nearly every step commits
    assert committed >= 15
    assert sum(monitor.storage.injected.values()) > 10  # type: ignore[attr-defined]


def test_a_corrupted_read_is_reported_by_verify(local_checkpoint_root: CheckpointRoot) -> None:
    root = local_checkpoint_root
    monitor = root.monitor()
    coordinator = CheckpointCoordinator(monitor)
    _save_step(coordinator, 1)
    coordinator.wait_all()
    faulty = FaultyStorage(root.open(), FaultPlan(corrupt_read=1.0, operations=frozenset({"read"})))
    from commitpoint.read.verify import check_record

    manifest = root.manifest(1)
    problems = [check_record(faulty, record) for record in manifest.files]
    assert any(p is not None and "!= manifest" in p.reason for p in problems)
    assert root.verify(1).ok  # the stored bytes are intact


@pytest.mark.parametrize("backend", ["local", "s3", "gcs"])
def test_training_under_ten_percent_faults_never_loses_or_tears_a_step(
    backend: str, request: pytest.FixtureRequest
) -> None:
    root: CheckpointRoot = request.getfixturevalue(f"{backend}_checkpoint_root")
    steps = {"local": 60, "s3": 25, "gcs": 25}[backend]
    report = run_campaign(root, mixed_plan(0.1, seed=11), steps=steps, numel=4096)
    assert report.problems == []
    assert report.bad == 0
    assert report.steps == steps
    assert report.outcomes["committed"] > 0
    assert report.outcomes["failed_loudly"] > 0  # faults really hit saves
    assert sum(report.injected.values()) > 0
    # the newest committed step is what the pointers name, and it verifies
    latest = root.committed_steps()["checkpoint"]
    assert latest is not None and root.verify(latest, Kind.CHECKPOINT).ok
