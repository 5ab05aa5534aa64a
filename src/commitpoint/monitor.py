"""CheckpointMonitor: counts the saves of each step and commits a step once all of them finished.

It is the only component that writes manifests and moves pointers. It runs in-process (a plain
object, thread-safe) or as a named Ray actor (:meth:`CheckpointMonitor.get_actor`) that every
worker of a job shares. Notifications may arrive in any order relative to the registration of
their step; a step commits only when it was asked to be monitored, every registered save of the
relevant kinds has finished, and none failed.

Commit rules (per step N):
- the state-dict pointer moves to N when every state-dict save of N finished;
- the checkpoint pointer moves to N when every checkpoint save and every state-dict save of N
  finished, and then the state-dict pointer moves to N as well;
- a failed state-dict save blocks both kinds of N; a failed checkpoint save blocks the checkpoint.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from commitpoint.errors import InvalidArgument, MonitorRestarted, StepRegression, StorageError
from commitpoint.layout import Kind, check_step
from commitpoint.lease import WriterLease
from commitpoint.manifest import build_manifest, read_manifest, write_manifest
from commitpoint.pointer import Advance, advance_pointer
from commitpoint.storage.protocol import FileRecord, StorageBackend
from commitpoint.storage.registry import open_storage
from commitpoint.strategy import SaveStrategy

logger = logging.getLogger(__name__)

MAX_TRACKED_STEPS = 4096
"""Steps with unfinished bookkeeping kept in memory; older ones are dropped with a warning."""

COMMIT_ATTEMPTS = 4
"""Tries of one commit (manifest + pointers) when storage fails transiently; both are idempotent."""


@dataclass
class _StepState:
    expected: dict[Kind, int] = field(default_factory=lambda: dict.fromkeys(Kind, 0))
    finished: dict[Kind, int] = field(default_factory=lambda: dict.fromkeys(Kind, 0))
    monitor_calls: dict[Kind, int] = field(default_factory=lambda: dict.fromkeys(Kind, 0))
    participants: dict[Kind, int] = field(default_factory=lambda: dict.fromkeys(Kind, 1))
    failed: dict[Kind, list[str]] = field(default_factory=lambda: {k: [] for k in Kind})
    records: dict[str, FileRecord] = field(default_factory=dict)
    committing: set[Kind] = field(default_factory=set)
    committed: set[Kind] = field(default_factory=set)

    def balanced(self, kind: Kind) -> bool:
        return self.finished[kind] == self.expected[kind]

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
        return all(
            k in self.committed or self.failed[k] or self.failed[Kind.STATE_DICT]
            for k in Kind
            if self.monitored(k)
        ) and any(self.monitored(k) for k in Kind)

    def quiet(self) -> bool:
        """No save of any kind is known to be running: listing the folder is safe."""
        return all(self.balanced(k) for k in Kind)


class CheckpointMonitor:
    """Counts saves per step and commits complete steps to ``storage_url``."""

    def __init__(
        self,
        storage_url: str,
        storage_options: Mapping[str, Any] | None = None,
        save_strategy: SaveStrategy | str = SaveStrategy.UNRESTRICTED,
        retention: Any | None = None,
    ) -> None:
        """``retention`` (a :class:`commitpoint.retention.RetentionPolicy`) is applied in the
        background after each commit; it never deletes a step a pointer names or one in flight."""
        self._storage_url = storage_url
        self._storage_options = dict(storage_options or {})
        try:
            self._strategy = SaveStrategy(save_strategy)
        except ValueError:
            raise InvalidArgument(
                f"save_strategy must be one of {[s.value for s in SaveStrategy]}, "
                f"got {save_strategy!r}"
            ) from None
        self._storage = open_storage(storage_url, **self._storage_options)
        self._lease = WriterLease(self._storage, seal=[kind.pointer for kind in Kind])
        self._lock = threading.Condition()
        self._commit_lock = threading.Lock()
        self._steps: dict[int, _StepState] = {}
        self._latest: dict[Kind, int | None] = {
            kind: self._storage.read_pointer(kind.pointer).value for kind in Kind
        }
        self._slot_owner: object = None
        self._slot_users = 0
        self._thread_ids = itertools.count(1)
        self._retention = retention
        self._retention_pool = (
            ThreadPoolExecutor(1, thread_name_prefix="commitpoint-retention") if retention else None
        )
        logger.info(
            "checkpoint monitor on %s (strategy %s, epoch %d): latest state dict %s, checkpoint %s",
            self._storage.url,
            self._strategy.value,
            self._lease.epoch,
            self._latest[Kind.STATE_DICT],
            self._latest[Kind.CHECKPOINT],
        )

    # -- Ray ----------------------------------------------------------------------------------
    @classmethod
    def get_actor(
        cls,
        namespace: str,
        storage_url: str,
        storage_options: Mapping[str, Any] | None = None,
        save_strategy: SaveStrategy | str = SaveStrategy.UNRESTRICTED,
        name: str = "checkpoint_monitor",
        retention: Any | None = None,
        **actor_options: Any,
    ) -> Any:
        """The job's named monitor actor: created on first call, shared by every later call.

        The actor restarts on failure (recovering the latest steps from storage) and serves
        calls concurrently, so a save waiting in ``notify_started`` never blocks the others.
        """
        import ray

        options: dict[str, Any] = {
            "name": name,
            "namespace": namespace,
            "get_if_exists": True,
            "max_restarts": -1,
            "max_concurrency": 1024,
            "num_cpus": 0,
        }
        options.update(actor_options)
        return (
            ray.remote(cls)
            .options(**options)
            .remote(
                storage_url, dict(storage_options or {}), SaveStrategy(save_strategy), retention
            )
        )

    # -- queries ------------------------------------------------------------------------------
    def storage_config(self) -> tuple[str, dict[str, Any]]:
        """URL and options for coordinators to open the same storage."""
        return self._storage_url, dict(self._storage_options)

    @property
    def storage(self) -> StorageBackend:
        return self._storage

    def latest_steps(self) -> dict[str, int | None]:
        """Latest committed step of each kind as this monitor knows it."""
        with self._lock:
            return {kind.value: self._latest[kind] for kind in Kind}

    def latest_state_dict_step(self) -> int | None:
        with self._lock:
            return self._latest[Kind.STATE_DICT]

    def latest_checkpoint_step(self) -> int | None:
        with self._lock:
            return self._latest[Kind.CHECKPOINT]

    def writer_epoch(self) -> int:
        return self._lease.epoch

    def pending_steps(self) -> list[int]:
        with self._lock:
            return sorted(self._steps)

    # -- registration -------------------------------------------------------------------------
    def register_thread_count(
        self, step: int, *, state_dict_thread_count: int = 0, checkpoint_thread_count: int = 0
    ) -> None:
        """Announce that this many saves of each kind belong to ``step`` (adds up over calls)."""
        check_step(step)
        for what, count in (
            ("state_dict_thread_count", state_dict_thread_count),
            ("checkpoint_thread_count", checkpoint_thread_count),
        ):
            check_step(count, what)
        with self._lock:
            state = self._state(step)
            state.expected[Kind.STATE_DICT] += state_dict_thread_count
            state.expected[Kind.CHECKPOINT] += checkpoint_thread_count
            ready = self._take_ready(step)
        self._commit_all(step, ready)

    def monitor_step(self, step: int, is_state_dict: bool = False, participants: int = 1) -> int:
        """Ask for ``step`` to be committed (as a state dict or a full checkpoint) once complete.

        With several workers each registering their own saves, pass ``participants`` = how many
        of them will call ``monitor_step``: the step waits for all their registrations. Returns
        this monitor's writer epoch, so the caller can tell whether it restarted meanwhile.
        """
        check_step(step)
        if check_step(participants, "participants") < 1:
            raise InvalidArgument("participants must be at least 1")
        kind = Kind.of(is_state_dict)
        with self._lock:
            state = self._state(step)
            state.monitor_calls[kind] += 1
            state.participants[kind] = max(state.participants[kind], participants)
            ready = self._take_ready(step)
        self._commit_all(step, ready)
        return self._lease.epoch

    # -- save lifecycle -----------------------------------------------------------------------
    def notify_started(
        self, node_id: str, job_id: str, timeout: float | None = None
    ) -> dict[str, int | None]:
        """Block until the save strategy lets a save of this node/process start.

        Returns :meth:`latest_steps` plus ``writer_epoch``, so the caller can refuse a committed
        step, or notice that this monitor was fenced, without a second round trip.
        """
        if self._strategy is SaveStrategy.UNRESTRICTED:
            return {**self.latest_steps(), "writer_epoch": self._lease.epoch}
        if self._strategy is SaveStrategy.SINGLE_THREAD:
            owner: object = next(self._thread_ids)
        elif self._strategy is SaveStrategy.SINGLE_PROCESS:
            owner = (node_id, job_id)
        else:
            owner = node_id
        with self._lock:
            if not self._lock.wait_for(
                lambda: self._slot_users == 0 or self._slot_owner == owner, timeout
            ):
                raise TimeoutError(f"no save slot within {timeout} s ({self._strategy.value})")
            self._slot_owner = owner
            self._slot_users += 1
            return {
                **{kind.value: self._latest[kind] for kind in Kind},
                "writer_epoch": self._lease.epoch,
            }

    def notify_finished(
        self,
        step: int,
        is_state_dict: bool = False,
        name: str = "",
        files: Iterable[FileRecord] = (),
        started: bool = True,
        writer_epoch: int | None = None,
    ) -> None:
        """A save of ``step`` finished; ``files`` are the records of what it wrote.

        ``writer_epoch`` is the epoch ``notify_started`` returned: if this monitor has restarted
        since (a new epoch), it never saw the step's registration complete, so the save is
        refused with :class:`MonitorRestarted` rather than silently never committed.
        """
        check_step(step)
        kind = Kind.of(is_state_dict)
        if writer_epoch is not None and writer_epoch != self._lease.epoch:
            logger.warning("save %r of step %d started before a monitor restart", name, step)
            raise MonitorRestarted(step, writer_epoch, self._lease.epoch)
        with self._lock:
            if started:
                self._release_slot()
            state = self._state(step)
            state.finished[kind] += 1
            for record in files:
                state.records[record.path] = record
            ready = self._take_ready(step)
        self._commit_all(step, ready)

    def notify_failed(
        self,
        step: int,
        is_state_dict: bool = False,
        name: str = "",
        error: str = "",
        started: bool = True,
    ) -> None:
        """A save of ``step`` raised: the step's kind is never committed."""
        check_step(step)
        kind = Kind.of(is_state_dict)
        logger.error("save %r of step %d failed; step will not be committed: %s", name, step, error)
        with self._lock:
            if started:
                self._release_slot()
            state = self._state(step)
            state.finished[kind] += 1
            state.failed[kind].append(f"{name}: {error}")
            self._prune(step)

    # -- internals ----------------------------------------------------------------------------
    def _release_slot(self) -> None:
        if self._slot_users > 0:
            self._slot_users -= 1
            self._lock.notify_all()

    def _state(self, step: int) -> _StepState:
        state = self._steps.get(step)
        if state is None:
            state = self._steps[step] = _StepState()
            if len(self._steps) > MAX_TRACKED_STEPS:
                oldest = min(self._steps)
                logger.warning("dropping bookkeeping of step %d (too many steps open)", oldest)
                del self._steps[oldest]
        return state

    def _take_ready(self, step: int) -> list[Kind]:
        """Under the lock: the kinds of ``step`` to commit now, marked as being committed."""
        state = self._steps[step]
        ready = [k for k in (Kind.CHECKPOINT, Kind.STATE_DICT) if state.ready(k)]
        if Kind.CHECKPOINT in ready and Kind.STATE_DICT in ready:
            ready.remove(Kind.STATE_DICT)  # the checkpoint commit moves both pointers
            state.committing.add(Kind.STATE_DICT)
        state.committing.update(ready)
        return ready

    def _commit_all(self, step: int, kinds: list[Kind]) -> None:
        for kind in kinds:
            try:
                self._commit_with_retries(step, kind)
            finally:
                with self._lock:
                    state = self._steps.get(step)
                    if state is not None:
                        state.committing.discard(kind)
                        if kind is Kind.CHECKPOINT:
                            state.committing.discard(Kind.STATE_DICT)
                        self._prune(step)
        if kinds and self._retention_pool is not None:
            try:
                self._retention_pool.submit(self._apply_retention)
            except RuntimeError:  # closed: the commit stands, retention just does not run
                logger.debug("monitor closed; no retention round after step %d", step)

    def _commit_with_retries(self, step: int, kind: Kind) -> None:
        """Commit, retrying transient storage failures: rewriting an uncommitted manifest and
        re-running the pointer compare-and-swap are both safe to repeat."""
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            try:
                self._commit(step, kind)
                return
            except StorageError as exc:
                if attempt == COMMIT_ATTEMPTS:
                    logger.error(
                        "commit of %s step %d failed %d times; not committed: %s",
                        kind.value,
                        step,
                        attempt,
                        exc,
                    )
                    raise
                logger.warning(
                    "commit of %s step %d failed (try %d of %d), retrying: %s",
                    kind.value,
                    step,
                    attempt,
                    COMMIT_ATTEMPTS,
                    exc,
                )
                time.sleep(min(1.0, 0.05 * 2**attempt) * (0.5 + random.random() / 2))

    def _commit(self, step: int, kind: Kind) -> None:
        with self._lock:
            state = self._steps[step]
            records = list(state.records.values())
            quiet = state.quiet() and (
                kind is Kind.CHECKPOINT or not state.monitored(Kind.CHECKPOINT)
            )
        with self._commit_lock:
            self._lease.check()
            if self._already_committed(step, kind):
                return
            if kind is Kind.CHECKPOINT:
                earlier = read_manifest(self._storage, step, Kind.STATE_DICT)
                if earlier is not None:
                    records = [*earlier.files, *records]
            manifest = build_manifest(
                self._storage,
                step,
                kind,
                records,
                include_listing=quiet,
                writer_epoch=self._lease.epoch,
            )
            # Check again right before writing: building may have taken a while, and a newer
            # writer may have taken over (and even committed this step) meanwhile.
            self._lease.check()
            if self._already_committed(step, kind):
                return
            write_manifest(self._storage, manifest)
            moved = [self._advance(kind, step)]
            if kind is Kind.CHECKPOINT:
                moved.append(self._advance(Kind.STATE_DICT, step))
        with self._lock:
            state.committed.add(kind)
            if kind is Kind.CHECKPOINT:
                state.committed.add(Kind.STATE_DICT)
        logger.info(
            "committed %s of step %d (%d files, %d bytes)%s",
            kind.value,
            step,
            len(manifest.files),
            manifest.total_bytes,
            "" if any(moved) else "; a later step was already committed",
        )

    def _already_committed(self, step: int, kind: Kind) -> bool:
        """True if the pointer already names ``step`` or a later one and the step's manifest
        exists: that manifest belongs to a commit (or a superseded step) and is never rewritten,
        whoever wrote it. A late step without one still gets its manifest, so it can be verified
        and rewound to."""
        current = self._storage.read_pointer(kind.pointer).value
        if current is None or current < step:
            return False
        if read_manifest(self._storage, step, kind) is None:
            return False
        logger.info("%s step %d: pointer already names step %d", kind.value, step, current)
        if kind is Kind.CHECKPOINT:
            self._advance(Kind.STATE_DICT, step)
        with self._lock:
            self._latest[kind] = max(self._latest[kind] or 0, current)
            state = self._steps.get(step)
            if state is not None:
                state.committed.add(kind)
                if kind is Kind.CHECKPOINT:
                    state.committed.add(Kind.STATE_DICT)
        return True

    def _advance(self, kind: Kind, step: int) -> bool:
        try:
            result = advance_pointer(self._storage, kind.pointer, step, self._lease.check)
        except StepRegression as exc:
            logger.info("step %d of %s superseded by step %d", step, kind.value, exc.current)
            with self._lock:
                self._latest[kind] = max(self._latest[kind] or 0, exc.current)
            return False
        with self._lock:
            if self._latest[kind] is None or step > (self._latest[kind] or 0):
                self._latest[kind] = step
        return result is Advance.MOVED

    def _apply_retention(self) -> None:
        if self._retention is None:
            return
        with self._lock:
            in_flight = set(self._steps)
        try:
            self._retention.apply(self._storage, in_flight=in_flight)
        except Exception:
            logger.exception(
                "retention on %s failed; nothing more is deleted this round", self._storage.url
            )

    def close(self) -> None:
        """Stop background retention work (waiting for a round in progress)."""
        if self._retention_pool is not None:
            self._retention_pool.shutdown(wait=True)

    def _prune(self, step: int) -> None:
        state = self._steps.get(step)
        if state is not None and state.done():
            del self._steps[step]


__all__ = ["CheckpointMonitor", "SaveStrategy"]
