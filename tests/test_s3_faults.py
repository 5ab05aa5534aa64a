"""S3 through a fault-injecting proxy: transient faults are retried, persistent ones fail loudly
and nothing is committed."""

from __future__ import annotations

import pytest

from commitpoint import CheckpointCoordinator, CheckpointMonitor, SaveFailed
from commitpoint.testing import CheckpointRoot
from fault_proxy import FaultPlan, fault_proxy

pytestmark = pytest.mark.s3


def _save_step(coordinator: CheckpointCoordinator, step: int) -> None:
    storage = coordinator.storage
    coordinator.save_async(
        "model",
        lambda: storage.write_bytes(f"global_step_{step}/model.bin", b"w" * 4096),
        step,
        True,
    )
    coordinator.register_and_monitor_sync(step, True, state_dict_thread_count=1)
    coordinator.wait_all()


@pytest.mark.parametrize("kind", ["503", "drop", "delay"])
def test_transient_faults_are_retried(s3_checkpoint_root: CheckpointRoot, kind: str) -> None:
    root = s3_checkpoint_root
    plan = FaultPlan(kind=kind)
    with fault_proxy(root.storage_options["endpoint_url"], plan) as endpoint:
        options = {**root.storage_options, "endpoint_url": endpoint}
        coordinator = CheckpointCoordinator(CheckpointMonitor(root.url, options))
        plan.faults = 3  # the next three requests fail, whatever they are
        _save_step(coordinator, 1)
    assert plan.injected == 3
    assert root.committed_steps()["state_dict"] == 1
    assert root.verify(1).ok


def test_persistent_faults_fail_loudly_without_commit(s3_checkpoint_root: CheckpointRoot) -> None:
    root = s3_checkpoint_root
    plan = FaultPlan(kind="503")
    with fault_proxy(root.storage_options["endpoint_url"], plan) as endpoint:
        options = {**root.storage_options, "endpoint_url": endpoint, "retries": 2}
        coordinator = CheckpointCoordinator(CheckpointMonitor(root.url, options))
        _save_step(coordinator, 1)
        plan.always = True
        with pytest.raises(SaveFailed):
            _save_step(coordinator, 2)
    assert plan.injected > 0
    assert root.committed_steps()["state_dict"] == 1  # step 2 never became visible
    assert root.verify(1).ok
