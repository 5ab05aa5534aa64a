"""The backend conformance suite: what every storage backend must do, as pytest tests.

A backend author runs it on their own store by subclassing :class:`BackendConformance` in a test
module and saying how to make a fresh root::

    from commitpoint.testing.conformance import BackendConformance

    class TestMyStore(BackendConformance):
        root_factory = staticmethod(my_store_root)   # a context manager yielding a CheckpointRoot

(or override the ``conformance_root`` fixture, e.g. to parametrise over several stores, as
commitpoint's own ``tests/test_backend_conformance.py`` does for memory, local, S3 and GCS). The
tests use only the storage protocol and the core helpers built on it, so a backend that passes
them gets manifests, verification, retention and the writer lease for free.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from commitpoint.core.checksum import Checksum
from commitpoint.core.pointer import Advance, advance_pointer, rewind_pointer
from commitpoint.errors import CommitConflict, CorruptCheckpoint, InvalidName, StepRegression
from commitpoint.storage.protocol import PointerState, StorageBackend
from commitpoint.storage.registry import available_schemes, open_storage, scheme_of
from commitpoint.testing import CheckpointRoot

RootFactory = Callable[[], contextlib.AbstractContextManager[CheckpointRoot]]

STATE_DICT_POINTER = "latest_state_dict_iteration.txt"
CHECKPOINT_POINTER = "latest_checkpointed_iteration.txt"


class BackendConformance:
    """Subclass as ``Test<YourStore>`` and set :attr:`root_factory` (or override the
    ``conformance_root`` fixture); pytest then runs every ``test_*`` method on your backend."""

    root_factory: ClassVar[RootFactory | None] = None
    """A zero-argument callable returning a context manager that yields a fresh, empty
    :class:`~commitpoint.testing.CheckpointRoot` and removes it afterwards."""

    @pytest.fixture
    def conformance_root(self) -> Iterator[CheckpointRoot]:
        factory = type(self).root_factory
        if factory is None:
            raise TypeError(
                f"{type(self).__name__} sets neither root_factory nor a conformance_root fixture"
            )
        with factory() as root:
            yield root

    @pytest.fixture
    def storage(self, conformance_root: CheckpointRoot) -> StorageBackend:
        return conformance_root.open()

    # -- the protocol ---------------------------------------------------------------------
    def test_opened_backend_satisfies_protocol(self, storage: StorageBackend) -> None:
        assert isinstance(storage, StorageBackend)
        assert "://" in storage.url or storage.url.startswith("/")

    def test_open_storage_finds_the_backend_by_scheme(
        self, conformance_root: CheckpointRoot
    ) -> None:
        scheme = scheme_of(conformance_root.url)
        assert scheme in available_schemes(), f"no backend registered for {scheme!r}"
        storage = open_storage(conformance_root.url, **conformance_root.storage_options)
        assert type(storage) is type(conformance_root.open())
        assert storage.url == conformance_root.url.rstrip("/")

    # -- files ------------------------------------------------------------------------------
    def test_streaming_write_records_size_and_checksum(self, storage: StorageBackend) -> None:
        chunks: list[bytes | bytearray | memoryview] = [
            b"a" * 1000,
            bytearray(b"b" * 5000),
            memoryview(b"c" * 3),
        ]
        with storage.open_write("global_step_1/model.bin") as writer:
            for chunk in chunks:
                writer.write(chunk)
        record = writer.record
        assert record is not None
        expected = Checksum(record.algorithm or "")
        for chunk in chunks:
            expected.update(bytes(chunk))
        assert record.size == 6003
        assert record.checksum == expected.hexdigest()
        assert storage.read_bytes("global_step_1/model.bin") == b"".join(bytes(c) for c in chunks)
        with storage.open_read("global_step_1/model.bin") as stream:
            stream.seek(1000)
            assert stream.read(5) == b"bbbbb"

    def test_records_are_taken_once_per_step_folder(self, storage: StorageBackend) -> None:
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

    def test_failed_write_leaves_no_record(self, storage: StorageBackend) -> None:
        with pytest.raises(RuntimeError), storage.open_write("global_step_4/x.bin") as writer:
            writer.write(b"partial")
            raise RuntimeError("save function broke")
        assert storage.records.take("global_step_4") == []

    def test_list_exists_delete(self, storage: StorageBackend) -> None:
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

    def test_root_does_not_depend_on_the_working_directory(
        self,
        conformance_root: CheckpointRoot,
        monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path,
    ) -> None:
        """A URL names one place: opened again from another folder, it shows the same files
        (a root built from a relative path would land inside the working directory)."""
        conformance_root.open().write_bytes("global_step_7/a.bin", b"here")
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)
        assert conformance_root.open().read_bytes("global_step_7/a.bin") == b"here"
        assert os.listdir(elsewhere) == []

    @pytest.mark.parametrize("bad", ["../escape", "/abs/path", "a/../../b", "", "a\\b", "x\x00y"])
    def test_paths_cannot_escape_the_root(self, storage: StorageBackend, bad: Any) -> None:
        with pytest.raises(InvalidName):
            storage.open_write(bad)
        with pytest.raises(InvalidName):
            storage.write_pointer_if(bad, 1, None)

    def test_backend_pickles_to_an_equivalent_one(self, conformance_root: CheckpointRoot) -> None:
        storage = conformance_root.open()
        storage.write_bytes("global_step_1/x", b"abc")
        clone = pickle.loads(pickle.dumps(storage))
        assert clone.url == storage.url
        assert clone.read_bytes("global_step_1/x") == b"abc"

    # -- pointers: the part each backend implements ----------------------------------------
    def test_absent_pointer_reads_as_no_value_and_no_token(self, storage: StorageBackend) -> None:
        assert storage.read_pointer(STATE_DICT_POINTER) == PointerState(None, None)

    def test_pointer_is_written_as_ascii_digits_and_a_newline(
        self, storage: StorageBackend
    ) -> None:
        storage.write_pointer_if(CHECKPOINT_POINTER, 1234, None)
        assert storage.read_bytes(CHECKPOINT_POINTER) == b"1234\n"

    def test_pointer_create_then_compare_and_swap(self, storage: StorageBackend) -> None:
        name = STATE_DICT_POINTER
        token = storage.write_pointer_if(name, 3, None)
        state = storage.read_pointer(name)
        assert (state.value, state.token) == (3, token)
        with pytest.raises(CommitConflict):
            storage.write_pointer_if(name, 4, None)  # create-only on an existing pointer
        new_token = storage.write_pointer_if(name, 7, token)
        assert new_token != token
        assert storage.read_pointer(name).value == 7
        with pytest.raises(CommitConflict):
            storage.write_pointer_if(name, 9, token)  # stale token
        assert storage.read_pointer(name) == storage.read_pointer(name)
        assert storage.read_pointer(name).token == new_token
        assert storage.read_bytes(name).strip() == b"7"

    def test_advance_is_monotonic(self, storage: StorageBackend) -> None:
        name = CHECKPOINT_POINTER
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

    def test_concurrent_advances_never_lose_the_highest(self, storage: StorageBackend) -> None:
        name = STATE_DICT_POINTER
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

    def test_corrupt_pointer_is_a_typed_error(self, storage: StorageBackend) -> None:
        storage.write_bytes(STATE_DICT_POINTER, b"12abc", track=False)
        with pytest.raises(CorruptCheckpoint, match="not a decimal step"):
            storage.read_pointer(STATE_DICT_POINTER)

    def test_trailing_newline_and_plain_digits_are_read(self, storage: StorageBackend) -> None:
        storage.write_bytes(STATE_DICT_POINTER, b"42", track=False)
        assert storage.read_pointer(STATE_DICT_POINTER).value == 42
        storage.write_bytes(CHECKPOINT_POINTER, b"43\n", track=False)
        assert storage.read_pointer(CHECKPOINT_POINTER).value == 43


__all__ = ["BackendConformance", "RootFactory"]
