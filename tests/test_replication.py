"""The replica tier: a Replicator publishes locally committed steps on a second root.

Local roots on disk, replicas on disk, moto S3 and fake-gcs-server (real HTTP). Steps are
committed through the real save path (coordinator + monitor) and then replicated.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from commitpoint import CheckpointCoordinator, CheckpointMonitor, RetentionPolicy
from commitpoint.core.layout import Kind, step_dir
from commitpoint.core.manifest import manifest_path, read_manifest
from commitpoint.errors import CorruptCheckpoint, InvalidArgument
from commitpoint.read.verify import verify_step
from commitpoint.replication import (
    OlderSteps,
    Outcome,
    ReplicationOptions,
    Replicator,
    Tier,
    TieredReader,
    compare_tiers,
    publish_step,
)
from commitpoint.storage.protocol import StorageBackend
from commitpoint.testing import CheckpointRoot, commit_step

FAST = {"backoff_s": 0.01, "max_backoff_s": 0.05}


def _commit(root: CheckpointRoot, steps: dict[int, bool], numel: int = 16) -> None:
    """Commit ``steps`` (step -> full checkpoint?) on ``root`` through the real save path."""
    monitor = CheckpointMonitor(root.url, root.storage_options)
    coordinator = CheckpointCoordinator(monitor)
    for step, full in sorted(steps.items()):
        commit_step(coordinator, step, checkpoint=full, numel=numel)
    monitor.close()


def _replicator(local: CheckpointRoot, replica: CheckpointRoot, **options: Any) -> Replicator:
    body = {**FAST, **options}
    body["storage_options"] = {**replica.storage_options, **body.get("storage_options", {})}
    return Replicator(local.url, replica.url, body, local_options=local.storage_options)


def _pointers(storage: StorageBackend) -> dict[Kind, int | None]:
    return {kind: storage.read_pointer(kind.pointer).value for kind in Kind}


@pytest.fixture
def local(local_checkpoint_root: CheckpointRoot) -> CheckpointRoot:
    return local_checkpoint_root


@pytest.fixture
def replica(tmp_path: Any) -> Iterator[CheckpointRoot]:
    from commitpoint.testing import local_root

    with local_root(str(tmp_path)) as root:
        yield root


# -- publication on every backend ---------------------------------------------------------------
def test_every_committed_step_reaches_the_replica_verified(
    local: CheckpointRoot, checkpoint_root: CheckpointRoot
) -> None:
    _commit(local, {1: False, 2: True, 3: False}, numel=4096)
    with _replicator(local, checkpoint_root) as replicator:
        assert replicator.drain(60)
        status = replicator.status()
    storage = checkpoint_root.open()
    assert _pointers(storage) == {Kind.STATE_DICT: 3, Kind.CHECKPOINT: 2}
    assert status.caught_up and status.lag_steps == 0 and status.lag_bytes == 0
    assert status.published == 3 and not status.failed
    source = local.open()
    for step, kinds in {1: [Kind.STATE_DICT], 2: list(Kind), 3: [Kind.STATE_DICT]}.items():
        for kind in kinds:
            assert verify_step(storage, step, kind).ok
            ours, theirs = read_manifest(source, step, kind), read_manifest(storage, step, kind)
            if ours is not None:  # the manifests are copied, not rebuilt
                assert theirs == ours
        for info in source.list_files(step_dir(step)):  # byte for byte, never re-serialised
            assert storage.read_bytes(info.path) == source.read_bytes(info.path)


def test_checkpoint_after_its_state_dict_uploads_only_the_new_files(
    local: CheckpointRoot, replica: CheckpointRoot
) -> None:
    """The weights of a step are published as soon as they commit; the full checkpoint of the
    same step then uploads only the optimizer files."""
    monitor = CheckpointMonitor(local.url)
    coordinator = CheckpointCoordinator(monitor)
    commit_step(coordinator, 1)
    with _replicator(local, replica) as replicator:
        assert replicator.drain(30)
        first = replicator.status().bytes_uploaded
        # The checkpoint of step 1 follows: write optim.pt and commit the checkpoint kind.
        from commitpoint import save_torch

        coordinator.save_async(
            "optim", lambda: save_torch(coordinator.storage, "global_step_1/optim.pt", {"x": 1}), 1
        )
        coordinator.register_and_monitor_sync(1, False, checkpoint_thread_count=1)
        coordinator.wait_all()
        replicator.submit(1, Kind.CHECKPOINT)
        assert replicator.drain(30)
        second = replicator.status().bytes_uploaded - first
    optim = local.open().list_files("global_step_1")
    sizes = {i.path.rsplit("/", 1)[-1]: i.size for i in optim}
    assert second == sizes["optim.pt"]
    assert _pointers(replica.open()) == {Kind.STATE_DICT: 1, Kind.CHECKPOINT: 1}
    assert verify_step(replica.open(), 1, Kind.CHECKPOINT).ok


# -- plain readers only ever see complete steps ----------------------------------------------
def _plain_reader(root: CheckpointRoot) -> tuple[Any, Any]:
    """(read pointer, read file) with the store's own client, not commitpoint's."""
    bucket, _, prefix = root.url.split("://", 1)[1].partition("/")
    if root.backend == "s3":
        import boto3

        options = root.storage_options
        client = boto3.client(
            "s3",
            endpoint_url=options["endpoint_url"],
            aws_access_key_id=options["key"],
            aws_secret_access_key=options["secret"],
            region_name="us-east-1",
        )

        def read(key: str) -> bytes | None:
            try:
                body = client.get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"]
            except client.exceptions.NoSuchKey:
                return None
            return bytes(body.read())

    else:
        import gcsfs

        fs = gcsfs.GCSFileSystem(skip_instance_cache=True, **root.storage_options)

        def read(key: str) -> bytes | None:
            try:
                return bytes(fs.cat_file(f"{bucket}/{prefix}/{key}"))
            except FileNotFoundError:
                return None

    def pointer(kind: Kind) -> int | None:
        data = read(kind.pointer)
        return None if data is None else int(data)

    return pointer, read


@pytest.mark.parametrize("store", ["s3", "gcs"])
def test_plain_readers_only_see_complete_steps(
    local: CheckpointRoot, store: str, request: pytest.FixtureRequest
) -> None:
    """A boto3 / gcsfs reader polling the replica while steps are published: whenever a pointer
    names a step, every file of that step is there, whole, with the local bytes."""
    root: CheckpointRoot = request.getfixturevalue(f"{store}_checkpoint_root")
    pointer, read = _plain_reader(root)
    source = local.open()
    seen: list[tuple[Kind, int]] = []
    problems: list[str] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            for kind in Kind:
                step = pointer(kind)
                if step is None or (kind, step) in seen:
                    continue
                seen.append((kind, step))
                manifest = read_manifest(source, step, kind) or read_manifest(
                    source, step, Kind.CHECKPOINT
                )
                assert manifest is not None
                for record in manifest.files:
                    if read(record.path) != source.read_bytes(record.path):
                        problems.append(f"{kind.value} {step}: {record.path} incomplete")

    with _replicator(local, root) as replicator:
        thread = threading.Thread(target=poll)
        thread.start()
        try:
            monitor = CheckpointMonitor(local.url)
            coordinator = CheckpointCoordinator(monitor)
            for step in range(1, 6):
                commit_step(coordinator, step, checkpoint=step % 2 == 0, numel=200_000)
                replicator.submit(step, Kind.CHECKPOINT if step % 2 == 0 else Kind.STATE_DICT)
            assert replicator.drain(120)
            time.sleep(0.2)
        finally:
            stop.set()
            thread.join()
    assert not problems
    assert (Kind.STATE_DICT, 5) in seen and (Kind.CHECKPOINT, 4) in seen


# -- faults on the replica --------------------------------------------------------------------
@pytest.mark.parametrize("seed", [7, 8, 9])
def test_transient_replica_faults_are_retried_until_published(
    local: CheckpointRoot, replica: CheckpointRoot, caplog: pytest.LogCaptureFixture, seed: int
) -> None:
    _commit(local, {1: False, 2: True, 3: True})
    faults = {
        "fail": 0.1,
        "fail_after": 0.3,
        "truncate": 0.1,
        "lose_tail": 0.1,
        "operations": ["write", "write_pointer", "list"],
        "seed": seed,
    }
    caplog.set_level(logging.WARNING, "commitpoint.replication")
    with _replicator(local, replica, attempts=30, storage_options={"faults": faults}) as r:
        assert r.drain(60)
        status = r.status()
    assert not status.failed and status.caught_up
    assert "retrying" in caplog.text  # the faults did hit
    storage = replica.open()
    assert _pointers(storage) == {Kind.STATE_DICT: 3, Kind.CHECKPOINT: 3}
    for step in (1, 2, 3):
        assert verify_step(storage, step, Kind.STATE_DICT).ok


def test_a_replica_that_keeps_failing_is_loud_and_moves_nothing(
    local: CheckpointRoot, replica: CheckpointRoot, caplog: pytest.LogCaptureFixture
) -> None:
    _commit(local, {1: False})
    faults = {"fail": 1.0, "operations": ["write"]}
    caplog.set_level(logging.WARNING, "commitpoint.replication")
    with _replicator(local, replica, attempts=3, storage_options={"faults": faults}) as r:
        r.drain(30)
        status = r.status()
    assert [(f.step, f.kind, f.attempts) for f in status.failed] == [(1, Kind.STATE_DICT, 3)]
    assert "injected failure" in (status.last_error or "")
    errors = [rec for rec in caplog.records if rec.levelno == logging.ERROR]
    assert errors and "failed 3 time(s)" in errors[0].getMessage()
    assert sum("retrying" in rec.getMessage() for rec in caplog.records) == 2
    storage = replica.open()
    assert _pointers(storage) == {Kind.STATE_DICT: None, Kind.CHECKPOINT: None}
    assert read_manifest(storage, 1, Kind.STATE_DICT) is None


def test_a_local_file_that_no_longer_matches_its_manifest_is_not_replicated(
    local: CheckpointRoot, replica: CheckpointRoot
) -> None:
    _commit(local, {1: False})
    source = local.open()
    path = f"{step_dir(1)}/model.pt"
    data = bytearray(source.read_bytes(path))
    data[len(data) // 2] ^= 0xFF
    with open(source.full_path(path), "wb") as f:  # bit rot after the commit
        f.write(data)
    with _replicator(local, replica, attempts=1) as r:
        r.drain(30)
        status = r.status()
    assert status.failed and "local manifest" in status.failed[0].error
    storage = replica.open()
    assert storage.read_pointer(Kind.STATE_DICT.pointer).value is None
    assert not storage.exists(path)  # the mismatched upload was removed again
    assert read_manifest(storage, 1, Kind.STATE_DICT) is None


def test_a_second_replicator_fences_the_first(
    local: CheckpointRoot, replica: CheckpointRoot
) -> None:
    _commit(local, {1: False})
    first = _replicator(local, replica).start()
    assert first.drain(30)
    second = _replicator(local, replica).start()
    _commit(local, {2: False})
    first.submit(2, Kind.STATE_DICT)
    first.drain(30)
    status = first.status()
    assert status.failed and "WriterFenced" in status.failed[0].error and not status.running
    assert replica.open().read_pointer(Kind.STATE_DICT.pointer).value == 1
    second.submit(2, Kind.STATE_DICT)
    assert second.drain(30)
    assert replica.open().read_pointer(Kind.STATE_DICT.pointer).value == 2
    first.close()
    second.close()


# -- crashes and restarts ---------------------------------------------------------------------
def test_restart_resumes_committed_steps_the_replica_lacks(
    local: CheckpointRoot, replica: CheckpointRoot
) -> None:
    _commit(local, {1: False, 2: True})
    with _replicator(local, replica) as r:
        assert r.drain(30)
    _commit(local, {3: False, 4: True, 5: False})  # committed while no replicator ran
    comparison = compare_tiers(local.open(), replica.open())
    assert [s.step for s in comparison.unreplicated] == [3, 4, 5]
    assert comparison.lag_steps == 3
    with _replicator(local, replica) as r:
        assert r.drain(30)
        assert r.status().published == 3
    assert _pointers(replica.open()) == {Kind.STATE_DICT: 5, Kind.CHECKPOINT: 4}
    assert not compare_tiers(local.open(), replica.open()).unreplicated


def test_a_step_whose_manifest_landed_but_not_its_pointer_is_finished_without_upload(
    local: CheckpointRoot, replica: CheckpointRoot
) -> None:
    """A crash between the replica manifest and the replica pointer: on restart the verified
    files are not uploaded again, and the pointer moves."""
    _commit(local, {1: True})
    crashing = replica.open()
    write_pointer_if = crashing.write_pointer_if

    def no_step_pointers(name: str, value: int, token: str | None) -> str:
        if name in (Kind.STATE_DICT.pointer, Kind.CHECKPOINT.pointer):
            raise OSError("the process died here")
        return write_pointer_if(name, value, token)

    crashing.write_pointer_if = no_step_pointers  # type: ignore[method-assign]
    with Replicator(local.url, crashing, {**FAST, "attempts": 1}) as r:
        r.drain(30)
    storage = replica.open()
    assert read_manifest(storage, 1, Kind.CHECKPOINT) is not None
    assert _pointers(storage) == {Kind.STATE_DICT: None, Kind.CHECKPOINT: None}
    with _replicator(local, replica) as r:
        assert r.drain(30)
        status = r.status()
    assert status.published == 1 and status.bytes_uploaded == 0
    assert _pointers(storage) == {Kind.STATE_DICT: 1, Kind.CHECKPOINT: 1}


def test_a_stale_unnamed_replica_step_is_replaced_manifest_first(
    local: CheckpointRoot, replica: CheckpointRoot
) -> None:
    """The replica has another run's step 1 that no pointer names: it is replaced."""
    _commit(replica, {1: False}, numel=8)
    storage = replica.open()
    for kind in Kind:  # unname it, as if its pointer never moved
        storage.delete(kind.pointer)
    _commit(local, {1: False}, numel=32)
    with _replicator(local, replica) as r:
        assert r.drain(30)
    assert read_manifest(storage, 1, Kind.STATE_DICT) == read_manifest(
        local.open(), 1, Kind.STATE_DICT
    )
    assert verify_step(storage, 1, Kind.STATE_DICT).ok


