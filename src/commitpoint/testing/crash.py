"""Crash-consistency harness: SIGKILL a checkpointing training job at random instants.

Invariants 2, 3, 4 and 6 promise that a kill at *any* instant leaves pointers that parse, name a
step whose manifest verifies and whose files load, never move back, and never lose a committed
step. Unit tests pick the instants; this harness lets chance pick them, hundreds of times.

Each cycle hands a job to a worker process (``python -m commitpoint.testing.crash --worker``,
started ahead of time so ``import torch`` is already done), which resumes from the latest committed
checkpoint like a restarted job and trains a small torch model, saving every step: the weights as
two state-dict shards, and every ``checkpoint_every`` steps also two optimizer shards and the
trainer state as a full checkpoint, all through ``save_async`` with an in-process monitor whose
retention deletes old steps. The harness SIGKILLs the worker after a random delay drawn over the
whole remaining run, reads which phase the worker was in (the worker keeps it in a small file),
and checks the root with :class:`Checker`; the next cycle restarts on the same root. A job that
runs to its last step is checked, removed, and a fresh job starts.

``python -m commitpoint.testing.crash --kills 500 --backend local,s3`` prints the counts and exits
non-zero if any check failed; docs/crash-consistency.md records a run.

Tiered mode (``--replica s3``): every job also replicates to a replica root on that backend
(``CheckpointMonitor(..., replicate_to=...)``, replica retention ``keep_last`` too). After each
kill the replica is checked like the local root, and more: its pointers never name a step the
local tier has not committed, and once a job ran to its end (its monitor's ``close`` waits for
the replica) the replica names the same steps as the local root. docs/reliability.md records a run.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import itertools
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

from commitpoint.core.layout import Kind, parse_step_dir, step_dir
from commitpoint.core.manifest import is_manifest, manifest_path
from commitpoint.errors import CommitpointError, CorruptCheckpoint
from commitpoint.maintenance.retention import RetentionPolicy, RetentionResult
from commitpoint.monitor import CheckpointMonitor
from commitpoint.read.reader import CheckpointReader
from commitpoint.read.verify import verify_step
from commitpoint.replication.options import ReplicationOptions
from commitpoint.save.coordinator import CheckpointCoordinator
from commitpoint.storage.protocol import FileRecord, StorageBackend
from commitpoint.storage.registry import open_storage
from commitpoint.testing import CheckpointRoot

logger = logging.getLogger(__name__)

MODEL_SHARDS = ("model_00.pt", "model_01.pt")
OPTIMIZER_SHARDS = ("optimizer_00.pt", "optimizer_01.pt")
TRAINER_STATE = "trainer_state.pt"

TORN = "torn pointers"
UNVERIFIABLE = "unverifiable steps"
UNLOADABLE = "unloadable steps"
LOST = "lost committed steps"
REGRESSION = "regressions"
WORKER_ERROR = "worker errors"
REPLICA_AHEAD = "replica names an uncommitted step"
REPLICA_BEHIND = "replica behind at job end"
CATEGORIES = (
    TORN,
    UNVERIFIABLE,
    UNLOADABLE,
    LOST,
    REGRESSION,
    WORKER_ERROR,
    REPLICA_AHEAD,
    REPLICA_BEHIND,
)

# What a worker's threads can be doing at once; a kill's phase names every one that was running
# (e.g. ``manifest+save``), or what the training thread did if none was (``train``, ``resume``...).
BUSY_PHASES = ("pointer", "manifest", "retention", "save", "replicate")
_RECORD_SIZE = 96


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def files_of(kind: Kind) -> tuple[str, ...]:
    """The files a committed step of ``kind`` must have (relative to its folder)."""
    if kind is Kind.STATE_DICT:
        return MODEL_SHARDS
    return (*MODEL_SHARDS, *OPTIMIZER_SHARDS, TRAINER_STATE)


@dataclass(frozen=True)
class JobConfig:
    """The training job every worker of a root runs (the same across restarts)."""

    steps: int = 40
    width: int = 16384
    """Hidden width of the model: 16384 gives ~2 MiB of weights, ~6.5 MiB per full checkpoint."""
    checkpoint_every: int = 2
    keep_last: int = 2


@dataclass(frozen=True)
class WorkerJob:
    """What the harness sends a waiting worker on its stdin (one JSON line)."""

    url: str
    storage_options: dict[str, Any]
    phase_file: str
    config: JobConfig
    replica_url: str | None = None
    """Tiered mode: the job also replicates to this root."""
    replica_options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, line: str) -> WorkerJob:
        body = json.loads(line)
        return cls(
            body["url"],
            body["storage_options"],
            body["phase_file"],
            JobConfig(**body["config"]),
            body.get("replica_url"),
            body.get("replica_options") or {},
        )


# -- where the worker is: a fixed-size record rewritten in place ----------------------------------
@dataclass(frozen=True)
class PhaseRecord:
    """The worker's last written phase and step, and its own timings (seconds to resume, per
    saving step, and to finish), from which the harness draws kill instants over a whole run."""

    phase: str = "startup"
    step: int = 0
    resume_s: float = 0.0
    step_s: float = 0.0
    finish_s: float = 0.0

    def encode(self) -> bytes:
        timings = (self.resume_s, self.step_s, self.finish_s)
        text = f"{self.phase} {self.step} " + " ".join(f"{t:.4f}" for t in timings)
        return text.encode().ljust(_RECORD_SIZE)

    @classmethod
    def read(cls, path: str) -> PhaseRecord:
        try:
            with open(path, "rb") as f:
                phase, step, *timings = f.read(_RECORD_SIZE).decode().split()
            resume_s, step_s, finish_s = map(float, timings)
            return cls(phase, int(step), resume_s, step_s, finish_s)
        except (OSError, ValueError):
            return cls("unknown")


class PhaseRecorder:
    """Keeps :class:`PhaseRecord` current in a file: one ``pwrite`` per change, cheap enough
    to mark every shard write, manifest write, pointer commit and retention round."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        self._lock = threading.Lock()
        self._busy: collections.Counter[str] = collections.Counter()
        self._base = "resume"
        self._step = 0
        self._timings = {"resume_s": 0.0, "step_s": 0.0, "finish_s": 0.0}
        self._write()

    def _write(self) -> None:
        phase = "+".join(p for p in BUSY_PHASES if self._busy[p] > 0) or self._base
        record = PhaseRecord(phase, self._step, **self._timings)
        os.pwrite(self._fd, record.encode(), 0)

    def set(self, base: str, step: int | None = None, **timings: float) -> None:
        """What the training thread does now (``resume``, ``train``, ``finish``, ``done``)."""
        with self._lock:
            self._base = base
            self._step = self._step if step is None else step
            self._timings.update(timings)
            self._write()

    @contextlib.contextmanager
    def busy(self, phase: str) -> Iterator[None]:
        """Mark ``phase`` (one of :data:`BUSY_PHASES`) as running in some thread."""
        with self._lock:
            self._busy[phase] += 1
            self._write()
        try:
            yield
        finally:
            with self._lock:
                self._busy[phase] -= 1
                self._write()

    def close(self) -> None:
        os.close(self._fd)


