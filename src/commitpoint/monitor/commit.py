"""The commit pipeline: writer lease, manifest, pointer compare-and-swap, off the notifying call.

Commits run one at a time on the pipeline's own thread, outside the ledger's lock: a notification
that completes a step hands the commit over and waits for its outcome, so the caller still learns
of a failed commit, while the ledger keeps serving every other call. Transient storage failures
are retried (rewriting an uncommitted manifest and re-running the compare-and-swap are both safe
to repeat). After each commit the listeners run (retention, replication).

The same thread moves pointers back when a save must rewrite a committed step
(:mod:`commitpoint.monitor.reopen`), so a move back and a commit never interleave. A pointer that
names a later step this pipeline never committed (nor read at start) was written by someone else:
the commit fails with :class:`ForeignPointer` instead of treating the step as superseded.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from commitpoint.core.layout import Kind
from commitpoint.core.lease import WriterLease
from commitpoint.core.manifest import build_manifest, read_manifest, write_manifest
from commitpoint.core.pointer import Advance, advance_pointer
from commitpoint.core.retry import RetryPolicy, retry
from commitpoint.errors import ForeignPointer, StepRegression, StorageError
from commitpoint.monitor import reopen as reopening
from commitpoint.monitor.ledger import StepLedger
from commitpoint.storage.protocol import StorageBackend

logger = logging.getLogger(__name__)
T = TypeVar("T")

COMMIT_RETRY = RetryPolicy(attempts=4, base_delay=0.1, max_delay=1.0)
"""Tries of one commit (manifest + pointers) when storage fails transiently."""

CommitListener = Callable[[int, Kind], None]
"""Called with (step, kind) after a pointer moved to a newly committed step."""


class CommitPipeline:
    """Commits ready steps of one root and tracks the latest committed step of each kind."""

    def __init__(self, storage: StorageBackend, lease: WriterLease, ledger: StepLedger) -> None:
        self._storage = storage
        self._lease = lease
        self._ledger = ledger
        self._lock = threading.Lock()
        self._latest: dict[Kind, int | None] = {
            kind: storage.read_pointer(kind.pointer).value for kind in Kind
        }
        self._listeners: list[CommitListener] = []
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="commitpoint-commit")

    # -- what the monitor asks ----------------------------------------------------------------
    def latest(self) -> dict[Kind, int | None]:
        with self._lock:
            return dict(self._latest)

    def add_listener(self, listener: CommitListener) -> None:
        """Run ``listener(step, kind)`` after every commit (errors are logged, never raised)."""
        self._listeners.append(listener)

    def commit(self, step: int, kinds: list[Kind]) -> None:
        """Commit ``kinds`` of ``step`` (marked committing by the ledger); raise if one failed."""
        if not kinds:
            return
        future: Future[None] = self._worker.submit(self._commit_all, step, kinds)
        future.result()

    def reopen(self, step: int, kinds: Collection[Kind], reason: str) -> None:
        """Move the pointers of ``kinds`` (naming ``step``) back before the step is rewritten."""
        self._exclusive(self._reopen, step, kinds, reason)

    def abandon_weights_above(self, checkpoint: int, why: str) -> None:
        """Move the state-dict pointer back to ``checkpoint`` (a run resumes from it)."""
        self._exclusive(self._abandon_weights_above, checkpoint, why)

    def _exclusive(self, fn: Callable[..., T], *args: object) -> T:
        future: Future[T] = self._worker.submit(fn, *args)
        return future.result()

    # -- the pipeline (on the worker thread) --------------------------------------------------
    def _reopen(self, step: int, kinds: Collection[Kind], reason: str) -> None:
        self._lease.check()
        moved = reopening.reopen(self._storage, step, kinds, reason, self._lease.check)
        with self._lock:
            self._latest.update(moved)
        self._ledger.forget_commit([step], kinds)

    def _abandon_weights_above(self, checkpoint: int, why: str) -> None:
        self._lease.check()
        current = self._storage.read_pointer(Kind.STATE_DICT.pointer).value
        if current is None or current <= checkpoint:
            return
        record = reopening.move_back(
            self._storage,
            Kind.STATE_DICT,
            current,
            checkpoint,
            f"resume from checkpoint step {checkpoint}: {why}",
            self._lease.check,
        )
        for abandoned in record.abandoned:
            reopening.drop_manifests(self._storage, abandoned, [Kind.STATE_DICT])
        with self._lock:
            self._latest[Kind.STATE_DICT] = checkpoint
        self._ledger.forget_commit(record.abandoned, [Kind.STATE_DICT])

    def _commit_all(self, step: int, kinds: list[Kind]) -> None:
        for kind in kinds:
            try:
                retry(
                    functools.partial(self._commit, step, kind),
                    COMMIT_RETRY,
                    retry_on=(StorageError,),
                    what=f"commit of {kind.value} step {step}",
                )
            finally:
                self._ledger.commit_finished(step, kind)
            self._notify(step, kind)

    def _notify(self, step: int, kind: Kind) -> None:
        for listener in self._listeners:
            try:
                listener(step, kind)
            except Exception:
                logger.exception("commit listener failed after %s step %d", kind.value, step)

    def _commit(self, step: int, kind: Kind) -> None:
        work = self._ledger.commit_input(step, kind)
        self._lease.check()
        if self._already_committed(step, kind):
            return
        records = list(work.records)
        if kind is Kind.CHECKPOINT:
            earlier = read_manifest(self._storage, step, Kind.STATE_DICT)
            if earlier is not None:  # its listed files are listed again: they may have changed
                records = [*(r for r in earlier.files if r.tracked), *records]
        manifest = build_manifest(
            self._storage,
            step,
            kind,
            records,
            include_listing=work.include_listing,
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
        self._ledger.mark_committed(step, kind)
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
        self._refuse_foreign(kind, step, current)
        if read_manifest(self._storage, step, kind) is None:
            return False
        logger.info("%s step %d: pointer already names step %d", kind.value, step, current)
        if kind is Kind.CHECKPOINT:
            self._advance(Kind.STATE_DICT, step)
        with self._lock:
            self._latest[kind] = max(self._latest[kind] or 0, current)
        self._ledger.mark_committed(step, kind)
        return True

    def _advance(self, kind: Kind, step: int) -> bool:
        try:
            result = advance_pointer(self._storage, kind.pointer, step, self._lease.check)
        except StepRegression as exc:
            self._refuse_foreign(kind, step, exc.current)
            logger.info("step %d of %s superseded by step %d", step, kind.value, exc.current)
            with self._lock:
                self._latest[kind] = max(self._latest[kind] or 0, exc.current)
            return False
        with self._lock:
            if self._latest[kind] is None or step > (self._latest[kind] or 0):
                self._latest[kind] = step
        return result is Advance.MOVED

    def _refuse_foreign(self, kind: Kind, step: int, current: int) -> None:
        """``current`` (above ``step``) is neither what the pointer held at start nor a step
        this pipeline committed: another writer moved it. Fail loudly, never skip silently."""
        with self._lock:
            known = self._latest[kind]
        if current == step or (known is not None and current <= known):
            return
        logger.error(
            "%s pointer of %s names step %d, which this monitor never committed; step %d is "
            "not committed over it",
            kind.value,
            self._storage.url,
            current,
            step,
        )
        raise ForeignPointer(self._storage.url_for(kind.pointer), step, current, known)
