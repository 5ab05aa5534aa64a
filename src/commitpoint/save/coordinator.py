"""CheckpointCoordinator: the one entry point for code that saves checkpoints.

``save_async`` starts the save in a named background thread and returns at once; the thread asks
the monitor for a save slot (per the save strategy), runs the save function, and reports the
outcome with the records of every file written through :attr:`CheckpointCoordinator.storage`.
A failure is logged at once and re-raised by :meth:`wait_all`; it never blocks other saves.

``stage`` + ``save_staged_async`` do the same for live tensors: the snapshot is copied in the
background (:mod:`commitpoint.save.staging`), and the save thread waits for it, writes it and
gives its buffers back; a failed copy fails the save like any other error.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

from commitpoint.core.layout import (
    WRITER_EPOCH,
    Kind,
    check_name,
    check_step,
    step_dir,
    step_of_path,
)
from commitpoint.core.manifest import read_manifest_for
from commitpoint.errors import (
    InvalidArgument,
    MonitorRestarted,
    SaveFailed,
    StepRegression,
    WriterFenced,
    redact,
)
from commitpoint.monitor.transport import MonitorClient
from commitpoint.save.staging import StagedStateDict, Stager, StagingOptions
from commitpoint.storage.protocol import StorageBackend
from commitpoint.storage.registry import open_storage

logger = logging.getLogger(__name__)

SaveFn = Callable[[], object]
TRACKED_STEP_EPOCHS = 1024
"""Recent steps whose monitor epoch is remembered, to notice a monitor restart mid-step."""
StagedSaveFn = Callable[[dict[str, Any]], object]


def _default_node_id() -> str:
    try:
        import ray

        if ray.is_initialized():
            return str(ray.get_runtime_context().get_node_id())
    except ImportError:
        pass
    return socket.gethostname()


def _default_job_id() -> str:
    """Who a "process" is for ``SINGLE_PROCESS``: under Ray the Ray job, as Trinity-RFT's monitor
    has it (every worker of one job on one node shares the slot); else this process."""
    try:
        import ray

        if ray.is_initialized():
            return str(ray.get_runtime_context().get_job_id())
    except ImportError:
        pass
    return str(os.getpid())


def _process_group_size() -> int:
    """Ranks of the torch.distributed group this process is in (1 if none)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return 1
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return int(dist.get_world_size())


def _check_save_fn(save_fn: object) -> SaveFn:
    if not callable(save_fn):
        raise InvalidArgument(f"save_fn must be a zero-argument callable, got {save_fn!r}")
    return save_fn


