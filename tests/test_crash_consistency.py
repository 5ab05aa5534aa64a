"""The crash-consistency harness: random SIGKILLs of a checkpointing job leave every commit sound,
and its checker catches damage (so a clean run means something)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from commitpoint import open_storage
from commitpoint.core.layout import CHECKPOINT_POINTER, STATE_DICT_POINTER, Kind
from commitpoint.core.manifest import build_manifest, manifest_path, write_manifest
from commitpoint.testing import CheckpointRoot
from commitpoint.testing.crash import (
    LOST,
    REGRESSION,
    TORN,
    UNLOADABLE,
    UNVERIFIABLE,
    Checker,
    JobConfig,
    PhaseRecorder,
    RootHistory,
    Tally,
    WorkerJob,
    run_crashes,
    run_worker,
)

QUICK = JobConfig(steps=24)
SMALL = JobConfig(steps=6, width=64)


def _assert_sound(tally: Tally, kills: int) -> None:
    assert not tally.failures, "\n".join(map(str, tally.failures))
    assert tally.kills == kills
    assert tally.kills_mid_run >= 1, tally.by_phase  # kills landed while the job saved/committed
    assert tally.verified >= 1  # and something was committed to check


def test_random_kills_on_local_disk(local_checkpoint_root: CheckpointRoot, tmp_path: Path) -> None:
    tally = run_crashes(local_checkpoint_root, 8, seed=1, config=QUICK, workdir=str(tmp_path))
    _assert_sound(tally, 8)


@pytest.mark.s3
def test_random_kills_on_s3(s3_checkpoint_root: CheckpointRoot, tmp_path: Path) -> None:
    tally = run_crashes(s3_checkpoint_root, 3, seed=2, config=QUICK, workdir=str(tmp_path))
    _assert_sound(tally, 3)


# -- the checker on purposely damaged roots --------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root the worker trained to the end without kills: both pointers at step 6, and step 5
    still there (retention keeps the last two)."""
    folder = tmp_path_factory.mktemp("trained")
    job = WorkerJob(str(folder / "root"), {}, str(folder / "phase"), SMALL)
    phases = PhaseRecorder(job.phase_file)
    try:
        assert run_worker(job, phases) == 0
    finally:
        phases.close()
    return folder / "root"


@pytest.fixture
def root(trained: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "root"
    shutil.copytree(trained, copy)
    return copy


def _check(root: Path, history: RootHistory | None = None) -> set[str]:
    result = Checker(str(root), {}, SMALL).check(history or RootHistory())
    return {f.category for f in result.failures}


def test_checker_passes_the_undamaged_root(root: Path) -> None:
    result = Checker(str(root), {}, SMALL).check(RootHistory())
    assert result.failures == []
    assert result.pointers == {Kind.STATE_DICT: 6, Kind.CHECKPOINT: 6}
    assert result.verified == 2
    assert (root / "global_step_5").is_dir()


def _seen(**last: int) -> RootHistory:
    """A history as if earlier checks had seen these pointer values."""
    history = RootHistory()
    for kind in Kind:
        if kind.value in last:
            history.last[kind] = last[kind.value]
            history.named[kind].add(last[kind.value])
    return history


def _replace_and_remanifest(root: Path, relpath: str, source: str) -> None:
    """Swap a file for another and rewrite the step's manifests to match: the step verifies,
    so only the load check can tell."""
    storage = open_storage(str(root))
    storage.write_bytes(relpath, storage.read_bytes(source), track=False)
    for kind in Kind:
        if storage.exists(manifest_path(6, kind)):
            write_manifest(storage, build_manifest(storage, 6, kind, [], include_listing=True))


def _empty_pointer(root: Path) -> None:
    (root / CHECKPOINT_POINTER).write_bytes(b"")


def _garbled_pointer(root: Path) -> None:
    (root / STATE_DICT_POINTER).write_bytes(b"6\x00")


def _missing_shard(root: Path) -> None:
    (root / "global_step_6/optimizer_01.pt").unlink()


def _missing_manifest(root: Path) -> None:
    (root / "global_step_6" / Kind.CHECKPOINT.manifest).unlink()


def _flipped_byte(root: Path) -> None:
    path = root / "global_step_6/model_00.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _stale_shard(root: Path) -> None:
    _replace_and_remanifest(root, "global_step_6/model_01.pt", "global_step_5/model_01.pt")


def _pointer_moved_back(root: Path) -> RootHistory:
    (root / STATE_DICT_POINTER).write_bytes(b"5\n")
    return _seen(state_dict=6)


def _committed_step_deleted(root: Path) -> RootHistory:
    shutil.rmtree(root / "global_step_5")  # one step above it is committed; keep_last is 2
    return _seen(state_dict=5)


DAMAGE: dict[str, tuple[Callable[[Path], RootHistory | None], set[str]]] = {
    "empty pointer": (_empty_pointer, {TORN}),
    "garbled pointer": (_garbled_pointer, {TORN}),
    "missing shard": (_missing_shard, {UNVERIFIABLE, UNLOADABLE}),
    "missing manifest": (_missing_manifest, {UNVERIFIABLE}),
    "flipped byte": (_flipped_byte, {UNVERIFIABLE}),
    "stale shard from another step": (_stale_shard, {UNLOADABLE}),
    "pointer moved back": (_pointer_moved_back, {REGRESSION}),
    "committed step deleted": (_committed_step_deleted, {LOST}),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_checker_reports_damage(root: Path, damage: str) -> None:
    harm, expected = DAMAGE[damage]
    assert _check(root, harm(root)) == expected
