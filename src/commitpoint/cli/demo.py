"""The demo: a small training run that checkpoints in the background, then resumes.

It trains a small MLP on a synthetic regression task, saves the weights (state dict) every few
steps and a full checkpoint (weights + optimizer + training state) less often. The tensors are
staged (``CheckpointCoordinator.stage``): copied in the background while the next step's forward
and backward pass run, with ``wait()`` just before the ``optimizer.step()`` that changes them,
then written by ``save_staged_async``. At the end it plays the part of a restarted job: it builds a
fresh model, loads the latest committed checkpoint, and proves the restored weights and optimizer
state equal what was saved. Run it again and it resumes from where the last run stopped: from the
newest full checkpoint that verifies, moving the pointers back (an explicit rewind) past any newer
step that does not, or past weights newer than that checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
from functools import partial
from typing import Any

from commitpoint.core.layout import Kind, step_dir
from commitpoint.errors import CommitpointError
from commitpoint.maintenance.rewind import BOTH, rewind
from commitpoint.monitor import CheckpointMonitor
from commitpoint.read.reader import CheckpointReader
from commitpoint.save.coordinator import CheckpointCoordinator
from commitpoint.save.staging import StagedStateDict
from commitpoint.save.torch_io import save_torch


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="commitpoint demo",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--storage",
        default="./checkpoints",
        help="checkpoint root: a folder (relative to where you start the demo), file://, "
        "s3://bucket/prefix, gs://bucket/prefix",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="storage option (repeatable), e.g. endpoint_url=http://...",
    )
    parser.add_argument("--steps", type=int, default=40, help="training steps to run")
    parser.add_argument("--save-every", type=int, default=5, help="state dict every N steps")
    parser.add_argument(
        "--checkpoint-every", type=int, default=10, help="full checkpoint every N steps"
    )
    parser.add_argument("--hidden", type=int, default=256, help="hidden width of the model")
    parser.add_argument("--ray", action="store_true", help="run the monitor as a Ray actor")
    parser.add_argument("--verbose", action="store_true", help="log commits as they happen")
    args = parser.parse_args(argv)
    for name in ("steps", "save_every", "checkpoint_every", "hidden"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def _options(pairs: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"commitpoint demo: --option needs KEY=VALUE, got {pair!r}")
        options[key] = value
    return options


def _model(hidden: int) -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(32, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1)
    )


def _batch(step: int) -> tuple[Any, Any]:
    import torch

    generator = torch.Generator().manual_seed(step)
    x = torch.randn(64, 32, generator=generator)
    y = x[:, :4].sum(dim=1, keepdim=True) + 0.1 * torch.randn(64, 1, generator=generator)
    return x, y


def _cpu_copy(state: dict[str, Any]) -> dict[str, Any]:
    """A plain clone, kept only to prove at the end that the restored state equals the saved."""
    import torch

    def clone(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.detach().to("cpu", copy=True)
        if isinstance(value, dict):
            return {k: clone(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(clone(v) for v in value)
        return copy.deepcopy(value)

    return {k: clone(v) for k, v in state.items()}


def _equal(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _storage_url(text: str) -> str:
    """A plain path means a folder relative to where the demo was started; make it absolute so
    what it prints can be pasted into ``commitpoint`` from anywhere."""
    return text if "://" in text else os.path.abspath(os.path.expanduser(text))


def _resume_step(reader: CheckpointReader) -> int | None:
    """The newest full checkpoint that verifies. Steps after it will be trained again, so any
    pointer above it (a newer checkpoint that does not verify, or newer weights) is moved back to
    it first, explicitly: a rewind, as ``commitpoint rewind URL --to STEP`` does."""
    latest = reader.latest_checkpoint_step()
    step = reader.latest_verified_step(Kind.CHECKPOINT)
    if latest is not None and step != latest:
        found = f"step {step}" if step is not None else "no older full checkpoint"
        _say(f"the latest full checkpoint, step {latest}, does not verify; {found} does")
    if step is None:
        if latest is not None:
            raise SystemExit(
                f"commitpoint demo: no full checkpoint under {reader.url} verifies; inspect them "
                f"with `commitpoint ls {reader.url}`, or start afresh with another --storage"
            )
        return None
    for record in rewind(reader.storage, BOTH, step) if _above(reader, step) else []:
        _say(
            f"rewound the {'weights' if record.kind is Kind.STATE_DICT else 'checkpoint'} "
            f"pointer from step {record.from_step} to checkpoint step {step} "
            f"(as `commitpoint rewind {reader.url} --to {step}` does)"
        )
    return step


def _above(reader: CheckpointReader, step: int) -> bool:
    return any((reader.latest_step(kind) or -1) > step for kind in Kind)


def _committed(value: int | None) -> str:
    return "-" if value is None else str(value)


def run(args: argparse.Namespace) -> int:
    import torch

    options = _options(args.option)
    args.storage = _storage_url(args.storage)
    reader = CheckpointReader(args.storage, **options)
    resumed = _resume_step(reader)
    if args.ray:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        monitor: Any = CheckpointMonitor.get_actor("commitpoint-demo", args.storage, options)
    else:
        monitor = CheckpointMonitor(args.storage, options)
    coordinator = CheckpointCoordinator(monitor)
    storage = coordinator.storage

    model = _model(args.hidden)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start = 0
    if resumed is not None:
        folder = step_dir(resumed)
        model.load_state_dict(reader.load(resumed, "model.pt", kind="checkpoint"))
        optimizer.load_state_dict(reader.load(resumed, "optimizer.pt", kind="checkpoint"))
        start = int(reader.load(resumed, "trainer_state.pt", kind="checkpoint")["step"])
        _say(f"resuming from {reader.storage.url_for(folder)} (step {start})")
    else:
        _say(f"starting a new run; checkpoints go to {storage.url}")

    saved: dict[int, dict[str, Any]] = {}
    staging: list[StagedStateDict] = []  # snapshots still copying while this step computes
    stall = 0.0
    t0 = time.perf_counter()
    loss_value = float("nan")
    for step in range(start + 1, start + args.steps + 1):
        x, y = _batch(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        began = time.perf_counter()
        for staged in staging:  # the step below changes the tensors those snapshots copy
            staged.wait()
        staging.clear()
        stall += time.perf_counter() - began
        optimizer.step()
        loss_value = loss.item()

        full = step % args.checkpoint_every == 0
        if step % args.save_every and not full:
            continue
        if full:  # the demo's own reference for the final check; not part of checkpointing
            saved[step] = {
                "model": _cpu_copy(model.state_dict()),
                "optimizer": _cpu_copy(optimizer.state_dict()),
            }
        began = time.perf_counter()
        folder = step_dir(step)
        weights = coordinator.stage(model.state_dict())
        save_weights = partial(save_torch, storage, f"{folder}/model.pt")
        coordinator.save_staged_async("model", weights, save_weights, step, True)
        staging.append(weights)
        if full:
            optim_state = coordinator.stage(optimizer.state_dict())
            save_optimizer = partial(save_torch, storage, f"{folder}/optimizer.pt")
            coordinator.save_staged_async("optimizer", optim_state, save_optimizer, step)
            staging.append(optim_state)
            trainer_state = {"step": step, "loss": loss_value}
            save_trainer_state = partial(
                save_torch, storage, f"{folder}/trainer_state.pt", trainer_state
            )
            coordinator.save_async("trainer_state", save_trainer_state, step)
            coordinator.register_and_monitor_sync(
                step, False, state_dict_thread_count=1, checkpoint_thread_count=2
            )
        else:
            coordinator.register_and_monitor_sync(step, True, state_dict_thread_count=1)
        stall += time.perf_counter() - began
        latest = coordinator.latest_steps()
        kind = "checkpoint" if full else "weights"
        _say(
            f"step {step:4d}  loss {loss_value:.4f}  saved {kind:10s}"
            f"  committed: weights {_committed(latest['state_dict'])}, "
            f"checkpoint {_committed(latest['checkpoint'])}"
        )

    coordinator.wait_all()
    elapsed = time.perf_counter() - t0
    latest = coordinator.latest_steps()
    _say(
        f"trained {args.steps} steps in {elapsed:.2f} s; training was blocked "
        f"{stall * 1000:.1f} ms in total by checkpointing (staging and its waits included)"
    )
    _say(
        f"committed: weights step {_committed(latest['state_dict'])}, "
        f"checkpoint step {_committed(latest['checkpoint'])}"
    )

    # A restarted job: fresh model and optimizer, restored from the newest full checkpoint.
    final = reader.latest_checkpoint_step()
    if final is None or final not in saved:
        _say("no full checkpoint was committed by this run; nothing to resume from")
        return 1
    report = reader.verify(final, "checkpoint")
    _say(
        f"verify step {final}: {report.files} files, {report.bytes} bytes, "
        f"{'ok' if report.ok else 'PROBLEMS: ' + '; '.join(map(str, report.problems))}"
    )
    fresh = _model(args.hidden)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    fresh.load_state_dict(reader.load(final, "model.pt", kind="checkpoint"))
    fresh_optimizer.load_state_dict(reader.load(final, "optimizer.pt", kind="checkpoint"))
    same = _equal(fresh.state_dict(), saved[final]["model"]) and _equal(
        fresh_optimizer.state_dict()["state"], saved[final]["optimizer"]["state"]
    )
    _say(
        f"restart check: a fresh model and optimizer loaded from step {final} "
        f"{'equal' if same else 'DIFFER FROM'} the saved ones"
    )
    _say(
        f"inspect what was written: commitpoint ls {storage.url}   "
        f"(in a clone of the repository: ./run commitpoint ls {storage.url}); "
        "run the demo again to resume"
    )
    if args.ray:
        import ray

        ray.shutdown()
    return 0 if same and report.ok else 1


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return run(args)
    except CommitpointError as exc:  # one line, and where to look, instead of a traceback
        message = " ".join(str(exc).split())
        sys.stderr.write(f"commitpoint demo: {message}\n")
        sys.stderr.write(
            f"commitpoint demo: inspect the root with `commitpoint ls {args.storage}`; "
            f"`commitpoint rewind {args.storage} --to STEP` moves its pointers back to a step "
            "that verifies\n"
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
