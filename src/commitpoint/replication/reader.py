"""Restore from two tiers: the newest step that verifies, from the local copy when it has one.

A restarted job on a fresh machine has an empty local root and a full replica; a job on the
same machine has both, and its local copy is the fast one. :class:`TieredReader` looks at every
committed step of either tier (at or below that tier's pointer, with a manifest), newest first,
and takes the first copy that verifies: the local one before the replica's of the same step.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from commitpoint.core.layout import Kind, parse_step_dir
from commitpoint.core.manifest import read_manifest_for
from commitpoint.errors import CommitpointError, CorruptCheckpoint
from commitpoint.read.reader import CheckpointReader
from commitpoint.read.verify import VerifyReport, verify_step
from commitpoint.storage.protocol import StorageBackend

logger = logging.getLogger(__name__)


class Tier(str, enum.Enum):
    LOCAL = "local"
    REPLICA = "replica"


@dataclass(frozen=True)
class TieredStep:
    """The copy a tiered restore chose: its step, tier, and a reader on that tier."""

    step: int
    kind: Kind
    tier: Tier
    reader: CheckpointReader
    report: VerifyReport | None
    """The verification that chose it (None when ``verify=False``)."""

    @property
    def url(self) -> str:
        return self.reader.step_url(self.step)

    def load(self, relpath: str, **options: Any) -> Any:
        """:meth:`CheckpointReader.load` of ``relpath`` from the chosen copy."""
        return self.reader.load(self.step, relpath, kind=self.kind, **options)


class TieredReader:
    """Finds the newest verifiable step over a local root and its replica."""

    def __init__(
        self,
        local: str | StorageBackend,
        replica: str | StorageBackend,
        *,
        local_options: Mapping[str, Any] | None = None,
        replica_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.local = CheckpointReader(local, **dict(local_options or {}))
        self.replica = CheckpointReader(replica, **dict(replica_options or {}))

    def _tiers(self) -> tuple[tuple[Tier, CheckpointReader], ...]:
        return ((Tier.LOCAL, self.local), (Tier.REPLICA, self.replica))

    def committed_steps(self, kind: Kind | str = Kind.STATE_DICT) -> dict[Tier, list[int]]:
        """Each tier's committed steps of ``kind`` (at or below its pointer, with a manifest)."""
        kind = Kind(kind)
        found: dict[Tier, list[int]] = {}
        for tier, reader in self._tiers():
            found[tier] = []
            try:
                pointer = reader.latest_step(kind)
                if pointer is None:
                    continue
                steps = [
                    s for s in map(parse_step_dir, reader.storage.list_dirs("")) if s is not None
                ]
                found[tier] = sorted(
                    (s for s in steps if s <= pointer and _has_manifest(reader.storage, s, kind)),
                    reverse=True,
                )
            except CommitpointError as exc:  # a tier that cannot be read is no candidate
                logger.warning("tier %s (%s) is unreadable: %s", tier.value, reader.url, exc)
        return found

    def resolve(self, kind: Kind | str = Kind.STATE_DICT, *, verify: bool = True) -> TieredStep:
        """The newest step of ``kind`` whose copy verifies, preferring the local tier.

        Raises :class:`CorruptCheckpoint` when neither tier has a step that verifies.
        """
        kind = Kind(kind)
        found = self.committed_steps(kind)
        candidates = sorted({s for steps in found.values() for s in steps}, reverse=True)
        rejected: list[str] = []
        for step in candidates:
            for tier, reader in self._tiers():
                if step not in found[tier]:
                    continue
                if not verify:
                    return TieredStep(step, kind, tier, reader, None)
                try:
                    report = verify_step(reader.storage, step, kind)
                except CommitpointError as exc:
                    rejected.append(f"step {step} on {tier.value}: {exc}")
                    continue
                if report.ok:
                    return TieredStep(step, kind, tier, reader, report)
                rejected.append(
                    f"step {step} on {tier.value}: " + "; ".join(map(str, report.problems))
                )
                logger.warning("skipping step %d on the %s tier: does not verify", step, tier.value)
        raise CorruptCheckpoint(
            f"{self.local.url} + {self.replica.url}",
            f"no {kind.value} step verifies on either tier",
            rejected,
        )

    def latest_step(self, kind: Kind | str = Kind.STATE_DICT, *, verify: bool = True) -> int | None:
        """The step :meth:`resolve` picks, or None when neither tier committed ``kind``."""
        try:
            return self.resolve(kind, verify=verify).step
        except CorruptCheckpoint as exc:
            if exc.problems:
                raise
            return None


def _has_manifest(storage: StorageBackend, step: int, kind: Kind) -> bool:
    return read_manifest_for(storage, step, kind) is not None