def _observe_commits(storage: StorageBackend, phases: PhaseRecorder) -> None:
    """Mark the monitor's manifest writes and pointer commits in the phase file.

    The monitor does both through its own backend object, so wrapping that object's two methods
    is enough; nothing else about the commit path changes.
    """
    write_pointer_if = storage.write_pointer_if
    write_bytes = storage.write_bytes

    def pointer(name: str, value: int, token: str | None) -> str:
        with phases.busy("pointer"):
            return write_pointer_if(name, value, token)

    def data(relpath: str, data: bytes, *, track: bool = True) -> FileRecord:
        if not is_manifest(relpath):
            return write_bytes(relpath, data, track=track)
        with phases.busy("manifest"):
            return write_bytes(relpath, data, track=track)

    storage.write_pointer_if = pointer  # type: ignore[method-assign]
    storage.write_bytes = data  # type: ignore[method-assign]


def _observe_replica(storage: StorageBackend, phases: PhaseRecorder) -> None:
    """Mark every write the replicator makes on the replica (uploads, manifests, pointers)."""
    open_write = storage.open_write
    write_pointer_if = storage.write_pointer_if

    def upload(relpath: str, *, track: bool = True) -> Any:
        writer = open_write(relpath, track=track)
        close, abort = writer.close, writer.abort
        phases_ctx = phases.busy("replicate")
        phases_ctx.__enter__()

        def closed() -> None:
            try:
                close()
            finally:
                phases_ctx.__exit__(None, None, None)

        def aborted() -> None:
            try:
                abort()
            finally:
                phases_ctx.__exit__(None, None, None)

        writer.close = closed  # type: ignore[method-assign]
        writer.abort = aborted  # type: ignore[method-assign]
        return writer

    def pointer(name: str, value: int, token: str | None) -> str:
        with phases.busy("replicate"):
            return write_pointer_if(name, value, token)

    storage.open_write = upload  # type: ignore[method-assign]
    storage.write_pointer_if = pointer  # type: ignore[method-assign]


