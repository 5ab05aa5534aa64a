"""The step ledger: what the monitor knows about each step's saves, and when a kind is ready.

A pure state machine (no storage, no threads of its own; thread-safe). For each step and kind
(state dict, checkpoint) it holds how many saves are expected, how many finished, which failed,
who asked for the step to be committed, the file records the saves reported, and whether a commit
is running or done. The monitor drives it in this order:

0. ``register(step, counts)`` and ``notify_finished`` / ``notify_failed`` may arrive in any order;
   ``admit(step, kind)`` (a save about to run, from ``notify_started``) waits for a commit of the
   step in progress, then counts the save as expected until it finishes, registered or not;
1. ``monitor(step, kind, participants)`` asks for the kind to be committed once complete;
2. after each of these calls, ``take_ready(step)`` returns the kinds that just became ready and
   marks them *committing* (a checkpoint commit moves both pointers, so it takes the state dict
   along);
3. the commit pipeline commits them, then ``commit_finished(step, kind, committed)`` records the
   outcome; a step whose every monitored kind is committed or failed, with nothing running, is
   dropped (``prune``).

Readiness (per step N):
- the state dict of N is ready when it is monitored, every state-dict save of N (registered or
  admitted) finished and none failed;
- the checkpoint of N is ready when it is monitored and every save of both kinds finished with
  none failed;
- a failed state-dict save blocks both kinds of N; a failed checkpoint save blocks the checkpoint.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from commitpoint.core.layout import Kind
from commitpoint.errors import SlotTimeout
from commitpoint.storage.protocol import FileRecord

logger = logging.getLogger(__name__)

MAX_TRACKED_STEPS = 4096
"""Steps with unfinished bookkeeping kept in memory; older ones are dropped with a warning."""


@dataclass
class StepState:
    """One step's bookkeeping (see the module docstring for how each field moves)."""

    expected: dict[Kind, int] = field(default_factory=lambda: dict.fromkeys(Kind, 0))
    finished: dict[Kind, int] = field(default_factory=lambda: dict.fromkeys(Kind, 0))
    monitor_calls: dict[Kind, int] = field(default_factory=lambda: dict.fromkeys(Kind, 0))
    participants: dict[Kind, int] = field(default_factory=lambda: dict.fromkeys(Kind, 1))
    failed: dict[Kind, list[str]] = field(default_factory=lambda: {k: [] for k in Kind})
    records: dict[str, FileRecord] = field(default_factory=dict)
    committing: set[Kind] = field(default_factory=set)
    committed: set[Kind] = field(default_factory=set)
    admitted: dict[Kind, int] = field(default_factory=lambda: dict.fromkeys(Kind, 0))
    """Saves admitted to run: each counts as expected even before its registration arrives, so
    the step never commits while one of them may still be writing."""
    saves: set[tuple[str, Kind]] = field(default_factory=set)
    """(name, kind) of the saves that finished."""

    def balanced(self, kind: Kind) -> bool:
        return self.finished[kind] == max(self.expected[kind], self.admitted[kind])

    def monitored(self, kind: Kind) -> bool:
        return self.monitor_calls[kind] >= self.participants[kind]

    def ready(self, kind: Kind) -> bool:
        if kind in self.committed or kind in self.committing or not self.monitored(kind):
            return False
        if self.failed[Kind.STATE_DICT] or not self.balanced(Kind.STATE_DICT):
            return False
        if kind is Kind.CHECKPOINT:
            return not self.failed[Kind.CHECKPOINT] and self.balanced(Kind.CHECKPOINT)
        return True

    def done(self) -> bool:
        if not all(self.balanced(k) for k in Kind) or self.committing:
            return False
        if any(self.finished[k] > self.expected[k] for k in Kind):
            return False  # admitted saves whose registration is still to come
        return all(
            k in self.committed or self.failed[k] or self.failed[Kind.STATE_DICT]
            for k in Kind
            if self.monitored(k)
        ) and any(self.monitored(k) for k in Kind)

    def quiet(self) -> bool:
        """No save of any kind is known to be running: listing the folder is safe."""
        return all(self.balanced(k) for k in Kind)


@dataclass(frozen=True)
class CommitInput:
    """What the commit pipeline needs from the ledger to commit one kind of one step."""

    step: int
    kind: Kind
    records: tuple[FileRecord, ...]
    include_listing: bool
    """True when no save of the step is known to be running, so listing its folder is safe."""