def test_a_torn_unnamed_replica_manifest_is_replaced(
    local: CheckpointRoot, replica: CheckpointRoot
) -> None:
    _commit(local, {1: False})
    storage = replica.open()
    storage.write_bytes(manifest_path(1, Kind.STATE_DICT), b'{"format": 1, "st', track=False)
    with _replicator(local, replica) as r:
        assert r.drain(30)
    assert read_manifest(storage, 1, Kind.STATE_DICT) == read_manifest(
        local.open(), 1, Kind.STATE_DICT
    )
    assert storage.read_pointer(Kind.STATE_DICT.pointer).value == 1


def test_a_named_replica_step_is_never_replaced(
    local: CheckpointRoot, replica: CheckpointRoot
) -> None:
    _commit(replica, {1: False}, numel=8)
    before = replica.open().read_bytes(manifest_path(1, Kind.STATE_DICT))
    _commit(local, {1: False}, numel=32)
    with ThreadPoolExecutorContext() as pool:
        result = publish_step(local.open(), replica.open(), 1, Kind.STATE_DICT, pool=pool)
    assert result.outcome is Outcome.CONFLICT
    assert replica.open().read_bytes(manifest_path(1, Kind.STATE_DICT)) == before


class ThreadPoolExecutorContext:
    def __enter__(self) -> Any:
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(2)
        return self.pool

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown()


