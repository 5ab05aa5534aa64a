"""Retention and orphan GC: keep exactly what the policy says, never what is committed or live."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from commitpoint import (
    CheckpointCoordinator,
    CheckpointMonitor,
    CommitpointError,
    InvalidArgument,
    Kind,
)
from commitpoint.core.layout import REWIND_HISTORY, parse_step_dir, step_dir
from commitpoint.core.manifest import manifest_path
from commitpoint.core.pointer import rewind_pointer
from commitpoint.maintenance.retention import RetentionPolicy
from commitpoint.storage.protocol import StorageBackend
from commitpoint.testing import CheckpointRoot, commit_step


@pytest.fixture
def root(any_checkpoint_root: CheckpointRoot) -> CheckpointRoot:
    """Every backend; S3/GCS skip (with the reason) when their plug-ins are not installed."""
    return any_checkpoint_root


@pytest.fixture
def coordinator(root: CheckpointRoot) -> Iterator[CheckpointCoordinator]:
    monitor = CheckpointMonitor(root.url, root.storage_options)
    yield CheckpointCoordinator(monitor)
    monitor.close()


def commit(coordinator: CheckpointCoordinator, step: int, *, checkpoint: bool = False) -> None:
    """Commit ``step`` through the real save path (torch files written by background saves)."""
    commit_step(coordinator, step, checkpoint=checkpoint, numel=32)


def steps_on(storage: StorageBackend) -> list[int]:
    return sorted(s for n in storage.list_dirs("") if (s := parse_step_dir(n)) is not None)


def write_orphan(storage: StorageBackend, step: int) -> None:
    """Files of a save the monitor never heard of (written through the backend, so its owner
    marker is there): no manifest."""
    storage.write_bytes(f"{step_dir(step)}/model.pt", b"partial weights")
    storage.records.take(step_dir(step))


def test_policy_arguments_are_checked() -> None:
    for bad in (0, -1, True, 1.5):
        with pytest.raises(InvalidArgument):
            RetentionPolicy(keep_last=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument):
            RetentionPolicy(keep_every=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        RetentionPolicy(orphan_min_age_s=-1)


def test_keep_last(root: CheckpointRoot, coordinator: CheckpointCoordinator) -> None:
    for step in range(1, 7):
        commit(coordinator, step)
    result = RetentionPolicy(keep_last=2).apply(root.open())
    assert result.deleted == (1, 2, 3, 4)
    assert result.kept == (5, 6)
    assert steps_on(root.open()) == [5, 6]
    assert root.verify(6).ok and root.verify(5).ok


def test_keep_last_and_keep_every_combine(
    root: CheckpointRoot, coordinator: CheckpointCoordinator
) -> None:
    for step in range(1, 8):
        commit(coordinator, step)
    result = RetentionPolicy(keep_last=1, keep_every=3).apply(root.open())
    assert result.kept == (3, 6, 7)
    assert result.deleted == (1, 2, 4, 5)
    assert steps_on(root.open()) == [3, 6, 7]


def test_no_rule_keeps_every_committed_step(
    root: CheckpointRoot, coordinator: CheckpointCoordinator
) -> None:
    for step in range(1, 4):
        commit(coordinator, step)
    result = RetentionPolicy().apply(root.open())
    assert result.deleted == () and result.kept == (1, 2, 3)
    assert steps_on(root.open()) == [1, 2, 3]


def test_dry_run_lists_and_deletes_nothing(
    root: CheckpointRoot, coordinator: CheckpointCoordinator
) -> None:
    for step in range(1, 5):
        commit(coordinator, step)
    write_orphan(root.open(), 0)
    policy = RetentionPolicy(keep_last=1, orphan_min_age_s=0)
    before = root.list_files()
    result = policy.apply(root.open(), dry_run=True)
    assert result.dry_run
    assert (result.deleted, result.orphans) == ((1, 2, 3), (0,))
    assert root.list_files() == before
    done = policy.apply(root.open())
    assert (done.deleted, done.orphans) == ((1, 2, 3), (0,))
    assert steps_on(root.open()) == [4]


def test_pointer_named_and_in_flight_steps_are_protected(
    root: CheckpointRoot, coordinator: CheckpointCoordinator
) -> None:
    commit(coordinator, 2, checkpoint=True)
    for step in (3, 4, 5, 6):
        commit(coordinator, step)
    assert root.committed_steps() == {"state_dict": 6, "checkpoint": 2}
    result = RetentionPolicy(keep_last=1).apply(root.open(), in_flight={4})
    assert result.deleted == (3, 5)
    assert result.protected == (2, 4)
    assert steps_on(root.open()) == [2, 4, 6]
    assert root.verify(2, Kind.CHECKPOINT).ok


def test_steps_above_the_newest_pointer_are_left_alone(
    root: CheckpointRoot, coordinator: CheckpointCoordinator
) -> None:
    """After a rewind to 3, steps 4..6 still have manifests; they are not retention's to judge."""
    for step in range(1, 7):
        commit(coordinator, step)
    storage = root.open()
    rewind_pointer(storage, Kind.STATE_DICT.pointer, 3, expected=6)
    result = RetentionPolicy(keep_last=1).apply(storage)
    assert result.deleted == (1, 2)
    assert steps_on(storage) == [3, 4, 5, 6]


