"""Opt-in SIGTERM handling for preemptible machines: finish, replicate, report, then exit.

A preempted VM gets SIGTERM and a grace period (30 s on GCE spot, 2 min on EC2 spot) before it is
gone with its local disk. :class:`PreemptionHandler` turns that grace period into durability: on
SIGTERM it sets :attr:`PreemptionHandler.preempted` (a training loop may poll it and stop
starting saves), then, on its own thread so the signal handler returns at once,

1. waits for the coordinator's saves in flight and the monitor's commits to finish,
2. queues the newest committed step of each kind for the replica, drops older queued steps,
   and waits for the replica's pointers to name it,
3. logs what is durable where (local pointers, replica pointers, what is lost with the disk),

all within ``deadline_s``, and then lets the signal take its course: the handler that was there
before runs (the default one ends the process, as SIGTERM would have without us). A second
SIGTERM meanwhile hands over at once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType
from typing import Any

from commitpoint.core.layout import Kind
from commitpoint.errors import CommitpointError, InvalidArgument
from commitpoint.replication.replicator import Replicator
from commitpoint.replication.status import ReplicationStatus

logger = logging.getLogger(__name__)


class PreemptionHandler:
    """Handles SIGTERM for a job whose checkpoints are replicated by ``replicator``."""

    def __init__(
        self,
        replicator: Replicator,
        *,
        coordinator: Any | None = None,
        monitor: Any | None = None,
        deadline_s: float = 30.0,
        exit: bool = True,
    ) -> None:
        if (
            isinstance(deadline_s, bool)
            or not isinstance(deadline_s, int | float)
            or deadline_s < 0
        ):
            raise InvalidArgument(f"deadline_s must be a number >= 0, got {deadline_s!r}")
        self.replicator = replicator
        self.coordinator = coordinator
        self.monitor = monitor
        self.deadline_s = float(deadline_s)
        self.exit = exit
        self.preempted = threading.Event()
        """Set as soon as SIGTERM arrives."""
        self.finished = threading.Event()
        """Set once the durable state was logged (just before the process is let go)."""
        self.result: ReplicationStatus | None = None
        self._previous: Any = None
        self._installed = False
        self._releasing = False
        self._thread: threading.Thread | None = None

    def install(self) -> PreemptionHandler:
        """Install the SIGTERM handler (only possible on the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            raise InvalidArgument("the SIGTERM handler can only be installed on the main thread")
        self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        self._installed = True
        return self

    def uninstall(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._releasing:
            self._release(signum, frame)
            return
        if self.preempted.is_set():  # a second SIGTERM: the operator insists
            logger.error("second SIGTERM: exiting without waiting for the replica")
            self._release(signum, frame)
            return
        self.preempted.set()
        logger.warning(
            "SIGTERM: finishing saves and replicating the newest step within %.0f s",
            self.deadline_s,
        )
        self._thread = threading.Thread(
            target=self.run, name="commitpoint-preemption", daemon=False
        )
        self._thread.start()

    def _release(self, signum: int, frame: FrameType | None) -> None:
        """On the main thread, once the work is done: the previous handler takes over."""
        self.uninstall()
        previous = self._previous
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGTERM)  # the default action: the process ends

    def run(self) -> ReplicationStatus:
        """Steps 1-3 of the module docstring, then (with ``exit``) re-deliver the signal."""
        deadline = time.monotonic() + self.deadline_s
        try:
            self._finish_saves(deadline)
            replicator = self.replicator
            local = replicator.local
            for kind in (Kind.CHECKPOINT, Kind.STATE_DICT):
                step = local.read_pointer(kind.pointer).value
                if step is not None:
                    replicator.submit(step, kind)
            dropped = replicator.prioritise_latest()
            if dropped:
                logger.warning("preempted: not replicating older steps %s", dropped)
            drained = replicator.drain(max(0.0, deadline - time.monotonic()))
            status = replicator.status()
            self.result = status
            self._report(status, drained)
        except Exception:
            logger.exception("preemption handling failed")
            raise
        finally:
            self.finished.set()
            if self.exit:
                self._let_go()
        return status

    def _finish_saves(self, deadline: float) -> None:
        coordinator = self.coordinator
        if coordinator is not None:
            while coordinator.pending() and time.monotonic() < deadline:
                time.sleep(0.02)
            try:
                coordinator.wait_all(timeout=0)
            except CommitpointError as exc:
                logger.error("preempted: a save failed and was not committed: %s", exc)
            if coordinator.pending():
                logger.error("preempted: saves %s did not finish in time", coordinator.pending())
        monitor = self.monitor
        if monitor is not None:
            # Commits run after the saves report; give them what is left of half the deadline.
            until = time.monotonic() + max(0.0, deadline - time.monotonic()) / 2
            while monitor.pending_steps() and time.monotonic() < until:
                time.sleep(0.02)

    def _report(self, status: ReplicationStatus, drained: bool) -> None:
        for kind in Kind:
            here, there = status.local[kind], status.replica[kind]
            if here is None:
                continue
            where = "locally and on the replica" if there == here else "locally only"
            logger.warning(
                "preempted: %s step %d is durable %s (%s); the replica names %s (%s)",
                kind.value,
                here,
                where,
                status.local_url,
                there,
                status.replica_url,
            )
        if not drained:
            logger.error("preempted: the replica did not catch up in time: %s", status.describe())

    def _let_go(self) -> None:
        """Hand SIGTERM back: the main thread (where handlers run) restores the previous
        handler and lets it act (by default: end the process)."""
        self._releasing = True
        os.kill(os.getpid(), signal.SIGTERM)
