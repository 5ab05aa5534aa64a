"""The bad-input table: every public entry point fed wrong values gives a typed error with a clear
message and leaves storage exactly as it was. The same table is in docs/reliability.md; a test
below keeps the two in step."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from commitpoint import (
    BackendNotFound,
    CheckpointCoordinator,
    CheckpointMonitor,
    CheckpointReader,
    CorruptCheckpoint,
    InvalidArgument,
    InvalidName,
    InvalidStep,
    NotFound,
    StepRegression,
    StorageError,
    StorageNotFound,
    save_torch,
)
from commitpoint.errors import CommitpointError, SaveFailed
from commitpoint.maintenance.retention import RetentionPolicy
from commitpoint.maintenance.rewind import rewind
from commitpoint.read.watch import watch
from commitpoint.storage.registry import open_storage
from commitpoint.testing import CheckpointRoot

DOCS = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"


@dataclass
class Ctx:
    """A root with steps 1 and 2 committed (state dict), and tools to poke at it."""

    root: CheckpointRoot
    monitor: CheckpointMonitor
    coordinator: CheckpointCoordinator

    @property
    def storage(self) -> Any:
        return self.coordinator.storage

    @property
    def reader(self) -> CheckpointReader:
        return self.root.reader()

    def save_and_wait(self, step: int) -> None:
        """save_async + wait_all: errors a save finds in the background surface here."""

        def save() -> None:
            save_torch(self.storage, f"global_step_{step}/model.pt", {"w": torch.zeros(4)})

        self.coordinator.save_async("model", save, step, is_state_dict=True)
        try:
            self.coordinator.wait_all()
        except SaveFailed as exc:
            raise exc.cause from exc


@dataclass(frozen=True)
class Case:
    entry: str
    given: str
    call: Callable[[Ctx], object]
    error: type[CommitpointError]
    message: str


def _noop() -> None:
    return None


CASES = [
    # -- steps
    Case("save_async", "global_step=-1", lambda c: c.coordinator.save_async("m", _noop, -1),
         InvalidStep, "non-negative"),
    Case("save_async", "global_step=1.5", lambda c: c.coordinator.save_async("m", _noop, 1.5),  # type: ignore[arg-type]
         InvalidStep, "non-negative int, got float 1.5"),
    Case("save_async", "global_step='3'", lambda c: c.coordinator.save_async("m", _noop, "3"),  # type: ignore[arg-type]
         InvalidStep, "got str '3'"),
    Case("save_async", "global_step=True", lambda c: c.coordinator.save_async("m", _noop, True),
         InvalidStep, "got bool True"),
    Case("save_async", "a step below the pointer", lambda c: c.save_and_wait(1),
         StepRegression, "from step 2 to step 1"),
    Case("save_sync", "global_step=-5", lambda c: c.coordinator.save_sync(_noop, -5),
         InvalidStep, "non-negative"),
    Case("register_and_monitor", "global_step=-1",
         lambda c: c.coordinator.register_and_monitor_sync(-1, True, 1), InvalidStep,
         "non-negative"),
    Case("register_and_monitor", "state_dict_thread_count=-2",
         lambda c: c.coordinator.register_and_monitor_sync(3, True, -2), InvalidStep,
         "state_dict_thread_count must be non-negative"),
    Case("register_and_monitor", "participants=0",
         lambda c: c.coordinator.register_and_monitor_sync(3, True, 1, participants=0),
         InvalidArgument, "participants must be at least 1"),
    # -- names and paths
    Case("save_async", "name=''", lambda c: c.coordinator.save_async("", _noop, 3),
         InvalidName, "non-empty str"),
    Case("save_async", "name=7", lambda c: c.coordinator.save_async(7, _noop, 3),  # type: ignore[arg-type]
         InvalidName, "non-empty str"),
    Case("storage.open_write", "'../x'", lambda c: c.storage.open_write("../x"),
         InvalidName, "escape the checkpoint root"),
    Case("storage.open_write", "'global_step_3/../../x'",
         lambda c: c.storage.open_write("global_step_3/../../x"), InvalidName,
         "escape the checkpoint root"),
    Case("storage.open_write", "'/etc/passwd' (absolute)",
         lambda c: c.storage.open_write("/etc/passwd"), InvalidName, "is absolute"),
    Case("storage.open_write", "'s3://other/x' (a URL)",
         lambda c: c.storage.open_write("s3://other/x"), InvalidName, "forbidden"),
    Case("storage.open_write", "'a\\\\b' (backslash)", lambda c: c.storage.open_write("a\\b"),
         InvalidName, "forbidden"),
    Case("storage.write_bytes", "''", lambda c: c.storage.write_bytes("", b"x"),
         InvalidName, "non-empty str"),
    Case("save_torch", "'../../x.pt'", lambda c: save_torch(c.storage, "../../x.pt", {}),
         InvalidName, "escape the checkpoint root"),
    Case("CheckpointReader.load", "relpath '../../etc/passwd'",
         lambda c: c.reader.load(2, "../../etc/passwd"), InvalidName,
         "escape the checkpoint root"),
    # -- save functions
    Case("save_async", "save_fn='not callable'",
         lambda c: c.coordinator.save_async("m", "not callable", 3),  # type: ignore[arg-type]
         InvalidArgument, "zero-argument callable"),
    Case("save_sync", "save_fn=None", lambda c: c.coordinator.save_sync(None, 3),  # type: ignore[arg-type]
         InvalidArgument, "zero-argument callable"),
    # -- URLs, backends, options
    Case("CheckpointMonitor", "url=''", lambda c: CheckpointMonitor(""), InvalidArgument,
         "non-empty str"),
    Case("CheckpointMonitor", "unknown scheme 'ftp://'", lambda c: CheckpointMonitor("ftp://h/x"),
         BackendNotFound, "scheme 'ftp'"),
    Case("CheckpointMonitor", "save_strategy='sometimes'",
         lambda c: CheckpointMonitor(c.root.url, c.root.storage_options, "sometimes"),
         InvalidArgument, "save_strategy must be one of"),
    Case("CheckpointCoordinator", "a monitor that is not one",
         lambda c: CheckpointCoordinator(object()), InvalidArgument,
         "must be a CheckpointMonitor"),
    Case("CheckpointReader", "url=42", lambda c: CheckpointReader(42),  # type: ignore[arg-type]
         InvalidArgument, "str or a StorageBackend"),
    Case("open_storage", "unknown scheme 'hdfs://'", lambda c: open_storage("hdfs://x/y"),
         BackendNotFound, "no installed package registers it"),
    Case("CheckpointReader.verify", "kind='weights'", lambda c: c.reader.verify(2, "weights"),
         InvalidArgument, "kind must be one of"),
    Case("watch", "interval=0", lambda c: next(watch(c.storage, interval=0)), InvalidArgument,
         "interval > 0"),
    Case("watch", "after=-3", lambda c: next(watch(c.storage, after=-3)), InvalidStep,
         "after must be non-negative"),
    Case("RetentionPolicy", "keep_last=0", lambda c: RetentionPolicy(keep_last=0),
         InvalidArgument, "keep_last must be a positive int"),
    Case("rewind", "to_step=-1", lambda c: rewind(c.storage, "state_dict", -1), InvalidStep,
         "to_step must be non-negative"),
    Case("rewind", "a step ahead of the pointer",
         lambda c: rewind(c.storage, "state_dict", 1_000), InvalidArgument,
         "rewind only moves back"),
    Case("rewind", "a step that was never committed",
         lambda c: rewind(c.storage, "state_dict", 0), NotFound, "step 0 does not exist"),
    # -- what is on storage
    Case("CheckpointReader.verify", "a step that does not exist",
         lambda c: c.reader.verify(99), NotFound, "step 99 does not exist"),
    Case("CheckpointReader.load", "a step that does not exist",
         lambda c: c.reader.load(99, "model.pt"), NotFound, "step 99 does not exist"),
    Case("CheckpointReader.load", "None (nothing committed yet)",
         lambda c: c.reader.load(None, "model.pt"), InvalidStep, "step is None, not a step"),
    Case("CheckpointReader.load", "a file the manifest does not list",
         lambda c: c.reader.load(2, "other.pt"), CorruptCheckpoint, "not listed"),
]  # fmt: skip


def _snapshot(root: CheckpointRoot) -> dict[str, bytes]:
    storage = root.open()
    return {f.path: storage.read_bytes(f.path) for f in storage.list_files()}


@pytest.fixture(params=["memory", "local"])
def ctx(request: pytest.FixtureRequest) -> Ctx:
    """The table runs on memory and local roots; object-store inputs have their own tests."""
    root: CheckpointRoot = request.getfixturevalue(f"{request.param}_checkpoint_root")
    monitor = root.monitor()
    coordinator = CheckpointCoordinator(monitor)
    for step in (1, 2):
        coordinator.save_async(
            "model",
            lambda step=step: save_torch(
                coordinator.storage, f"global_step_{step}/model.pt", {"w": torch.ones(4) * step}
            ),
            step,
            is_state_dict=True,
        )
        coordinator.register_and_monitor_sync(step, True, state_dict_thread_count=1)
    coordinator.wait_all()
    return Ctx(root, monitor, coordinator)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.entry}: {c.given}")
def test_bad_input_gives_a_typed_error_and_changes_nothing(ctx: Ctx, case: Case) -> None:
    before = _snapshot(ctx.root)
    with pytest.raises(case.error, match=re.escape(case.message)) as caught:
        case.call(ctx)
    assert type(caught.value) is case.error or issubclass(type(caught.value), case.error)
    after = _snapshot(ctx.root)
    # a new monitor takes the writer lease (one small counter object); nothing else may change
    after.pop(".commitpoint/writer_epoch", None)
    before.pop(".commitpoint/writer_epoch", None)
    assert after == before
    assert ctx.root.committed_steps() == {"state_dict": 2, "checkpoint": None}


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "is not a decimal step"), (b"12abc", "is not a decimal step"), (b"-4", "decimal")],
)
def test_a_corrupt_pointer_is_reported_not_guessed(ctx: Ctx, content: bytes, message: str) -> None:
    """Corrupt pointer contents: every reader refuses with CorruptCheckpoint, and a monitor
    refuses to start on such a root rather than overwrite what it cannot read."""
    pointer = "latest_state_dict_iteration.txt"
    with ctx.root.open().fs.open(ctx.root.open().full_path(pointer), "wb") as f:
        f.write(content)
    with pytest.raises(CorruptCheckpoint, match=message):
        ctx.reader.latest_state_dict_step()
    with pytest.raises(CorruptCheckpoint, match=message):
        CheckpointMonitor(ctx.root.url, ctx.root.storage_options)
    assert ctx.root.open().read_bytes(pointer) == content


def test_a_pointer_naming_a_missing_step_fails_verification(ctx: Ctx) -> None:
    storage = ctx.root.open()
    storage.delete("global_step_2", recursive=True)
    with pytest.raises(CorruptCheckpoint, match="step 2 has no state_dict manifest"):
        ctx.reader.verify(2)
    with pytest.raises(CorruptCheckpoint):
        ctx.reader.load(2, "model.pt")


def test_the_table_in_the_docs_matches_the_tests() -> None:
    text = DOCS.read_text()
    missing = [
        f"{c.entry} | {c.given}"
        for c in CASES
        if f"| `{c.entry}` | {c.given} | `{c.error.__name__}` |" not in text
    ]
    assert missing == [], "docs/reliability.md lacks rows for: " + "; ".join(missing)


@pytest.mark.parametrize("backend", ["s3", "gcs"])
def test_a_missing_bucket_is_a_clear_storage_error_at_once(
    backend: str, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    root: CheckpointRoot = request.getfixturevalue(f"{backend}_checkpoint_root")
    scheme = root.url.split("://", 1)[0]
    missing = f"{scheme}://commitpoint-no-such-bucket-{backend}/run"
    with (
        caplog.at_level(logging.WARNING),
        pytest.raises(StorageNotFound, match="commitpoint-no-such-bucket") as caught,
    ):
        CheckpointMonitor(missing, root.storage_options)
    assert [r.getMessage() for r in caplog.records if "retry" in r.getMessage().lower()] == []
    assert isinstance(caught.value, FileNotFoundError)
    text = str(caught.value)
    assert "testing" not in text.replace("commitpoint", "")  # no key or secret in the message
    with pytest.raises(StorageError, match="commitpoint-no-such-bucket"):
        CheckpointReader(missing, **root.storage_options).latest_state_dict_step()