def test_latest_rewind_target_is_protected(
    root: CheckpointRoot, coordinator: CheckpointCoordinator
) -> None:
    for step in range(1, 7):
        commit(coordinator, step)
    storage = root.open()
    line = {"time": 0, "kind": "state_dict", "from": 9, "to": 2, "host": "h", "pid": 1}
    storage.write_bytes(REWIND_HISTORY, (json.dumps(line) + "\n").encode(), track=False)
    result = RetentionPolicy(keep_last=1).apply(storage)
    assert result.protected == (2,)
    assert steps_on(storage) == [2, 6]


def test_orphans_are_collected_only_when_old_below_the_pointer_and_not_in_flight(
    root: CheckpointRoot, coordinator: CheckpointCoordinator
) -> None:
    commit(coordinator, 5)
    storage = root.open()
    for step in (1, 2, 9):
        write_orphan(storage, step)
    young = RetentionPolicy().apply(storage)  # default minimum age: an hour
    assert young.orphans == ()
    assert steps_on(storage) == [1, 2, 5, 9]

    result = RetentionPolicy(orphan_min_age_s=0).apply(storage, in_flight={2})
    assert result.orphans == (1,)
    assert steps_on(storage) == [2, 5, 9]  # 2 in flight, 9 above the pointer

    off = RetentionPolicy(gc_orphans=False, orphan_min_age_s=0).apply(storage)
    assert off.orphans == ()
    assert steps_on(storage) == [2, 5, 9]


def test_nothing_is_deleted_before_anything_is_committed(root: CheckpointRoot) -> None:
    storage = root.open()
    write_orphan(storage, 1)
    result = RetentionPolicy(keep_last=1, orphan_min_age_s=0).apply(storage)
    assert (result.deleted, result.orphans) == ((), ())
    assert steps_on(storage) == [1]


class _Storage:
    """The real backend, with a hook run when a given path is deleted (fault injection)."""

    def __init__(self, inner: StorageBackend, hooks: dict[str, Any]) -> None:
        self._inner = inner
        self._hooks = hooks

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def delete(self, relpath: str, *, recursive: bool = False) -> None:
        self._inner.delete(relpath, recursive=recursive)
        hook = self._hooks.get(relpath)
        if hook is not None:
            hook()


def test_a_step_interrupted_mid_delete_has_no_manifest_and_is_collected_later(
    root: CheckpointRoot, coordinator: CheckpointCoordinator
) -> None:
    for step in (1, 2):
        commit(coordinator, step)
    real = root.open()

    def crash() -> None:
        raise OSError("simulated crash after the manifest went")

    broken: Any = _Storage(real, {manifest_path(1, Kind.STATE_DICT): crash})
    result = RetentionPolicy(keep_last=1).apply(broken)
    assert result.deleted == () and len(result.errors) == 1
    assert not any(real.exists(manifest_path(1, k)) for k in Kind)
    assert real.exists("global_step_1/model.pt")  # files still there, but not verifiable
    with pytest.raises(Exception, match="no state_dict manifest"):
        root.verify(1)
    again = RetentionPolicy(keep_last=1, orphan_min_age_s=0).apply(real)
    assert again.orphans == (1,)
    assert steps_on(real) == [2]


