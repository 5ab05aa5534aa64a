"""Tiered commit: local first, replica in the background, against a local root and a direct root.

For each object store (S3 on moto, GCS on fake-gcs-server, both over real HTTP on 127.0.0.1) and
state-dict size, the same steps run in the same process, one after another (the two local roots
take turns going first), on

- a **local root** (the floor: what training waits on without a replica),
- a **tiered** root (``CheckpointMonitor(local, replicate_to=store)``),
- a **direct** root on the store (``CheckpointMonitor("s3://...")``, for contrast),

and, right after each tiered step reached the replica, a **raw upload** of the same file with the
store's own client (boto3 ``upload_file`` with its defaults / gcsfs ``put_file``), never at the
same time as anything else. Measured per step: the training-visible stall (``save_async`` plus
registration), the local commit (from the save's file closing to the local pointer naming the
step, taken by a commit listener; goal <= 5 ms and equal to the local root), and the replica
(from the local commit until the replicator reports the replica pointer naming the step:
uploaded, verified against the local manifest, manifest written; goal <= 1.1x the raw upload).
The direct root's commit is from the file closing on the store to its pointer naming the step;
its "save start -> pointer" row counts from the save's start.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from benchmarks.common import (
    MiB,
    Row,
    base_parser,
    format_size,
    make_state_dict,
    repeats_from,
    report,
    row,
    scratch_dir,
)

NAME = "tiered"
FULL_SIZES = (64 * MiB, 256 * MiB)
QUICK_SIZES = (8 * MiB,)


def _wait(done: Callable[[], bool], what: str, poll: float, timeout: float = 600) -> float:
    """Poll until ``done()``; the instant it first held."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout} s")
        if poll:
            time.sleep(poll)
    return time.perf_counter()


class _Steps:
    """Runs steps on one monitor and collects the figures of each."""

    def __init__(self, monitor: Any, sd: dict[str, Any]) -> None:
        from commitpoint import CheckpointCoordinator

        self.monitor = monitor
        self.coordinator = CheckpointCoordinator(monitor)
        self.sd = sd
        self.stall: list[float] = []
        self.commit: list[float] = []
        self.visible: list[float] = []
        self._committed: dict[int, float] = {}
        # The commit's own instant, taken on the commit thread right after the pointer moved (a
        # poller would also count how long it waited for the GIL while uploads run).
        monitor.add_commit_listener(self._on_commit)

    def _on_commit(self, step: int, kind: Any) -> None:
        self._committed.setdefault(step, time.perf_counter())

    def run(self, step: int) -> float:
        """One step; returns the instant its pointer named it on the monitor's root."""
        from commitpoint import save_torch

        storage = self.coordinator.storage
        path = f"{self.coordinator.step_dir(step)}/model.pt"
        closed: list[float] = []

        def save() -> None:
            save_torch(storage, path, self.sd)
            closed.append(time.perf_counter())

        start = time.perf_counter()
        self.coordinator.register_and_monitor_sync(step, True, state_dict_thread_count=1)
        self.coordinator.save_async("model", save, step, True)
        self.stall.append(time.perf_counter() - start)
        local = storage.url.startswith("/") or "://" not in storage.url
        _wait(
            lambda: self.monitor.latest_state_dict_step() == step,
            f"step {step} not committed on {storage.url}",
            poll=0.0002 if local else 0.001,
        )
        self.coordinator.wait_all()
        committed = self._committed[step]
        self.commit.append(committed - closed[0])
        self.visible.append(committed - start)
        return committed


def _raw_upload(store: str, root: Any) -> Callable[[str, str], None]:
    """The store's own client uploading a local file to ``key`` under the root."""
    bucket, _, prefix = root.url.split("://", 1)[1].partition("/")
    options = root.storage_options
    if store == "s3":
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=options["endpoint_url"],
            aws_access_key_id=options["key"],
            aws_secret_access_key=options["secret"],
            region_name="us-east-1",
        )

        def upload_file(source: str, key: str) -> None:
            client.upload_file(source, bucket, f"{prefix}/{key}")

        return upload_file
    import gcsfs

    fs = gcsfs.GCSFileSystem(skip_instance_cache=True, **options)

    def put_file(source: str, key: str) -> None:
        fs.put_file(source, f"{bucket}/{prefix}/{key}")

    return put_file


def _store_roots(store: str) -> Callable[[str], contextlib.AbstractContextManager[Any]]:
    if store == "s3":
        from commitpoint.testing.s3 import s3_root

        return s3_root
    from commitpoint.testing.gcs import gcs_root

    return gcs_root


