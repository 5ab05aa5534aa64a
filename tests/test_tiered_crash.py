"""The SIGKILL harness in tiered mode (CI-sized): kills of a job that commits locally and
replicates, with the replica checked after every kill; and a job run to its end leaves the
replica naming the same steps as the local root."""

from __future__ import annotations

from pathlib import Path

import pytest

from commitpoint.core.layout import Kind
from commitpoint.read.verify import verify_step
from commitpoint.testing import CheckpointRoot, local_root
from commitpoint.testing.crash import (
    CATEGORIES,
    REPLICA_AHEAD,
    REPLICA_BEHIND,
    JobConfig,
    PhaseRecorder,
    WorkerJob,
    run_crashes,
    run_worker,
)

QUICK = JobConfig(steps=24)


def test_random_kills_of_a_tiered_job(
    local_checkpoint_root: CheckpointRoot, tmp_path: Path
) -> None:
    with local_root(str(tmp_path)) as replica:
        tally = run_crashes(
            local_checkpoint_root, 3, seed=3, config=QUICK, workdir=str(tmp_path), replica=replica
        )
    assert not tally.failures, "\n".join(map(str, tally.failures))
    assert tally.kills == 3 and tally.backend == "local->local"
    assert tally.kills_mid_run >= 1, tally.by_phase
    assert tally.verified >= 2  # steps on both tiers were checked
    assert REPLICA_AHEAD in CATEGORIES and REPLICA_BEHIND in CATEGORIES


@pytest.mark.parametrize("store", ["s3", "gcs"])
def test_a_tiered_job_run_to_its_end_leaves_both_tiers_equal(
    local_checkpoint_root: CheckpointRoot,
    store: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    replica: CheckpointRoot = request.getfixturevalue(f"{store}_checkpoint_root")
    config = JobConfig(steps=6, width=64)
    job = WorkerJob(
        local_checkpoint_root.url,
        {},
        str(tmp_path / "phase"),
        config,
        replica.url,
        dict(replica.storage_options),
    )
    phases = PhaseRecorder(job.phase_file)
    try:
        assert run_worker(job, phases) == 0
    finally:
        phases.close()
    local, remote = local_checkpoint_root.open(), replica.open()
    for kind in Kind:
        assert remote.read_pointer(kind.pointer).value == local.read_pointer(kind.pointer).value
    assert verify_step(remote, 6, Kind.CHECKPOINT).ok