def test_a_step_a_rewind_lands_on_mid_delete_is_restored(
    root: CheckpointRoot, coordinator: CheckpointCoordinator
) -> None:
    for step in (1, 2, 3):
        commit(coordinator, step)
    real = root.open()

    def rewind_now() -> None:  # an operator rewinds onto step 1 at the worst instant
        rewind_pointer(real, Kind.STATE_DICT.pointer, 1, expected=3)

    racing: Any = _Storage(real, {manifest_path(1, Kind.STATE_DICT): rewind_now})
    result = RetentionPolicy(keep_last=1).apply(racing)
    assert 1 not in result.deleted and 1 in result.protected
    assert root.committed_steps()["state_dict"] == 1
    assert root.verify(1).ok
    assert root.reader().load(1, "model.pt")["w"][0].item() == 1.0


def test_background_retention_under_concurrent_commits(root: CheckpointRoot) -> None:
    """The monitor applies retention after every commit while steps keep committing; the step the
    pointer names always verifies, and at the end exactly the newest two remain."""
    monitor = CheckpointMonitor(
        root.url, root.storage_options, retention=RetentionPolicy(keep_last=2)
    )
    coordinator = CheckpointCoordinator(monitor)
    done = threading.Event()
    failures: list[str] = []

    checked: list[int] = []

    def check() -> None:
        reader = root.reader()
        while not done.is_set():
            step = reader.latest_state_dict_step()
            if step is None:
                continue
            try:
                problems = [str(p) for p in reader.verify(step).problems]
            except (CommitpointError, OSError) as exc:
                problems = [str(exc)]
            if problems and reader.latest_state_dict_step() == step:
                failures.append(f"step {step} named by the pointer failed: {problems}")
            checked.append(step)

    checker = threading.Thread(target=check)
    checker.start()
    try:
        for step in range(1, 16):
            commit(coordinator, step, checkpoint=step % 5 == 0)
    finally:
        done.set()
        checker.join()
        monitor.close()
    assert failures == []
    assert checked, "the checker never saw a committed step"
    assert root.committed_steps() == {"state_dict": 15, "checkpoint": 15}
    assert steps_on(root.open()) == [14, 15]
    assert all(root.verify(s).ok for s in (14, 15))


def test_monitor_retention_spares_a_step_still_being_saved(root: CheckpointRoot) -> None:
    """Step 3's save is half-written (no manifest, below the pointer, zero minimum age) while
    later steps commit and retention runs: the monitor reports it in flight, so it survives."""
    policy = RetentionPolicy(keep_last=1, orphan_min_age_s=0)
    monitor = CheckpointMonitor(root.url, root.storage_options, retention=policy)
    coordinator = CheckpointCoordinator(monitor)
    worker = CheckpointCoordinator(monitor)  # another worker of the job, saving step 3 slowly
    storage = worker.storage
    written = threading.Event()
    release = threading.Event()

    def slow_save() -> None:
        with storage.open_write("global_step_3/model.pt") as writer:
            writer.write(b"first half ")
            written.set()
            release.wait(30)
            writer.write(b"second half")

    commit(coordinator, 1)
    worker.save_async("slow", slow_save, 3, True)
    worker.register_and_monitor_sync(3, True, state_dict_thread_count=1)
    assert written.wait(30)
    commit(coordinator, 4)
    commit(coordinator, 5)
    monitor.close()  # waits for the retention rounds those commits started
    try:
        present = steps_on(root.open())
        assert [s for s in present if s != 3] == [5]  # 1 and 4 deleted
        if root.backend == "local":
            assert 3 in present  # spared (object stores and memory show it once it is whole)
        again = RetentionPolicy(keep_last=1, orphan_min_age_s=0).apply(root.open(), in_flight={3})
        assert again.orphans == ()
    finally:
        release.set()
        worker.wait_all()
    assert root.open().read_bytes("global_step_3/model.pt") == b"first half second half"
    assert root.verify(3).ok  # committed late (the pointer had moved on), and intact