@dataclass(frozen=True)
class _ObservedRetention:
    """A :class:`RetentionPolicy` whose rounds show up as the ``retention`` phase."""

    policy: RetentionPolicy
    phases: PhaseRecorder

    def apply(
        self, storage: StorageBackend, *, in_flight: Any = (), dry_run: bool = False
    ) -> RetentionResult:
        with self.phases.busy("retention"):
            return self.policy.apply(storage, in_flight=in_flight, dry_run=dry_run)


# -- the job: save shards, and load them back like a restarted job --------------------------------
def _shard(items: Mapping[Any, Any], index: int, count: int) -> dict[Any, Any]:
    """Every ``count``-th entry starting at ``index`` (by sorted key): a deterministic split."""
    return {k: items[k] for i, k in enumerate(sorted(items)) if i % count == index}


def _expect_step(payload: Any, step: int, name: str) -> dict[str, Any]:
    """A shard names the step it was saved at: a stale file from another step fails here."""
    if not isinstance(payload, dict) or payload.get("step") != step:
        found = payload.get("step") if isinstance(payload, dict) else type(payload).__name__
        raise CorruptCheckpoint(name, f"holds step {found!r}, expected step {step}")
    return payload


def load_step(
    reader: CheckpointReader,
    step: int,
    kind: Kind,
    model: Any,
    optimizer: Any,
    *,
    verify: bool = True,
) -> int:
    """Load ``step`` of ``kind`` into ``model`` (and, for a checkpoint, ``optimizer``) with
    ``weights_only`` loads, the way a restarted job or a weight consumer does; raise if anything
    is missing, stale or does not fit. Returns the step the trainer state names (or ``step``)."""
    tensors: dict[str, Any] = {}
    for name in MODEL_SHARDS:
        shard = _expect_step(reader.load(step, name, kind=kind, verify=verify), step, name)
        tensors.update(shard["tensors"])
    model.load_state_dict(tensors, strict=True)
    if kind is Kind.STATE_DICT:
        return step
    state: dict[int, Any] = {}
    groups: Any = None
    for name in OPTIMIZER_SHARDS:
        shard = _expect_step(reader.load(step, name, kind=kind, verify=verify), step, name)
        state.update(shard["state"])
        groups = shard["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    trainer = reader.load(step, TRAINER_STATE, kind=kind, verify=verify)
    trainer = _expect_step(trainer, step, TRAINER_STATE)
    return int(trainer["step"])


def _new_model(config: JobConfig) -> tuple[Any, Any]:
    """A two-layer MLP (``width`` sets the size) and its AdamW, the same at every start."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, config.width), torch.nn.ReLU(), torch.nn.Linear(config.width, 1)
    )
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _batch(step: int) -> tuple[Any, Any]:
    import torch

    generator = torch.Generator().manual_seed(step)
    x = torch.randn(64, 32, generator=generator)
    return x, x[:, :4].sum(dim=1, keepdim=True)


def _save(phases: PhaseRecorder, storage: StorageBackend, path: str, payload: object) -> None:
    from commitpoint.save.torch_io import save_torch

    with phases.busy("save"):
        save_torch(storage, path, payload)


def _save_step(
    coordinator: CheckpointCoordinator,
    phases: PhaseRecorder,
    step: int,
    model: Any,
    optimizer: Any,
    config: JobConfig,
) -> None:
    """Start the saves of ``step`` in the background and register them with the monitor."""
    storage = coordinator.storage
    folder = step_dir(step)
    weights = copy.deepcopy(model.state_dict())  # training goes on while they are written
    for i, name in enumerate(MODEL_SHARDS):
        payload = {"step": step, "tensors": _shard(weights, i, len(MODEL_SHARDS))}
        save = partial(_save, phases, storage, f"{folder}/{name}", payload)
        coordinator.save_async(f"model-{i}", save, step, is_state_dict=True)
    full = step % config.checkpoint_every == 0
    if full:
        optim = copy.deepcopy(optimizer.state_dict())
        for i, name in enumerate(OPTIMIZER_SHARDS):
            payload = {
                "step": step,
                "state": _shard(optim["state"], i, len(OPTIMIZER_SHARDS)),
                "param_groups": optim["param_groups"],
            }
            save = partial(_save, phases, storage, f"{folder}/{name}", payload)
            coordinator.save_async(f"optimizer-{i}", save, step)
        save = partial(_save, phases, storage, f"{folder}/{TRAINER_STATE}", {"step": step})
        coordinator.save_async("trainer-state", save, step)
    # The weights are published as soon as their shards land; a full checkpoint follows.
    coordinator.register_and_monitor_sync(
        step,
        True,
        state_dict_thread_count=len(MODEL_SHARDS),
        checkpoint_thread_count=len(OPTIMIZER_SHARDS) + 1 if full else 0,
    )
    if full:
        coordinator.register_and_monitor_sync(step, False)
    coordinator.wait_all(timeout=0)  # raise a failed save now, as a real job would


def run_worker(job: WorkerJob, phases: PhaseRecorder) -> int:
    """Resume ``job`` from its latest committed checkpoint and train it to its last step,
    checkpointing every step; a failed save raises :class:`~commitpoint.errors.SaveFailed`."""
    import torch

    began = time.perf_counter()
    config = job.config
    reader = CheckpointReader(job.url, **job.storage_options)
    retention = RetentionPolicy(keep_last=config.keep_last, orphan_min_age_s=0.0)
    replica: StorageBackend | None = None
    if job.replica_url is not None:
        replica = open_storage(job.replica_url, **job.replica_options)
        _observe_replica(replica, phases)
    monitor = CheckpointMonitor(
        job.url,
        job.storage_options,
        retention=_ObservedRetention(retention, phases),
        replicate_to=replica,
        replicate_options=ReplicationOptions(
            retention=RetentionPolicy(keep_last=config.keep_last, orphan_min_age_s=0.0),
            backoff_s=0.05,
        ),
    )
    _observe_commits(monitor.storage, phases)
    coordinator = CheckpointCoordinator(monitor, node_id="crash-worker")

    model, optimizer = _new_model(config)
    resumed = reader.latest_checkpoint_step()
    start = 0 if resumed is None else load_step(reader, resumed, Kind.CHECKPOINT, model, optimizer)
    # Steps up to the newest pointer are trained again but not saved: their commits stand, and
    # the coordinator refuses to write into a committed step.
    first_save = max(start, reader.latest_state_dict_step() or 0) + 1
    step_s = 0.0
    phases.set("train", start, resume_s=time.perf_counter() - began)
    for step in range(start + 1, config.steps + 1):
        tick = time.perf_counter()
        phases.set("train", step)
        x, y = _batch(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        if step < first_save:
            continue
        _save_step(coordinator, phases, step, model, optimizer, config)
        elapsed = time.perf_counter() - tick
        step_s = elapsed if step_s == 0 else 0.8 * step_s + 0.2 * elapsed
        phases.set("train", step, step_s=step_s)
    finishing = time.perf_counter()
    phases.set("finish")
    coordinator.wait_all()
    monitor.close()
    phases.set("done", finish_s=time.perf_counter() - finishing)
    return 0


def _warm_up() -> None:
    """One tiny training step: torch imports much of itself lazily on the first optimizer
    construction and backward pass (seconds), which is start-up, not the job being killed."""
    import torch

    model, optimizer = _new_model(JobConfig(width=4))
    x, y = torch.zeros(2, 32), torch.zeros(2, 1)
    torch.nn.functional.mse_loss(model(x), y).backward()  # type: ignore[no-untyped-call]
    optimizer.step()


def _worker_main() -> int:
    """A worker waits, warmed up, for one job on stdin and runs it."""
    import torch

    with contextlib.suppress(ImportError):  # the S3 backend, when installed, is imported ahead
        import commitpoint_s3  # noqa: F401

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _warm_up()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    line = sys.stdin.readline()
    if not line.strip():
        return 0  # the harness is done with us
    job = WorkerJob.from_json(line)
    phases = PhaseRecorder(job.phase_file)
    try:
        return run_worker(job, phases)
    finally:
        phases.close()


# -- the checker --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Failure:
    """One thing a check found wrong."""

    category: str
    detail: str

    def __str__(self) -> str:
        return f"{self.category}: {self.detail}"


@dataclass
class RootHistory:
    """What earlier checks of one root saw: the last value of each pointer, and every step a
    pointer ever named that still has to be there (or be legitimately gone)."""

    last: dict[Kind, int | None] = field(default_factory=lambda: dict.fromkeys(Kind))
    named: dict[Kind, set[int]] = field(default_factory=lambda: {k: set() for k in Kind})


@dataclass
class CheckResult:
    """The outcome of one :meth:`Checker.check`."""

    failures: list[Failure] = field(default_factory=list)
    pointers: dict[Kind, int | None] = field(default_factory=dict)
    verified: int = 0
    """Steps (of a kind) that verified against their manifest."""
    removed: int = 0
    """Formerly committed steps found deleted, legitimately, by retention."""


class Checker:
    """Checks a checkpoint root after a kill: every pointer parses and names a step that
    verifies and loads; no pointer went back; every step a pointer named before still verifies
    unless retention may have deleted it (a newer commit exists and ``keep_last`` steps above it
    are still committed — retention never deletes one of the newest ``keep_last``)."""

    def __init__(
        self, url: str, storage_options: Mapping[str, Any], config: JobConfig = JobConfig()
    ) -> None:
        self.reader = CheckpointReader(url, **dict(storage_options))
        self.storage = self.reader.storage
        self.config = config
        self._model: tuple[Any, Any] | None = None

    def check(self, history: RootHistory) -> CheckResult:
        """Check the root once, updating ``history`` with what it saw."""
        result = CheckResult()
        for kind in Kind:
            try:
                value = self.storage.read_pointer(kind.pointer).value
            except CorruptCheckpoint as exc:
                result.failures.append(Failure(TORN, str(exc)))
                continue
            result.pointers[kind] = value
            last = history.last[kind]
            if last is not None and (value is None or value < last):
                result.failures.append(
                    Failure(REGRESSION, f"{kind.pointer} went from step {last} to {value}")
                )
            else:  # after a regression, keep comparing against the highest value seen
                history.last[kind] = value
            if value is not None:
                history.named[kind].add(value)
                self._check_step(value, kind, result, load=True)
        named_now = {v for v in result.pointers.values() if v is not None}
        for kind in Kind:
            for step in sorted(history.named[kind]):
                if step == result.pointers.get(kind):
                    continue
                covering = (kind, Kind.CHECKPOINT) if kind is Kind.STATE_DICT else (kind,)
                if any(self.storage.exists(manifest_path(step, k)) for k in covering):
                    self._check_step(step, kind, result, load=False)
                elif self._legitimately_removed(step, named_now):
                    history.named[kind].discard(step)
                    result.removed += 1
                else:
                    result.failures.append(
                        Failure(LOST, f"step {step} ({kind.value}) was committed and is gone")
                    )
        return result

    def _check_step(self, step: int, kind: Kind, result: CheckResult, *, load: bool) -> None:
        where = f"step {step} ({kind.value})"
        try:
            report = verify_step(self.storage, step, kind)
            listed = {f.path for f in self.reader.manifest(step, kind).files}
        except CommitpointError as exc:
            result.failures.append(Failure(UNVERIFIABLE, f"{where}: {exc}"))
        else:
            missing = [n for n in files_of(kind) if f"{step_dir(step)}/{n}" not in listed]
            if not report.ok or missing:
                problems = [*map(str, report.problems), *(f"{n}: not in manifest" for n in missing)]
                result.failures.append(Failure(UNVERIFIABLE, f"{where}: " + "; ".join(problems)))
            else:
                result.verified += 1
        if load:
            model, optimizer = self._load_target()
            try:
                load_step(self.reader, step, kind, model, optimizer, verify=False)
            except Exception as exc:
                result.failures.append(Failure(UNLOADABLE, f"{where}: {type(exc).__name__}: {exc}"))

    def _load_target(self) -> tuple[Any, Any]:
        """A model and optimizer to load into (built once: a strict load replaces all state)."""
        if self._model is None:
            self._model = _new_model(self.config)
        return self._model

    def _legitimately_removed(self, step: int, named_now: set[int]) -> bool:
        if step in named_now or not named_now or step >= max(named_now):
            return False
        newest = max(named_now)
        above = 0
        for name in self.storage.list_dirs(""):
            other = parse_step_dir(name)
            if other is not None and step < other <= newest:
                above += any(self.storage.exists(manifest_path(other, k)) for k in Kind)
        return above >= self.config.keep_last


# -- the harness --------------------------------------------------------------------------------
@dataclass
class Tally:
    """Counts of one backend's run."""

    backend: str
    kills: int = 0
    by_phase: collections.Counter[str] = field(default_factory=collections.Counter)
    finished_before_kill: int = 0
    jobs_completed: int = 0
    checks: int = 0
    verified: int = 0
    removed: int = 0
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, category: str) -> int:
        return sum(f.category == category for f in self.failures)

    def kills_during(self, phase: str) -> int:
        """Kills that landed while ``phase`` was running (alone or beside others)."""
        return sum(n for label, n in self.by_phase.items() if phase in label.split("+"))

    @property
    def kills_mid_run(self) -> int:
        """Kills that landed while the job trained, saved or committed (not in start-up)."""
        return sum(
            n
            for label, n in self.by_phase.items()
            if label == "train" or not set(label.split("+")).isdisjoint(BUSY_PHASES)
        )

    def summary(self) -> list[str]:
        phases = ", ".join(f"{p} {n}" for p, n in self.by_phase.most_common())
        during = ", ".join(f"{p} {self.kills_during(p)}" for p in BUSY_PHASES)
        counts = ", ".join(f"{c} {self.count(c)}" for c in CATEGORIES)
        return [
            f"{self.backend}: {self.kills} kills in {self.seconds:.1f} s; {self.checks} checks, "
            f"{self.verified} committed steps verified, {self.removed} removed by retention, "
            f"{self.jobs_completed} jobs run to the end, "
            f"{self.finished_before_kill} workers finished before their kill instant",
            f"{self.backend}: kills by phase: {phases or 'none'}",
            f"{self.backend}: kills while each ran (alone or not): {during}",
            f"{self.backend}: {counts}",
        ]


