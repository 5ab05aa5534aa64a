"""CheckpointMonitor: the one component that commits, composed of the monitor's parts.

It runs in-process (a plain object, thread-safe) or as a named Ray actor
(:meth:`CheckpointMonitor.get_actor`) that every worker of a job shares. Each call is answered
by one part: the step ledger (:mod:`commitpoint.monitor.ledger`) does the accounting, the commit
pipeline (:mod:`commitpoint.monitor.commit`) writes manifests and moves pointers, the slot
scheduler (:mod:`commitpoint.monitor.slots`) applies the save strategy, and retention runs in
the background after commits (:class:`commitpoint.maintenance.retention.BackgroundRetention`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from commitpoint.core.layout import Kind, check_step
from commitpoint.core.lease import WriterLease
from commitpoint.errors import InvalidArgument, MonitorRestarted
from commitpoint.maintenance.retention import BackgroundRetention
from commitpoint.monitor.commit import CommitListener, CommitPipeline
from commitpoint.monitor.ledger import StepLedger
from commitpoint.monitor.slots import SaveStrategy, SlotScheduler
from commitpoint.storage.protocol import FileRecord, StorageBackend
from commitpoint.storage.registry import open_storage

logger = logging.getLogger(__name__)


class CheckpointMonitor:
    """Accounts for the saves of each step and commits complete steps to ``storage_url``."""

    def __init__(
        self,
        storage_url: str,
        storage_options: Mapping[str, Any] | None = None,
        save_strategy: SaveStrategy | str = SaveStrategy.UNRESTRICTED,
        retention: Any | None = None,
    ) -> None:
        """``retention`` (a :class:`commitpoint.RetentionPolicy`) is applied in the background
        after each commit; it never deletes a step a pointer names or one in flight."""
        self._storage_url = storage_url
        self._storage_options = dict(storage_options or {})
        try:
            strategy = SaveStrategy(save_strategy)
        except ValueError:
            raise InvalidArgument(
                f"save_strategy must be one of {[s.value for s in SaveStrategy]}, "
                f"got {save_strategy!r}"
            ) from None
        self._storage = open_storage(storage_url, **self._storage_options)
        self._lease = WriterLease(self._storage, seal=[kind.pointer for kind in Kind])
        self._ledger = StepLedger()
        self._slots = SlotScheduler(strategy)
        self._pipeline = CommitPipeline(self._storage, self._lease, self._ledger)
        self._retention = (
            BackgroundRetention(retention, self._storage, self._ledger.pending_steps)
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
        from commitpoint.monitor.transport import get_or_create_actor

        return get_or_create_actor(
            cls,
            namespace=namespace,
            name=name,
            init_args=(
                storage_url,
                dict(storage_options or {}),
                SaveStrategy(save_strategy),
                retention,
            ),
            actor_options=actor_options,
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

    def pending_steps(self) -> list[int]:
        return self._ledger.pending_steps()

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
        self, node_id: str, job_id: str, timeout: float | None = None
    ) -> dict[str, int | None]:
        """Block until the save strategy lets a save of this node/process start.

        Returns :meth:`latest_steps` plus ``writer_epoch``, so the caller can refuse a committed
        step, or notice that this monitor was fenced, without a second round trip. Raises
        :class:`~commitpoint.errors.SlotTimeout` if no slot is free within ``timeout``.
        """
        self._slots.acquire(node_id, job_id, timeout)
        return {**self.latest_steps(), "writer_epoch": self._lease.epoch}

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
        if started:
            self._slots.release()
        ready = self._ledger.finished(step, kind, files)
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
        """Stop background retention (waiting for a round in progress). Commits go on: a save
        still running may complete its step after this."""
        if self._retention is not None:
            self._retention.close()


__all__ = ["CheckpointMonitor", "SaveStrategy"]
