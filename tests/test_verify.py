"""Verification: a committed step re-read against its manifest; damage is reported exactly."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from commitpoint import (
    CheckpointCoordinator,
    CheckpointMonitor,
    CorruptCheckpoint,
    Kind,
    save_torch,
    verify_step,
)
from commitpoint.core.layout import step_dir
from commitpoint.core.manifest import manifest_path
from commitpoint.storage.protocol import FileRecord
from commitpoint.testing import CheckpointRoot


def commit(
    coordinator: CheckpointCoordinator, step: int, *, checkpoint: bool = False
) -> dict[str, torch.Tensor]:
    """Commit ``step`` through the real save path: weights, plus an optimizer file if asked."""
    storage = coordinator.storage
    folder = step_dir(step)
    weights = {"w": torch.arange(64, dtype=torch.float32) + step}
    coordinator.save_async(
        "model", partial(save_torch, storage, f"{folder}/model.pt", weights), step, True
    )
    if checkpoint:
        optim = {"state": {"step": step}}
        coordinator.save_async(
            "optim", partial(save_torch, storage, f"{folder}/optim.pt", optim), step
        )
        coordinator.register_and_monitor_sync(
            step, False, state_dict_thread_count=1, checkpoint_thread_count=1
        )
    else:
        coordinator.register_and_monitor_sync(step, True, state_dict_thread_count=1)
    coordinator.wait_all()
    return weights


@pytest.fixture(params=["local", "memory", "s3", "gcs"])
def root(request: pytest.FixtureRequest) -> CheckpointRoot:
    """Every backend: the S3/GCS roots skip (with the reason) until their plug-ins are installed."""
    found: CheckpointRoot = request.getfixturevalue(f"{request.param}_checkpoint_root")
    return found


@pytest.fixture
def committed(root: CheckpointRoot) -> CheckpointRoot:
    """A root with step 3 committed as a full checkpoint (two files)."""
    coordinator = CheckpointCoordinator(CheckpointMonitor(root.url, root.storage_options))
    commit(coordinator, 3, checkpoint=True)
    assert root.committed_steps() == {"state_dict": 3, "checkpoint": 3}
    return root


def _record(root: CheckpointRoot, name: str) -> FileRecord:
    manifest = root.manifest(3, Kind.CHECKPOINT)
    return next(f for f in manifest.files if f.path == f"global_step_3/{name}")


def test_sound_step_verifies_with_sizes_and_checksums(committed: CheckpointRoot) -> None:
    for kind in Kind:
        report = committed.verify(3, kind)
        assert report.ok, report.problems
    report = committed.verify(3, Kind.CHECKPOINT)
    assert report.files == 2
    listed = {i.path: i.size for i in committed.list_files("global_step_3")}
    assert report.bytes == listed["global_step_3/model.pt"] + listed["global_step_3/optim.pt"]
    assert all(f.checksum and f.tracked for f in committed.manifest(3, Kind.CHECKPOINT).files)


def test_flipped_byte_is_a_checksum_mismatch(committed: CheckpointRoot) -> None:
    storage = committed.open()
    path = "global_step_3/model.pt"
    data = bytearray(storage.read_bytes(path))
    data[len(data) // 2] ^= 0xFF
    storage.write_bytes(path, bytes(data), track=False)

    report = committed.verify(3, Kind.CHECKPOINT)
    assert [p.path for p in report.problems] == [path]
    record = _record(committed, "model.pt")
    assert record.checksum is not None and record.checksum in report.problems[0].reason
    assert "!=" in report.problems[0].reason and "size" not in report.problems[0].reason
    with pytest.raises(CorruptCheckpoint) as info:
        committed.reader().load(3, "model.pt")
    assert info.value.path.endswith(path)
    # The other file is still fine to load.
    assert committed.reader().load(3, "optim.pt", kind="checkpoint") == {"state": {"step": 3}}


def test_truncated_file_is_a_size_mismatch(committed: CheckpointRoot) -> None:
    storage = committed.open()
    path = "global_step_3/optim.pt"
    data = storage.read_bytes(path)
    storage.write_bytes(path, data[:-7], track=False)

    report = committed.verify(3, Kind.CHECKPOINT)
    assert [str(p) for p in report.problems] == [
        f"{path}: size {len(data) - 7} != manifest size {len(data)}"
    ]
    # Both kinds committed together share one manifest, so the state-dict view reports it too.
    assert committed.verify(3, Kind.STATE_DICT).problems == report.problems
    with pytest.raises(CorruptCheckpoint, match="size"):
        committed.reader().load(3, "optim.pt", kind="checkpoint")


def test_deleted_file_is_reported_missing(committed: CheckpointRoot) -> None:
    storage = committed.open()
    storage.delete("global_step_3/model.pt")

    report = committed.verify(3, Kind.CHECKPOINT)
    assert [str(p) for p in report.problems] == ["global_step_3/model.pt: missing"]
    with pytest.raises(CorruptCheckpoint, match="missing"):
        committed.reader().load(3, "model.pt")
    with pytest.raises(CorruptCheckpoint) as info:
        report.raise_for_problems(storage.url)
    assert info.value.problems == ("global_step_3/model.pt: missing",)


def test_every_problem_is_reported_not_just_the_first(committed: CheckpointRoot) -> None:
    storage = committed.open()
    storage.delete("global_step_3/model.pt")
    storage.write_bytes("global_step_3/optim.pt", b"garbage", track=False)
    report = committed.verify(3, Kind.CHECKPOINT)
    assert sorted(p.path for p in report.problems) == [
        "global_step_3/model.pt",
        "global_step_3/optim.pt",
    ]


def test_missing_manifest_raises(committed: CheckpointRoot) -> None:
    storage = committed.open()
    for kind in Kind:
        storage.delete(manifest_path(3, kind))
    with pytest.raises(CorruptCheckpoint, match="no state_dict manifest"):
        verify_step(storage, 3)
    with pytest.raises(CorruptCheckpoint):
        committed.reader().load(3, "model.pt")


def test_unreadable_manifest_raises(committed: CheckpointRoot) -> None:
    storage = committed.open()
    storage.write_bytes(manifest_path(3, Kind.CHECKPOINT), b"{not json", track=False)
    with pytest.raises(CorruptCheckpoint, match="manifest is unreadable"):
        verify_step(storage, 3, Kind.CHECKPOINT)


def test_progress_callback_sees_every_file(committed: CheckpointRoot) -> None:
    seen: list[str] = []
    report = verify_step(
        committed.open(), 3, Kind.CHECKPOINT, progress=lambda record: seen.append(record.path)
    )
    assert report.ok
    assert seen == ["global_step_3/model.pt", "global_step_3/optim.pt"]


def test_load_of_a_file_not_in_the_manifest_is_refused(committed: CheckpointRoot) -> None:
    storage = committed.open()
    save_torch(storage, "global_step_3/extra.pt", {"x": 1})
    with pytest.raises(CorruptCheckpoint, match="not listed"):
        committed.reader().load(3, "extra.pt")


class _SwappingStorage:
    """A backend whose file is replaced after the first ``swap_after`` opens (a concurrent
    writer): every later open sees other bytes."""

    def __init__(self, inner: object, swap_after: int) -> None:
        self._inner = inner
        self._swap_after = swap_after
        self.opens = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def open_read(self, relpath: str) -> object:
        import io

        self.opens += 1
        stream = self._inner.open_read(relpath)  # type: ignore[attr-defined]
        if self.opens <= self._swap_after:
            return stream
        with stream:
            data = bytearray(stream.read())
        data[-1] ^= 0xFF
        return io.BytesIO(bytes(data))


@pytest.mark.parametrize("swap_after", [0, 1])
def test_an_unrestricted_verified_load_unpickles_the_bytes_it_verified(
    any_checkpoint_root: CheckpointRoot, swap_after: int
) -> None:
    from commitpoint import CheckpointCoordinator, CheckpointReader, CorruptCheckpoint
    from commitpoint.testing import commit_step

    monitor = any_checkpoint_root.monitor()
    commit_step(CheckpointCoordinator(monitor), 1, numel=8)
    monitor.close()
    storage = _SwappingStorage(any_checkpoint_root.open(), swap_after)
    reader = CheckpointReader(any_checkpoint_root.url, **any_checkpoint_root.storage_options)
    reader.storage = storage  # type: ignore[assignment]
    if swap_after == 0:  # swapped before the one read: refused
        with pytest.raises(CorruptCheckpoint):
            reader.load(1, "model.pt", weights_only=False)
    else:  # swapped after it: what was verified is what is loaded
        loaded = reader.load(1, "model.pt", weights_only=False)
        assert torch.equal(loaded["w"], torch.full((8,), 1.0))
    assert storage.opens == 1
