"""The bad-input table: every public entry point fed wrong values gives a typed error with a clear
message and leaves storage exactly as it was. The same table is in docs/reliability.md; a test
below keeps the two in step."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
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
    saved: dict[str, bytes] = field(default_factory=dict)

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


_MANIFEST = "global_step_{}/.commitpoint-manifest.state_dict.json"


def _put(ctx: Ctx, relpath: str, data: bytes) -> None:
    """Overwrite a committed file in place (a hostile or broken store): the snapshot taken
    before the case is then restored by the case itself."""
    storage = ctx.root.open()
    ctx.saved[relpath] = storage.read_bytes(relpath)
    storage.write_bytes(relpath, data, track=False)


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
    # -- added by the hardening pass (issue 18 item 15)
    Case("save_async", "global_step=10**5000",
         lambda c: c.coordinator.save_async("m", _noop, 10**5000),
         InvalidStep, "at most 2**63 - 1"),
    Case("save_async", "block='no'", lambda c: c.coordinator.save_async("m", _noop, 3, block="no"),  # type: ignore[arg-type]
         InvalidArgument, "block must be a bool"),
    Case("CheckpointCoordinator", "max_queued=-1",
         lambda c: CheckpointCoordinator(c.monitor, max_queued=-1), InvalidArgument,
         "max_queued must be an int >= 0"),
    Case("CheckpointCoordinator", "exit_timeout=nan",
         lambda c: CheckpointCoordinator(c.monitor, exit_timeout=float("nan")), InvalidArgument,
         "exit_timeout must be a finite number"),
    Case("stage", "timeout=nan",
         lambda c: c.coordinator.stage({"w": torch.ones(1)}, timeout=float("nan")),
         InvalidArgument, "timeout must be a finite number"),
    Case("stage", "state_dict=[1]", lambda c: c.coordinator.stage([1]),  # type: ignore[arg-type]
         InvalidArgument, "must be a mapping"),
    Case("wait_all", "timeout='soon'", lambda c: c.coordinator.wait_all("soon"),  # type: ignore[arg-type]
         InvalidArgument, "timeout must be a finite number"),
    Case("open_storage", "unknown option direct_oi=False",
         lambda c: open_storage(c.root.url, direct_oi=False), InvalidArgument,
         "unknown"),
    Case("open_storage", "memory option colour='red'",
         lambda c: open_storage("memory://x", colour="red"), InvalidArgument,
         "unknown memory options ['colour']"),
    Case("open_storage", "direct_io='maybe'",
         lambda c: open_storage("/tmp/commitpoint-never", direct_io="maybe"), InvalidArgument,
         "direct_io must be true or false"),
    Case("open_storage", "'s3:/bucket' (one slash)", lambda c: open_storage("s3:/bucket/run"),
         InvalidArgument, "without '//'"),
    Case("open_storage", "'memory:/x' (one slash)", lambda c: open_storage("memory:/x"),
         InvalidArgument, "without '//'"),
    Case("watch", "interval='1'", lambda c: next(watch(c.storage, interval="1")),  # type: ignore[arg-type]
         InvalidArgument, "watch option interval must be a finite number"),
    Case("watch", "timeout=nan", lambda c: next(watch(c.storage, timeout=float("nan"))),
         InvalidArgument, "watch option timeout must be a finite number"),
    Case("watch", "every_step='yes'", lambda c: next(watch(c.storage, every_step="yes")),  # type: ignore[arg-type]
         InvalidArgument, "every_step must be a bool"),
    Case("watch", "stop=5", lambda c: next(watch(c.storage, stop=5)),  # type: ignore[arg-type]
         InvalidArgument, "stop needs is_set()"),
    Case("watch", "a str instead of a backend", lambda c: next(watch("/tmp/x")),  # type: ignore[arg-type]
         InvalidArgument, "watch needs a StorageBackend"),
    Case("RetentionPolicy", "orphan_min_age_s=nan",
         lambda c: RetentionPolicy(orphan_min_age_s=float("nan")), InvalidArgument,
         "orphan_min_age_s must be a finite number"),
    Case("RetentionPolicy", "orphan_min_age_s='1h'",
         lambda c: RetentionPolicy(orphan_min_age_s="1h"),  # type: ignore[arg-type]
         InvalidArgument, "orphan_min_age_s must be a finite number"),
    Case("RetentionPolicy", "gc_foreign='yes'", lambda c: RetentionPolicy(gc_foreign="yes"),  # type: ignore[arg-type]
         InvalidArgument, "gc_foreign must be a bool"),
    Case("RetentionPolicy.apply", "a str instead of a backend",
         lambda c: RetentionPolicy().apply("/tmp/x"),  # type: ignore[arg-type]
         InvalidArgument, "storage must be a StorageBackend"),
    Case("RetentionPolicy.apply", "in_flight=5",
         lambda c: RetentionPolicy().apply(c.storage, in_flight=5),  # type: ignore[arg-type]
         InvalidArgument, "in_flight must be a collection of steps"),
    Case("RetentionPolicy.apply", "dry_run='no'",
         lambda c: RetentionPolicy().apply(c.storage, dry_run="no"),  # type: ignore[arg-type]
         InvalidArgument, "dry_run must be a bool"),
    Case("CheckpointReader.verify", "a manifest that is `[]`",
         lambda c: (_put(c, _MANIFEST.format(2), b"[]"), c.reader.verify(2)),
         CorruptCheckpoint, "manifest must be a JSON object, got list"),
    Case("CheckpointReader.verify", "a manifest that is `null`",
         lambda c: (_put(c, _MANIFEST.format(1), b"null"), c.reader.verify(1)),
         CorruptCheckpoint, "manifest must be a JSON object, got NoneType"),
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
    try:
        with pytest.raises(case.error, match=re.escape(case.message)) as caught:
            case.call(ctx)
    finally:
        for relpath, data in ctx.saved.items():  # a case that broke a file puts it back
            ctx.root.open().write_bytes(relpath, data, track=False)
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


@pytest.mark.parametrize(
    ("backend", "options"),
    [
        ("s3", {"config_kwargs": 5}),
        ("s3", {"client_kwargs": "eu-west-1"}),
        ("s3", {"part_size": [1]}),
        ("s3", {"endpoint_uri": "http://127.0.0.1:1"}),  # a typo of endpoint_url
        ("gcs", {"chunk_size": [1]}),
        ("gcs", {"projekt": "x"}),
    ],
)
def test_object_store_options_of_the_wrong_type_or_name_give_typed_errors(
    backend: str, options: dict[str, Any], request: pytest.FixtureRequest
) -> None:
    root: CheckpointRoot = request.getfixturevalue(f"{backend}_checkpoint_root")
    with pytest.raises(CommitpointError) as caught:
        open_storage(root.url, **{**root.storage_options, **options}).read_pointer(
            "latest_state_dict_iteration.txt"
        )
    assert isinstance(caught.value, InvalidArgument | StorageError)
