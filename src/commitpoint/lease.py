"""The writer lease: one committing monitor per checkpoint root.

A monitor takes the lease when it starts by incrementing the epoch object under the root's hidden
folder (compare-and-swap). Before each commit it checks that the epoch is still its own; once a
newer monitor (a restarted job) has taken the lease, the older one's commits raise
:class:`WriterFenced`. The check and the pointer write are two operations, so a zombie that passed
the check an instant before the takeover can land at most that one in-flight commit, and the
pointer's own compare-and-swap still keeps it monotonic.
"""

from __future__ import annotations

import logging
import random
import time

from commitpoint.errors import StorageError, WriterFenced
from commitpoint.layout import WRITER_EPOCH
from commitpoint.pointer import bump_counter
from commitpoint.storage.protocol import StorageBackend

logger = logging.getLogger(__name__)


class WriterLease:
    """The epoch this writer holds on ``storage``'s root."""

    def __init__(self, storage: StorageBackend, attempts: int = 4) -> None:
        """A transient storage error while taking the lease is retried: an increment that landed
        but was reported as failed only skips an epoch number."""
        self._storage = storage
        for attempt in range(1, attempts + 1):
            try:
                self.epoch = bump_counter(storage, WRITER_EPOCH)
                break
            except StorageError as exc:
                if attempt == attempts:
                    raise
                logger.warning("taking the writer lease failed (try %d): %s", attempt, exc)
                time.sleep(0.05 * 2**attempt * random.random())
        logger.info("took writer epoch %d of %s", self.epoch, storage.url)

    def current_epoch(self) -> int | None:
        return self._storage.read_pointer(WRITER_EPOCH).value

    def check(self) -> None:
        """Raise :class:`WriterFenced` if a newer writer has taken the lease."""
        current = self.current_epoch()
        if current != self.epoch:
            raise WriterFenced(self._storage.url, self.epoch, current)
