"""The replica tier: commit locally first, then publish each step on a second store.

The local root stays what training waits on; a :class:`Replicator` uploads each committed step's
files to the replica in the background, checks them against the local manifest, writes the
manifest and only then moves the replica's pointer by compare-and-swap. The replica is a root like
any other (same layout, same invariants), readable by plain tools. See docs/tiered.md.
"""

from commitpoint.replication.options import OlderSteps, ReplicationOptions
from commitpoint.replication.preemption import PreemptionHandler
from commitpoint.replication.publish import Outcome, Published, publish_step
from commitpoint.replication.reader import Tier, TieredReader, TieredStep
from commitpoint.replication.replicator import ProtectedRetention, Replicator
from commitpoint.replication.status import (
    ReplicationStatus,
    StepFailure,
    TierComparison,
    TierStep,
    compare_tiers,
)

__all__ = [
    "OlderSteps",
    "Outcome",
    "PreemptionHandler",
    "ProtectedRetention",
    "Published",
    "ReplicationOptions",
    "ReplicationStatus",
    "Replicator",
    "StepFailure",
    "Tier",
    "TierComparison",
    "TierStep",
    "TieredReader",
    "TieredStep",
    "compare_tiers",
    "publish_step",
]