class _Worker:
    """A worker process that has imported torch and waits for its job on stdin."""

    def __init__(self, log_path: str) -> None:
        self.log_path = log_path
        env = dict(os.environ, OMP_NUM_THREADS="1")
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "commitpoint.testing.crash", "--worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
            )

    def start(self, job: WorkerJob) -> bool:
        """Wait until the worker is warm, then hand it ``job``; False if it died warming up."""
        assert self.process.stdin is not None and self.process.stdout is not None
        if self.process.stdout.readline().strip() != b"ready":
            return False
        self.process.stdin.write((job.to_json() + "\n").encode())
        self.process.stdin.close()
        return True

    def log_tail(self, lines: int = 15) -> str:
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-lines:]).strip()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        with contextlib.suppress(OSError):
            os.unlink(self.log_path)


class _Tiers:
    """Tiered mode: the replica root of the current job, its checker and history."""

    def __init__(self, replica: CheckpointRoot, config: JobConfig) -> None:
        self.replica = replica
        self.config = config
        self.url = ""
        self.checker: Checker | None = None
        self.history = RootHistory()

    def new_job(self, number: int) -> None:
        self.url = f"{self.replica.url.rstrip('/')}/job-{number:03d}"
        self.checker = Checker(self.url, self.replica.storage_options, self.config)
        self.history = RootHistory()

    def job(self, job: WorkerJob) -> WorkerJob:
        return WorkerJob(
            job.url,
            job.storage_options,
            job.phase_file,
            job.config,
            self.url,
            dict(self.replica.storage_options),
        )

    def check(self, local: CheckResult, *, done: bool) -> None:
        """Check the replica like a root, then against the local pointers just read."""
        assert self.checker is not None
        result = self.checker.check(self.history)
        for failure in result.failures:
            local.failures.append(Failure(failure.category, f"replica: {failure.detail}"))
        local.verified += result.verified
        local.removed += result.removed
        for kind in Kind:
            here, there = local.pointers.get(kind), result.pointers.get(kind)
            if there is not None and (here is None or there > here):
                local.failures.append(
                    Failure(REPLICA_AHEAD, f"replica {kind.pointer} names {there}, local {here}")
                )
            if done and there != here:
                local.failures.append(
                    Failure(REPLICA_BEHIND, f"{kind.pointer}: local {here}, replica {there}")
                )

    def remove(self) -> None:
        _remove_root(self.url, self.replica.storage_options)


