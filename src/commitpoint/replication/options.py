"""What a replica tier does: parallelism, the older-step policy, retries, retention, shutdown.

One frozen, validated dataclass (``ReplicationOptions``), built from keyword arguments or from a
mapping (``CheckpointMonitor(..., replicate_options={...})``); unknown keys are refused, so a
misspelt option fails at start instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from commitpoint.errors import InvalidArgument
from commitpoint.maintenance.retention import RetentionPolicy


class OlderSteps(str, enum.Enum):
    """What happens to a committed step still queued when a newer step of its kind commits.

    ``UPLOAD``: every committed step reaches the replica, in step order (the replica holds the
    same history as the local tier). ``SKIP``: a queued step is dropped once a newer one of the
    same kind is queued (the replica follows the newest step at upload bandwidth). A step whose
    upload has started is always finished, never abandoned half way for a newer one, so the replica
    keeps moving even when every upload takes longer than a training step.
    """

    UPLOAD = "upload"
    SKIP = "skip"

    @classmethod
    def _missing_(cls, value: object) -> OlderSteps:
        raise InvalidArgument(f"older_steps must be one of {[p.value for p in cls]}, got {value!r}")


@dataclass(frozen=True)
class ReplicationOptions:
    """How a :class:`~commitpoint.replication.Replicator` copies committed steps to its replica."""

    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    """Options for opening the replica URL (may hold credentials: never logged)."""
    older_steps: OlderSteps = OlderSteps.UPLOAD
    """See :class:`OlderSteps`."""
    parallel_files: int = 4
    """Files of one step uploaded at once (each file's own upload is multipart/parallel too)."""
    attempts: int = 5
    """Tries of one step before it is reported as failed (ERROR log, ``status().failed``)."""
    backoff_s: float = 0.5
    """Wait before the second try; doubles each try, up to ``max_backoff_s`` (with jitter)."""
    max_backoff_s: float = 30.0
    retention: RetentionPolicy | None = None
    """Retention of the replica, applied after each step it publishes (``keep_every=1000``...)."""
    protect_unreplicated: bool = True
    """Local retention keeps every step the replica does not hold yet; False lets it delete them
    (the replica then skips a step that is gone locally, with a warning)."""
    close_timeout_s: float | None = None
    """How long ``close()`` waits for the queue to reach the replica (None: until it has)."""
    handle_sigterm: bool = False
    """Install a :class:`~commitpoint.replication.PreemptionHandler` (main thread only)."""
    sigterm_deadline_s: float = 30.0
    """Seconds the SIGTERM handler gives saves and the replica before the process exits."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "older_steps", OlderSteps(self.older_steps))
        object.__setattr__(self, "storage_options", dict(self.storage_options))
        for name in ("parallel_files", "attempts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgument(
                    f"replication option {name} must be an int >= 1, got {value!r}"
                )
        for name in ("backoff_s", "max_backoff_s", "sigterm_deadline_s", "close_timeout_s"):
            value = getattr(self, name)
            if value is None and name == "close_timeout_s":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise InvalidArgument(
                    f"replication option {name} must be a number >= 0, got {value!r}"
                )
        if self.retention is not None and not isinstance(self.retention, RetentionPolicy):
            raise InvalidArgument(
                f"replication option retention must be a RetentionPolicy, got {self.retention!r}"
            )

    @classmethod
    def of(cls, value: ReplicationOptions | Mapping[str, Any] | None) -> ReplicationOptions:
        """``value`` as options: itself, the defaults for None, or a mapping of option names."""
        if value is None:
            return cls()
        if isinstance(value, ReplicationOptions):
            return value
        if not isinstance(value, Mapping):
            raise InvalidArgument(
                f"replicate_options must be a ReplicationOptions or a mapping, got {value!r}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(map(str, value)) - known)
        if unknown:
            raise InvalidArgument(
                f"unknown replication option(s) {unknown}; known: {sorted(known)}"
            )
        body = dict(value)
        if isinstance(body.get("retention"), Mapping):
            body["retention"] = RetentionPolicy(**body["retention"])
        return cls(**body)