# -- policy for older steps -------------------------------------------------------------------
@pytest.mark.parametrize("policy", [OlderSteps.UPLOAD, OlderSteps.SKIP])
def test_older_step_policy(
    local: CheckpointRoot, replica: CheckpointRoot, policy: OlderSteps
) -> None:
    """Steps committed faster than the replica takes them: ``upload`` publishes all in order,
    ``skip`` drops queued ones for the newest; neither leaves a half-published step."""
    slow = {"delay": 1.0, "delay_seconds": 0.15, "operations": ["write"]}
    monitor = CheckpointMonitor(local.url)
    coordinator = CheckpointCoordinator(monitor)
    with _replicator(local, replica, older_steps=policy, storage_options={"faults": slow}) as r:
        for step in range(1, 6):
            commit_step(coordinator, step)
            r.submit(step, Kind.STATE_DICT)
        assert r.drain(60)
        status = r.status()
    storage = replica.open()
    assert storage.read_pointer(Kind.STATE_DICT.pointer).value == 5
    on_replica = [s for s in range(1, 6) if read_manifest(storage, s, Kind.STATE_DICT)]
    if policy is OlderSteps.UPLOAD:
        assert on_replica == [1, 2, 3, 4, 5] and not status.skipped
    else:
        assert status.skipped and set(status.skipped).isdisjoint(on_replica)
        assert on_replica[-1] == 5 and len(on_replica) < 5
    for step in on_replica:
        assert verify_step(storage, step, Kind.STATE_DICT).ok


