"""Tiered commit through the monitor: ``CheckpointMonitor(local, replicate_to=...)``, local
retention that waits for the replica, ``commitpoint ls --replica``, and the Ray actor."""

from __future__ import annotations

import io
import json
import logging
import time
from typing import Any

import pytest

from commitpoint import CheckpointCoordinator, CheckpointMonitor, RetentionPolicy
from commitpoint.cli import main
from commitpoint.core.layout import Kind
from commitpoint.core.manifest import read_manifest
from commitpoint.read.verify import verify_step
from commitpoint.replication import ReplicationOptions, TieredReader
from commitpoint.testing import CheckpointRoot, commit_step


def _committed(storage: Any, steps: range) -> list[int]:
    return [s for s in steps if read_manifest(storage, s, Kind.STATE_DICT) is not None]


@pytest.mark.parametrize("store", ["s3", "gcs"])
def test_monitor_commits_locally_and_replicates(
    local_checkpoint_root: CheckpointRoot, store: str, request: pytest.FixtureRequest
) -> None:
    replica: CheckpointRoot = request.getfixturevalue(f"{store}_checkpoint_root")
    monitor = CheckpointMonitor(
        local_checkpoint_root.url,
        replicate_to=replica.url,
        replicate_options={"storage_options": replica.storage_options},
    )
    coordinator = CheckpointCoordinator(monitor)
    assert coordinator.storage.url == local_checkpoint_root.open().url  # saves write locally
    for step in range(1, 5):
        commit_step(coordinator, step, checkpoint=step % 2 == 0, numel=50_000)
    monitor.close()  # waits for the replica
    status = monitor.replication_status()
    assert status is not None and status.caught_up and status.lag_bytes == 0
    assert status.published == 4 and not status.failed
    storage = replica.open()
    assert {k: storage.read_pointer(k.pointer).value for k in Kind} == {
        Kind.STATE_DICT: 4,
        Kind.CHECKPOINT: 4,
    }
    for step in range(1, 5):
        kind = Kind.CHECKPOINT if step % 2 == 0 else Kind.STATE_DICT
        assert verify_step(storage, step, kind).ok
    restore = TieredReader(
        local_checkpoint_root.url, replica.url, replica_options=replica.storage_options
    )
    chosen = restore.resolve(Kind.CHECKPOINT)
    assert chosen.step == 4 and chosen.tier.value == "local"


def test_monitor_without_a_replica_reports_no_status(
    local_checkpoint_root: CheckpointRoot,
) -> None:
    monitor = CheckpointMonitor(local_checkpoint_root.url)
    assert monitor.replication_status() is None
    monitor.close()


