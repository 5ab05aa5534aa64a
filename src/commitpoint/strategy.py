"""How many saves may write at the same time, cluster-wide."""

from __future__ import annotations

import enum


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
