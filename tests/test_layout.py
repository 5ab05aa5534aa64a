"""The package layout: old module paths, the curated API, the error tree and its pickling."""

from __future__ import annotations

import importlib
import pickle
import subprocess
import sys

import pytest

import commitpoint
from commitpoint import errors
from commitpoint._moved import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_paths_are_the_moved_modules(old: str) -> None:
    with pytest.warns(DeprecationWarning, match="moved to"):
        module = importlib.import_module(old) if old not in sys.modules else None
    if module is None:  # imported earlier in this session: the alias is already in place
        module = sys.modules[old]
    assert module is importlib.import_module(MOVED[old])


def test_old_paths_work_in_a_fresh_interpreter() -> None:
    code = (
        "import warnings; warnings.simplefilter('ignore');"
        "from commitpoint.reader import CheckpointReader;"
        "from commitpoint.monitor import CheckpointMonitor;"
        "from commitpoint.coordinator import CheckpointCoordinator;"
        "from commitpoint.retention import RetentionPolicy;"
        "from commitpoint.rewind import rewind;"
        "from commitpoint.watch import watch;"
        "import commitpoint, commitpoint.read.reader as r;"
        "assert CheckpointReader is commitpoint.CheckpointReader is r.CheckpointReader;"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_curated_api_exports_exist_and_internals_warn() -> None:
    for name in commitpoint.__all__:
        assert hasattr(commitpoint, name), name
    with pytest.warns(DeprecationWarning, match="not public API"):
        from commitpoint import advance_pointer
    from commitpoint.core.pointer import advance_pointer as real

    assert advance_pointer is real
    with pytest.raises(AttributeError):
        commitpoint.no_such_name  # noqa: B018


def test_refusals_are_grouped() -> None:
    for cls in (
        errors.CommitConflict,
        errors.StepRegression,
        errors.WriterFenced,
        errors.MonitorRestarted,
    ):
        assert issubclass(cls, errors.Refused)
    assert issubclass(errors.StoragePermissionError, PermissionError)
    assert issubclass(errors.UploadFailed, errors.StorageError)
    assert issubclass(errors.SlotTimeout, TimeoutError)
    assert issubclass(errors.StagingTimeout, errors.StagingError)
    assert issubclass(errors.NotFound, LookupError)


def _every_error() -> list[errors.CommitpointError]:
    unpicklable = RuntimeError("boom")
    unpicklable.handle = lambda: None  # type: ignore[attr-defined]
    failed = errors.SaveFailed(7, "model", unpicklable)
    return [
        errors.CommitpointError("plain"),
        errors.InvalidArgument("bad"),
        errors.InvalidName("bad name"),
        errors.InvalidStep("bad step"),
        errors.BackendNotFound("zz", "install zz"),
        errors.NotFound("no step 3"),
        errors.CommitConflict("mem://p", "raced"),
        errors.StepRegression("mem://p", 5, 4),
        errors.WriterFenced("mem://r", 1, 2),
        errors.MonitorRestarted(3, 1, 2),
        errors.CorruptCheckpoint("mem://f", "size", ["a", "b"]),
        errors.StorageError("read", "mem://f", OSError("eio")),
        errors.StoragePermissionError("read", "mem://f", "denied", code="AccessDenied", status=403),
        errors.UploadFailed("mem://f", "too many parts"),
        failed,
        errors.StagingFailed("w.0", ValueError("x")),
        errors.StagingTimeout("slot"),
        errors.SlotTimeout("single_thread", 1.5),
    ]


@pytest.mark.parametrize("error", _every_error(), ids=lambda e: type(e).__name__)
def test_every_error_survives_a_pickle_round_trip(error: errors.CommitpointError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    for name, value in vars(error).items():
        if name in ("failures", "cause"):
            continue
        assert getattr(copy, name) == value, name
    if isinstance(error, errors.SaveFailed):
        assert copy.step == 7 and copy.name == "model"
        assert "boom" in str(copy.cause)


def test_map_errors_translates_only_foreign_errors() -> None:
    def translate(exc: BaseException) -> BaseException:
        return errors.StorageError("read", "mem://x", exc)

    with pytest.raises(errors.StorageError) as info, errors.map_errors(translate):
        raise OSError("eio")
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(errors.StepRegression), errors.map_errors(translate):
        raise errors.StepRegression("mem://p", 2, 1)
