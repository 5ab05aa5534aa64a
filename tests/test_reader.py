"""CheckpointReader: the newest step that verifies, and what it says about steps it cannot read."""

from __future__ import annotations

import inspect
import logging

import pytest

from commitpoint import CheckpointCoordinator, CheckpointReader, InvalidStep, NotFound
from commitpoint.read.watch import watch
from commitpoint.testing import CheckpointRoot, commit_step


@pytest.fixture(params=["local", "memory"])
def root(request: pytest.FixtureRequest) -> CheckpointRoot:
    found: CheckpointRoot = request.getfixturevalue(f"{request.param}_checkpoint_root")
    return found


@pytest.fixture
def trained(root: CheckpointRoot) -> CheckpointRoot:
    """Weights at 1..6, full checkpoints at 2, 4 and 6."""
    coordinator = CheckpointCoordinator(root.monitor())
    for step in range(1, 7):
        commit_step(coordinator, step, checkpoint=step % 2 == 0)
    return root


def _corrupt(root: CheckpointRoot, relpath: str) -> None:
    storage = root.open()
    data = bytearray(storage.read_bytes(relpath))
    data[len(data) // 2] ^= 0xFF
    storage.write_bytes(relpath, bytes(data), track=False)


def test_a_sound_latest_is_the_answer(trained: CheckpointRoot) -> None:
    reader = trained.reader()
    assert reader.latest_verified_step() == 6
    assert reader.latest_verified_step("checkpoint") == 6


def test_a_corrupted_latest_checkpoint_gives_the_one_before(
    trained: CheckpointRoot, caplog: pytest.LogCaptureFixture
) -> None:
    _corrupt(trained, "global_step_6/optim.pt")
    reader = trained.reader()
    with caplog.at_level(logging.WARNING, logger="commitpoint.read.reader"):
        assert reader.latest_verified_step("checkpoint") == 4
    messages = [r.getMessage() for r in caplog.records]
    assert any("step 6 (checkpoint)" in m and "does not verify" in m for m in messages)
    assert any(f"`commitpoint rewind {reader.url} --to 4`" in m for m in messages)
    assert reader.latest_checkpoint_step() == 6  # it only reads: the pointers stay


def test_state_dict_steps_are_walked_back_one_by_one(trained: CheckpointRoot) -> None:
    _corrupt(trained, "global_step_6/model.pt")
    _corrupt(trained, "global_step_5/model.pt")
    assert trained.reader().latest_verified_step() == 4


def test_uncommitted_folders_are_not_candidates(trained: CheckpointRoot) -> None:
    _corrupt(trained, "global_step_6/model.pt")
    trained.open().write_bytes("global_step_5/stray.bin", b"x", track=False)
    for kind in ("state_dict", "checkpoint"):
        trained.open().delete(f"global_step_5/.commitpoint-manifest.{kind}.json")
    assert trained.reader().latest_verified_step() == 4


def test_nothing_that_verifies_is_none(trained: CheckpointRoot) -> None:
    for step in (2, 4, 6):
        _corrupt(trained, f"global_step_{step}/optim.pt")
    assert trained.reader().latest_verified_step("checkpoint") is None


def test_nothing_committed_is_none(root: CheckpointRoot) -> None:
    assert root.reader().latest_verified_step() is None


def test_load_of_none_says_what_probably_happened(root: CheckpointRoot) -> None:
    reader = root.reader()
    with pytest.raises(InvalidStep, match="step is None, not a step") as info:
        reader.load(reader.latest_state_dict_step(), "model.pt")
    assert "latest_state_dict_step() returns None when nothing is" in str(info.value)
    assert "NoneType" not in str(info.value)


def test_a_step_that_does_not_exist_is_not_found_not_corrupt(trained: CheckpointRoot) -> None:
    reader = trained.reader()
    for call in (
        lambda: reader.load(9, "model.pt"),
        lambda: reader.verify(9),
        lambda: reader.manifest(9),
    ):
        with pytest.raises(NotFound, match="step 9 does not exist") as info:
            call()
        assert "latest committed: state_dict 6, checkpoint 6" in str(info.value)


def test_watch_shows_its_options_by_name() -> None:
    shown = inspect.signature(CheckpointReader.watch).parameters
    real = inspect.signature(watch).parameters
    assert list(shown)[1:] == list(real)[1:]  # self / storage, then the same options
    assert all(shown[n].default == real[n].default for n in list(real)[1:])
    assert list(inspect.signature(CheckpointReader.awatch).parameters) == list(shown)
