"""A long training loop under injected storage faults, counting what happened to every step.

Each step saves real torch tensors from several background saves (state-dict shards and a
checkpoint shard) through a coordinator and an in-process monitor whose storage injects faults
(:mod:`commitpoint.testing.faults`). After each step it looks at storage *without* faults and sorts
the step into one of:

- ``committed``: the pointers name it, its manifest verifies and every shard loads with the values
  that were saved;
- ``failed_loudly``: ``wait_all`` (or the registration) raised, and no pointer names the step;
- ``committed_despite_error``: an error was raised, yet the commit landed (an ambiguous pointer
  write) and the step verifies: safe, and reported;

and the failures the design forbids, which must all stay at zero: ``silently_lost`` (no error,
not committed), ``partial_commits`` (a pointer names a step that does not verify or load),
``regressions`` (a pointer moved back), ``hangs`` (a save still running after the timeout) and
``lost_committed`` (a committed step that no longer verifies at the end).

Run ``python -m commitpoint.testing.fault_campaign --steps 500 --backend local,s3 --rate 0.1``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from commitpoint.core.layout import Kind
from commitpoint.errors import CommitpointError, SaveFailed
from commitpoint.monitor import CheckpointMonitor
from commitpoint.read.verify import verify_step
from commitpoint.save.coordinator import CheckpointCoordinator
from commitpoint.storage.registry import open_storage
from commitpoint.testing import CheckpointRoot, local_root
from commitpoint.testing.faults import FaultPlan

STATE_DICT_SHARDS = 2
SAVE_TIMEOUT = 120.0
BAD_OUTCOMES = ("silently_lost", "partial_commits", "regressions", "hangs", "lost_committed")


def mixed_plan(rate: float, seed: int | None = None) -> FaultPlan:
    """Faults on ``rate`` of all operations, spread over every kind of fault."""
    return FaultPlan(
        fail=rate * 0.4,
        fail_after=rate * 0.1,
        delay=rate * 0.2,
        delay_seconds=0.01,
        truncate=rate * 0.1,
        lose_tail=rate * 0.1,
        corrupt_read=rate * 0.1,
        seed=seed,
    )


@dataclass
class CampaignReport:
    """What happened to every step of a campaign."""

    backend: str
    steps: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    injected: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def bad(self) -> int:
        return sum(self.outcomes[name] for name in BAD_OUTCOMES)

    def summary(self) -> str:
        counts = ", ".join(
            f"{name} {self.outcomes[name]}"
            for name in ("committed", "failed_loudly", "committed_despite_error", *BAD_OUTCOMES)
        )
        return (
            f"{self.backend}: {self.steps} steps in {self.seconds:.1f} s; {counts}; "
            f"faults injected {sum(self.injected.values())}"
        )


def _shard(step: int, index: int, numel: int) -> Any:
    import torch

    return {"w": torch.arange(numel, dtype=torch.float32) + float(step * 100 + index)}


def _loads_as_saved(storage: Any, step: int, names: list[str], numel: int) -> str | None:
    import torch

    from commitpoint.save.torch_io import load_torch

    for index, name in enumerate(names):
        loaded = load_torch(storage, f"global_step_{step}/{name}.pt")
        if not torch.equal(loaded["w"], _shard(step, index, numel)["w"]):
            return f"step {step}: {name} loads with other values than were saved"
    return None


def run_campaign(
    root: CheckpointRoot,
    plan: FaultPlan,
    *,
    steps: int,
    numel: int = 16_384,
) -> CampaignReport:
    """Train ``steps`` steps on ``root`` with ``plan``'s faults; see the module docstring."""
    from commitpoint.save.torch_io import save_torch

    report = CampaignReport(root.backend)
    clean = open_storage(root.url, **root.storage_options)
    options = {**root.storage_options, "faults": plan.to_dict()}
    monitor = CheckpointMonitor(root.url, options)
    coordinator = CheckpointCoordinator(monitor)
    names = [f"sd_{i}" for i in range(STATE_DICT_SHARDS)] + ["ckpt"]
    committed: list[int] = []
    last = {kind: clean.read_pointer(kind.pointer).value for kind in Kind}
    started = time.monotonic()
    for step in range(1, steps + 1):
        for index, name in enumerate(names):

            def save(step: int = step, index: int = index, name: str = name) -> None:
                save_torch(
                    coordinator.storage,
                    f"global_step_{step}/{name}.pt",
                    _shard(step, index, numel),
                )

            coordinator.save_async(name, save, step, is_state_dict=name != "ckpt")
        raised: BaseException | None = None
        try:
            coordinator.register_and_monitor_sync(
                step, False, state_dict_thread_count=STATE_DICT_SHARDS, checkpoint_thread_count=1
            )
        except CommitpointError as exc:
            raised = exc
        try:
            coordinator.wait_all(timeout=SAVE_TIMEOUT)
        except SaveFailed as exc:
            raised = raised or exc
        if coordinator.pending():
            report.outcomes["hangs"] += 1
            report.problems.append(f"step {step}: saves still running: {coordinator.pending()}")
            break
        now = {kind: clean.read_pointer(kind.pointer).value for kind in Kind}
        for kind in Kind:
            before, after = last[kind], now[kind]
            if before is not None and (after is None or after < before):
                report.outcomes["regressions"] += 1
                report.problems.append(f"step {step}: {kind.value} went {last[kind]}->{now[kind]}")
        last = now
        is_committed = now[Kind.CHECKPOINT] == step
        if not is_committed:
            if raised is None:
                report.outcomes["silently_lost"] += 1
                report.problems.append(f"step {step}: no error raised, yet not committed")
            else:
                report.outcomes["failed_loudly"] += 1
            continue
        problem = _check_committed(clean, step, names, numel)
        if problem is not None:
            report.outcomes["partial_commits"] += 1
            report.problems.append(problem)
            continue
        committed.append(step)
        report.outcomes["committed" if raised is None else "committed_despite_error"] += 1
    report.steps = step
    for step in committed:
        problem = _check_committed(clean, step, names, numel)
        if problem is not None:
            report.outcomes["lost_committed"] += 1
            report.problems.append(f"at the end: {problem}")
    report.seconds = time.monotonic() - started
    for storage in (monitor.storage, coordinator.storage):
        report.injected.update(getattr(storage, "injected", Counter()))
    monitor.close()
    return report


