"""The writer lease: one committing monitor per checkpoint root.

A monitor takes the lease when it starts by incrementing the epoch object under the root's hidden
folder (compare-and-swap). Before each commit it checks that the epoch is still its own; once a
newer monitor (a restarted job) has taken the lease, the older one's commits raise
:class:`WriterFenced`.

The check and the pointer write are two operations, so a zombie could pass the check an instant
before the takeover. To close that window the new holder then *seals* the pointers: it rewrites
each one with its own value by compare-and-swap, which gives it a new version token. A zombie that
read a pointer before the seal fails its conditional write, re-reads, checks the lease again and
is fenced; one that reads after the seal checks the lease after the takeover and is fenced too.
(On S3 the token is the ETag, a hash of the bytes, so rewriting the same value keeps it: there a
commit already past its check at the takeover can still land, monotonic as always.)
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from commitpoint.errors import CommitConflict, StorageError, WriterFenced
from commitpoint.layout import WRITER_EPOCH
from commitpoint.pointer import MAX_ATTEMPTS, bump_counter
from commitpoint.storage.protocol import StorageBackend

logger = logging.getLogger(__name__)
T = TypeVar("T")


class WriterLease:
    """The epoch this writer holds on ``storage``'s root."""

    def __init__(
        self, storage: StorageBackend, seal: Iterable[str] = (), attempts: int = 4
    ) -> None:
        """Take the lease, then seal the pointers named in ``seal`` (see the module docstring).

        A transient storage error is retried: an increment that landed but was reported as
        failed only skips an epoch number, and a seal only rewrites a value that is there.
        """
        self._storage = storage
        self.epoch = self._retried(lambda: bump_counter(storage, WRITER_EPOCH), attempts)
        for name in seal:
            self._retried(functools.partial(self._seal, name), attempts)
        logger.info("took writer epoch %d of %s", self.epoch, storage.url)

    @staticmethod
    def _retried(operation: Callable[[], T], attempts: int) -> T:
        for attempt in range(1, attempts + 1):
            try:
                return operation()
            except StorageError as exc:
                if attempt == attempts:
                    raise
                logger.warning("taking the writer lease failed (try %d): %s", attempt, exc)
                time.sleep(0.05 * 2**attempt * random.random())
        raise AssertionError("unreachable")

    def _seal(self, name: str) -> None:
        """Rewrite pointer ``name`` with its own value, giving it a new version token."""
        for _ in range(MAX_ATTEMPTS):
            state = self._storage.read_pointer(name)
            if state.value is None:
                return
            try:
                self._storage.write_pointer_if(name, state.value, state.token)
                return
            except CommitConflict:
                continue  # a commit landed meanwhile: seal what is there now
        raise CommitConflict(self._storage.url_for(name), "could not seal the pointer")

    def current_epoch(self) -> int | None:
        return self._storage.read_pointer(WRITER_EPOCH).value

    def check(self) -> None:
        """Raise :class:`WriterFenced` if a newer writer has taken the lease."""
        current = self.current_epoch()
        if current != self.epoch:
            raise WriterFenced(self._storage.url, self.epoch, current)
