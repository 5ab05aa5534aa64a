"""Writer fencing under contention: two processes keep restarting monitors on one root and race
for the same steps. No pointer moves back, every step a pointer names verifies, and no file of a
committed step is replaced (``python -m commitpoint.testing.fencing`` runs the long version)."""

from __future__ import annotations

import pytest

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
