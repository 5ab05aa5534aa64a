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

import atexit
import contextlib
import logging
import os
import socket
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from commitpoint.core.layout import (
    WRITER_EPOCH,
    Kind,
    check_name,
    check_seconds,
    check_step,
    step_dir,
    step_of_path,
)
from commitpoint.core.manifest import read_manifest_for
from commitpoint.errors import (
    DuplicateWrite,
    InvalidArgument,
    MonitorRestarted,
    SaveFailed,
    SaveQueueFull,
    StepRegression,
    WriterFenced,
    describe_exception,
    safe_repr,
)
from commitpoint.monitor.transport import MonitorClient
from commitpoint.save.staging import StagedStateDict, Stager, StagingOptions
from commitpoint.storage.protocol import FileRecord, StorageBackend
from commitpoint.storage.registry import open_storage

logger = logging.getLogger(__name__)

SaveFn = Callable[[], object]
TRACKED_STEP_EPOCHS = 1024
"""Recent steps whose monitor epoch is remembered, to notice a monitor restart mid-step."""
StagedSaveFn = Callable[[dict[str, Any]], object]
DEFAULT_MAX_QUEUED = 1
"""Saves of one name that ``save_async(..., block=False)`` queues behind the running one."""
DEFAULT_EXIT_TIMEOUT = 300.0
"""Seconds a process that ends waits for its saves still in flight (and their commits)."""
EXIT_SAVES_LOST = 70
"""Exit status of a process that ended with saves it could not finish (EX_SOFTWARE)."""
CLAIMS_KEPT = 65536
"""Files whose writing save this process remembers, to refuse a second save writing one."""


@dataclass(eq=False)
class _Save:
    """One save_async call: its thread, and the save of the same name it waits for."""

    name: str
    step: int
    previous: _Save | None
    done: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    @property
    def waiting(self) -> bool:
        """Queued behind an earlier save of the name that has not finished yet."""
        return self.previous is not None and not self.previous.done.is_set()


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
        raise InvalidArgument(f"save_fn must be a zero-argument callable, got {safe_repr(save_fn)}")
    return save_fn


def _check_bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{what} must be a bool, got {safe_repr(value)}")
    return value


@dataclass
class _Claim:
    """Which save wrote a file of a step, of which kind, and whether the monitor has its record."""

    name: str
    kind: Kind
    reported: bool = False