def measure(store: str, size: int, steps: int) -> list[Row]:
    from commitpoint import CheckpointMonitor, Kind

    sd = make_state_dict(size)
    case = f"{store} {format_size(size)}"
    roots = _store_roots(store)
    with contextlib.ExitStack() as stack:
        plain_dir = stack.enter_context(scratch_dir("tiered-plain"))
        tier_dir = stack.enter_context(scratch_dir("tiered-local"))
        replica = stack.enter_context(roots("replica"))
        direct_root = stack.enter_context(roots("direct"))
        raw_root = stack.enter_context(roots("raw"))

        plain = _Steps(CheckpointMonitor(str(plain_dir / "root")), sd)
        tiered_monitor = CheckpointMonitor(
            str(tier_dir / "root"),
            replicate_to=replica.url,
            replicate_options={"storage_options": replica.storage_options},
        )
        tiered = _Steps(tiered_monitor, sd)
        direct = _Steps(CheckpointMonitor(direct_root.url, direct_root.storage_options), sd)
        upload = _raw_upload(store, raw_root)
        replica_s: list[float] = []
        raw_s: list[float] = []

        def replicated(step: int) -> Callable[[], bool]:
            def check() -> bool:
                status = tiered_monitor.replication_status()
                return status is not None and status.replica[Kind.STATE_DICT] == step

            return check

        for step in range(1, steps + 1):
            if step % 2:  # alternate which of the two local roots commits first
                plain.run(step)
            committed = tiered.run(step)
            reached = _wait(replicated(step), f"step {step} not replicated", poll=0.001)
            replica_s.append(reached - committed)
            if not step % 2:
                plain.run(step)
            source = tiered.coordinator.storage.full_path(f"global_step_{step}/model.pt")
            began = time.perf_counter()
            upload(source, f"raw/{step}/model.pt")
            raw_s.append(time.perf_counter() - began)
            direct.run(step)
        tiered_monitor.close()
        nbytes = os.path.getsize(source)

    raw_label = "raw boto3 upload_file" if store == "s3" else "raw gcsfs put_file"
    base_stall = sorted(plain.stall)[len(plain.stall) // 2]
    base_commit = sorted(plain.commit)[len(plain.commit) // 2]
    raw_median = sorted(raw_s)[len(raw_s) // 2]
    note = f"{format_size(nbytes)} file per step"
    rows = [
        row(case, "stall: local root", "s", plain.stall, note=note),
        row(
            case,
            "stall: tiered",
            "s",
            tiered.stall,
            ratio_to="stall: local root",
            ratio=_median(tiered.stall) / base_stall,
        ),
        row(case, f"stall: direct {store} root", "s", direct.stall),
        row(case, "local commit: local root", "s", plain.commit),
        row(
            case,
            "local commit: tiered",
            "s",
            tiered.commit,
            goal="<= 5 ms",
            met=_median(tiered.commit) <= 0.005,
            ratio_to="local commit: local root",
            ratio=_median(tiered.commit) / base_commit,
        ),
        row(case, f"commit: direct {store} root", "s", direct.commit),
        row(case, raw_label, "s", raw_s),
        row(
            case,
            "replica pointer after local commit: tiered",
            "s",
            replica_s,
            goal="<= 1.1x raw",
            met=_median(replica_s) <= 1.1 * raw_median,
            ratio_to=raw_label,
            ratio=_median(replica_s) / raw_median,
        ),
        row(case, f"save start -> pointer: direct {store} root", "s", direct.visible),
        row(
            case,
            "save start -> replica pointer: tiered",
            "s",
            [t + r for t, r in zip(tiered.visible, replica_s, strict=True)],
        ),
    ]
    return rows


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _stores() -> Iterator[str]:
    for store, module in (("s3", "commitpoint_s3"), ("gcs", "commitpoint_gcs")):
        try:
            __import__(module)
        except ImportError:
            continue
        yield store


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--stores", default="s3,gcs", help="comma-separated: s3, gcs")
    args = parser.parse_args(argv)
    from benchmarks.common import parse_size

    sizes = (
        [parse_size(s) for s in args.sizes.split(",")]
        if args.sizes
        else list(QUICK_SIZES if args.quick else FULL_SIZES)
    )
    steps = repeats_from(args, full=5, quick=2)
    wanted = [s.strip() for s in args.stores.split(",") if s.strip()]
    rows: list[Row] = []
    for store in [s for s in _stores() if s in wanted]:
        for size in sizes:
            try:
                rows.extend(measure(store, size, steps))
            except Exception as exc:  # an emulator that would not start: report, go on
                note = f"{type(exc).__name__}: {exc}"[:200]
                rows.append(
                    {
                        "case": f"{store} {format_size(size)}",
                        "method": "failed",
                        "unit": "",
                        "note": note,
                    }
                )
    return report(NAME, rows)


if __name__ == "__main__":
    raise SystemExit(main())
