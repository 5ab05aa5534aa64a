"""CheckpointMonitor: the one component that commits, composed of the monitor's parts.

It runs in-process (a plain object, thread-safe) or as a named Ray actor
(:meth:`CheckpointMonitor.get_actor`) that every worker of a job shares. Each call is answered
by one part: the step ledger (:mod:`commitpoint.monitor.ledger`) does the accounting, the commit
pipeline (:mod:`commitpoint.monitor.commit`) writes manifests and moves pointers, the slot
scheduler (:mod:`commitpoint.monitor.slots`) applies the save strategy, and retention runs in
the background after commits (:class:`commitpoint.maintenance.retention.BackgroundRetention`).
A save that would write into a committed step is answered before it runs
(:mod:`commitpoint.monitor.reopen`: re-save, reopen, resume).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from commitpoint.core.layout import Kind, check_step
from commitpoint.core.lease import WriterLease
from commitpoint.errors import InvalidArgument, MonitorRestarted
from commitpoint.maintenance.retention import BackgroundRetention
from commitpoint.monitor import reopen as reopening
from commitpoint.monitor.commit import CommitListener, CommitPipeline
from commitpoint.monitor.ledger import StepLedger
from commitpoint.monitor.slots import SaveStrategy, SlotScheduler
from commitpoint.replication.options import ReplicationOptions
from commitpoint.replication.preemption import PreemptionHandler
from commitpoint.replication.replicator import Replicator
from commitpoint.replication.status import ReplicationStatus
from commitpoint.storage.protocol import FileRecord, StorageBackend
from commitpoint.storage.registry import open_storage

logger = logging.getLogger(__name__)


class CheckpointMonitor:
    """Accounts for the saves of each step and commits complete steps to ``storage_url``."""

    def __init__(
        self,
        storage_url: str,
        storage_options: Mapping[str, Any] | None = None,
        save_strategy: object = SaveStrategy.UNRESTRICTED,
        retention: Any | None = None,
        replicate_to: str | StorageBackend | None = None,
        replicate_options: ReplicationOptions | Mapping[str, Any] | None = None,
    ) -> None:
        """``retention`` (a :class:`commitpoint.RetentionPolicy`) is applied in the background
        after each commit; it never deletes a step a pointer names or one in flight.
        ``save_strategy``: any enum or string naming a :class:`SaveStrategy` (any case).

        ``replicate_to`` (any URL with a backend; Trinity-RFT's ``default_hdfs_dir``) makes a
        second tier: each step commits here first, then a
        :class:`~commitpoint.replication.Replicator` publishes it there in the background
        (``replicate_options``: a :class:`~commitpoint.replication.ReplicationOptions` or its
        mapping). Local retention then also keeps the steps the replica lacks."""
        self._storage_url = storage_url
        self._storage_options = dict(storage_options or {})
        strategy = SaveStrategy.parse(save_strategy)
        if replicate_to is not None and not isinstance(replicate_to, str | StorageBackend):
            raise InvalidArgument(f"replicate_to must be a URL or path, got {replicate_to!r}")
        self._replicate_to = (
            replicate_to if isinstance(replicate_to, str | None) else replicate_to.url
        )
        self._storage = open_storage(storage_url, **self._storage_options)
        self._lease = WriterLease(self._storage, seal=[kind.pointer for kind in Kind])
        self._ledger = StepLedger()
        self._slots = SlotScheduler(strategy)
        self._pipeline = CommitPipeline(self._storage, self._lease, self._ledger)
        self._replicator: Replicator | None = None
        in_flight = self._ledger.pending_steps
        if replicate_to is not None:
            self._replicator = Replicator(self._storage, replicate_to, replicate_options)
            self._pipeline.add_listener(self._replicator.submit)
            if self._replicator.options.protect_unreplicated:
                in_flight = self._unreplicated_or_pending
        self._retention = (
            BackgroundRetention(retention, self._storage, in_flight)
            if retention is not None
            else None
        )
        if self._retention is not None:
            self._pipeline.add_listener(self._retention.after_commit)
        latest = self._pipeline.latest()
        logger.info(
            "checkpoint monitor on %s (strategy %s, epoch %d): latest state dict %s, checkpoint %s",
            self._storage.url,
            strategy.value,
            self._lease.epoch,
            latest[Kind.STATE_DICT],
            latest[Kind.CHECKPOINT],
        )
        if self._replicator is not None:
            self._replicator.start()
            if self._replicator.options.handle_sigterm:
                self._install_preemption_handler()

    def _unreplicated_or_pending(self) -> list[int]:
        """What local retention must keep: open steps, and steps the replica lacks."""
        assert self._replicator is not None
        unreplicated = self._replicator.unreplicated(self._storage)
        return sorted({*self._ledger.pending_steps(), *unreplicated})

    def _install_preemption_handler(self) -> None:
        assert self._replicator is not None
        if threading.current_thread() is not threading.main_thread():
            logger.warning("handle_sigterm needs the monitor on the main thread; not installed")
            return
        PreemptionHandler(
            self._replicator,
            monitor=self,
            deadline_s=self._replicator.options.sigterm_deadline_s,
        ).install()

    # -- Ray ----------------------------------------------------------------------------------
    @classmethod
    def get_actor(
        cls,
        namespace: str | None = None,
        storage_url: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        save_strategy: object = None,
        name: str = "checkpoint_monitor",
        retention: Any | None = None,
        *,
        default_local_dir: str | None = None,
        default_hdfs_dir: str | None = None,
        replicate_to: str | None = None,
        replicate_options: ReplicationOptions | Mapping[str, Any] | None = None,
        resume_from_checkpoint: bool | None = None,
        **actor_options: Any,
    ) -> Any:
        """The job's named monitor actor: created on first call, shared by every later call.

        The actor restarts on failure (recovering the latest steps from storage) and serves
        calls concurrently, so a save waiting in ``notify_started`` never blocks the others.

        Trinity-RFT's keywords work too: ``default_local_dir`` is the root (``storage_url``),
        ``default_hdfs_dir`` the replica (``replicate_to``). Without a root the call looks up
        the running actor (:class:`~commitpoint.errors.MonitorNotFound` if there is none). A
        trainer that passes ``default_local_dir`` starts a run that resumes from the checkpoint
        pointer, so :meth:`resume_from_checkpoint` runs before this returns
        (``resume_from_checkpoint=False`` turns that off; ``True`` turns it on for any caller).
        """
        from commitpoint.monitor.transport import ActorRequest, get_actor

        return get_actor(
            cls,
            ActorRequest(
                namespace=namespace,
                name=name,
                storage_url=storage_url,
                default_local_dir=default_local_dir,
                storage_options=storage_options,
                save_strategy=save_strategy,
                retention=retention,
                replicate_to=replicate_to,
                default_hdfs_dir=default_hdfs_dir,
                replicate_options=replicate_options,
                resume_from_checkpoint=resume_from_checkpoint,
                actor_options=actor_options,
            ),
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
        return {kind.value: step for kind, step in self._pipeline.latest().items()}

    def latest_state_dict_step(self) -> int | None:
        return self._pipeline.latest()[Kind.STATE_DICT]

    def latest_checkpoint_step(self) -> int | None:
        return self._pipeline.latest()[Kind.CHECKPOINT]

    def writer_epoch(self) -> int:
        return self._lease.epoch

    def save_strategy(self) -> str:
        return self._slots.strategy.value

    def replication_target(self) -> str | None:
        """The replica root this monitor was given (``replicate_to`` / ``default_hdfs_dir``)."""
        return self._replicate_to

    def pending_steps(self) -> list[int]:
        return self._ledger.pending_steps()

    def replication_status(self) -> ReplicationStatus | None:
        """Lag of the replica tier in steps, seconds and bytes (None without ``replicate_to``)."""
        return None if self._replicator is None else self._replicator.status()

    def add_commit_listener(self, listener: CommitListener) -> None:
        """Call ``listener(step, kind)`` after every commit (in-process monitors only)."""
        self._pipeline.add_listener(listener)

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
        ready = self._ledger.register(
            step,
            {Kind.STATE_DICT: state_dict_thread_count, Kind.CHECKPOINT: checkpoint_thread_count},
        )
        self._pipeline.commit(step, ready)

    def monitor_step(self, step: int, is_state_dict: bool = False, participants: int = 1) -> int:
        """Ask for ``step`` to be committed (as a state dict or a full checkpoint) once complete.

        With several workers each registering their own saves, pass ``participants`` = how many
        of them will call ``monitor_step``: the step waits for all their registrations. Returns
        this monitor's writer epoch, so the caller can tell whether it restarted meanwhile.
        """
        check_step(step)
        if check_step(participants, "participants") < 1:
            raise InvalidArgument("participants must be at least 1")
        ready = self._ledger.monitor(step, Kind.of(is_state_dict), participants)
        self._pipeline.commit(step, ready)
        return self._lease.epoch

    # -- save lifecycle -----------------------------------------------------------------------
    def notify_started(
        self,
        node_id: str,
        job_id: str,
        timeout: float | None = None,
        *,
        step: int | None = None,
        is_state_dict: bool = False,
        name: str = "",
        must_run: bool = False,
    ) -> dict[str, Any]:
        """Block until the save strategy lets a save of this node/process start.

        Returns :meth:`latest_steps` plus ``writer_epoch``, so the caller can notice that this
        monitor was fenced without a second round trip. Raises
        :class:`~commitpoint.errors.SlotTimeout` if no slot is free within ``timeout``.

        With ``step`` (the coordinator always passes it) the save is admitted to its step
        (:mod:`commitpoint.monitor.reopen`) and the reply says what to do: ``action`` ``"run"``,
        ``"skip"`` (a committed re-save: do not run the save function, report nothing more) or
        ``"refuse"`` (the step is below a pointer: fail without writing; ``pointer`` and
        ``current`` say which), with a ``reason``. ``must_run``: the save function cannot be
        skipped (it may hold collectives other ranks wait in).
        """
        self._slots.acquire(node_id, job_id, timeout)
        if step is None:
            return {**self.latest_steps(), "writer_epoch": self._lease.epoch}
        try:
            decision = self._admit(
                check_step(step), Kind.of(is_state_dict), name, must_run, timeout
            )
        except BaseException:
            self._slots.release()
            raise
        if decision.action is reopening.Action.SKIP:
            self._slots.release()
        reply: dict[str, Any] = {
            **self.latest_steps(),
            "writer_epoch": self._lease.epoch,
            "action": decision.action.value,
            "reason": decision.reason,
        }
        if decision.refused_by is not None:
            reply["pointer"] = self._storage.url_for(decision.refused_by.pointer)
            reply["current"] = self._pipeline.latest()[decision.refused_by]
        return reply

    def _admit(
        self, step: int, kind: Kind, name: str, must_run: bool, timeout: float | None
    ) -> reopening.Decision:
        """Decide what a save of ``step`` does; move pointers back first when it must rewrite a
        step one of them names, or re-train steps above the checkpoint a run resumed from."""
        self._ledger.admit(step, kind, timeout)  # no commit of the step starts from here on
        try:
            decision = reopening.decide(
                step,
                kind,
                name,
                self._pipeline.latest(),
                self._ledger.committed_saves(step),
                must_run,
            )
            if decision.action is reopening.Action.RUN:
                if decision.resume_to is not None:
                    self._pipeline.abandon_weights_above(
                        decision.resume_to, f"a save of step {step} trains it again"
                    )
                if decision.reopen:
                    self._pipeline.reopen(step, decision.reopen, decision.reason)
        except BaseException:
            self._ledger.unadmit(step, kind)
            raise
        if decision.action is reopening.Action.SKIP:
            self._pipeline.commit(step, self._ledger.skipped(step, kind, name))
        return decision

    def resume_from_checkpoint(self) -> dict[str, int | None]:
        """A run starts from the checkpoint pointer: the state dicts committed above it will be
        trained again, so the state-dict pointer moves back to it now, before any rank writes
        (ranks that write with plain ``torch.save`` never ask). Returns :meth:`latest_steps`."""
        latest = self._pipeline.latest()
        checkpoint, weights = latest[Kind.CHECKPOINT], latest[Kind.STATE_DICT]
        if weights is not None and checkpoint is None:
            logger.warning(
                "the state-dict pointer of %s names step %d but no checkpoint is committed: a "
                "run that starts from scratch here is refused at its first save; use a new root",
                self._storage.url,
                weights,
            )
        elif weights is not None and checkpoint is not None and weights > checkpoint:
            self._pipeline.abandon_weights_above(checkpoint, "the run starts from it")
        return self.latest_steps()

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
        if started:  # first: the slot is free again whatever happens below (never twice)
            self._slots.release()
        check_step(step)
        kind = Kind.of(is_state_dict)
        if writer_epoch is not None and writer_epoch != self._lease.epoch:
            logger.warning("save %r of step %d started before a monitor restart", name, step)
            raise MonitorRestarted(step, writer_epoch, self._lease.epoch)
        ready = self._ledger.finished(step, kind, files, name)
        self._pipeline.commit(step, ready)

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
        if started:
            self._slots.release()
        self._ledger.failed(step, kind, f"{name}: {error}")

    def close(self) -> None:
        """Let the replica catch up (up to ``close_timeout_s``), then stop background
        retention (waiting for a round in progress). Commits go on: a save still running may
        complete its step after this (a replicated job's next start uploads it)."""
        if self._replicator is not None:
            self._replicator.close()
        if self._retention is not None:
            self._retention.close()


__all__ = ["CheckpointMonitor", "SaveStrategy"]