class CheckpointCoordinator:
    """Runs saves in the background and reports them to a :class:`CheckpointMonitor`.

    ``checkpoint_monitor`` is an in-process monitor or the actor handle returned by
    :meth:`CheckpointMonitor.get_actor`. ``staging`` configures the :class:`Stager` behind
    :meth:`stage` (made on first use).
    """

    def __init__(
        self,
        checkpoint_monitor: Any,
        *,
        node_id: str | None = None,
        job_id: str | None = None,
        staging: StagingOptions | None = None,
    ) -> None:
        self._monitor = MonitorClient(checkpoint_monitor)
        url, options = self._monitor.storage_config()
        self._storage = open_storage(url, **options)
        self._writer_epoch: int | None = None
        self._saving = threading.local()  # epoch and kind of the save this thread runs
        self._step_epochs: dict[int, int] = {}
        self._storage.set_publish_guard(self._guard_publish)
        self._node_id = node_id or _default_node_id()
        self._job_id = job_id or _default_job_id()
        self._threads: dict[str, threading.Thread] = {}
        self._failures: list[SaveFailed] = []
        self._lock = threading.Lock()
        self._staging_options = staging
        self._stager: Stager | None = None

    @property
    def storage(self) -> StorageBackend:
        """The backend save functions write through, so their files are checksummed."""
        return self._storage

    @property
    def monitor(self) -> MonitorClient:
        """The client this coordinator reaches its monitor through."""
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
        return self._start(name, save_fn, global_step, bool(is_state_dict), None)

    def _start(
        self,
        name: str,
        save_fn: SaveFn,
        step: int,
        is_state_dict: bool,
        cleanup: Callable[[], None] | None,
    ) -> threading.Thread:
        with self._lock:
            previous = self._threads.pop(name, None)
        if previous is not None:
            previous.join()
        # The new thread waits for ``go`` before it does anything: otherwise it takes the GIL the
        # moment it starts and the training loop, blocked in ``start()``, waits up to a whole
        # switch interval (5 ms) to get it back. Once ``go`` is set the caller returns first.
        go = threading.Event()
        thread = threading.Thread(
            target=self._run,
            args=(name, save_fn, step, is_state_dict, cleanup, go),
            name=f"commitpoint-save-{name}",
            daemon=True,
        )
        with self._lock:
            self._threads[name] = thread
        thread.start()
        go.set()
        return thread

    # -- staging ------------------------------------------------------------------------------
    @property
    def stager(self) -> Stager:
        """The :class:`Stager` behind :meth:`stage` (its ``stats`` show buffer reuse)."""
        with self._lock:
            if self._stager is None:
                self._stager = Stager(self._staging_options)
            return self._stager

    def stage(
        self, state_dict: Mapping[str, Any], *, timeout: float | None = None
    ) -> StagedStateDict:
        """Snapshot ``state_dict`` in the background; see :meth:`Stager.stage`.

        Call ``wait()`` on the result before the next ``optimizer.step()``, and hand it to
        :meth:`save_staged_async`.
        """
        return self.stager.stage(state_dict, timeout=timeout)

    def save_staged_async(
        self,
        name: str,
        staged: StagedStateDict,
        save_fn: StagedSaveFn,
        global_step: int,
        is_state_dict: bool = False,
    ) -> threading.Thread:
        """:meth:`save_async` of ``save_fn(staged.state_dict())``; the save owns ``staged``.

        The thread waits for the copy, runs the save, and releases the buffers whatever happens;
        a failed copy fails the save (:class:`SaveFailed` from :meth:`wait_all`, step not
        committed).
        """
        check_name(name)
        if not callable(save_fn):
            raise InvalidArgument(f"save_fn must take the staged state dict, got {save_fn!r}")
        check_step(global_step)
        if not isinstance(staged, StagedStateDict):
            raise InvalidArgument(f"staged must come from stage(), got {type(staged).__name__}")
        release = staged._hand_over()
        try:
            return self._start(
                name,
                lambda: save_fn(staged.state_dict()),
                global_step,
                bool(is_state_dict),
                release,
            )
        except BaseException:
            release()
            raise

    def save_sync(self, save_fn: SaveFn, global_step: int, is_state_dict: bool = False) -> None:
        """Run ``save_fn`` now, in this thread.

        A failure raises a :class:`SaveFailed` that is also an instance of the save function's
        own exception type (:meth:`SaveFailed.like_cause`): code written to catch that type keeps
        working, and ``step``, ``name`` and ``cause`` are attached.

        A re-save of a committed step is skipped as in :meth:`save_async`, except in a
        torch.distributed group of several ranks: the function may hold collectives that the
        other ranks wait in, so it runs, after the pointers naming the step were moved back.
        """
        _check_save_fn(save_fn)
        check_step(global_step)
        ranks = _process_group_size()
        failure = self._run_save("sync", save_fn, global_step, bool(is_state_dict), ranks)
        if failure is not None:
            raise SaveFailed.like_cause(
                failure.step, failure.name, failure.cause
            ) from failure.cause

    def _run(
        self,
        name: str,
        save_fn: SaveFn,
        step: int,
        is_state_dict: bool,
        cleanup: Callable[[], None] | None,
        go: threading.Event,
    ) -> None:
        go.wait()
        try:
            failure = self._run_save(name, save_fn, step, is_state_dict)
        finally:
            if cleanup is not None:
                cleanup()
        if failure is not None:
            with self._lock:
                self._failures.append(failure)

    def _run_save(
        self, name: str, save_fn: SaveFn, step: int, is_state_dict: bool, ranks: int = 1
    ) -> SaveFailed | None:
        started = False
        try:
            latest = self._monitor.notify_started(
                self._node_id,
                self._job_id,
                step=step,
                is_state_dict=is_state_dict,
                name=name,
                must_run=ranks > 1,
            )
            started = True
            if not self._admitted(name, step, latest, ranks):
                return None
            self._writer_epoch = self._saving.epoch = latest.get("writer_epoch")
            self._saving.kind = Kind.of(is_state_dict)
            self._refuse_if_fenced()
            try:
                save_fn()
            finally:
                self._saving.kind = self._saving.epoch = None
            records = self._storage.records.take(step_dir(step))
            self._monitor.notify_finished(
                step,
                is_state_dict,
                name=name,
                files=records,
                writer_epoch=self._writer_epoch_of(step, latest.get("writer_epoch")),
            )
            return None
        except BaseException as exc:  # every failure must reach wait_all
            self._storage.records.take(step_dir(step))
            described = redact(f"{type(exc).__name__}: {exc}")
            logger.error("save %r of step %d failed: %s", name, step, described)
            try:
                self._monitor.notify_failed(
                    step,
                    is_state_dict,
                    name=name,
                    error=described,
                    started=started,
                )
            except Exception as report_exc:  # the monitor itself is gone; still fail loudly
                logger.error("could not report failed save %r to the monitor: %s", name, report_exc)
            return SaveFailed(step, name, exc)

    @staticmethod
    def _admitted(name: str, step: int, reply: dict[str, Any], ranks: int) -> bool:
        """Act on the monitor's answer (:mod:`commitpoint.monitor.reopen`): False for a
        committed re-save (not run), raise for a step below a pointer (nothing written), True to
        run (pointers naming the step were moved back if it is being rewritten)."""
        action, reason = reply.get("action", "run"), reply.get("reason", "")
        if action == "skip":
            logger.info("save %r of step %d not run: %s", name, step, reason)
            return False
        if action == "refuse":
            raise StepRegression(str(reply["pointer"]), int(reply["current"]), step)
        if reason and ranks > 1:
            logger.info(
                "save %r of step %d runs although the step is committed: this process is one of "
                "%d ranks of a torch.distributed process group whose collectives the save may "
                "hold; the pointers naming the step were moved back first (%s)",
                name,
                step,
                ranks,
                reason,
            )
        elif reason:
            logger.info("save %r of step %d: %s; its pointers were moved back", name, step, reason)
        return True

    def _writer_epoch_of(self, step: int, epoch: int | None) -> int | None:
        """The monitor epoch the first save or registration of ``step`` here saw."""
        if epoch is None:
            return None
        with self._lock:
            first = self._step_epochs.setdefault(step, epoch)
            while len(self._step_epochs) > TRACKED_STEP_EPOCHS:
                del self._step_epochs[min(self._step_epochs)]
        return first

    def _check_epoch(self, step: int, epoch: object) -> None:
        """Fail a registration that reached a restarted monitor after saves of its step
        reported to the one before: the restarted monitor will never commit that step."""
        if not isinstance(epoch, int):
            return
        first = self._writer_epoch_of(step, epoch)
        if first is not None and first != epoch:
            raise MonitorRestarted(step, first, epoch)

    def _refuse_if_fenced(self) -> None:
        """Never write for a monitor that a newer one has fenced (a zombie of a restarted job):
        its files could replace files of steps the new job commits."""
        expected = getattr(self._saving, "epoch", None) or self._writer_epoch
        if expected is None:
            return
        current = self._storage.read_pointer(WRITER_EPOCH).value
        if current != expected:
            raise WriterFenced(self._storage.url, expected, current)

    def _guard_publish(self, relpath: str) -> None:
        """Run right before a file written through :attr:`storage` becomes visible: refuse if
        this writer was fenced, or if the file's step is already committed (by anyone) for the
        kind being saved, so a committed file is never replaced."""
        self._refuse_if_fenced()
        kind: Kind | None = getattr(self._saving, "kind", None)
        target = step_of_path(relpath)
        if kind is None or target is None:
            return
        current = self._storage.read_pointer(kind.pointer).value
        if current is None or target > current:
            return
        # A pointer at or above the step and the step's manifest: its files are committed. (A late
        # step below the pointer without a manifest is not, and may still finish; nor is a step
        # the monitor reopened for this save, whose manifest it dropped before the save ran.)
        if read_manifest_for(self._storage, target, kind) is not None:
            raise StepRegression(self._storage.url_for(kind.pointer), current, target)

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
        counts = self._registration(
            global_step, state_dict_thread_count, checkpoint_thread_count, participants
        )
        epoch = await self._monitor.aregister(
            global_step, bool(is_state_dict), counts, participants
        )
        self._check_epoch(global_step, epoch)

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
        counts = self._registration(
            global_step, state_dict_thread_count, checkpoint_thread_count, participants
        )
        epoch = self._monitor.register(global_step, bool(is_state_dict), counts, participants)
        self._check_epoch(global_step, epoch)

    @staticmethod
    def _registration(
        step: int, state_dicts: int, checkpoints: int, participants: int
    ) -> dict[str, int]:
        """The counts of a registration, after checking every argument."""
        check_step(step)
        counts = {
            "state_dict_thread_count": check_step(state_dicts, "state_dict_thread_count"),
            "checkpoint_thread_count": check_step(checkpoints, "checkpoint_thread_count"),
        }
        if check_step(participants, "participants") < 1:
            raise InvalidArgument("participants must be at least 1")
        return counts

    def latest_steps(self) -> dict[str, int | None]:
        """Latest committed steps as the monitor knows them."""
        return self._monitor.latest_steps()

    def __enter__(self) -> CheckpointCoordinator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.wait_all()