class _Estimate:
    """How long a worker takes to resume and per step, learned from the workers' own records,
    so random kill instants spread over the whole remaining run."""

    def __init__(self) -> None:
        self.resume_s = 0.5
        self.step_s = 0.05
        self.finish_s = 1.0

    def learn(self, record: PhaseRecord, delay: float) -> None:
        """Take the latest worker's figures (the step time is already its moving average).

        A worker killed before it measured its resume or finish says only that it took longer
        than ``delay``: the estimate grows, so kills cannot stay stuck in the same phase."""
        self.resume_s = record.resume_s or self.resume_s
        self.step_s = record.step_s or self.step_s
        self.finish_s = record.finish_s or self.finish_s
        if record.phase in ("startup", "resume"):
            self.resume_s = 1.25 * max(self.resume_s, delay)
        elif record.phase == "finish":
            self.finish_s *= 1.25

    def run_s(self, remaining_steps: int) -> float:
        """Resume, the steps after the checkpoint (one more for slack), and finish."""
        return self.resume_s + (remaining_steps + 1) * self.step_s + self.finish_s


def _remove_root(url: str, storage_options: Mapping[str, Any]) -> None:
    storage = open_storage(url, **dict(storage_options))
    for name in storage.list_dirs(""):
        storage.delete(name, recursive=True)
    for info in storage.list_files(""):
        storage.delete(info.path)


