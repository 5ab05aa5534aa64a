"""Writer fencing under contention: two processes keep restarting monitors on one root and race
for the same steps. No pointer moves back, every step a pointer names verifies, and no file of a
committed step is replaced (``python -m commitpoint.testing.fencing`` runs the long version)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from commitpoint import CheckpointCoordinator, SaveFailed, WriterFenced
from commitpoint.testing import CheckpointRoot
from commitpoint.testing.fencing import race

ATTEMPTS = {"local": 1200, "s3": 120, "gcs": 300}


@pytest.mark.parametrize("backend", ["local", "s3", "gcs"])
def test_racing_restarted_writers_never_regress_lose_or_overwrite(
    backend: str, request: pytest.FixtureRequest
) -> None:
    root: CheckpointRoot = request.getfixturevalue(f"{backend}_checkpoint_root")
    report = race(root, attempts=ATTEMPTS[backend], seed=3)
    assert report.problems == []
    assert report.bad == 0
    assert report.counts["attempts"] == ATTEMPTS[backend]
    # the race really was contested: both writers ran at once, both committed, both were fenced
    assert report.counts["contested"] >= ATTEMPTS[backend] // 2
    assert report.counts["committed"] > 0
    assert report.counts["fenced"] > 0
    assert report.counts["pointer_reads"] > 0
    assert len(report.committers) == 2


def _slow_save(coordinator: CheckpointCoordinator, relpath: str, body: bytes) -> tuple[Any, Any]:
    """A save that writes half its bytes, then waits for ``release`` before finishing."""
    half = threading.Event()
    release = threading.Event()

    def save() -> None:
        with coordinator.storage.open_write(relpath) as writer:
            writer.write(body[:4])
            half.set()
            release.wait(30)
            writer.write(body[4:])

    return save, (half, release)


def test_a_zombie_save_is_refused_before_its_file_becomes_visible(
    local_checkpoint_root: CheckpointRoot,
) -> None:
    root = local_checkpoint_root
    zombie = CheckpointCoordinator(root.monitor())
    save, (half, release) = _slow_save(zombie, "global_step_1/model.bin", b"zombie bytes")
    zombie.save_async("model", save, 1, is_state_dict=True)
    assert half.wait(30)
    new_job = CheckpointCoordinator(root.monitor())  # takes the writer lease
    new_job.save_sync(
        lambda: new_job.storage.write_bytes("global_step_1/model.bin", b"new"), 1, True
    )
    release.set()
    with pytest.raises(SaveFailed) as caught:
        zombie.wait_all()
    assert isinstance(caught.value.cause, WriterFenced)
    assert root.open().read_bytes("global_step_1/model.bin") == b"new"


def test_a_step_never_commits_while_a_save_admitted_to_it_still_writes(
    local_checkpoint_root: CheckpointRoot,
) -> None:
    """Two saves of one step, one registered: the step waits for the one still writing (it was
    admitted), then commits what the store holds, so no committed file is ever replaced."""
    root = local_checkpoint_root
    monitor = root.monitor()
    late, other = CheckpointCoordinator(monitor), CheckpointCoordinator(monitor)
    save, (half, release) = _slow_save(late, "global_step_2/model.bin", b"late bytes")
    late.save_async("model", save, 2, is_state_dict=True)
    assert half.wait(30)
    other.register_and_monitor_sync(2, True, state_dict_thread_count=1)
    other.save_sync(lambda: other.storage.write_bytes("global_step_2/model.bin", b"first"), 2, True)
    assert root.committed_steps()["state_dict"] is None
    release.set()
    late.wait_all()
    assert root.committed_steps()["state_dict"] == 2
    assert root.open().read_bytes("global_step_2/model.bin") == b"late bytes"
    assert root.verify(2).ok
