"""CheckpointCoordinator: the one entry point for code that saves checkpoints.

``save_async`` starts the save in a named background thread and returns at once; the thread asks
the monitor for a save slot (per the save strategy), runs the save function, and reports the
outcome with the records of every file written through :attr:`CheckpointCoordinator.storage`.
A failure is logged at once and re-raised by :meth:`wait_all`; it never blocks other saves.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from commitpoint.errors import InvalidArgument, SaveFailed, StepRegression
from commitpoint.layout import Kind, check_name, check_step, step_dir
from commitpoint.monitor_client import MonitorClient
from commitpoint.storage.protocol import StorageBackend
from commitpoint.storage.registry import open_storage

logger = logging.getLogger(__name__)

SaveFn = Callable[[], object]


def _default_node_id() -> str:
    try:
        import ray

        if ray.is_initialized():
            return str(ray.get_runtime_context().get_node_id())
    except ImportError:
        pass
    return socket.gethostname()


def _check_save_fn(save_fn: object) -> SaveFn:
    if not callable(save_fn):
        raise InvalidArgument(f"save_fn must be a zero-argument callable, got {save_fn!r}")
    return save_fn


class CheckpointCoordinator:
    """Runs saves in the background and reports them to a :class:`CheckpointMonitor`.

    ``checkpoint_monitor`` is an in-process monitor or the actor handle returned by
    :meth:`CheckpointMonitor.get_actor`.
    """

    def __init__(
        self,
        checkpoint_monitor: Any,
        *,
        node_id: str | None = None,
        job_id: str | None = None,
    ) -> None:
        self._monitor = MonitorClient(checkpoint_monitor)
        url, options = self._monitor.call("storage_config")
        self._storage = open_storage(url, **options)
        self._node_id = node_id or _default_node_id()
        self._job_id = job_id or str(os.getpid())
        self._threads: dict[str, threading.Thread] = {}
        self._failures: list[SaveFailed] = []
        self._lock = threading.Lock()

    @property
    def storage(self) -> StorageBackend:
        """The backend save functions write through, so their files are checksummed."""
        return self._storage

    @property
    def monitor(self) -> Any:
        return self._monitor

    def step_dir(self, global_step: int) -> str:
        """Folder (relative to the root) where the files of ``global_step`` go."""
        return step_dir(global_step)

    # -- saving -------------------------------------------------------------------------------
    def save_async(
        self, name: str, save_fn: SaveFn, global_step: int, is_state_dict: bool = False
    ) -> threading.Thread:
        """Run ``save_fn`` in the background thread ``name``; an earlier save of that name is
        joined first, so saves sharing a name never overlap."""
        check_name(name)
        _check_save_fn(save_fn)
        check_step(global_step)
        with self._lock:
            previous = self._threads.pop(name, None)
        if previous is not None:
            previous.join()
        thread = threading.Thread(
            target=self._run,
            args=(name, save_fn, global_step, bool(is_state_dict)),
            name=f"commitpoint-save-{name}",
            daemon=True,
        )
        with self._lock:
            self._threads[name] = thread
        thread.start()
        return thread

    def save_sync(self, save_fn: SaveFn, global_step: int, is_state_dict: bool = False) -> None:
        """Run ``save_fn`` now, in this thread; raise :class:`SaveFailed` if it fails."""
        _check_save_fn(save_fn)
        check_step(global_step)
        failure = self._run_save("sync", save_fn, global_step, bool(is_state_dict))
        if failure is not None:
            raise failure

    def _run(self, name: str, save_fn: SaveFn, step: int, is_state_dict: bool) -> None:
        failure = self._run_save(name, save_fn, step, is_state_dict)
        if failure is not None:
            with self._lock:
                self._failures.append(failure)

    def _run_save(
        self, name: str, save_fn: SaveFn, step: int, is_state_dict: bool
    ) -> SaveFailed | None:
        started = False
        try:
            latest = self._monitor.call("notify_started", self._node_id, self._job_id)
            started = True
            self._refuse_committed_step(step, is_state_dict, latest)
            save_fn()
            records = self._storage.take_records(step_dir(step))
            self._monitor.call("notify_finished", step, is_state_dict, name=name, files=records)
            return None
        except BaseException as exc:  # every failure must reach wait_all
            self._storage.take_records(step_dir(step))
            logger.error("save %r of step %d failed: %s: %s", name, step, type(exc).__name__, exc)
            try:
                self._monitor.call(
                    "notify_failed",
                    step,
                    is_state_dict,
                    name=name,
                    error=f"{type(exc).__name__}: {exc}",
                    started=started,
                )
            except Exception as report_exc:  # the monitor itself is gone; still fail loudly
                logger.error("could not report failed save %r to the monitor: %s", name, report_exc)
            return SaveFailed(step, name, exc)

    def _refuse_committed_step(
        self, step: int, is_state_dict: bool, latest_steps: dict[str, int | None]
    ) -> None:
        """Never write into a step a pointer already names: its files are committed.

        This happens after resuming from an older checkpoint while the state-dict pointer is
        ahead of it; rewind the pointer first (``commitpoint rewind``) to re-train those steps.
        """
        kind = Kind.of(is_state_dict)
        latest = latest_steps[kind.value]
        if latest is not None and step <= latest:
            raise StepRegression(self._storage.url_for(kind.pointer), latest, step)

    def wait_all(self, timeout: float | None = None) -> None:
        """Wait for every background save; raise :class:`SaveFailed` if any of them failed.

        Each failure is raised once: a later ``wait_all`` starts with a clean slate.
        """
        with self._lock:
            threads = list(self._threads.values())
        for thread in threads:
            thread.join(timeout)
        with self._lock:
            for name, thread in list(self._threads.items()):
                if not thread.is_alive():
                    del self._threads[name]
            failures, self._failures = self._failures, []
        if failures:
            first = failures[0]
            first.failures = failures
            raise first

    def pending(self) -> list[str]:
        """Names of background saves still running."""
        with self._lock:
            return [n for n, t in self._threads.items() if t.is_alive()]

    # -- registration -------------------------------------------------------------------------
    async def register_and_monitor(
        self,
        global_step: int,
        is_state_dict: bool = False,
        state_dict_thread_count: int = 0,
        checkpoint_thread_count: int = 0,
        *,
        participants: int = 1,
    ) -> None:
        """Tell the monitor how many saves ``global_step`` has, and to commit it when done."""
        for method, args, kwargs in self._registration(
            global_step,
            is_state_dict,
            state_dict_thread_count,
            checkpoint_thread_count,
            participants,
        ):
            await self._monitor.acall(method, *args, **kwargs)

    def register_and_monitor_sync(
        self,
        global_step: int,
        is_state_dict: bool = False,
        state_dict_thread_count: int = 0,
        checkpoint_thread_count: int = 0,
        *,
        participants: int = 1,
    ) -> None:
        """:meth:`register_and_monitor` for callers without an event loop."""
        for method, args, kwargs in self._registration(
            global_step,
            is_state_dict,
            state_dict_thread_count,
            checkpoint_thread_count,
            participants,
        ):
            self._monitor.call(method, *args, **kwargs)

    @staticmethod
    def _registration(
        step: int, is_state_dict: bool, state_dicts: int, checkpoints: int, participants: int
    ) -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
        """The two monitor calls of a registration, after checking every argument."""
        check_step(step)
        counts = {
            "state_dict_thread_count": check_step(state_dicts, "state_dict_thread_count"),
            "checkpoint_thread_count": check_step(checkpoints, "checkpoint_thread_count"),
        }
        if check_step(participants, "participants") < 1:
            raise InvalidArgument("participants must be at least 1")
        return [
            ("register_thread_count", (step,), counts),
            ("monitor_step", (step, bool(is_state_dict), participants), {}),
        ]

    def latest_steps(self) -> dict[str, int | None]:
        """Latest committed steps as the monitor knows them."""
        result: dict[str, int | None] = self._monitor.call("latest_steps")
        return result

    def __enter__(self) -> CheckpointCoordinator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.wait_all()
