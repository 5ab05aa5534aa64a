"""StorageWrapper: a wrapper delegates every protocol member, shares records and publish guard,
plugs in through the registry's wrapper hook and travels (pickled) wrapped the same way."""

from __future__ import annotations

import inspect
import pickle
from collections.abc import Iterator
from typing import Any

import pytest

from commitpoint import StorageError, open_storage
from commitpoint.storage import registry
from commitpoint.storage.protocol import StorageBackend
from commitpoint.storage.wrapper import StorageWrapper
from commitpoint.testing import CheckpointRoot
from commitpoint.testing.faults import FaultyStorage


class CountingReads(StorageWrapper):
    """Overrides one operation; everything else is the base's delegation."""

    option = "count_reads"

    def __init__(self, inner: StorageBackend, _: object) -> None:
        super().__init__(inner)
        self.reads = 0

    def read_bytes(self, relpath: str) -> bytes:
        self.reads += 1
        return super().read_bytes(relpath)


@pytest.fixture
def counting_hook() -> Iterator[None]:
    registry.register_wrapper("count_reads", CountingReads)
    try:
        yield
    finally:
        with registry._lock:
            registry._wrappers.pop("count_reads", None)


def _protocol_members() -> set[str]:
    return {
        name
        for name, _ in inspect.getmembers(StorageBackend)
        if not name.startswith("_") and name in vars(StorageBackend)
    }


def test_the_protocol_is_byte_io_plus_the_pointer_pair() -> None:
    members = _protocol_members()
    assert {"read_pointer", "write_pointer_if", "records", "set_publish_guard"} <= members
    assert not members & {"fs", "root", "full_path", "take_records", "publish_guard"}


def test_the_wrapper_base_defines_every_protocol_member() -> None:
    assert _protocol_members() <= set(vars(StorageWrapper))


def test_a_wrapper_plugs_in_by_option_and_delegates(
    counting_hook: None, memory_checkpoint_root: CheckpointRoot
) -> None:
    root = memory_checkpoint_root
    storage = open_storage(root.url, **root.storage_options, count_reads=True)
    assert isinstance(storage, CountingReads) and isinstance(storage, StorageBackend)
    storage.write_bytes("global_step_1/a.bin", b"abc")
    assert storage.read_bytes("global_step_1/a.bin") == b"abc" and storage.reads == 1
    assert [f.path for f in storage.list_files("global_step_1")] == ["global_step_1/a.bin"]
    # (the hidden folder holds the step's owner marker, written with its first file)
    assert storage.list_dirs("") == [".commitpoint", "global_step_1"]
    token = storage.write_pointer_if("latest_state_dict_iteration.txt", 1, None)
    assert storage.read_pointer("latest_state_dict_iteration.txt").token == token
    # records are the inner backend's: taken once, through either
    assert [r.path for r in storage.inner.records.take("global_step_1")] == ["global_step_1/a.bin"]
    assert storage.records.take("global_step_1") == []
    # a copy (a Ray worker's) is reopened from URL and options, wrapped again
    assert storage.storage_options["count_reads"] is True
    copy: Any = pickle.loads(pickle.dumps(storage))
    assert isinstance(copy, CountingReads) and copy.read_bytes("global_step_1/a.bin") == b"abc"


def test_the_publish_guard_reaches_the_backend_that_publishes(
    memory_checkpoint_root: CheckpointRoot, local_checkpoint_root: CheckpointRoot
) -> None:
    for root in (memory_checkpoint_root, local_checkpoint_root):
        storage = FaultyStorage(root.open(), {})
        seen: list[str] = []

        def guard(relpath: str, seen: list[str] = seen) -> None:
            seen.append(relpath)
            if relpath.endswith("refused.bin"):
                raise StorageError("publish", relpath, "fenced")

        storage.set_publish_guard(guard)
        storage.write_bytes("global_step_1/kept.bin", b"1")
        with pytest.raises(StorageError, match="fenced"):
            storage.write_bytes("global_step_1/refused.bin", b"2")
        # the step's owner marker passes the guard too, before the step's first file
        assert seen == [
            ".commitpoint/steps/global_step_1",
            "global_step_1/kept.bin",
            "global_step_1/refused.bin",
        ]
        assert not storage.exists("global_step_1/refused.bin")
        assert storage.records.take("global_step_1")[0].path == "global_step_1/kept.bin"
        storage.set_publish_guard(None)
        storage.write_bytes("global_step_1/refused.bin", b"3")
        assert storage.exists("global_step_1/refused.bin")


def test_listings_carry_modification_times(local_checkpoint_root: CheckpointRoot) -> None:
    storage = local_checkpoint_root.open()
    storage.write_bytes("global_step_1/a.bin", b"abc")
    [info] = storage.list_files("global_step_1")
    assert info.size == 3 and info.modified is not None and info.modified > 0