def _run_once(worker: _Worker, job: WorkerJob, delay: float) -> tuple[int, PhaseRecord]:
    """Start ``job`` on ``worker`` and SIGKILL it after ``delay`` seconds unless it ended first;
    return its exit code (-9 when killed) and where it was."""
    with open(job.phase_file, "wb") as f:
        f.write(PhaseRecord().encode())
    if not worker.start(job):
        code = worker.process.wait()
    else:
        try:
            code = worker.process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            worker.process.kill()
            code = worker.process.wait()
    return code, PhaseRecord.read(job.phase_file)


def run_crashes(
    root: CheckpointRoot,
    kills: int,
    *,
    seed: int = 0,
    config: JobConfig = JobConfig(),
    workdir: str | None = None,
    progress: Callable[[str], None] | None = None,
    replica: CheckpointRoot | None = None,
) -> Tally:
    """Kill workers training on ``root`` until ``kills`` SIGKILLs landed; check after each.

    With ``replica`` (tiered mode) every job also replicates to a root under it, which is
    checked after each kill too (see the module docstring)."""
    rng = random.Random(seed)
    tally = Tally(root.backend if replica is None else f"{root.backend}->{replica.backend}")
    tiers = _Tiers(replica, config) if replica is not None else None
    estimate = _Estimate()
    began = time.monotonic()
    work = tempfile.mkdtemp(prefix="commitpoint-crash-") if workdir is None else workdir
    phase_file = os.path.join(work, f"phase-{root.backend}")
    jobs = 0
    url = f"{root.url.rstrip('/')}/job-{jobs:03d}"
    checker, history = Checker(url, root.storage_options, config), RootHistory()
    if tiers is not None:
        tiers.new_job(jobs)
    logs = (os.path.join(work, f"worker-{root.backend}-{n}.log") for n in itertools.count())
    live: list[_Worker] = []
    errors_in_a_row = 0
    try:
        live.append(_Worker(next(logs)))
        while tally.kills < kills and errors_in_a_row < 3:
            live.append(_Worker(next(logs)))  # it imports torch while this cycle's worker runs
            worker = live.pop(0)
            remaining = config.steps - (history.last[Kind.CHECKPOINT] or 0)
            delay = rng.uniform(0, 1.1 * estimate.run_s(remaining))
            job = WorkerJob(url, dict(root.storage_options), phase_file, config)
            if tiers is not None:
                job = tiers.job(job)
            code, record = _run_once(worker, job, delay)
            estimate.learn(record, delay)
            result = checker.check(history)
            if tiers is not None:
                tiers.check(result, done=record.phase == "done" and code == 0)
            logger.debug("delay %.2f s, exit %s, %s: %s", delay, code, record, result.failures)
            tally.checks += 1
            tally.verified += result.verified
            tally.removed += result.removed
            tally.failures.extend(result.failures)
            errors_in_a_row = 0 if code in (0, -9) else errors_in_a_row + 1
            if code == -9:
                tally.kills += 1
                tally.by_phase[record.phase] += 1
            elif code == 0:
                tally.finished_before_kill += 1
            else:  # three in a row end the run: the job cannot make progress
                detail = f"exit code {code} at {url}:\n{worker.log_tail()}"
                tally.failures.append(Failure(WORKER_ERROR, detail))
            worker.stop()
            if record.phase == "done":  # the job ran to its end: a fresh one starts
                tally.jobs_completed += 1
                _remove_root(url, root.storage_options)
                jobs += 1
                url = f"{root.url.rstrip('/')}/job-{jobs:03d}"
                checker, history = Checker(url, root.storage_options, config), RootHistory()
                if tiers is not None:
                    tiers.remove()
                    tiers.new_job(jobs)
            if progress is not None and code == -9 and tally.kills % 25 == 0:
                progress(
                    f"{root.backend}: {tally.kills}/{kills} kills, "
                    f"{time.monotonic() - began:.0f} s, {len(tally.failures)} failures"
                )
    finally:
        for worker in live:
            worker.stop()
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    tally.seconds = time.monotonic() - began
    return tally