class CheckpointCoordinator:
    """Runs saves in the background and reports them to a :class:`CheckpointMonitor`.

    ``checkpoint_monitor`` is an in-process monitor or the actor handle returned by
    :meth:`CheckpointMonitor.get_actor`. ``staging`` configures the :class:`Stager` behind
    :meth:`stage` (made on first use). ``max_queued`` bounds the saves of one name that
    ``save_async(..., block=False)`` queues behind the running one (so at most
    ``max_queued + 1`` snapshots of a name are held). ``exit_timeout`` is how long a process
    that ends waits for saves still in flight and their commits (None: without a bound); saves
    it could not finish are logged as errors and the process exits with status 70.
    """

    def __init__(
        self,
        checkpoint_monitor: Any,
        *,
        node_id: str | None = None,
        job_id: str | None = None,
        staging: StagingOptions | None = None,
        max_queued: int = DEFAULT_MAX_QUEUED,
        exit_timeout: float | None = DEFAULT_EXIT_TIMEOUT,
    ) -> None:
        if isinstance(max_queued, bool) or not isinstance(max_queued, int) or max_queued < 0:
            raise InvalidArgument(f"max_queued must be an int >= 0, got {safe_repr(max_queued)}")
        self._exit_timeout = check_seconds(exit_timeout, "exit_timeout")
        self._max_queued = max_queued
        self._monitor = MonitorClient(checkpoint_monitor)
        url, options = self._monitor.storage_config()
        self._storage = open_storage(url, **options)
        self._writer_epoch: int | None = None
        self._saving = threading.local()  # epoch and kind of the save this thread runs
        self._step_epochs: dict[int, int] = {}
        self._storage.set_publish_guard(self._guard_publish)
        self._node_id = node_id or _default_node_id()
        self._job_id = job_id or _default_job_id()
        self._saves: dict[str, _Save] = {}  # the newest save of each name
        self._live: list[_Save] = []  # every save not yet done, in the order started
        self._failures: list[SaveFailed] = []
        self._claims: OrderedDict[str, _Claim] = OrderedDict()  # file -> the save that wrote it
        self._lock = threading.Lock()
        self._staging_options = staging
        self._stager: Stager | None = None
        _EXIT.track(self)

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
        self,
        name: str,
        save_fn: SaveFn,
        global_step: int,
        is_state_dict: bool = False,
        *,
        block: bool = True,
    ) -> threading.Thread:
        """Run ``save_fn`` in the background thread ``name``; saves sharing a name never overlap
        and run in the order they were asked for, from any number of threads.

        With ``block=True`` (the default) the call first waits for the earlier save of that name
        to finish: on a slow store that is the time of one whole save. With ``block=False`` it
        returns at once and the save is queued behind the earlier one; at most ``max_queued``
        saves of a name wait so (:class:`SaveQueueFull` beyond that), which bounds the memory
        their snapshots hold.
        """
        check_name(name)
        _check_save_fn(save_fn)
        check_step(global_step)
        _check_bool(block, "block")
        return self._start(name, save_fn, global_step, bool(is_state_dict), None, block)

    def _start(
        self,
        name: str,
        save_fn: SaveFn,
        step: int,
        is_state_dict: bool,
        cleanup: Callable[[], None] | None,
        block: bool = True,
    ) -> threading.Thread:
        # The new thread waits for ``go`` before it does anything: otherwise it takes the GIL the
        # moment it starts and the training loop, blocked in ``start()``, waits up to a whole
        # switch interval (5 ms) to get it back. Once ``go`` is set the caller returns first.
        go = threading.Event()
        with self._lock:
            previous = self._saves.get(name)
            if previous is not None and previous.done.is_set():
                previous = None
            if not block and previous is not None:
                # queued = waiting for an earlier save of the name that has not finished
                queued = sum(1 for s in self._live if s.name == name and s.waiting)
                if queued >= self._max_queued:
                    raise SaveQueueFull(name, self._max_queued)
            save = _Save(name, step, previous)
            thread = threading.Thread(
                target=self._run,
                args=(save, save_fn, is_state_dict, cleanup, go),
                name=f"commitpoint-save-{name}",
                daemon=True,  # a process that ends waits for it (bounded) in _ExitGuard
            )
            save.thread = thread
            thread.start()  # started under the lock: every save anyone can see has a thread
            self._saves[name] = save
            self._live.append(save)
        go.set()
        if block and previous is not None:
            previous.done.wait()
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
        if not isinstance(state_dict, Mapping):
            raise InvalidArgument(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        return self.stager.stage(state_dict, timeout=check_seconds(timeout, "timeout"))

    def save_staged_async(
        self,
        name: str,
        staged: StagedStateDict,
        save_fn: StagedSaveFn,
        global_step: int,
        is_state_dict: bool = False,
        *,
        block: bool = True,
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
        _check_bool(block, "block")
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
                block,
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
            if not isinstance(failure.cause, Exception):
                raise failure.cause  # KeyboardInterrupt, SystemExit: reported, then let through
            raise SaveFailed.like_cause(
                failure.step, failure.name, failure.cause
            ) from failure.cause

    def _run(
        self,
        save: _Save,
        save_fn: SaveFn,
        is_state_dict: bool,
        cleanup: Callable[[], None] | None,
        go: threading.Event,
    ) -> None:
        try:
            go.wait()
            if save.previous is not None:
                save.previous.done.wait()  # saves of one name never overlap
            failure = self._run_save(save.name, save_fn, save.step, is_state_dict)
            if failure is not None:
                with self._lock:
                    self._failures.append(failure)
        finally:
            try:
                if cleanup is not None:
                    cleanup()
            finally:
                with self._lock:
                    save.done.set()
                    if save in self._live:
                        self._live.remove(save)
                    save.previous = None  # the chain of finished saves is not kept

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
            self._saving.name = name
            self._refuse_if_fenced()
            try:
                save_fn()
            finally:
                self._saving.kind = self._saving.epoch = self._saving.name = None
            records = self._storage.records.take(step_dir(step))
            # From here the monitor releases the slot itself, whatever notify_finished does
            # (a failed commit must not release it a second time through notify_failed).
            started = False
            self._monitor.notify_finished(
                step,
                is_state_dict,
                name=name,
                files=records,
                writer_epoch=self._writer_epoch_of(step, latest.get("writer_epoch")),
            )
            self._mark_reported(name, records)
            return None
        except BaseException as exc:  # every failure must reach wait_all
            return self._record_failure(name, step, is_state_dict, exc, started)

    def _record_failure(
        self, name: str, step: int, is_state_dict: bool, exc: BaseException, started: bool
    ) -> SaveFailed:
        """Log and report a failed save; this cannot fail, whatever ``exc`` holds."""
        described = describe_exception(exc)
        try:
            self._storage.records.take(step_dir(step))
        except Exception as drop_exc:
            logger.debug("could not drop the records of step %d: %r", step, type(drop_exc))
        logger.error("save %s of step %d failed: %s", safe_repr(name), step, described)
        try:
            self._monitor.notify_failed(
                step,
                is_state_dict,
                name=name,
                error=described,
                started=started,
            )
        except Exception as report_exc:  # the monitor itself is gone; still fail loudly
            logger.error(
                "could not report failed save %s to the monitor: %s",
                safe_repr(name),
                describe_exception(report_exc),
            )
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
        this writer was fenced, if the file's step is already committed (by anyone) for the kind
        being saved, if the file is listed by a committed manifest of the other kind (a full
        checkpoint never replaces its step's committed state dict), or if another save of this
        process already wrote it (:class:`DuplicateWrite`). So a committed file is never
        replaced, and a manifest never records bytes the file no longer holds."""
        self._refuse_if_fenced()
        kind: Kind | None = getattr(self._saving, "kind", None)
        target = step_of_path(relpath)
        if kind is None or target is None:
            return
        for checked in (kind, *(k for k in Kind if k is not kind)):
            current = self._storage.read_pointer(checked.pointer).value
            if current is None or target > current:
                continue
            # A pointer at or above the step and the step's manifest: its files are committed.
            # (A late step below the pointer without a manifest is not, and may still finish;
            # nor is a step the monitor reopened for this save, whose manifest it dropped.)
            manifest = read_manifest_for(self._storage, target, checked)
            if checked is kind:
                if manifest is not None:
                    raise StepRegression(self._storage.url_for(kind.pointer), current, target)
            elif manifest is not None and any(f.path == relpath for f in manifest.files):
                raise StepRegression(self._storage.url_for(checked.pointer), current, target)
        self._claim(relpath, getattr(self._saving, "name", None) or "?", kind)

    def _claim(self, relpath: str, name: str, kind: Kind) -> None:
        """Remember that save ``name`` wrote ``relpath``. Another save may not write it while the
        first has not reported its record: the monitor could then keep either record for bytes
        only one of them describes. Once the first reported, a later save may rewrite the file:
        its record arrives later and replaces the first, so the manifest describes the bytes the
        file holds (a full checkpoint rewriting the weights it published, as Trinity-RFT's
        trainer does)."""
        with self._lock:
            owner = self._claims.get(relpath)
            if owner is not None and owner.name != name and not owner.reported:
                raise DuplicateWrite(self._storage.url_for(relpath), owner.name, name)
            self._claims[relpath] = _Claim(name, kind)
            self._claims.move_to_end(relpath)
            while len(self._claims) > CLAIMS_KEPT:
                self._claims.popitem(last=False)

    def _mark_reported(self, name: str, records: list[FileRecord]) -> None:
        """The monitor holds the records of save ``name``: its files may now be rewritten by a
        save of the other kind."""
        with self._lock:
            for record in records:
                claim = self._claims.get(record.path)
                if claim is not None and claim.name == name:
                    claim.reported = True

    def wait_all(self, timeout: float | None = None) -> None:
        """Wait for every background save asked for so far (also those queued behind another
        of their name); raise :class:`SaveFailed` if any of them failed.

        Each failure is raised once: a later ``wait_all`` starts with a clean slate. With a
        ``timeout`` it returns once that many seconds have passed in total; :meth:`pending`
        then names what still runs.
        """
        timeout = check_seconds(timeout, "timeout")
        self._wait_live(timeout)
        with self._lock:
            failures, self._failures = self._failures, []
        if failures:
            first = failures[0]
            first.failures = failures
            raise first

    def _wait_live(self, timeout: float | None) -> bool:
        """Wait for the saves live now; True when all of them are done."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            live = list(self._live)
        for save in live:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not save.done.wait(remaining):
                return False
        return True

    def pending(self) -> list[str]:
        """Names of background saves still running or queued."""
        with self._lock:
            return list(dict.fromkeys(s.name for s in self._live))

    def _at_exit(self, timeout: float | None) -> list[str]:
        """Wait (bounded) for saves in flight as the process ends; what was lost, described."""
        if self._exit_timeout is not None:
            timeout = self._exit_timeout if timeout is None else min(timeout, self._exit_timeout)
        with self._lock:
            names = [f"{s.name!r} of step {s.step}" for s in self._live]
            earlier = len(self._failures)  # already logged and left to wait_all, not lost here
        if names:
            logger.warning(
                "process ending with %d save(s) in flight: waiting up to %s s for them",
                len(names),
                "an unbounded time" if timeout is None else f"{timeout:g}",
            )
        finished = self._wait_live(timeout)
        with self._lock:
            lost = [f"save {s.name!r} of step {s.step} did not finish" for s in self._live]
            lost += [str(f) for f in self._failures[earlier:]]
        if not finished or lost:
            for line in lost:
                logger.error("commitpoint: lost at exit: %s", line)
        return lost

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


class _ExitGuard:
    """At interpreter exit, waits for every coordinator's saves still in flight (each within
    its ``exit_timeout``) and then, if any was lost (unfinished, or failed with nobody left to
    collect the error), logs it and ends the process with :data:`EXIT_SAVES_LOST`.

    Save threads are daemon threads so a hung store cannot hold the process forever; this hook
    runs before the interpreter stops them. It is registered with the hooks the interpreter
    runs first at exit (``threading._register_atexit``, before ``concurrent.futures`` refuses
    new work and before any ``atexit`` hook such as Ray's shutdown), when the first coordinator
    is made; plain ``atexit`` where that does not exist.
    """

    def __init__(self) -> None:
        self._coordinators: weakref.WeakSet[CheckpointCoordinator] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._registered = False

    def track(self, coordinator: CheckpointCoordinator) -> None:
        with self._lock:
            self._coordinators.add(coordinator)
            if not self._registered:
                early = getattr(threading, "_register_atexit", None)
                try:
                    if not callable(early):  # pragma: no cover - every supported Python has it
                        raise RuntimeError("no threading._register_atexit")
                    early(self.run)
                except RuntimeError:  # made while the interpreter already shuts down
                    atexit.register(self.run)
                self._registered = True

    def run(self) -> None:
        with self._lock:
            coordinators = list(self._coordinators)
        lost: list[str] = []
        for coordinator in coordinators:
            try:
                lost += coordinator._at_exit(None)
            except Exception as exc:
                lost.append(describe_exception(exc))
        if lost:
            logger.error(
                "commitpoint: %d save(s) lost as the process ended; exiting with status %d",
                len(lost),
                EXIT_SAVES_LOST,
            )
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):  # a closed stream cannot be flushed
                    stream.flush()
            logging.shutdown()
            os._exit(EXIT_SAVES_LOST)


_EXIT = _ExitGuard()
