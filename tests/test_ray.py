"""Ray: a named monitor actor shared by worker actors, each saving its shard of a step."""

from __future__ import annotations

import os
import sys
import time
import uuid
from typing import Any

import pytest
import torch

from commitpoint import CheckpointCoordinator, CheckpointMonitor, CheckpointReader, save_torch
from commitpoint.testing import CheckpointRoot

ray = pytest.importorskip("ray")
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.ray


class ShardWorker:
    """A training worker: its own coordinator, writing one shard per step."""

    def __init__(self, namespace: str, url: str, options: dict[str, Any], rank: int) -> None:
        monitor = CheckpointMonitor.get_actor(namespace, url, options)
        self.coordinator = CheckpointCoordinator(monitor)
        self.rank = rank

    def save(self, step: int, gate: str) -> None:
        def write_shard() -> None:
            while not os.path.exists(gate):
                time.sleep(0.01)
            shard = {"w": torch.full((256,), float(self.rank * 1000 + step))}
            save_torch(self.coordinator.storage, f"global_step_{step}/shard_{self.rank}.pt", shard)

        self.coordinator.save_async("shard", write_shard, step, is_state_dict=True)
        self.coordinator.register_and_monitor_sync(
            step, True, state_dict_thread_count=1, participants=WORKERS
        )

    def wait(self) -> None:
        self.coordinator.wait_all()


WORKERS = 3


def _wait_for(predicate: Any, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_pointer_moves_only_after_every_worker_shard(
    ray_cluster: Any, checkpoint_root: CheckpointRoot, tmp_path: Any
) -> None:
    """Local disk, S3 on moto and GCS on the emulator alike."""
    root = checkpoint_root
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    monitor = CheckpointMonitor.get_actor(namespace, root.url, root.storage_options)
    worker_cls = ray.remote(num_cpus=0)(ShardWorker)
    workers = [
        worker_cls.remote(namespace, root.url, root.storage_options, r) for r in range(WORKERS)
    ]
    reader = CheckpointReader(root.url, **root.storage_options)

    for step in (1, 2):
        gates = [str(tmp_path / f"gate-{step}-{r}") for r in range(WORKERS)]
        ray.get([w.save.remote(step, g) for w, g in zip(workers, gates, strict=True)])
        for rank, gate in enumerate(gates):
            assert reader.latest_state_dict_step() == (step - 1 or None)
            open(gate, "w").close()
            if rank < WORKERS - 1:
                # give the released shard time to land; the pointer must still not move
                shard = f"global_step_{step}/shard_{rank}.pt"
                storage = root.open()
                assert _wait_for(lambda s=shard, st=storage: st.exists(s))
                time.sleep(0.3)
        assert _wait_for(lambda s=step: reader.latest_state_dict_step() == s)
        report = reader.verify(step)
        assert report.ok and report.files == WORKERS
        for rank in range(WORKERS):
            value = reader.load(step, f"shard_{rank}.pt")["w"][0].item()
            assert value == rank * 1000 + step
    ray.get([w.wait.remote() for w in workers])

    # the named actor is shared: a second get_actor returns the same monitor
    again = CheckpointMonitor.get_actor(namespace, root.url, root.storage_options)
    assert ray.get(again.latest_steps.remote()) == {"state_dict": 2, "checkpoint": None}
    assert ray.get(again.writer_epoch.remote()) == ray.get(monitor.writer_epoch.remote())
    ray.kill(monitor, no_restart=True)


def test_failure_in_a_worker_reaches_its_wait_all(
    ray_cluster: Any, local_checkpoint_root: CheckpointRoot
) -> None:
    root = local_checkpoint_root
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    monitor = CheckpointMonitor.get_actor(namespace, root.url, root.storage_options)

    @ray.remote(num_cpus=0)
    def failing_worker() -> str:
        coordinator = CheckpointCoordinator(CheckpointMonitor.get_actor(namespace, root.url))

        def broken() -> None:
            raise RuntimeError("shard 0 could not be written")

        coordinator.save_async("shard", broken, 1, is_state_dict=True)
        coordinator.register_and_monitor_sync(1, True, state_dict_thread_count=1)
        try:
            coordinator.wait_all()
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return "no error"

    message = ray.get(failing_worker.remote())
    assert message.startswith("SaveFailed") and "shard 0 could not be written" in message
    assert ray.get(monitor.latest_steps.remote())["state_dict"] is None
    assert CheckpointReader(root.url).latest_state_dict_step() is None
    ray.kill(monitor, no_restart=True)