# -- retention per tier -----------------------------------------------------------------------
def test_local_retention_keeps_steps_the_replica_lacks(
    local: CheckpointRoot, replica: CheckpointRoot
) -> None:
    _commit(local, {1: False, 2: False, 3: False, 4: False})
    storage = local.open()
    policy = RetentionPolicy(keep_last=1, orphan_min_age_s=0)
    faults = {"fail": 1.0, "operations": ["write"]}
    with _replicator(local, replica, attempts=1, storage_options={"faults": faults}) as r:
        r.drain(30)
        protected = r.protecting(policy)
        assert protected is not None
        result = protected.apply(storage)
        assert result.deleted == ()
        assert sorted(result.protected) == [1, 2, 3]
    with _replicator(local, replica) as r:  # the replica catches up: retention may delete
        assert r.drain(30)
        protected = r.protecting(policy)
        assert protected is not None
        assert sorted(protected.apply(storage).deleted) == [1, 2, 3]


def test_local_retention_may_be_told_not_to_wait(
    local: CheckpointRoot, replica: CheckpointRoot
) -> None:
    _commit(local, {1: False, 2: False, 3: False})
    policy = RetentionPolicy(keep_last=1, orphan_min_age_s=0)
    r = _replicator(local, replica, protect_unreplicated=False)
    protected = r.protecting(policy)
    assert protected is not None
    assert sorted(protected.apply(local.open()).deleted) == [1, 2]
    with r:  # the deleted steps are gone locally: only step 3 is published
        assert r.drain(30)
        assert r.status().published == 1
    assert replica.open().read_pointer(Kind.STATE_DICT.pointer).value == 3


