"""Backend conformance: every registered backend behaves the same through the protocol.

Parametrised over memory, local, and (when their packages are installed) S3 on moto and GCS on
fake-gcs-server, through the testing kit's roots.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from commitpoint import (
    CommitConflict,
    CorruptCheckpoint,
    InvalidName,
    StepRegression,
    StorageBackend,
    open_storage,
)
from commitpoint.core.checksum import Checksum
from commitpoint.core.pointer import Advance, advance_pointer, rewind_pointer
from commitpoint.testing import CheckpointRoot


@pytest.fixture
def root(any_checkpoint_root: CheckpointRoot) -> CheckpointRoot:
    return any_checkpoint_root


@pytest.fixture
def storage(root: CheckpointRoot) -> StorageBackend:
    return root.open()


def test_opened_backend_satisfies_protocol(storage: StorageBackend) -> None:
    assert isinstance(storage, StorageBackend)
    assert "://" in storage.url or storage.url.startswith("/")


def test_streaming_write_records_size_and_checksum(storage: StorageBackend) -> None:
    chunks = [b"a" * 1000, bytearray(b"b" * 5000), memoryview(b"c" * 3)]
    with storage.open_write("global_step_1/model.bin") as writer:
        for chunk in chunks:
            writer.write(chunk)
    record = writer.record
    expected = Checksum(record.algorithm or "")
    for chunk in chunks:
        expected.update(bytes(chunk))
    assert record.size == 6003
    assert record.checksum == expected.hexdigest()
    assert storage.read_bytes("global_step_1/model.bin") == b"".join(bytes(c) for c in chunks)
    with storage.open_read("global_step_1/model.bin") as stream:
        stream.seek(1000)
        assert stream.read(5) == b"bbbbb"


def test_records_are_taken_once_per_step_folder(storage: StorageBackend) -> None:
    storage.write_bytes("global_step_2/a.bin", b"1")
    storage.write_bytes("global_step_2/sub/b.bin", b"22")
    storage.write_bytes("global_step_3/c.bin", b"333")
    storage.write_bytes("global_step_2/untracked.json", b"{}", track=False)
    taken = storage.records.take("global_step_2")
    assert [(r.path, r.size) for r in taken] == [
        ("global_step_2/a.bin", 1),
        ("global_step_2/sub/b.bin", 2),
    ]
    assert storage.records.take("global_step_2") == []
    assert [r.path for r in storage.records.take("global_step_3")] == ["global_step_3/c.bin"]


def test_failed_write_leaves_no_record(storage: StorageBackend) -> None:
    with pytest.raises(RuntimeError), storage.open_write("global_step_4/x.bin") as writer:
        writer.write(b"partial")
        raise RuntimeError("save function broke")
    assert storage.records.take("global_step_4") == []


def test_list_exists_delete(storage: StorageBackend) -> None:
    storage.write_bytes("global_step_5/a.bin", b"12345")
    storage.write_bytes("global_step_5/nested/b.bin", b"1")
    storage.write_bytes("global_step_6/c.bin", b"")
    listed = storage.list_files("global_step_5")
    assert [(i.path, i.size) for i in listed] == [
        ("global_step_5/a.bin", 5),
        ("global_step_5/nested/b.bin", 1),
    ]
    assert {"global_step_5", "global_step_6"} <= set(storage.list_dirs())
    assert storage.exists("global_step_5/a.bin")
    assert not storage.exists("global_step_5/missing.bin")
    storage.delete("global_step_5/a.bin")
    assert not storage.exists("global_step_5/a.bin")
    storage.delete("global_step_5", recursive=True)
    assert storage.list_files("global_step_5") == []
    assert storage.list_files("no_such_folder") == []


def test_pointer_create_then_compare_and_swap(storage: StorageBackend) -> None:
    name = "latest_state_dict_iteration.txt"
    assert storage.read_pointer(name).value is None
    token = storage.write_pointer_if(name, 3, None)
    state = storage.read_pointer(name)
    assert (state.value, state.token) == (3, token)
    with pytest.raises(CommitConflict):
        storage.write_pointer_if(name, 4, None)  # create-only on an existing pointer
    new_token = storage.write_pointer_if(name, 7, token)
    assert storage.read_pointer(name).value == 7
    with pytest.raises(CommitConflict):
        storage.write_pointer_if(name, 9, token)  # stale token
    assert storage.read_pointer(name) == storage.read_pointer(name)
    assert storage.read_pointer(name).token == new_token
    assert storage.read_bytes(name).strip() == b"7"


def test_advance_is_monotonic(storage: StorageBackend) -> None:
    name = "latest_checkpointed_iteration.txt"
    assert advance_pointer(storage, name, 5) is Advance.MOVED
    assert advance_pointer(storage, name, 5) is Advance.ALREADY_THERE
    with pytest.raises(StepRegression) as info:
        advance_pointer(storage, name, 4)
    assert (info.value.current, info.value.requested) == (5, 4)
    assert storage.read_pointer(name).value == 5
    rewind_pointer(storage, name, 2, expected=5)
    assert storage.read_pointer(name).value == 2
    with pytest.raises(CommitConflict):
        rewind_pointer(storage, name, 1, expected=5)


def test_concurrent_advances_never_lose_the_highest(storage: StorageBackend) -> None:
    name = "latest_state_dict_iteration.txt"
    steps = list(range(1, 25))
    errors: list[BaseException] = []

    def worker(mine: list[int]) -> None:
        for step in mine:
            try:
                advance_pointer(storage, name, step)
            except StepRegression:
                pass
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=(steps[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert storage.read_pointer(name).value == max(steps)


def test_corrupt_pointer_is_a_typed_error(storage: StorageBackend) -> None:
    storage.write_bytes("latest_state_dict_iteration.txt", b"12abc", track=False)
    with pytest.raises(CorruptCheckpoint, match="not a decimal step"):
        storage.read_pointer("latest_state_dict_iteration.txt")


def test_trailing_newline_and_plain_digits_are_read(storage: StorageBackend) -> None:
    storage.write_bytes("latest_state_dict_iteration.txt", b"42", track=False)
    assert storage.read_pointer("latest_state_dict_iteration.txt").value == 42
    storage.write_bytes("latest_checkpointed_iteration.txt", b"43\n", track=False)
    assert storage.read_pointer("latest_checkpointed_iteration.txt").value == 43


@pytest.mark.parametrize("bad", ["../escape", "/abs/path", "a/../../b", "", "a\\b", "x\x00y"])
def test_paths_cannot_escape_the_root(storage: StorageBackend, bad: Any) -> None:
    with pytest.raises(InvalidName):
        storage.open_write(bad)
    with pytest.raises(InvalidName):
        storage.write_pointer_if(bad, 1, None)


def test_backend_pickles_to_an_equivalent_one(root: CheckpointRoot) -> None:
    import pickle

    storage = root.open()
    storage.write_bytes("global_step_1/x", b"abc")
    clone = pickle.loads(pickle.dumps(storage))
    assert clone.url == storage.url
    assert clone.read_bytes("global_step_1/x") == b"abc"


def test_open_storage_by_scheme(root: CheckpointRoot) -> None:
    storage = open_storage(root.url, **root.storage_options)
    assert type(storage).__name__.lower().startswith(root.backend[:2])
