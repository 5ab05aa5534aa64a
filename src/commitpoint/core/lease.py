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
from collections.abc import Iterable

from commitpoint.core.layout import WRITER_EPOCH
from commitpoint.core.pointer import bump_counter, rewrite_pointer
from commitpoint.core.retry import RetryPolicy, retry
from commitpoint.errors import (
    StorageError,
    StorageNotFound,
    StoragePermissionError,
    WriterFenced,
)
from commitpoint.storage.protocol import StorageBackend

logger = logging.getLogger(__name__)


LEASE_RETRY = RetryPolicy(attempts=4, base_delay=0.1, max_delay=1.0, full_jitter=True)
"""Transient storage errors while taking the lease are retried: an increment that landed but was
reported as failed only skips an epoch number, and a seal only rewrites a value that is there."""


def _worth_retrying(exc: BaseException) -> bool:
    """A storage error may pass; a missing bucket or a refusal of the credentials will not."""
    return isinstance(exc, StorageError) and not isinstance(
        exc, StoragePermissionError | StorageNotFound
    )


class WriterLease:
    """The epoch this writer holds on ``storage``'s root."""

    def __init__(
        self, storage: StorageBackend, seal: Iterable[str] = (), policy: RetryPolicy = LEASE_RETRY
    ) -> None:
        """Take the lease, then seal the pointers named in ``seal`` (see the module docstring)."""
        self._storage = storage
        self.epoch = retry(
            functools.partial(bump_counter, storage, WRITER_EPOCH),
            policy,
            retry_on=_worth_retrying,
            what=f"taking the writer lease of {storage.url}",
        )
        for name in seal:
            retry(
                functools.partial(rewrite_pointer, storage, name),
                policy,
                retry_on=_worth_retrying,
                what=f"sealing {storage.url_for(name)}",
            )
        logger.info("took writer epoch %d of %s", self.epoch, storage.url)

    def current_epoch(self) -> int | None:
        return self._storage.read_pointer(WRITER_EPOCH).value

    def check(self) -> None:
        """Raise :class:`WriterFenced` if a newer writer has taken the lease."""
        current = self.current_epoch()
        if current != self.epoch:
            raise WriterFenced(self._storage.url, self.epoch, current)
