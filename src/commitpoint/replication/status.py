"""What is durable where: the replication status of a running replicator, and of two roots.

:class:`ReplicationStatus` is the live view a :class:`~commitpoint.replication.Replicator` keeps
(lag in steps, seconds and bytes; what is queued, uploading, failed). :func:`compare_tiers`
derives the same picture from storage alone (pointers and manifests of both roots), which is what
``commitpoint ls --replica`` prints and what a restarted replicator resumes from.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from commitpoint.core.layout import Kind, parse_step_dir
from commitpoint.core.manifest import read_manifest
from commitpoint.storage.protocol import StorageBackend


@dataclass(frozen=True)
class StepFailure:
    """A step that could not be replicated after every try."""

    step: int
    kind: Kind
    attempts: int
    error: str


@dataclass(frozen=True)
class ReplicationStatus:
    """The replica tier as its replicator sees it right now."""

    local_url: str
    replica_url: str
    local: dict[Kind, int | None]
    """Newest step of each kind committed locally (as submitted or found at start)."""
    replica: dict[Kind, int | None]
    """Newest step of each kind the replica's pointers name."""
    lag_steps: int
    """Training steps between the newest local commit and the newest replicated one."""
    lag_seconds: float
    """Age of the oldest local commit not on the replica yet (0 when caught up)."""
    lag_bytes: int
    """Bytes still to upload for the queued and in-flight steps."""
    pending: tuple[int, ...] = ()
    in_flight: int | None = None
    failed: tuple[StepFailure, ...] = ()
    skipped: tuple[int, ...] = ()
    """Steps dropped by the ``skip`` policy (a newer step of their kind was queued)."""
    published: int = 0
    bytes_uploaded: int = 0
    last_error: str | None = None
    running: bool = False
    checked_at: float = field(default_factory=time.time)

    @property
    def caught_up(self) -> bool:
        """Nothing queued or uploading, and the replica names every kind's newest local step."""
        return (
            not self.pending
            and self.in_flight is None
            and all(
                self.local[k] is None or (self.replica[k] or -1) >= (self.local[k] or 0)
                for k in Kind
            )
        )

    def describe(self) -> str:
        """One log line: where each kind's newest step is durable, and the lag."""
        parts = [f"{k.value}: local {self.local[k]}, replica {self.replica[k]}" for k in Kind]
        text = (
            f"{'; '.join(parts)}; lag {self.lag_steps} steps, {self.lag_seconds:.1f} s, "
            f"{self.lag_bytes} bytes"
        )
        if self.pending or self.in_flight is not None:
            text += f"; uploading {self.in_flight}, queued {list(self.pending)}"
        if self.failed:
            text += f"; failed {[f.step for f in self.failed]}"
        return text


def lag_steps(local: dict[Kind, int | None], replica: dict[Kind, int | None]) -> int:
    """Training steps the replica is behind, the larger over both kinds (a replica with no
    step of a kind counts from step 0)."""
    behind = 0
    for kind in Kind:
        here, there = local[kind], replica[kind]
        if here is not None:
            behind = max(behind, here - (there or 0))
    return behind


@dataclass(frozen=True)
class TierStep:
    """One step folder as two tiers hold it: the kinds each has a manifest for."""

    step: int
    local: frozenset[Kind]
    replica: frozenset[Kind]
    local_bytes: int


@dataclass(frozen=True)
class TierComparison:
    """Both tiers from storage alone: pointers, steps, and what the replica is missing."""

    local_url: str
    replica_url: str
    local: dict[Kind, int | None]
    replica: dict[Kind, int | None]
    steps: tuple[TierStep, ...]

    @property
    def unreplicated(self) -> tuple[TierStep, ...]:
        """Steps committed locally (at or below a local pointer) that the replica's pointer
        of their kind has not reached yet: what a restarted replicator uploads."""
        return tuple(
            s for s in self.steps if unreplicated_kinds(s.step, s.local, self.local, self.replica)
        )

    @property
    def lag_steps(self) -> int:
        return lag_steps(self.local, self.replica)

    @property
    def lag_bytes(self) -> int:
        return sum(s.local_bytes for s in self.unreplicated)


def unreplicated_kinds(
    step: int,
    kinds: frozenset[Kind],
    local: dict[Kind, int | None],
    replica: dict[Kind, int | None],
) -> frozenset[Kind]:
    """The kinds of a local ``step`` (with manifests for ``kinds``) the replica still lacks.

    A checkpoint manifest covers the state dict too; a kind counts only up to its local pointer
    (above it the step is still being committed, or was never committed).
    """
    covered = set(kinds)
    if Kind.CHECKPOINT in covered:
        covered.add(Kind.STATE_DICT)
    missing = set()
    for kind in covered:
        named_here, named_there = local[kind], replica[kind]
        if named_here is None or step > named_here:
            continue
        if named_there is None or step > named_there:
            missing.add(kind)
    return frozenset(missing)


def pointers(storage: StorageBackend) -> dict[Kind, int | None]:
    return {kind: storage.read_pointer(kind.pointer).value for kind in Kind}


def step_kinds(storage: StorageBackend) -> dict[int, frozenset[Kind]]:
    """Every step folder of ``storage`` with the kinds it has manifests for."""
    found: dict[int, frozenset[Kind]] = {}
    for name in storage.list_dirs(""):
        step = parse_step_dir(name)
        if step is None:
            continue
        found[step] = frozenset(k for k in Kind if read_manifest(storage, step, k) is not None)
    return found


def compare_tiers(local: StorageBackend, replica: StorageBackend) -> TierComparison:
    """Both tiers' pointers and committed steps, read from storage."""
    here, there = step_kinds(local), step_kinds(replica)
    local_pointers, replica_pointers = pointers(local), pointers(replica)
    steps = []
    for step in sorted(set(here) | set(there)):
        size = 0
        if here.get(step):
            kind = Kind.CHECKPOINT if Kind.CHECKPOINT in here[step] else Kind.STATE_DICT
            manifest = read_manifest(local, step, kind)
            size = manifest.total_bytes if manifest is not None else 0
        steps.append(
            TierStep(step, here.get(step, frozenset()), there.get(step, frozenset()), size)
        )
    return TierComparison(local.url, replica.url, local_pointers, replica_pointers, tuple(steps))