class StepLedger:
    """Per-step accounting of saves; decides readiness, never touches storage."""

    def __init__(self, max_steps: int = MAX_TRACKED_STEPS) -> None:
        self._lock = threading.Condition()
        self._steps: dict[int, StepState] = {}
        self._max_steps = max_steps
        self._committed_saves: dict[int, set[tuple[str, Kind]]] = {}

    # -- events -------------------------------------------------------------------------------
    def register(self, step: int, counts: dict[Kind, int]) -> list[Kind]:
        """Add expected saves; return the kinds that became ready."""
        with self._lock:
            state = self._state(step)
            for kind, count in counts.items():
                state.expected[kind] += count
            return self._take_ready(step)

    def monitor(self, step: int, kind: Kind, participants: int) -> list[Kind]:
        """One participant asks for ``kind`` of ``step`` to be committed."""
        with self._lock:
            state = self._state(step)
            state.monitor_calls[kind] += 1
            state.participants[kind] = max(state.participants[kind], participants)
            return self._take_ready(step)

    def admit(self, step: int, kind: Kind, timeout: float | None = None) -> None:
        """A save of ``kind`` is about to run: wait for a commit of ``step`` in progress to end,
        then count the save as expected (no commit of the step starts until it finished)."""
        with self._lock:
            state = self._state(step)
            if not self._lock.wait_for(lambda: not state.committing, timeout):
                raise SlotTimeout(f"step {step} still committing", timeout)
            state.admitted[kind] += 1

    def unadmit(self, step: int, kind: Kind) -> None:
        """An admitted save will not run after all (its admission failed)."""
        with self._lock:
            state = self._steps.get(step)
            if state is not None and state.admitted[kind] > 0:
                state.admitted[kind] -= 1

    def skipped(self, step: int, kind: Kind, name: str) -> list[Kind]:
        """An admitted save is a committed re-save: it counts as finished without running."""
        with self._lock:
            state = self._state(step)
            state.finished[kind] += 1
            state.saves.add((name, kind))
            return self._take_ready(step)

    def committed_saves(self, step: int) -> set[tuple[str, Kind]]:
        """The saves a commit of ``step`` held, as far as this ledger saw it commit."""
        with self._lock:
            return set(self._committed_saves.get(step, ()))

    def forget_commit(self, steps: Iterable[int], kinds: Iterable[Kind] = tuple(Kind)) -> None:
        """Pointers no longer name these steps for ``kinds``: they may commit again."""
        doomed = set(kinds)
        if Kind.CHECKPOINT in doomed:
            doomed.add(Kind.STATE_DICT)
        with self._lock:
            for step in steps:
                self._committed_saves.pop(step, None)
                state = self._steps.get(step)
                if state is not None:
                    state.committed.difference_update(doomed)

    def finished(
        self, step: int, kind: Kind, records: Iterable[FileRecord], name: str = ""
    ) -> list[Kind]:
        """A save of ``kind`` finished with these file records."""
        with self._lock:
            state = self._state(step)
            state.finished[kind] += 1
            state.saves.add((name, kind))
            for record in records:
                state.records[record.path] = record
            return self._take_ready(step)

    def failed(self, step: int, kind: Kind, description: str) -> None:
        """A save of ``kind`` failed: that kind (and for a state dict, both) never commits."""
        with self._lock:
            state = self._state(step)
            state.finished[kind] += 1
            state.failed[kind].append(description)
            self._prune(step)

    def commit_input(self, step: int, kind: Kind) -> CommitInput:
        """The records and listing rule of a kind marked committing by :meth:`take_ready`."""
        with self._lock:
            state = self._steps[step]
            return CommitInput(
                step,
                kind,
                tuple(state.records.values()),
                state.quiet() and (kind is Kind.CHECKPOINT or not state.monitored(Kind.CHECKPOINT)),
            )

    def mark_committed(self, step: int, kind: Kind) -> None:
        """The pointer names ``step`` for ``kind`` (a checkpoint commit covers the state dict)."""
        with self._lock:
            state = self._steps.get(step)
            if state is not None:
                state.committed.add(kind)
                if kind is Kind.CHECKPOINT:
                    state.committed.add(Kind.STATE_DICT)
                self._committed_saves.setdefault(step, set()).update(state.saves)
                while len(self._committed_saves) > self._max_steps:
                    del self._committed_saves[min(self._committed_saves)]

    def commit_finished(self, step: int, kind: Kind) -> None:
        """The commit of ``kind`` ended (either way): it no longer runs."""
        with self._lock:
            state = self._steps.get(step)
            if state is not None:
                state.committing.discard(kind)
                if kind is Kind.CHECKPOINT:
                    state.committing.discard(Kind.STATE_DICT)
                self._prune(step)
            self._lock.notify_all()  # saves waiting in admit()

    # -- queries ------------------------------------------------------------------------------
    def pending_steps(self) -> list[int]:
        with self._lock:
            return sorted(self._steps)

    # -- internals (under the lock) -----------------------------------------------------------
    def _state(self, step: int) -> StepState:
        state = self._steps.get(step)
        if state is None:
            state = self._steps[step] = StepState()
            if len(self._steps) > self._max_steps:
                oldest = min(self._steps)
                logger.warning("dropping bookkeeping of step %d (too many steps open)", oldest)
                del self._steps[oldest]
        return state

    def _take_ready(self, step: int) -> list[Kind]:
        state = self._steps[step]
        ready = [k for k in (Kind.CHECKPOINT, Kind.STATE_DICT) if state.ready(k)]
        if Kind.CHECKPOINT in ready and Kind.STATE_DICT in ready:
            ready.remove(Kind.STATE_DICT)  # the checkpoint commit moves both pointers
            state.committing.add(Kind.STATE_DICT)
        state.committing.update(ready)
        return ready

    def _prune(self, step: int) -> None:
        state = self._steps.get(step)
        if state is not None and state.done():
            del self._steps[step]
