"""Writer fencing under contention: racing processes keep restarting monitors on one root.

Each worker process loops: now and then it starts a new :class:`CheckpointMonitor` (a restarted
job taking the writer lease, which fences every older monitor, including the other process's),
then tries to commit a step just above the current pointer, the same step the other process is
likely to try, writing a file whose bytes are unique to this attempt. Meanwhile the parent reads
the pointer continuously. Afterwards every step a worker committed must still hold exactly the
bytes that worker wrote.

Counted: attempts, commits, fenced attempts (``WriterFenced``), superseded ones; and the failures
the design forbids, all zero: ``regressions`` (the pointer seen moving back), ``unverifiable``
(the pointer named a step whose manifest did not verify), ``overwritten`` (a committed file that
no longer holds the committing worker's bytes) and ``lost`` (a commit the final pointer is below).

Run ``python -m commitpoint.testing.fencing --attempts 1000 --backend local,s3,gcs``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from commitpoint.core.layout import Kind
from commitpoint.core.manifest import read_manifest
from commitpoint.errors import CommitpointError, SaveFailed, StepRegression, WriterFenced
from commitpoint.read.verify import verify_step
from commitpoint.storage.registry import open_storage
from commitpoint.testing import CheckpointRoot

POINTER = Kind.STATE_DICT.pointer
BAD_OUTCOMES = ("regressions", "unverifiable", "overwritten", "lost", "worker_errors")


@dataclass
class FencingReport:
    """Counts of one race on one backend."""

    backend: str
    workers: int
    counts: Counter[str] = field(default_factory=Counter)
    committers: set[str] = field(default_factory=set)
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def bad(self) -> int:
        return sum(self.counts[name] for name in BAD_OUTCOMES)

    def summary(self) -> str:
        shown = ("attempts", "contested", "committed", "fenced", "superseded", "failed")
        counts = ", ".join(f"{name} {self.counts[name]}" for name in (*shown, *BAD_OUTCOMES))
        return f"{self.backend}: {self.workers} racing processes, {self.seconds:.1f} s; {counts}"


# -- the worker process ------------------------------------------------------------------------
def _worker(url: str, options: dict[str, Any], name: str, attempts: int, seed: int) -> None:
    """Race for commits; print one JSON line per attempt."""
    from commitpoint.monitor import CheckpointMonitor
    from commitpoint.save.coordinator import CheckpointCoordinator

    rng = random.Random(seed)
    storage = open_storage(url, **options)
    monitor: CheckpointMonitor | None = None
    coordinator: CheckpointCoordinator | None = None
    fenced = False
    for attempt in range(attempts):
        # A fenced writer goes on a while (a zombie) before it restarts and takes over again.
        if monitor is None or rng.random() < (0.3 if fenced else 0.05):
            if monitor is not None:
                monitor.close()  # the zombie is left as it is: only its lease is superseded
            monitor = CheckpointMonitor(url, options)
            coordinator = CheckpointCoordinator(monitor, job_id=name)
        assert coordinator is not None
        epoch = monitor.writer_epoch()
        current = storage.read_pointer(POINTER).value or 0
        step = current + 1 + rng.randint(0, 1)
        body = f"{name} attempt {attempt} epoch {epoch} step {step}".encode()
        relpath = f"global_step_{step}/shard.bin"

        def save(
            relpath: str = relpath, body: bytes = body, target: Any = coordinator.storage
        ) -> None:
            target.write_bytes(relpath, body)

        outcome = "committed"
        try:
            coordinator.register_and_monitor_sync(step, True, state_dict_thread_count=1)
            coordinator.save_sync(save, step, is_state_dict=True)
        except SaveFailed as exc:
            outcome = _outcome_of(exc.cause)
        except CommitpointError as exc:
            outcome = _outcome_of(exc)
        fenced = outcome == "fenced"
        if outcome == "committed":
            manifest = read_manifest(storage, step, Kind.STATE_DICT)
            if manifest is None or manifest.writer_epoch != epoch:
                outcome = "superseded"  # another writer's manifest stands for this step
        record = {
            "worker": name,
            "attempt": attempt,
            "epoch": epoch,
            "step": step,
            "outcome": outcome,
            "sha256": hashlib.sha256(body).hexdigest(),
            "time": time.time(),
        }
        print(json.dumps(record), flush=True)


def _outcome_of(exc: BaseException) -> str:
    if isinstance(exc, WriterFenced):
        return "fenced"
    if isinstance(exc, StepRegression):
        return "superseded"
    return f"failed:{type(exc).__name__}"


# -- the parent --------------------------------------------------------------------------------
class _PointerWatcher(threading.Thread):
    """Reads the pointer over and over: it must never move back, and what it names verifies."""

    def __init__(self, storage: Any, report: FencingReport) -> None:
        super().__init__(name="fencing-watcher", daemon=True)
        self._storage = storage
        self._report = report
        self._stop_event = threading.Event()

    def run(self) -> None:
        last: int | None = None
        while not self._stop_event.is_set():
            try:
                value = self._storage.read_pointer(POINTER).value
            except CommitpointError as exc:
                self._report.counts["unverifiable"] += 1
                self._report.problems.append(f"pointer unreadable: {exc}")
                continue
            if value is None:
                time.sleep(0.005)
                continue
            if last is not None and value < last:
                self._report.counts["regressions"] += 1
                self._report.problems.append(f"pointer moved back {last} -> {value}")
            last = value if last is None else max(last, value)
            try:
                verified = verify_step(self._storage, value, Kind.STATE_DICT)
                if not verified.ok:
                    raise CommitpointError("; ".join(map(str, verified.problems)))
            except CommitpointError as exc:
                self._report.counts["unverifiable"] += 1
                self._report.problems.append(f"pointer names step {value}, which fails: {exc}")
            self._report.counts["pointer_reads"] += 1

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def race(root: CheckpointRoot, *, attempts: int, workers: int = 2, seed: int = 0) -> FencingReport:
    """Run ``workers`` racing processes for ``attempts`` commit attempts in all."""
    report = FencingReport(root.backend, workers)
    storage = open_storage(root.url, **root.storage_options)
    watcher = _PointerWatcher(storage, report)
    env = {**os.environ, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    started = time.monotonic()
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "commitpoint.testing.fencing",
                "--worker",
                f"w{index}",
                "--url",
                root.url,
                "--options",
                json.dumps(root.storage_options),
                "--attempts",
                str(attempts // workers),
                "--seed",
                str(seed * 1000 + index),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for index in range(workers)
    ]
    watcher.start()
    outputs = [p.communicate() for p in processes]
    watcher.stop()
    report.seconds = time.monotonic() - started
    records: list[dict[str, Any]] = []
    for process, (out, err) in zip(processes, outputs, strict=True):
        if process.returncode != 0:
            report.counts["worker_errors"] += 1
            report.problems.append(f"worker exited {process.returncode}: {err.decode()[-2000:]}")
        records += [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    _tally(records, report)
    _check_commits(storage, records, report)
    return report


def _tally(records: list[dict[str, Any]], report: FencingReport) -> None:
    finished = {
        name: max(r["time"] for r in records if r["worker"] == name)
        for name in {r["worker"] for r in records}
    }
    for record in records:
        report.counts["attempts"] += 1
        others = [t for name, t in finished.items() if name != record["worker"]]
        if others and record["time"] <= max(others):
            report.counts["contested"] += 1
        outcome = record["outcome"]
        if outcome == "committed":
            report.committers.add(record["worker"])
        report.counts["failed" if outcome.startswith("failed:") else outcome] += 1
        if outcome.startswith("failed:"):
            report.counts[outcome] += 1


def _check_commits(storage: Any, records: list[dict[str, Any]], report: FencingReport) -> None:
    final = storage.read_pointer(POINTER).value or 0
    for record in records:
        if record["outcome"] != "committed":
            continue
        step = record["step"]
        if step > final:
            report.counts["lost"] += 1
            report.problems.append(f"step {step} was committed but the pointer ends at {final}")
        try:
            body = storage.read_bytes(f"global_step_{step}/shard.bin")
            sound = verify_step(storage, step, Kind.STATE_DICT).ok
        except CommitpointError as exc:
            body, sound = b"", False
            report.problems.append(f"step {step}: {exc}")
        if not sound or hashlib.sha256(body).hexdigest() != record["sha256"]:
            report.counts["overwritten"] += 1
            report.problems.append(
                f"step {step} committed by {record['worker']} (epoch {record['epoch']}) "
                "no longer holds its bytes"
            )


@contextlib.contextmanager
def _root(backend: str) -> Any:
    from commitpoint.testing import local_root

    if backend == "local":
        with local_root() as root:
            yield root
    elif backend == "s3":
        from commitpoint.testing.s3 import s3_root

        with s3_root() as root:
            yield root
    elif backend == "gcs":
        from commitpoint.testing.gcs import gcs_root

        with gcs_root() as root:
            yield root
    else:
        raise SystemExit(f"unknown backend {backend!r}; choose from local, s3, gcs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m commitpoint.testing.fencing",
        description="Racing processes restart monitors on one root; count what the race broke.",
    )
    parser.add_argument("--attempts", type=int, default=1000, help="commit attempts per backend")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backend", default="local,s3,gcs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.CRITICAL)
    for noisy in ("werkzeug", "moto", "botocore", "s3fs", "gcsfs", "aiobotocore"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    if args.worker:
        _worker(args.url, json.loads(args.options), args.worker, args.attempts, args.seed)
        return 0
    from commitpoint.testing import shutdown_servers

    bad = 0
    try:
        for backend in args.backend.split(","):
            with _root(backend.strip()) as root:
                report = race(root, attempts=args.attempts, workers=args.workers, seed=args.seed)
            print(report.summary(), flush=True)
            for problem in report.problems[:20]:
                print(f"  {problem}", flush=True)
            bad += report.bad
    finally:
        shutdown_servers()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
