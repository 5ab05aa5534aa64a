"""Monitor restart: the Ray monitor actor is killed mid-run; it restarts, recovers the latest steps
from storage, never commits the step that was in flight, and later steps commit as before."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from commitpoint import CheckpointCoordinator, CheckpointMonitor, SaveFailed, save_torch
from commitpoint.errors import MonitorRestarted, WriterFenced
from commitpoint.testing import CheckpointRoot

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray


def _shard_save(coordinator: CheckpointCoordinator, step: int, gate: Path | None = None) -> Any:
    def save() -> None:
        if gate is not None:
            (gate.parent / "started").touch()
            while not gate.exists():
                time.sleep(0.01)
        save_torch(
            coordinator.storage, f"global_step_{step}/model.pt", {"w": torch.full((64,), step)}
        )

    return save


def _commit(coordinator: CheckpointCoordinator, step: int) -> None:
    coordinator.save_async("model", _shard_save(coordinator, step), step, is_state_dict=True)
    coordinator.register_and_monitor_sync(step, True, state_dict_thread_count=1)
    coordinator.wait_all()


def _restart(actor: Any) -> dict[str, int | None]:
    """Kill the actor (Ray restarts it) and return what the new instance recovered."""
    before = ray.get(actor.writer_epoch.remote())
    ray.kill(actor, no_restart=False)
    deadline = time.monotonic() + 60
    while True:
        try:
            epoch = ray.get(actor.writer_epoch.remote(), timeout=10)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
            continue
        if epoch > before:
            latest: dict[str, int | None] = ray.get(actor.latest_steps.remote())
            return latest
        time.sleep(0.1)


@pytest.fixture
def actor(ray_cluster: Any, local_checkpoint_root: CheckpointRoot) -> Any:
    root = local_checkpoint_root
    namespace = f"restart-{uuid.uuid4().hex[:8]}"
    handle = CheckpointMonitor.get_actor(namespace, root.url, root.storage_options)
    yield handle
    ray.kill(handle, no_restart=True)


def test_a_save_in_flight_during_a_restart_fails_loudly_and_training_goes_on(
    actor: Any, local_checkpoint_root: CheckpointRoot, tmp_path: Path
) -> None:
    root = local_checkpoint_root
    coordinator = CheckpointCoordinator(actor)
    _commit(coordinator, 1)
    _commit(coordinator, 2)

    gate = tmp_path / "gate"
    coordinator.register_and_monitor_sync(3, True, state_dict_thread_count=1)
    coordinator.save_async("model", _shard_save(coordinator, 3, gate), 3, is_state_dict=True)
    while not (tmp_path / "started").exists():
        time.sleep(0.01)

    recovered = _restart(actor)
    assert recovered == {"state_dict": 2, "checkpoint": None}  # read back from storage

    gate.touch()
    with pytest.raises(SaveFailed) as caught:
        coordinator.wait_all()
    # the save's last file was refused at publish time (fenced) or its report was refused by
    # the restarted monitor, depending on which it reached first
    assert isinstance(caught.value.cause, WriterFenced | MonitorRestarted)
    assert root.list_files("global_step_3") == [] or isinstance(
        caught.value.cause, MonitorRestarted
    )
    assert root.committed_steps()["state_dict"] == 2  # step 3 was never seen complete

    for step in (4, 5):
        _commit(coordinator, step)
    assert root.committed_steps()["state_dict"] == 5
    assert root.verify(5).ok
    assert root.reader().load(5, "model.pt")["w"][0].item() == 5


def test_a_registration_that_reaches_the_restarted_monitor_fails_loudly(
    actor: Any, local_checkpoint_root: CheckpointRoot
) -> None:
    root = local_checkpoint_root
    coordinator = CheckpointCoordinator(actor)
    _commit(coordinator, 1)
    # the save of step 2 finishes and reports to the monitor, which then dies before the
    # registration arrives: the restarted monitor never heard of that save
    coordinator.save_async("model", _shard_save(coordinator, 2), 2, is_state_dict=True)
    coordinator.wait_all()
    _restart(actor)
    with pytest.raises(MonitorRestarted, match="step 2 will not be committed"):
        coordinator.register_and_monitor_sync(2, True, state_dict_thread_count=1)
    assert root.committed_steps()["state_dict"] == 1
    _commit(coordinator, 3)
    assert root.committed_steps()["state_dict"] == 3