@contextlib.contextmanager
def _backend_root(backend: str, parent: str | None) -> Iterator[CheckpointRoot]:
    if backend == "local":
        from commitpoint.testing import local_root

        with local_root(parent) as root:
            yield root
    elif backend == "s3":
        from commitpoint.testing.s3 import s3_root

        with s3_root("crash") as root:
            yield root
    elif backend == "gcs":
        from commitpoint.testing.gcs import gcs_root

        with gcs_root("crash") as root:
            yield root
    else:
        raise SystemExit(f"commitpoint crash: unknown backend {backend!r} (local, s3, gcs)")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m commitpoint.testing.crash", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--kills", type=int, default=500, help="SIGKILLs in total (all backends)")
    parser.add_argument("--backend", default="local,s3", help="comma-separated: local, s3")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill instants")
    parser.add_argument("--root", default=None, help="parent folder of the local roots")
    parser.add_argument("--steps", type=int, default=JobConfig.steps, help="steps per job")
    parser.add_argument("--width", type=int, default=JobConfig.width, help="model width")
    parser.add_argument("--checkpoint-every", type=int, default=JobConfig.checkpoint_every)
    parser.add_argument("--keep-last", type=int, default=JobConfig.keep_last)
    parser.add_argument(
        "--replica",
        default=None,
        help="tiered mode: every job also replicates to a root on this backend (local, s3, gcs)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("kills", "steps", "width", "checkpoint_every", "keep_last"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.worker:
        code = _worker_main()
        sys.stdout.flush()
        sys.stderr.flush()
        # Skip the interpreter's teardown of torch (most of a second): everything is committed,
        # and a worker that spent it being killed would only pad the counts.
        os._exit(code)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's log line per request
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    config = JobConfig(args.steps, args.width, args.checkpoint_every, args.keep_last)
    began = time.monotonic()
    tallies: list[Tally] = []
    try:
        for i, backend in enumerate(backends):
            share = args.kills // len(backends) + (i < args.kills % len(backends))
            with contextlib.ExitStack() as stack:
                root = stack.enter_context(_backend_root(backend, args.root))
                replica = (
                    stack.enter_context(_backend_root(args.replica, args.root))
                    if args.replica
                    else None
                )
                where = root.url if replica is None else f"{root.url} -> {replica.url}"
                _say(f"{backend}: {share} kills on {where}")
                tally = run_crashes(
                    root, share, seed=args.seed + i, config=config, progress=_say, replica=replica
                )
            tallies.append(tally)
            for line in tally.summary():
                _say(line)
            for failure in tally.failures[:20]:
                _say(f"  {failure}")
    finally:
        from commitpoint.testing import shutdown_servers

        shutdown_servers()
    failures = sum(len(t.failures) for t in tallies)
    _say(
        f"total: {sum(t.kills for t in tallies)} kills on {', '.join(backends)} in "
        f"{time.monotonic() - began:.1f} s; "
        + ", ".join(f"{c} {sum(t.count(c) for t in tallies)}" for c in CATEGORIES)
    )
    return 1 if failures else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
