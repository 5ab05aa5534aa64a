"""Saves into steps that are already committed: re-save, reopen, resume.

Trinity-RFT (and any trainer shaped like it) writes into committed steps in three ways, and the
monitor answers each before the save function runs (:func:`decide`):

- **re-save**: the same save (name and kind) of a step a pointer names runs again (the final
  ``save_checkpoint`` after a step that was just checkpointed). It is a no-op: the committed
  files stay untouched and the save counts as finished.
- **reopen**: a different save targets a step a pointer names (the checkpoint of a step whose
  weights were just published), or a re-save must run (its function holds collectives that other
  ranks are waiting in). Every pointer naming the step moves back first to the newest earlier step
  whose files are all present, the step's manifests are dropped, and the step commits again once
  its saves are done: no reader resolves a pointer to a step while it is being rewritten.
- **resume**: a save for a step between the checkpoint pointer C and a higher state-dict pointer
  S: the run resumed from C and re-trains C+1..S. The state-dict pointer moves back to C first;
  steps C+1..S are recorded as abandoned. :func:`resume_from_checkpoint` does the same when a run
  starts, before any of its ranks writes (ranks that write with plain ``torch.save`` never ask).

Every move is a compare-and-swap against the step the monitor expects, and is appended to the
rewind history with its reason.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from commitpoint.core.layout import Kind, parse_step_dir, step_dir
from commitpoint.core.manifest import manifest_path, read_manifest, read_manifest_for
from commitpoint.core.pointer import rewind_pointer
from commitpoint.errors import CommitConflict, CommitpointError
from commitpoint.maintenance.rewind import RewindRecord, append_history
from commitpoint.storage.protocol import StorageBackend

logger = logging.getLogger(__name__)


class Action(str, enum.Enum):
    """What a save that asked :func:`decide` does next."""

    RUN = "run"
    SKIP = "skip"
    REFUSE = "refuse"


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str = ""
    reopen: tuple[Kind, ...] = ()
    """Pointers that name the step and must move back before the save runs."""
    resume_to: int | None = None
    """Move the state-dict pointer back to this checkpoint step before the save runs."""
    refused_by: Kind | None = None


def decide(
    step: int,
    kind: Kind,
    name: str,
    latest: dict[Kind, int | None],
    committed_saves: Collection[tuple[str, Kind]],
    must_run: bool,
) -> Decision:
    """The answer for a save ``(step, kind, name)`` given the pointers the monitor knows.

    ``committed_saves``: the saves that made up the commit of ``step`` this monitor made, if any.
    ``must_run``: the caller cannot skip its save function (see the module docstring).
    """
    checkpoint, weights = latest[Kind.CHECKPOINT], latest[Kind.STATE_DICT]
    resume_to = None
    if weights is not None and checkpoint is not None and checkpoint < step < weights:
        resume_to = checkpoint
        weights = checkpoint
    named = tuple(
        k
        for k in (Kind.CHECKPOINT, Kind.STATE_DICT)
        if {Kind.CHECKPOINT: checkpoint, Kind.STATE_DICT: weights}[k] == step
    )
    if named:
        if (name, kind) in committed_saves and resume_to is None and not must_run:
            return Decision(Action.SKIP, f"save {name!r} of step {step} is already committed")
        why = (
            f"save {name!r} must run again (its function takes part in collectives)"
            if (name, kind) in committed_saves
            else f"save {name!r} adds to committed step {step}"
        )
        return Decision(Action.RUN, why, reopen=named, resume_to=resume_to)
    for pointer_kind, value in ((Kind.CHECKPOINT, checkpoint), (Kind.STATE_DICT, weights)):
        if value is not None and step < value and (pointer_kind is kind or kind is Kind.STATE_DICT):
            return Decision(Action.REFUSE, refused_by=pointer_kind)
    return Decision(Action.RUN, resume_to=resume_to)


def files_present(storage: StorageBackend, step: int, kind: Kind) -> bool:
    """The step has a manifest covering ``kind`` and every file it lists is stored whole (by
    size): a pointer may be moved back to it. Checksums are left to verified loads."""
    try:
        manifest = read_manifest_for(storage, step, kind)
        if manifest is None:
            return False
        stored = {info.path: info.size for info in storage.list_files(step_dir(step))}
    except (CommitpointError, OSError):  # unreadable, or being deleted by someone else
        return False
    return all(stored.get(record.path) == record.size for record in manifest.files)


def rewind_target(
    storage: StorageBackend, kind: Kind, below: int, floor: int | None = None
) -> int | None:
    """The newest step below ``below`` (and not below ``floor``) a ``kind`` pointer may name."""
    candidates = sorted(
        (s for n in storage.list_dirs("") if (s := parse_step_dir(n)) is not None and s < below),
        reverse=True,
    )
    for candidate in candidates:
        if floor is not None and candidate < floor:
            break
        if files_present(storage, candidate, kind):
            return candidate
    return None


@dataclass(frozen=True)
class MoveBack(RewindRecord):
    """A rewind the monitor made on its own, with why and which steps it abandoned."""

    reason: str = ""
    abandoned: tuple[int, ...] = field(default_factory=tuple)

    def to_json(self) -> str:
        body = json.loads(super().to_json())
        body.update({"reason": self.reason, "abandoned": list(self.abandoned)})
        return json.dumps(body, sort_keys=True)


def move_back(
    storage: StorageBackend,
    kind: Kind,
    from_step: int,
    to_step: int,
    reason: str,
    before_write: Callable[[], None] | None = None,
) -> MoveBack:
    """Move ``kind``'s pointer from ``from_step`` back to ``to_step`` (compare-and-swap) and
    append the move, its reason and the abandoned step folders to the rewind history."""
    if before_write is not None:
        before_write()
    rewind_pointer(storage, kind.pointer, to_step, expected=from_step)
    abandoned = tuple(
        sorted(
            s
            for n in storage.list_dirs("")
            if (s := parse_step_dir(n)) is not None and to_step < s <= from_step
        )
    )
    record = MoveBack(
        kind, from_step, to_step, time.time(), socket.gethostname(), os.getpid(), reason, abandoned
    )
    append_history(storage, [record])
    logger.info(
        "moved %s pointer of %s back from step %d to step %d: %s",
        kind.value,
        storage.url,
        from_step,
        to_step,
        reason,
    )
    return record


def drop_manifests(storage: StorageBackend, step: int, kinds: Collection[Kind]) -> None:
    """Remove ``step``'s manifests of ``kinds`` (no pointer names the step any more, or it is
    being rewritten): the next commit of the step lists its files afresh."""
    doomed = set(kinds)
    if Kind.CHECKPOINT in doomed:
        doomed.add(Kind.STATE_DICT)  # a checkpoint commit covers the step's weights too
    for kind in doomed:
        if read_manifest(storage, step, kind) is not None:
            storage.delete(manifest_path(step, kind))


def reopen(
    storage: StorageBackend,
    step: int,
    kinds: Collection[Kind],
    reason: str,
    before_write: Callable[[], None] | None = None,
) -> dict[Kind, int | None]:
    """Move every pointer in ``kinds`` (all naming ``step``) back, then drop the step's manifests.

    Returns where each pointer is now. A pointer with no earlier step to go back to stays (logged
    as a warning: a reader that does not verify may see the step while it is rewritten; one that
    verifies finds no manifest and refuses)."""
    moved: dict[Kind, int | None] = {}
    floor: int | None = None
    for kind in (Kind.CHECKPOINT, Kind.STATE_DICT):  # the weights never end below the checkpoint
        if kind not in kinds:
            continue
        target = rewind_target(storage, kind, step, floor)
        if target is None:
            floor = step  # the state-dict pointer never ends below the checkpoint pointer
            logger.warning(
                "%s step %d is rewritten (%s) but no earlier step can be named instead; the "
                "pointer keeps naming it until the step commits again",
                kind.value,
                step,
                reason,
            )
            moved[kind] = step
            continue
        try:
            move_back(storage, kind, step, target, f"reopen step {step}: {reason}", before_write)
        except CommitConflict:
            moved[kind] = storage.read_pointer(kind.pointer).value
            continue
        moved[kind] = target
        if kind is Kind.CHECKPOINT:
            floor = target
    drop_manifests(storage, step, kinds)
    return moved


__all__ = [
    "Action",
    "Decision",
    "MoveBack",
    "decide",
    "drop_manifests",
    "files_present",
    "move_back",
    "reopen",
    "rewind_target",
]
