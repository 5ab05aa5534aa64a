"""Deletes stay confined: no glob expansion whatever a root's name holds, nothing outside the
folder asked for, and never another tool's step folders unless asked (issue 18, items 1 and 2).
Every backend (memory, local, S3 on moto, GCS on the emulator)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from commitpoint import CheckpointCoordinator, StorageError
from commitpoint.cli.commands import main
from commitpoint.core.layout import CHECKPOINT_POINTER, STATE_DICT_POINTER, owner_marker
from commitpoint.maintenance.retention import RetentionPolicy
from commitpoint.storage.base import FsspecStorage
from commitpoint.testing import CheckpointRoot, commit_step, unique_name


@pytest.fixture
def root(any_checkpoint_root: CheckpointRoot) -> CheckpointRoot:
    return any_checkpoint_root


@contextlib.contextmanager
def sub_root(root: CheckpointRoot, name: str) -> Iterator[CheckpointRoot]:
    """A root inside ``root``'s folder or bucket (memory roots are emptied afterwards)."""
    sub = CheckpointRoot(f"{root.url}/{name}", root.storage_options, root.backend)
    try:
        yield sub
    finally:
        if root.backend == "memory":
            with contextlib.suppress(Exception):
                for info in sub.open().list_files():
                    sub.open().delete(info.path)


def commit_steps(root: CheckpointRoot, steps: range) -> None:
    monitor = root.monitor()
    try:
        coordinator = CheckpointCoordinator(monitor)
        for step in steps:
            commit_step(coordinator, step, numel=8)
    finally:
        monitor.close()


@pytest.mark.parametrize("glob", ["run[1]", "run?", "run*"])
def test_retention_in_a_root_named_like_a_glob_leaves_its_sibling_alone(
    root: CheckpointRoot, glob: str
) -> None:
    prefix = unique_name("g")
    with sub_root(root, f"{prefix}-run1") as sibling, sub_root(root, f"{prefix}-{glob}") as odd:
        commit_steps(sibling, range(1, 4))
        commit_steps(odd, range(1, 4))
        before = sibling.list_files()
        result = RetentionPolicy(keep_last=1, orphan_min_age_s=0).apply(odd.open())
        assert result.deleted == (1, 2)
        assert sibling.list_files() == before
        for step in (1, 2, 3):
            assert sibling.verify(step).ok
        assert [s for s in (1, 2, 3) if odd.open().exists(f"global_step_{s}/model.pt")] == [3]


def test_a_recursive_delete_removes_exactly_the_folder_asked_for(root: CheckpointRoot) -> None:
    storage = root.open()
    for path in ("global_step_1/a", "global_step_1/sub/b", "global_step_10/c", "global_step_1x"):
        storage.write_bytes(path, b"x", track=False)
    storage.delete("global_step_1", recursive=True)
    assert [i.path for i in storage.list_files()] == ["global_step_10/c", "global_step_1x"]


def test_the_confinement_rule_refuses_a_path_outside_the_folder(root: CheckpointRoot) -> None:
    storage = root.open()
    assert isinstance(storage, FsspecStorage)
    target = storage.full_path("global_step_1")
    with pytest.raises(StorageError, match="refusing to delete"):
        storage._confined(storage.full_path("global_step_10/x"), target)
    with pytest.raises(StorageError, match="refusing to delete"):
        storage._confined(storage.root + "-sibling/global_step_1/x", target)
    assert storage._confined(target + "/x", target) == target + "/x"


def write_foreign_step(root: CheckpointRoot, step: int) -> None:
    """verl's own checkpoint: written without commitpoint (no manifest, no owner marker)."""
    storage = root.open()
    storage.write_bytes(f"global_step_{step}/actor/model.pt", b"verl weights", track=False)


def test_another_tools_step_folders_are_never_collected_unless_asked(root: CheckpointRoot) -> None:
    for step in (10, 20):
        write_foreign_step(root, step)
    storage = root.open()
    storage.write_pointer_if(CHECKPOINT_POINTER, 20, None)  # verl's pointer names step 20
    commit_steps(root, range(30, 32))  # commitpoint's own steps above them
    policy = RetentionPolicy(keep_last=1, orphan_min_age_s=0)
    result = policy.apply(storage)
    assert result.orphans == ()
    assert result.deleted == (30,)
    assert storage.exists("global_step_10/actor/model.pt")
    assert storage.exists("global_step_20/actor/model.pt")
    assert main(["gc", root.url, *_options(root), "--orphan-min-age", "0"]) == 0
    assert storage.exists("global_step_10/actor/model.pt")

    asked = RetentionPolicy(orphan_min_age_s=0, gc_foreign=True).apply(storage)
    assert asked.orphans == (10,)  # 20 is still named by the checkpoint pointer
    assert not storage.exists("global_step_10/actor/model.pt")
    assert storage.exists("global_step_20/actor/model.pt")


def test_a_crashed_commitpoint_save_is_still_collected(root: CheckpointRoot) -> None:
    commit_steps(root, range(5, 6))
    storage = root.open()
    storage.write_bytes("global_step_2/model.pt", b"half")  # tracked: the owner marker first
    storage.records.take("global_step_2")
    assert storage.exists(owner_marker(2))
    result = RetentionPolicy(orphan_min_age_s=0).apply(storage)
    assert result.orphans == (2,)
    assert not storage.exists(owner_marker(2))
    assert storage.read_pointer(STATE_DICT_POINTER).value == 5


def _options(root: CheckpointRoot) -> list[str]:
    import json

    args: list[str] = []
    for key, value in root.storage_options.items():
        text = json.dumps(value) if isinstance(value, dict | list) else str(value)
        args += ["--option", f"{key}={text}"]
    return args