def test_replica_retention_runs_on_the_replica(
    local: CheckpointRoot, replica: CheckpointRoot
) -> None:
    _commit(local, {s: False for s in range(1, 7)})
    keep = RetentionPolicy(keep_last=1, keep_every=3, orphan_min_age_s=0)
    with _replicator(local, replica, retention=keep) as r:
        assert r.drain(30)
    storage = replica.open()
    assert [s for s in range(1, 7) if read_manifest(storage, s, Kind.STATE_DICT)] == [3, 6]
    assert len([s for s in range(1, 7) if read_manifest(local.open(), s, Kind.STATE_DICT)]) == 6


# -- status -----------------------------------------------------------------------------------
def test_status_reports_lag_while_uploading(local: CheckpointRoot, replica: CheckpointRoot) -> None:
    _commit(local, {1: False, 2: False}, numel=300_000)
    slow = {"delay": 1.0, "delay_seconds": 0.3, "operations": ["write"]}
    with _replicator(local, replica, storage_options={"faults": slow}) as r:
        time.sleep(0.1)
        status = r.status()
        assert status.lag_steps == 2 and status.lag_seconds > 0 and not status.caught_up
        assert status.in_flight == 1 and status.pending == (2,)
        assert status.lag_bytes > 2 * 300_000 * 4
        assert "queued [2]" in status.describe()
        assert r.drain(30)
        assert r.status().caught_up


