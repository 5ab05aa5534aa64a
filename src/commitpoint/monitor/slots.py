"""How many saves may write at the same time, cluster-wide."""

from __future__ import annotations

import enum
import itertools
import threading

from commitpoint.errors import InvalidArgument, SlotTimeout


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

    @classmethod
    def parse(cls, value: object) -> SaveStrategy:
        """``value`` as a strategy: any enum or string whose name or value matches one,
        case-insensitively (Trinity-RFT's own ``SaveStrategy``, ``"SINGLE_THREAD"``...)."""
        candidates: list[object] = [value]
        if isinstance(value, enum.Enum):
            candidates = [value.value, value.name]
        for candidate in candidates:
            if isinstance(candidate, str):
                key = candidate.strip().lower()
                for strategy in cls:
                    if key in (strategy.value, strategy.name.lower()):
                        return strategy
        raise InvalidArgument(
            f"save_strategy must be one of {[s.value for s in cls]} (name or value, any case), "
            f"got {value!r}"
        )


class SlotScheduler:
    """Hands out the save slot per the strategy: ``acquire`` blocks while another writer has it.

    Owners are compared by what the strategy limits: a fresh token per save (``SINGLE_THREAD``),
    (node, job) (``SINGLE_PROCESS``; under Ray the coordinator's job is the Ray job, as in
    Trinity-RFT), the node (``SINGLE_NODE``). Any number of saves of the
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
