"""The file records a backend keeps between a tracked write and the save that reports it.

A tracked write's :class:`~commitpoint.storage.protocol.FileRecord` (size and checksum counted
on the way) is kept here once the file is durable; the coordinator takes the records of a step's
folder when its save finishes and sends them with the notification. One :class:`FileRecords`
belongs to one backend; a wrapper shares its inner backend's, so records are never duplicated.
"""

from __future__ import annotations

import threading

from commitpoint.core.layout import safe_relpath
from commitpoint.storage.protocol import FileRecord


class FileRecords:
    """Records of durable tracked writes by path, until :meth:`take` collects them (thread-safe)."""

    def __init__(self) -> None:
        self._records: dict[str, FileRecord] = {}
        self._lock = threading.Lock()

    def keep(self, record: FileRecord) -> None:
        """Keep ``record``, replacing an earlier one of the same path."""
        with self._lock:
            self._records[record.path] = record

    def take(self, prefix: str) -> list[FileRecord]:
        """Remove and return the records of files below folder ``prefix``, sorted by path."""
        prefix = safe_relpath(prefix) + "/"
        with self._lock:
            taken = [r for p, r in self._records.items() if p.startswith(prefix)]
            for record in taken:
                del self._records[record.path]
        return sorted(taken, key=lambda r: r.path)