def test_local_retention_waits_for_the_replica(
    local_checkpoint_root: CheckpointRoot, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """keep_last=1 locally while the replica is down: nothing the replica lacks is deleted;
    once a replicator catches up, local retention deletes the old steps."""
    replica = str(tmp_path / "replica")
    down = ReplicationOptions(
        storage_options={"faults": {"fail": 1.0, "operations": ["write"]}},
        attempts=2,
        backoff_s=0.01,
        close_timeout_s=5,
    )
    keep_one = RetentionPolicy(keep_last=1, orphan_min_age_s=0)
    caplog.set_level(logging.ERROR, "commitpoint.replication")
    monitor = CheckpointMonitor(
        local_checkpoint_root.url, retention=keep_one, replicate_to=replica, replicate_options=down
    )
    coordinator = CheckpointCoordinator(monitor)
    for step in range(1, 5):
        commit_step(coordinator, step)
    monitor.close()
    status = monitor.replication_status()
    assert status is not None and {f.step for f in status.failed} == {1, 2, 3, 4}
    assert "the replica does not have it" in caplog.text
    local = local_checkpoint_root.open()
    assert _committed(local, range(1, 5)) == [1, 2, 3, 4]

    up = ReplicationOptions(backoff_s=0.01)
    monitor = CheckpointMonitor(
        local_checkpoint_root.url, retention=keep_one, replicate_to=replica, replicate_options=up
    )
    coordinator = CheckpointCoordinator(monitor)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = monitor.replication_status()
        if status is not None and status.caught_up:
            break
        time.sleep(0.05)
    commit_step(coordinator, 5)  # a commit runs a local retention round
    monitor.close()  # waits for that round
    assert _committed(local, range(1, 6)) == [5]
    assert _committed(CheckpointRoot(replica).open(), range(1, 6)) == [1, 2, 3, 4, 5]


def test_local_retention_told_not_to_wait(
    local_checkpoint_root: CheckpointRoot, tmp_path: Any
) -> None:
    down = ReplicationOptions(
        storage_options={"faults": {"fail": 1.0, "operations": ["write"]}},
        attempts=1,
        protect_unreplicated=False,
        close_timeout_s=5,
    )
    monitor = CheckpointMonitor(
        local_checkpoint_root.url,
        retention=RetentionPolicy(keep_last=1, orphan_min_age_s=0),
        replicate_to=str(tmp_path / "replica"),
        replicate_options=down,
    )
    coordinator = CheckpointCoordinator(monitor)
    for step in range(1, 5):
        commit_step(coordinator, step)
    monitor.close()
    assert _committed(local_checkpoint_root.open(), range(1, 5)) == [4]


def _cli(*argv: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue()


def test_ls_shows_both_tiers_and_the_lag(
    local_checkpoint_root: CheckpointRoot, s3_checkpoint_root: CheckpointRoot
) -> None:
    replica = s3_checkpoint_root
    monitor = CheckpointMonitor(
        local_checkpoint_root.url,
        replicate_to=replica.url,
        replicate_options={"storage_options": replica.storage_options},
    )
    coordinator = CheckpointCoordinator(monitor)
    commit_step(coordinator, 1)
    commit_step(coordinator, 2, checkpoint=True)
    monitor.close()
    plain = CheckpointMonitor(local_checkpoint_root.url)  # step 3 is committed locally only
    commit_step(CheckpointCoordinator(plain), 3)
    plain.close()
    options = []
    for key, value in replica.storage_options.items():
        text = json.dumps(value) if isinstance(value, dict) else value
        options += ["--replica-option", f"{key}={text}"]
    code, out = _cli("ls", local_checkpoint_root.url, "--replica", replica.url, *options)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].split()[-3:] == ["REPLICA", "REPLICA", "LATEST"]
    assert lines[2].split()[-2:] == ["state_dict,checkpoint", "state_dict,checkpoint"]
    assert lines[3].split()[-1] == "-"  # step 3 is not on the replica
    assert "lag 1 steps" in lines[-1] and "in steps [3]" in lines[-1]
    code, out = _cli("ls", local_checkpoint_root.url, "--json", "--replica", replica.url, *options)
    data = json.loads(out)
    assert data["replica"]["latest"] == {"state_dict": 2, "checkpoint": 2}
    assert data["replica"]["unreplicated"] == [3] and data["replica"]["lag_bytes"] > 0
    assert [r["replica_kinds"] for r in data["steps"]] == [
        ["state_dict"],
        ["state_dict", "checkpoint"],
        [],
    ]


def test_ray_actor_monitor_replicates(
    ray_cluster: Any, local_checkpoint_root: CheckpointRoot, tmp_path: Any
) -> None:
    replica = str(tmp_path / "replica")
    actor = CheckpointMonitor.get_actor(
        "tiered-test",
        local_checkpoint_root.url,
        name="tiered-monitor",
        replicate_to=replica,
        replicate_options=ReplicationOptions(older_steps="skip"),  # type: ignore[arg-type]
    )
    try:
        coordinator = CheckpointCoordinator(actor)
        for step in (1, 2):
            commit_step(coordinator, step)
        deadline = time.monotonic() + 60
        status = ray_cluster.get(actor.replication_status.remote())
        while not status.caught_up and time.monotonic() < deadline:
            time.sleep(0.1)
            status = ray_cluster.get(actor.replication_status.remote())
        assert status.caught_up and status.replica[Kind.STATE_DICT] == 2
    finally:
        ray_cluster.kill(actor)
    assert verify_step(CheckpointRoot(replica).open(), 2, Kind.STATE_DICT).ok


def test_tiered_page_embeds_the_example_that_runs() -> None:
    from pathlib import Path

    docs = Path(__file__).resolve().parent.parent / "docs"
    example = (docs / "examples" / "test_tiered_training.py").read_text().rstrip()
    page = (docs / "tiered.md").read_text()
    assert f"```python\n{example}\n```" in page
    assert "(tiered.md)" in (docs / "index.md").read_text()


def test_plain_local_saves_reach_the_replica(
    local_checkpoint_root: CheckpointRoot, s3_checkpoint_root: CheckpointRoot
) -> None:
    """Trinity-RFT's way of saving: ``os.makedirs`` + ``torch.save(path)`` on the local disk,
    nothing through commitpoint's writer. The monitor lists and checksums those files, and the
    replica gets them with the same checks."""
    import os

    import torch

    replica = s3_checkpoint_root
    monitor = CheckpointMonitor(
        local_checkpoint_root.url,
        replicate_to=replica.url,
        replicate_options={"storage_options": replica.storage_options},
    )
    coordinator = CheckpointCoordinator(monitor)

    def trinity_save(step: int) -> None:
        folder = os.path.join(local_checkpoint_root.url, f"global_step_{step}", "actor")
        os.makedirs(folder, exist_ok=True)
        torch.save({"w": torch.full((1000,), float(step))}, os.path.join(folder, "model.pt"))

    coordinator.save_async("actor", lambda: trinity_save(3), 3, is_state_dict=True)
    coordinator.register_and_monitor_sync(3, True, state_dict_thread_count=1)
    coordinator.wait_all()
    monitor.close()
    storage = replica.open()
    assert storage.read_pointer(Kind.STATE_DICT.pointer).value == 3
    manifest = read_manifest(storage, 3, Kind.STATE_DICT)
    assert manifest is not None
    listed = [(r.path, r.tracked) for r in manifest.files]
    assert listed == [("global_step_3/actor/model.pt", False)]
    assert verify_step(storage, 3, Kind.STATE_DICT).ok
