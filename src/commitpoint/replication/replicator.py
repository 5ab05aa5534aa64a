"""The replicator: a background queue that publishes locally committed steps on a replica.

Call order (one replicator per local root and replica, like one monitor per root):

0. ``Replicator(local, replica, options)`` opens both roots; nothing runs yet.
1. ``start()`` takes the replica's writer lease (so a zombie replicator of an older process is
   fenced), reads both tiers' pointers, queues every step committed locally that the replica's
   pointers have not reached (the resume after a crash: all of it is derived from storage), and
   starts the worker thread.
2. ``submit(step, kind)`` after each local commit (the monitor's commit listener); it only
   queues and returns.
3. The worker takes queued steps in step order (with the ``skip`` policy, dropping a queued step
   once a newer one of its kind is queued) and publishes each with
   :func:`~commitpoint.replication.publish.publish_step`; a failure is retried with exponential
   backoff, then logged at ERROR and kept in ``status().failed``. After each published step the
   replica's retention policy runs.
4. ``status()`` any time; ``drain(timeout)`` waits until the queue is empty; ``close(timeout)``
   drains (up to the timeout), stops the worker (an upload still running is abandoned between
   two chunks, unpublished) and logs what is durable where.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from commitpoint.core.layout import Kind, check_step
from commitpoint.core.lease import WriterLease
from commitpoint.errors import InvalidArgument, WriterFenced
from commitpoint.maintenance.retention import RetentionPolicy, RetentionResult
from commitpoint.replication.options import OlderSteps, ReplicationOptions
from commitpoint.replication.publish import Outcome, Published, local_manifests, publish_step
from commitpoint.replication.status import (
    ReplicationStatus,
    StepFailure,
    lag_steps,
    pointers,
    step_kinds,
    unreplicated_kinds,
)
from commitpoint.storage.protocol import StorageBackend
from commitpoint.storage.registry import open_storage

logger = logging.getLogger(__name__)


@dataclass
class _Queued:
    kinds: set[Kind]
    since: float
    """When the step was committed locally (wall clock), for the lag in seconds."""
    bytes: int | None = None


@dataclass
class _InFlight:
    step: int
    kind: Kind
    since: float
    bytes_total: int = 0
    bytes_done: int = 0
    kinds: set[Kind] = field(default_factory=set)


def _open(target: StorageBackend | str, options: Mapping[str, Any]) -> StorageBackend:
    if isinstance(target, str):
        return open_storage(target, **dict(options))
    if isinstance(target, StorageBackend):
        return target
    raise InvalidArgument(f"a tier must be a URL or a StorageBackend, got {target!r}")


class Replicator:
    """Copies every step committed on ``local`` to ``replica`` in the background."""

    def __init__(
        self,
        local: StorageBackend | str,
        replica: StorageBackend | str,
        options: ReplicationOptions | Mapping[str, Any] | None = None,
        *,
        local_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.options = ReplicationOptions.of(options)
        self.local = _open(local, local_options or {})
        self.replica = _open(replica, self.options.storage_options)
        if self.local.url == self.replica.url:
            raise InvalidArgument(f"the replica {self.replica.url} is the local root itself")
        self._cond = threading.Condition()
        self._pending: dict[int, _Queued] = {}
        self._in_flight: _InFlight | None = None
        self._local_steps: dict[Kind, int | None] = dict.fromkeys(Kind)
        self._replica_steps: dict[Kind, int | None] = dict.fromkeys(Kind)
        self._failed: dict[tuple[int, Kind], StepFailure] = {}
        self._skipped: list[int] = []
        self._published = 0
        self._bytes_uploaded = 0
        self._last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lease: WriterLease | None = None

    def __repr__(self) -> str:
        return f"Replicator({self.local.url!r} -> {self.replica.url!r})"

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> Replicator:
        """Take the replica's lease, queue what the replica misses, and start uploading."""
        if self._thread is not None:
            return self
        self._stop.clear()
        self._lease = WriterLease(self.replica, seal=[kind.pointer for kind in Kind])
        local_pointers, replica_pointers = pointers(self.local), pointers(self.replica)
        with self._cond:
            for kind in Kind:
                self._local_steps[kind] = _newest(self._local_steps[kind], local_pointers[kind])
                self._replica_steps[kind] = replica_pointers[kind]
        resumed = self._scan(local_pointers, replica_pointers)
        self._pool = ThreadPoolExecutor(
            self.options.parallel_files, thread_name_prefix="commitpoint-replica-upload"
        )
        self._thread = threading.Thread(
            target=self._run, name="commitpoint-replicator", daemon=True
        )
        self._thread.start()
        logger.info(
            "replicating %s to %s (epoch %d, %s older steps): replica names state dict %s, "
            "checkpoint %s; %d committed step(s) to resume",
            self.local.url,
            self.replica.url,
            self._lease.epoch,
            self.options.older_steps.value,
            replica_pointers[Kind.STATE_DICT],
            replica_pointers[Kind.CHECKPOINT],
            len(resumed),
        )
        return self

    def _scan(
        self, local_pointers: dict[Kind, int | None], replica_pointers: dict[Kind, int | None]
    ) -> list[int]:
        """Queue every step committed locally that the replica pointers have not reached."""
        found: list[int] = []
        for step, kinds in sorted(step_kinds(self.local).items()):
            missing = unreplicated_kinds(step, kinds, local_pointers, replica_pointers)
            if not missing:
                continue
            manifests = local_manifests(self.local, step, max(missing, key=_rank))
            since = min((m.created_at for m in manifests), default=time.time())
            for kind in missing:
                self._queue(step, kind, since)
            found.append(step)
        return found

    def submit(self, step: int, kind: Kind | str) -> None:
        """Queue ``kind`` of ``step``, which the local tier has just committed (returns at once)."""
        check_step(step)
        self._queue(step, Kind(kind), time.time())

    def _queue(self, step: int, kind: Kind, since: float) -> None:
        with self._cond:
            queued = self._pending.get(step)
            if queued is None:
                queued = self._pending[step] = _Queued(set(), since)
            queued.kinds.add(kind)
            queued.bytes = None  # a checkpoint brings more files than its state dict
            self._local_steps[kind] = _newest(self._local_steps[kind], step)
            if kind is Kind.CHECKPOINT:
                self._local_steps[Kind.STATE_DICT] = _newest(
                    self._local_steps[Kind.STATE_DICT], step
                )
            self._failed.pop((step, kind), None)
            self._cond.notify_all()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued or uploading; False if ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending or self._in_flight is not None:
                if self._thread is None or not self._thread.is_alive():
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left if left is not None else 1.0)
        return True

    def prioritise_latest(self) -> list[int]:
        """Drop queued steps older than the newest of their kind (what a preempted job does
        with its last seconds); returns the steps dropped."""
        with self._cond:
            return self._skip_older()

    def close(self, timeout: float | None = None) -> ReplicationStatus:
        """Drain for up to ``timeout`` (default ``options.close_timeout_s``), then stop.

        What is still queued stays committed locally and is resumed by the next ``start()``.
        """
        if self._thread is not None:
            wait = self.options.close_timeout_s if timeout is None else timeout
            if not self.drain(wait):
                logger.warning("replica %s: closing before the queue drained", self.replica.url)
            self._stop.set()
            with self._cond:
                self._cond.notify_all()
            self._thread.join()
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        status = self.status()
        logger.info(
            "replication %s -> %s closed: %s", self.local.url, self.replica.url, status.describe()
        )
        return status

    def __enter__(self) -> Replicator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- observation ------------------------------------------------------------------------
    def status(self) -> ReplicationStatus:
        """Lag in steps, seconds and bytes, and what is queued, uploading or failed."""
        now = time.time()
        with self._cond:
            local, replica = dict(self._local_steps), dict(self._replica_steps)
            since = [q.since for q in self._pending.values()]
            left = sum(q.bytes or 0 for q in self._pending.values())
            in_flight = self._in_flight
            if in_flight is not None:
                since.append(in_flight.since)
                left += max(0, in_flight.bytes_total - in_flight.bytes_done)
            return ReplicationStatus(
                local_url=self.local.url,
                replica_url=self.replica.url,
                local=local,
                replica=replica,
                lag_steps=lag_steps(local, replica),
                lag_seconds=max(0.0, now - min(since)) if since else 0.0,
                lag_bytes=left,
                pending=tuple(sorted(self._pending)),
                in_flight=None if in_flight is None else in_flight.step,
                failed=tuple(self._failed[k] for k in sorted(self._failed)),
                skipped=tuple(self._skipped),
                published=self._published,
                bytes_uploaded=self._bytes_uploaded,
                last_error=self._last_error,
                running=self._thread is not None and self._thread.is_alive(),
            )

    def unreplicated(self, storage: StorageBackend | None = None) -> set[int]:
        """Local steps the replica does not hold yet: queued, uploading, failed, and (listing
        ``storage``, the local root) every committed step above the replica's pointers."""
        with self._cond:
            steps = set(self._pending) | {s for s, _ in self._failed}
            if self._in_flight is not None:
                steps.add(self._in_flight.step)
            local, replica = dict(self._local_steps), dict(self._replica_steps)
        if storage is not None:
            for kind in Kind:
                local[kind] = _newest(local[kind], storage.read_pointer(kind.pointer).value)
            for step, kinds in step_kinds(storage).items():
                if unreplicated_kinds(step, kinds, local, replica):
                    steps.add(step)
        return steps

    def protecting(self, policy: RetentionPolicy | None) -> ProtectedRetention | None:
        """``policy`` for the local tier, keeping unreplicated steps unless the options say not."""
        if policy is None or not self.options.protect_unreplicated:
            return None if policy is None else ProtectedRetention(policy, None)
        return ProtectedRetention(policy, self)

    # -- the worker -------------------------------------------------------------------------
    def _run(self) -> None:
        assert self._pool is not None and self._lease is not None
        while True:
            self._size_queued()
            with self._cond:
                while not self._pending and not self._stop.is_set():
                    self._cond.wait()
                if self._stop.is_set():
                    return
                if self.options.older_steps is OlderSteps.SKIP:
                    self._skip_older()
                if not self._pending:
                    continue
                step = min(self._pending)
                queued = self._pending.pop(step)
                kind = max(queued.kinds, key=_rank)
                self._in_flight = _InFlight(
                    step, kind, queued.since, queued.bytes or 0, 0, queued.kinds
                )
            try:
                self._publish_with_retries(step, kind)
            finally:
                with self._cond:
                    self._in_flight = None
                    self._cond.notify_all()

    def _size_queued(self) -> None:
        """Read the size of newly queued steps from their local manifests (for lag bytes)."""
        with self._cond:
            unsized = [
                (s, max(q.kinds, key=_rank)) for s, q in self._pending.items() if q.bytes is None
            ]
        for step, kind in unsized:
            try:
                size = sum(m.total_bytes for m in local_manifests(self.local, step, kind))
            except Exception:  # only a figure; the upload reports real problems
                size = 0
            with self._cond:
                queued = self._pending.get(step)
                if queued is not None and queued.bytes is None:
                    queued.bytes = size

    def _skip_older(self) -> list[int]:
        """Under the lock: drop each queued kind a newer queued step covers."""
        dropped: list[int] = []
        for step in sorted(self._pending):
            queued = self._pending[step]
            newer = [q.kinds for s, q in self._pending.items() if s > step]
            for kind in list(queued.kinds):
                covers = {kind, Kind.CHECKPOINT} if kind is Kind.STATE_DICT else {kind}
                if any(kinds & covers for kinds in newer):
                    queued.kinds.discard(kind)
            if not queued.kinds:
                del self._pending[step]
                dropped.append(step)
        if dropped:
            self._skipped.extend(dropped)
            logger.info(
                "replica %s: skipping steps %s (newer steps queued)", self.replica.url, dropped
            )
        return dropped

    def _on_bytes(self, count: int) -> None:
        with self._cond:
            if self._in_flight is not None:
                self._in_flight.bytes_done += count

    def _publish_with_retries(self, step: int, kind: Kind) -> None:
        assert self._pool is not None and self._lease is not None
        attempts = self.options.attempts
        for attempt in range(1, attempts + 1):
            try:
                result = publish_step(
                    self.local,
                    self.replica,
                    step,
                    kind,
                    pool=self._pool,
                    check_lease=self._lease.check,
                    should_stop=self._stop.is_set,
                    on_bytes=self._on_bytes,
                )
            except WriterFenced as exc:
                self._fail(step, kind, attempt, exc)
                logger.error("replicator fenced, stopping: %s", exc)
                self._stop.set()
                return
            except Exception as exc:
                if attempt == attempts or self._stop.is_set():
                    self._fail(step, kind, attempt, exc)
                    return
                delay = min(self.options.max_backoff_s, self.options.backoff_s * 2 ** (attempt - 1))
                delay *= 0.5 + random.random() / 2
                logger.warning(
                    "replicating step %d (%s) to %s failed (try %d of %d), retrying in %.1f s: %s",
                    step,
                    kind.value,
                    self.replica.url,
                    attempt,
                    attempts,
                    delay,
                    exc,
                )
                with self._cond:
                    self._last_error = f"step {step}: {exc}"
                if self._stop.wait(delay):
                    self._requeue(step, kind)
                    return
                continue
            self._done(result)
            return

    def _requeue(self, step: int, kind: Kind) -> None:
        with self._cond:
            flight = self._in_flight
            kinds = flight.kinds if flight is not None and flight.step == step else {kind}
            since = flight.since if flight is not None else time.time()
            queued = self._pending.setdefault(step, _Queued(set(), since))
            queued.kinds.update(kinds)

    def _fail(self, step: int, kind: Kind, attempt: int, exc: BaseException) -> None:
        text = f"{type(exc).__name__}: {exc}"
        logger.error(
            "replicating step %d (%s) to %s failed %d time(s); the replica does not have it "
            "(it stays committed locally): %s",
            step,
            kind.value,
            self.replica.url,
            attempt,
            text,
        )
        with self._cond:
            self._failed[(step, kind)] = StepFailure(step, kind, attempt, text)
            self._last_error = f"step {step}: {text}"

    def _done(self, result: Published) -> None:
        if result.outcome is Outcome.STOPPED:
            self._requeue(result.step, result.kind)
            return
        with self._cond:
            if result.outcome in (Outcome.PUBLISHED, Outcome.SUPERSEDED, Outcome.ALREADY_THERE):
                covered = [result.kind] + (
                    [Kind.STATE_DICT] if result.kind is Kind.CHECKPOINT else []
                )
                for kind in covered:
                    self._replica_steps[kind] = _newest(self._replica_steps[kind], result.step)
            if result.outcome is Outcome.PUBLISHED:
                self._published += 1
            self._bytes_uploaded += result.bytes_uploaded
        log = logger.info if result.outcome is not Outcome.CONFLICT else logger.warning
        log(
            "replica %s: step %d (%s) %s (%d files, %d bytes uploaded in %.2f s)",
            self.replica.url,
            result.step,
            result.kind.value,
            result.outcome.value,
            result.files,
            result.bytes_uploaded,
            result.seconds,
        )
        if self.options.retention is not None and result.outcome is Outcome.PUBLISHED:
            with self._cond:
                busy = set(self._pending)
            try:
                self.options.retention.apply(self.replica, in_flight=busy)
            except Exception:
                logger.exception("retention on the replica %s failed this round", self.replica.url)


@dataclass(frozen=True)
class ProtectedRetention:
    """A local retention policy that never deletes a step the replica does not hold yet."""

    policy: RetentionPolicy
    replicator: Replicator | None

    def apply(
        self, storage: StorageBackend, *, in_flight: Collection[int] = (), dry_run: bool = False
    ) -> RetentionResult:
        keep = set(in_flight)
        if self.replicator is not None:
            keep |= self.replicator.unreplicated(storage)
        return self.policy.apply(storage, in_flight=keep, dry_run=dry_run)


def _rank(kind: Kind) -> int:
    """A full checkpoint covers its state dict: it is published instead of it."""
    return 1 if kind is Kind.CHECKPOINT else 0


def _newest(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    return a if b is None else max(a, b)
