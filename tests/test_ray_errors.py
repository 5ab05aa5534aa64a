"""Errors raised inside the Ray monitor actor reach the caller as the same typed error."""

from __future__ import annotations

import asyncio
import pickle
import uuid
from typing import Any

import pytest

from commitpoint import CheckpointMonitor, InvalidStep, MonitorRestarted
from commitpoint.monitor.transport import MonitorClient
from commitpoint.testing import CheckpointRoot

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray


def test_monitor_call_errors_arrive_typed_with_their_fields(
    ray_cluster: Any, memory_checkpoint_root: CheckpointRoot
) -> None:
    root = memory_checkpoint_root
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    actor = CheckpointMonitor.get_actor(namespace, root.url, root.storage_options)
    try:
        client = MonitorClient(actor)
        epoch = client.notify_started("node-a", "job-1")["writer_epoch"]
        assert epoch is not None
        with pytest.raises(MonitorRestarted) as restarted:
            client.notify_finished(
                3, True, name="model", files=[], writer_epoch=epoch + 5
            )
        error = restarted.value
        assert type(error) is MonitorRestarted
        assert (error.step, error.seen_epoch, error.current_epoch) == (3, epoch + 5, epoch)
        assert "step 3" in str(error)
        # still a plain, picklable commitpoint error once it reached the caller
        assert type(pickle.loads(pickle.dumps(error))) is MonitorRestarted

        with pytest.raises(InvalidStep) as invalid:
            client.register(-1, True, {"state_dict_thread_count": 1}, 1)
        assert type(invalid.value) is InvalidStep
    finally:
        ray.kill(actor, no_restart=True)


def test_async_monitor_calls_raise_the_same_typed_errors(
    ray_cluster: Any, memory_checkpoint_root: CheckpointRoot
) -> None:
    root = memory_checkpoint_root
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    actor = CheckpointMonitor.get_actor(namespace, root.url, root.storage_options)
    try:
        call = MonitorClient(actor).aregister(-2, True, {"state_dict_thread_count": 1}, 1)
        with pytest.raises(InvalidStep) as invalid:
            asyncio.run(call)
        assert type(invalid.value) is InvalidStep
    finally:
        ray.kill(actor, no_restart=True)
