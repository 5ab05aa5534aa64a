"""Rewind: move pointers back to an earlier step that verifies, on purpose, with an audit trail.

The commit path only ever moves pointers forward
(:func:`~commitpoint.core.pointer.advance_pointer`); going back is this separate operation.
:func:`rewind` checks the target step against its manifest
(:func:`~commitpoint.read.verify.verify_step`), moves each pointer by one compare-and-swap
(:func:`~commitpoint.core.pointer.rewind_pointer`) against the step it expected, verifies the
target once more (retention may have been deleting it at that instant; if so the pointer is moved
back and :class:`CorruptCheckpoint` raised), and appends one JSON line per moved pointer to
``.commitpoint/rewind_history.jsonl``.

After a rewind to step S, training commits S+1, S+2, ... again through the normal path; steps above
S left over from before are neither protected nor deleted by retention until training passes them.

The history file is appended with ``O_APPEND`` on local disk (atomic for lines this small). Object
stores have no append, so there it is read, extended and rewritten, then read back to confirm the
line landed (re-appended if a concurrent rewind overwrote it, up to a few times). Two rewinds of the
same root at the same instant could still drop one line in the worst case; rewinds are rare,
operator-driven actions and the history is an audit trail — the pointers are the truth.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass

from commitpoint.core.layout import HISTORY_LIMIT, REWIND_HISTORY, Kind, check_step
from commitpoint.core.pointer import rewind_pointer
from commitpoint.errors import CommitConflict, CorruptCheckpoint, InvalidArgument, UnexpectedStep
from commitpoint.read.verify import verify_step
from commitpoint.storage.local import LocalBackend
from commitpoint.storage.protocol import StorageBackend

logger = logging.getLogger(__name__)

BOTH = "both"
HISTORY_ATTEMPTS = 5


@dataclass(frozen=True)
class RewindRecord:
    """One pointer moved back: written as a line of the rewind history."""

    kind: Kind
    from_step: int
    to_step: int
    time: float
    host: str
    pid: int

    def to_json(self) -> str:
        return json.dumps(
            {
                "time": self.time,
                "kind": self.kind.value,
                "from": self.from_step,
                "to": self.to_step,
                "host": self.host,
                "pid": self.pid,
            },
            sort_keys=True,
        )


def _kinds(kind_or_both: Kind | str) -> list[Kind]:
    """Checkpoint first: the state-dict pointer is never left below the checkpoint pointer."""
    if kind_or_both == BOTH:
        return [Kind.CHECKPOINT, Kind.STATE_DICT]
    try:
        return [Kind(kind_or_both)]
    except ValueError:
        raise InvalidArgument(
            f"kind must be 'state_dict', 'checkpoint' or 'both', got {kind_or_both!r}"
        ) from None


def rewind(
    storage: StorageBackend,
    kind_or_both: Kind | str,
    to_step: int,
    *,
    expected_current: int | None = None,
) -> list[RewindRecord]:
    """Move the pointer(s) of ``kind_or_both`` back to ``to_step`` and record it.

    ``expected_current``: the step the pointer(s) must name now (compare-and-swap); None means
    "whatever they name when read". With ``"both"``, a pointer already at or below ``to_step`` is
    left alone. Raises :class:`InvalidArgument` if nothing would move back (or a pointer is
    absent), :class:`CorruptCheckpoint` if ``to_step`` does not verify for a kind it moves, and
    :class:`CommitConflict` if a pointer does not name ``expected_current`` or changed meanwhile.
    Returns one record per pointer moved.
    """
    check_step(to_step, "to_step")
    kinds = _kinds(kind_or_both)
    plan: list[tuple[Kind, int]] = []
    for kind in kinds:
        current = storage.read_pointer(kind.pointer).value
        if expected_current is not None and current != expected_current:
            raise UnexpectedStep(
                storage.url_for(kind.pointer), kind.value, expected_current, current
            )
        if current is None:
            if kind_or_both == BOTH:
                continue
            raise InvalidArgument(f"nothing is committed as {kind.value} under {storage.url}")
        if current > to_step:
            plan.append((kind, current))
        elif kind_or_both != BOTH:
            raise InvalidArgument(
                f"{kind.value} pointer names step {current}; rewind only moves back "
                f"(requested step {to_step})"
            )
    if not plan:
        raise InvalidArgument(f"no pointer of {storage.url} is above step {to_step}")
    for kind, _ in plan:
        verify_step(storage, to_step, kind).raise_for_problems(storage.url_for(kind.pointer))

    moved: list[tuple[Kind, int]] = []
    try:
        for kind, current in plan:
            rewind_pointer(storage, kind.pointer, to_step, expected=current)
            moved.append((kind, current))
            report = verify_step(storage, to_step, kind)
            report.raise_for_problems(storage.url_for(kind.pointer))
    except (CommitConflict, CorruptCheckpoint) as exc:
        _undo(storage, to_step, moved)
        raise exc
    records = [
        RewindRecord(kind, current, to_step, time.time(), socket.gethostname(), os.getpid())
        for kind, current in moved
    ]
    for record in records:
        logger.info(
            "rewound %s pointer of %s from step %d to step %d",
            record.kind.value,
            storage.url,
            record.from_step,
            record.to_step,
        )
    append_history(storage, records)
    return records


def _undo(storage: StorageBackend, to_step: int, moved: list[tuple[Kind, int]]) -> None:
    """Put back the pointers a failed rewind already moved (unless they changed since)."""
    for kind, previous in reversed(moved):
        try:
            rewind_pointer(storage, kind.pointer, previous, expected=to_step)
        except Exception as exc:
            logger.error(
                "could not restore %s pointer of %s to step %d after a failed rewind: %s",
                kind.value,
                storage.url,
                previous,
                exc,
            )


def append_history(storage: StorageBackend, records: list[RewindRecord]) -> None:
    """Append ``records`` to the rewind history (see the module docstring for the guarantees)."""
    if not records:
        return
    lines = "".join(r.to_json() + "\n" for r in records).encode()
    if isinstance(storage, LocalBackend):
        _append_local(storage.full_path(REWIND_HISTORY), lines)
        return
    for _ in range(HISTORY_ATTEMPTS):
        existing = (
            storage.read_small(REWIND_HISTORY, HISTORY_LIMIT)
            if storage.exists(REWIND_HISTORY)
            else b""
        )
        if existing and not existing.endswith(b"\n"):
            existing += b"\n"
        storage.write_bytes(REWIND_HISTORY, existing + lines, track=False)
        if lines in storage.read_small(REWIND_HISTORY, HISTORY_LIMIT):
            return
        time.sleep(0.05)
    logger.error("could not record a rewind in %s", storage.url_for(REWIND_HISTORY))


def _append_local(path: str, lines: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, lines)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_history(storage: StorageBackend) -> list[dict[str, object]]:
    """Every entry of the rewind history, oldest first (unparsable lines skipped)."""
    if not storage.exists(REWIND_HISTORY):
        return []
    entries: list[dict[str, object]] = []
    for line in storage.read_small(REWIND_HISTORY, HISTORY_LIMIT).splitlines():
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


__all__ = ["BOTH", "RewindRecord", "append_history", "read_history", "rewind"]