def _check_committed(storage: Any, step: int, names: list[str], numel: int) -> str | None:
    try:
        verified = verify_step(storage, step, Kind.CHECKPOINT)
        if not verified.ok:
            return f"step {step}: committed but does not verify: {verified}"
        return _loads_as_saved(storage, step, names, numel)
    except CommitpointError as exc:
        return f"step {step}: committed but unreadable: {exc}"


@contextlib.contextmanager
def _root(backend: str) -> Iterator[CheckpointRoot]:
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
        prog="python -m commitpoint.testing.fault_campaign",
        description="Train under injected storage faults and count what happened to each step.",
    )
    parser.add_argument("--steps", type=int, default=500, help="steps per backend")
    parser.add_argument("--backend", default="local,s3", help="comma-separated: local, s3, gcs")
    parser.add_argument("--rate", type=float, default=0.1, help="fraction of faulty operations")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.CRITICAL)
    for noisy in ("werkzeug", "moto", "botocore", "s3fs", "gcsfs", "aiobotocore"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    from commitpoint.testing import shutdown_servers

    bad = 0
    try:
        for backend in args.backend.split(","):
            with _root(backend.strip()) as root:
                report = run_campaign(root, mixed_plan(args.rate, args.seed), steps=args.steps)
            print(report.summary(), flush=True)
            for problem in report.problems[:20]:
                print(f"  {problem}", flush=True)
            bad += report.bad
    finally:
        shutdown_servers()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
