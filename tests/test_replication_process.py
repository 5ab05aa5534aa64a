"""The replica tier across process deaths: SIGKILL mid-replication then restart, and SIGTERM
(preemption) handling. Each test runs a real child process against real roots (local disk, moto
S3, fake-gcs-server)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest

from commitpoint import CheckpointCoordinator, CheckpointMonitor
from commitpoint.core.layout import Kind
from commitpoint.core.manifest import read_manifest
from commitpoint.read.verify import verify_step
from commitpoint.replication import Replicator, compare_tiers
from commitpoint.testing import CheckpointRoot, commit_step

STEPS = {1: False, 2: True, 3: False, 4: True}

REPLICATE = textwrap.dedent(
    """
    import json, logging, sys, time
    logging.basicConfig(level=logging.INFO)
    from commitpoint.replication import Replicator
    job = json.loads(sys.argv[1])
    replicator = Replicator(job["local"], job["replica"], job["options"]).start()
    print("ready", flush=True)
    replicator.drain()
    print("drained", flush=True)
    time.sleep(60)
    """
)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    return env


def _commit(root: CheckpointRoot, steps: dict[int, bool], numel: int) -> None:
    monitor = CheckpointMonitor(root.url, root.storage_options)
    coordinator = CheckpointCoordinator(monitor)
    for step, full in sorted(steps.items()):
        commit_step(coordinator, step, checkpoint=full, numel=numel)
    monitor.close()


def _check_replica(local: CheckpointRoot, replica: CheckpointRoot) -> dict[Kind, int | None]:
    """What the replica shows after a kill: pointers name verified steps, and every step with
    a replica manifest has all its files (nothing half-visible)."""
    storage = replica.open()
    storage.fs.invalidate_cache()
    named = {kind: storage.read_pointer(kind.pointer).value for kind in Kind}
    for kind, step in named.items():
        if step is not None:
            assert verify_step(storage, step, kind).ok
    for step in STEPS:
        for kind in Kind:
            if read_manifest(storage, step, kind) is not None:
                assert verify_step(storage, step, kind).ok
    return named


@pytest.mark.parametrize("kill_when", ["started", "first step", "second step"])
@pytest.mark.parametrize("store", ["s3", "gcs"])
def test_sigkill_mid_replication_then_restart(
    local_checkpoint_root: CheckpointRoot,
    store: str,
    kill_when: str,
    request: pytest.FixtureRequest,
) -> None:
    replica: CheckpointRoot = request.getfixturevalue(f"{store}_checkpoint_root")
    local = local_checkpoint_root
    _commit(local, STEPS, numel=250_000)  # ~1 MiB per file
    slow = {"delay": 1.0, "delay_seconds": 0.25, "operations": ["write"]}
    job = {
        "local": local.url,
        "replica": replica.url,
        "options": {"storage_options": {**replica.storage_options, "faults": slow}},
    }
    child = subprocess.Popen(
        [sys.executable, "-c", REPLICATE, json.dumps(job)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=_env(),
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        storage = replica.open()
        target = {"started": None, "first step": 1, "second step": 2}[kill_when]
        deadline = time.monotonic() + 60
        while target is not None and time.monotonic() < deadline:
            storage.fs.invalidate_cache()
            value = storage.read_pointer(Kind.STATE_DICT.pointer).value
            if value is not None and value >= target:
                break
            time.sleep(0.02)
        child.kill()
        assert child.wait(30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    named = _check_replica(local, replica)
    assert named[Kind.STATE_DICT] is None or named[Kind.STATE_DICT] < 4  # killed before the end
    # The restart resumes from both tiers' pointers and manifests; nothing else is kept.
    with Replicator(local.url, replica.url, {"storage_options": replica.storage_options}) as r:
        assert r.drain(120)
        status = r.status()
    assert not status.failed and status.caught_up
    after = _check_replica(local, replica)
    assert after == {Kind.STATE_DICT: 4, Kind.CHECKPOINT: 4}
    assert not compare_tiers(local.open(), replica.open()).unreplicated


PREEMPTED = textwrap.dedent(
    """
    import json, logging, os, signal, sys, time
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from commitpoint import CheckpointCoordinator, CheckpointMonitor
    from commitpoint.core.layout import Kind
    from commitpoint.replication import PreemptionHandler, Replicator
    from commitpoint.testing import commit_step
    job = json.loads(sys.argv[1])
    if job["mode"] == "handler":
        monitor = CheckpointMonitor(job["local"])
        coordinator = CheckpointCoordinator(monitor)
        replicator = Replicator(job["local"], job["replica"], job["options"]).start()
        handler = PreemptionHandler(
            replicator, coordinator=coordinator, monitor=monitor, deadline_s=30
        ).install()
    else:  # the monitor's own option
        options = {**job["options"], "handle_sigterm": True, "sigterm_deadline_s": 30}
        monitor = CheckpointMonitor(
            job["local"], replicate_to=job["replica"], replicate_options=options
        )
        coordinator = CheckpointCoordinator(monitor)
    for step in range(1, 5):
        commit_step(coordinator, step, numel=250_000)
        if job["mode"] == "handler":
            replicator.submit(step, Kind.STATE_DICT)
    os.kill(os.getpid(), signal.SIGTERM)  # the cloud preempts the machine
    while True:  # a training loop that keeps going until the process is ended
        time.sleep(0.05)
    """
)


@pytest.mark.parametrize("mode", ["handler", "monitor option"])
def test_sigterm_replicates_the_newest_step_and_reports_then_exits(
    local_checkpoint_root: CheckpointRoot, tmp_path: Any, mode: str
) -> None:
    from commitpoint.testing import local_root

    with local_root(str(tmp_path)) as replica:
        slow = {"delay": 1.0, "delay_seconds": 0.3, "operations": ["write"]}
        job = {
            "local": local_checkpoint_root.url,
            "replica": replica.url,
            "options": {"storage_options": {"faults": slow}},
            "mode": mode,
        }
        result = subprocess.run(
            [sys.executable, "-c", PREEMPTED, json.dumps(job)],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=120,
        )
        assert result.returncode == -signal.SIGTERM, result.stderr[-3000:]
        storage = replica.open()
        assert storage.read_pointer(Kind.STATE_DICT.pointer).value == 4
        assert verify_step(storage, 4, Kind.STATE_DICT).ok
        assert "state_dict step 4 is durable locally and on the replica" in result.stderr
        assert "not replicating older steps" in result.stderr  # the newest went first


STUBBORN = textwrap.dedent(
    """
    import json, logging, sys, time
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from commitpoint import CheckpointCoordinator, CheckpointMonitor
    from commitpoint.core.layout import Kind
    from commitpoint.replication import PreemptionHandler, Replicator
    from commitpoint.testing import commit_step
    job = json.loads(sys.argv[1])
    monitor = CheckpointMonitor(job["local"])
    coordinator = CheckpointCoordinator(monitor)
    commit_step(coordinator, 1)
    replicator = Replicator(job["local"], job["replica"], job["options"]).start()
    PreemptionHandler(replicator, deadline_s=600).install()
    print("ready", flush=True)
    while True:
        time.sleep(0.05)
    """
)


def test_a_second_sigterm_ends_the_process_at_once(
    local_checkpoint_root: CheckpointRoot, tmp_path: Any
) -> None:
    from commitpoint.testing import local_root

    with local_root(str(tmp_path)) as replica:
        stuck = {"delay": 1.0, "delay_seconds": 600, "operations": ["write"]}
        job = {
            "local": local_checkpoint_root.url,
            "replica": replica.url,
            "options": {"storage_options": {"faults": stuck}},
        }
        child = subprocess.Popen(
            [sys.executable, "-c", STUBBORN, json.dumps(job)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_env(),
            text=True,
        )
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
            child.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert child.poll() is None  # still waiting for the (stuck) replica
            child.send_signal(signal.SIGTERM)
            _, stderr = child.communicate(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert child.returncode == -signal.SIGTERM
        assert "second SIGTERM" in stderr
        assert replica.open().read_pointer(Kind.STATE_DICT.pointer).value is None
