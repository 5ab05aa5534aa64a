"""How a DCP save reaches the monitor: as one save, reported by the coordinator rank.

Every rank's file records travel to the coordinator rank inside DCP's own collectives (the
write results), so only that rank talks to the monitor, and only at two moments: before any
rank writes (:meth:`StepReport.admit` decides whether the step may be written at all) and once
every rank's part is durable (:meth:`StepReport.commit`). The other ranks never need a monitor.
All monitor calls of :mod:`commitpoint.dcp` are in this module.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from commitpoint.core.layout import WRITER_EPOCH, Kind
from commitpoint.errors import MonitorRestarted, StepRegression, WriterFenced, redact
from commitpoint.save.coordinator import CheckpointCoordinator
from commitpoint.storage.protocol import FileRecord, StorageBackend

logger = logging.getLogger(__name__)

SAVE_NAME = "dcp"
"""The name the monitor knows a DCP save of a step by."""


@dataclass(frozen=True)
class Admission:
    """The coordinator rank's decision that ``step`` may be written: sent to every rank."""

    step: int
    kind: Kind
    writer_epoch: int | None


def refuse_if_committed(storage: StorageBackend, step: int, kind: Kind) -> None:
    """Refuse a step that the kind's pointer names, or one below it: its files are committed
    (or the training resumed from an older checkpoint; rewind first)."""
    current = storage.read_pointer(kind.pointer).value
    if current is not None and step <= current:
        raise StepRegression(storage.url_for(kind.pointer), current, step)


def refuse_if_fenced(storage: StorageBackend, writer_epoch: int | None) -> None:
    """Refuse to write for a monitor whose writer lease a newer one took."""
    if writer_epoch is None:
        return
    current = storage.read_pointer(WRITER_EPOCH).value
    if current != writer_epoch:
        raise WriterFenced(storage.url, writer_epoch, current)


class StepReport:
    """The coordinator rank's side of one DCP save of ``step``."""

    def __init__(self, coordinator: CheckpointCoordinator, step: int, kind: Kind) -> None:
        self._coordinator = coordinator
        self._monitor = coordinator.monitor
        self._storage = coordinator.storage
        self._step = step
        self._kind = kind
        self._admission: Admission | None = None
        self._open = False  # admitted, and neither committed nor failed yet

    def admit(self) -> Admission:
        """Take a save slot and decide, before anything is written, whether the step may be
        saved: a committed step raises :class:`StepRegression`, a fenced writer
        :class:`WriterFenced` (the slot is given back either way)."""
        node = str(getattr(self._coordinator, "_node_id", "") or "")
        job = str(getattr(self._coordinator, "_job_id", "") or "")
        latest: dict[str, Any] = self._monitor.notify_started(node, job)
        self._open = True
        try:
            known = latest.get(self._kind.value)
            if known is not None and self._step <= known:
                raise StepRegression(self._storage.url_for(self._kind.pointer), known, self._step)
            refuse_if_committed(self._storage, self._step, self._kind)
            epoch = latest.get("writer_epoch")
            refuse_if_fenced(self._storage, epoch)
        except BaseException as exc:
            self.fail(exc)
            raise
        self._admission = Admission(self._step, self._kind, epoch)
        return self._admission

    def commit(self, records: list[FileRecord]) -> None:
        """Every rank's part is durable: register the save, report its files, ask for the
        commit. With an in-process monitor the commit happens in this call."""
        if self._admission is None:
            raise RuntimeError("StepReport.commit before admit")
        is_state_dict = self._kind is Kind.STATE_DICT
        counts = {
            "state_dict_thread_count": 1 if is_state_dict else 0,
            "checkpoint_thread_count": 0 if is_state_dict else 1,
        }
        epoch = self._admission.writer_epoch
        self._open = False
        self._monitor.notify_finished(
            self._step, is_state_dict, name=SAVE_NAME, files=records, writer_epoch=epoch
        )
        now = self._monitor.register(self._step, is_state_dict, counts, 1)
        if epoch is not None and isinstance(now, int) and now != epoch:
            raise MonitorRestarted(self._step, epoch, now)

    def fail(self, error: BaseException) -> None:
        """Report the save as failed (once): the step's kind is never committed."""
        if not self._open:
            return
        self._open = False
        described = redact(f"{type(error).__name__}: {error}")
        try:
            self._monitor.notify_failed(
                self._step,
                self._kind is Kind.STATE_DICT,
                name=SAVE_NAME,
                error=described,
                started=True,
            )
        except Exception as report_exc:  # the monitor is gone; the caller still sees the error
            logger.error("could not report failed DCP save of step %d: %s", self._step, report_exc)