def test_options_are_validated() -> None:
    with pytest.raises(InvalidArgument, match="unknown replication option"):
        ReplicationOptions.of({"paralel_files": 2})
    with pytest.raises(InvalidArgument, match="parallel_files"):
        ReplicationOptions(parallel_files=0)
    with pytest.raises(InvalidArgument, match="older_steps"):
        ReplicationOptions(older_steps="sometimes")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="backoff_s"):
        ReplicationOptions(backoff_s=-1)
    with pytest.raises(InvalidArgument, match="retention"):
        ReplicationOptions(retention={"keep_last": 2})  # type: ignore[arg-type]
    options = ReplicationOptions.of({"retention": {"keep_every": 1000}, "older_steps": "skip"})
    assert options.retention == RetentionPolicy(keep_every=1000)
    assert options.older_steps is OlderSteps.SKIP


def test_the_replica_cannot_be_the_local_root(local: CheckpointRoot) -> None:
    with pytest.raises(InvalidArgument, match="local root itself"):
        Replicator(local.url, local.url)


# -- tiered restore ---------------------------------------------------------------------------
def test_tiered_reader_prefers_local_then_falls_back_to_the_replica(
    local: CheckpointRoot, replica: CheckpointRoot, tmp_path: Any
) -> None:
    _commit(local, {1: True, 2: True})
    with _replicator(local, replica) as r:
        assert r.drain(30)
    reader = TieredReader(local.url, replica.url)
    chosen = reader.resolve(Kind.CHECKPOINT)
    assert (chosen.step, chosen.tier) == (2, Tier.LOCAL)
    path = local.open().full_path(f"{step_dir(2)}/model.pt")
    with open(path, "r+b") as f:  # the local copy of step 2 rots
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    chosen = reader.resolve(Kind.CHECKPOINT)
    assert (chosen.step, chosen.tier) == (2, Tier.REPLICA)
    assert float(chosen.load("model.pt")["w"][0]) == 2.0
    fresh = TieredReader(str(tmp_path / "empty-local"), replica.url)  # a new machine
    assert fresh.resolve(Kind.STATE_DICT).tier is Tier.REPLICA
    assert fresh.latest_step(Kind.STATE_DICT) == 2
    with open(replica.open().full_path(f"{step_dir(2)}/model.pt"), "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    chosen = reader.resolve(Kind.CHECKPOINT)
    assert (chosen.step, chosen.tier) == (1, Tier.LOCAL)


def test_tiered_reader_with_nothing_committed(
    local: CheckpointRoot, replica: CheckpointRoot
) -> None:
    reader = TieredReader(local.url, replica.url)
    assert reader.latest_step(Kind.STATE_DICT) is None
    with pytest.raises(CorruptCheckpoint, match="no state_dict step verifies"):
        reader.resolve()


def test_bad_inputs_are_refused_with_typed_errors(
    local: CheckpointRoot, replica: CheckpointRoot
) -> None:
    from commitpoint import BackendNotFound, CheckpointMonitor
    from commitpoint.errors import InvalidStep

    r = _replicator(local, replica)
    with pytest.raises(InvalidStep):
        r.submit(-1, Kind.STATE_DICT)
    with pytest.raises(InvalidStep):
        r.submit(True, Kind.STATE_DICT)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="kind must be one of"):
        r.submit(1, "weights")
    with pytest.raises(InvalidArgument, match="URL or a StorageBackend"):
        Replicator(local.url, 5)  # type: ignore[arg-type]
    with pytest.raises(BackendNotFound):
        CheckpointMonitor(local.url, replicate_to="nosuch://bucket/run")
    with pytest.raises(InvalidArgument, match="replicate_options"):
        CheckpointMonitor(local.url, replicate_to=replica.url, replicate_options=[1])  # type: ignore[arg-type]
    assert r.status().pending == ()
