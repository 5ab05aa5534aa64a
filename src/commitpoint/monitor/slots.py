"""How many saves may write at the same time, cluster-wide."""

from __future__ import annotations

import enum
import itertools
import threading

from commitpoint.errors import SlotTimeout


class SaveStrategy(str, enum.Enum):
    """Concurrency limit the monitor enforces through ``notify_started``.

    - ``SINGLE_THREAD``: one save at a time in the whole job.
    - ``SINGLE_PROCESS``: saves of one process at a time (any number of its threads).
    - ``SINGLE_NODE``: saves of one node at a time (any number of its processes).
    - ``UNRESTRICTED``: no limit.

    Limiting saves protects a shared disk or network link from many writers at once; it never
    changes what is committed.
    """

    SINGLE_THREAD = "single_thread"
    SINGLE_PROCESS = "single_process"
    SINGLE_NODE = "single_node"
    UNRESTRICTED = "unrestricted"


class SlotScheduler:
    """Hands out the save slot per the strategy: ``acquire`` blocks while another writer has it.

    Owners are compared by what the strategy limits: a fresh token per save (``SINGLE_THREAD``),
    (node, job) (``SINGLE_PROCESS``), the node (``SINGLE_NODE``). Any number of saves of the
    owner share the slot; it is free again once all of them released it.
    """

    def __init__(self, strategy: SaveStrategy) -> None:
        self.strategy = strategy
        self._lock = threading.Condition()
        self._owner: object = None
        self._users = 0
        self._thread_ids = itertools.count(1)

    def acquire(self, node_id: str, job_id: str, timeout: float | None = None) -> None:
        """Take the slot for a save of this node/process; raise :class:`SlotTimeout` if it is
        not free within ``timeout`` seconds."""
        if self.strategy is SaveStrategy.UNRESTRICTED:
            return
        if self.strategy is SaveStrategy.SINGLE_THREAD:
            owner: object = next(self._thread_ids)
        elif self.strategy is SaveStrategy.SINGLE_PROCESS:
            owner = (node_id, job_id)
        else:
            owner = node_id
        with self._lock:
            if not self._lock.wait_for(lambda: self._users == 0 or self._owner == owner, timeout):
                raise SlotTimeout(self.strategy.value, timeout)
            self._owner = owner
            self._users += 1

    def release(self) -> None:
        """One save of the owner ended (finished or failed)."""
        with self._lock:
            if self._users > 0:
                self._users -= 1
                self._lock.notify_all()
