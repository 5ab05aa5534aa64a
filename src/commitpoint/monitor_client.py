"""One calling convention for a monitor, whether it is an in-process object or a Ray actor."""

from __future__ import annotations

import asyncio
from typing import Any

from commitpoint.errors import InvalidArgument
from commitpoint.monitor import CheckpointMonitor


class MonitorClient:
    """Calls monitor methods synchronously or from an event loop, in-process or over Ray."""

    def __init__(self, monitor: Any) -> None:
        if isinstance(monitor, CheckpointMonitor):
            self._local: CheckpointMonitor | None = monitor
        elif hasattr(getattr(monitor, "notify_finished", None), "remote"):
            self._local = None
        else:
            raise InvalidArgument(
                "checkpoint_monitor must be a CheckpointMonitor or the Ray actor handle from "
                f"CheckpointMonitor.get_actor(), got {type(monitor).__name__}"
            )
        self._monitor = monitor

    @property
    def is_remote(self) -> bool:
        return self._local is None

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self._local is not None:
            return getattr(self._local, method)(*args, **kwargs)
        import ray

        return ray.get(getattr(self._monitor, method).remote(*args, **kwargs))

    async def acall(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self._local is not None:
            return await asyncio.to_thread(getattr(self._local, method), *args, **kwargs)
        return await getattr(self._monitor, method).remote(*args, **kwargs)
