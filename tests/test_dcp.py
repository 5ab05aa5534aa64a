"""commitpoint.dcp on real gloo ranks (subprocesses) with local, S3 (moto) and GCS roots.

Each multi-rank test starts its ranks through :mod:`dcp_ranks` (FSDP2 ``fully_shard`` models on
CPU, model + optimizer through ``get_state_dict``); rank 0 owns the monitor. Every run is bounded
by a deadline, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed.checkpoint")

import torch.distributed.checkpoint as torch_dcp  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # noqa: E402

import commitpoint.dcp as cdcp  # noqa: E402
from commitpoint import (  # noqa: E402
    CheckpointCoordinator,
    CorruptCheckpoint,
    InvalidArgument,
    SaveFailed,
    StepRegression,
)
from commitpoint.dcp.reader import _MetadataUnpickler  # noqa: E402
from commitpoint.testing import CheckpointRoot  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import dcp_ranks  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _run(root: CheckpointRoot, world: int, actions: list[dict[str, Any]], work: Path) -> Any:
    ranks = dcp_ranks.run_ranks(world, root.url, root.storage_options, actions, work)
    assert ranks.returncodes == [0] * world, ranks.logs
    assert all(len(r) == len(actions) for r in ranks.reports), ranks.logs
    return ranks.reports


def _files(root: CheckpointRoot, step: int) -> dict[str, bytes]:
    storage = root.open()
    return {
        info.path: storage.read_bytes(info.path)
        for info in storage.list_files(f"global_step_{step}")
    }


def _local_state(seed: int) -> tuple[Any, Any, dict[str, Any]]:
    """A plain (unsharded) model + optimizer of the same shape, in this process."""
    model = dcp_ranks.build_model(seed)
    optimizer = dcp_ranks.train_one_step(model, seed)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return model, optimizer, {"model": model_sd, "optim": optim_sd}


def _load_here(root: CheckpointRoot, step: int | None, **kwargs: Any) -> tuple[int, Any]:
    """Load into one unsharded process (no process group): resharding to world size 1."""
    model, optimizer, state = _local_state(seed=1234)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = cdcp.load(state, root.url, step, **kwargs, **root.storage_options)
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return loaded, dcp_ranks.full_values({"model": model_sd, "optim": optim_sd})


# -- commit, refusal, async, verified load: every backend ---------------------------------------
def test_two_ranks_commit_refuse_and_load(checkpoint_root: CheckpointRoot, tmp_path: Path) -> None:
    actions = [
        {"op": "save", "step": 1, "seed": 1},
        {"op": "save", "step": 2, "seed": 2, "async": True},
        {"op": "hash", "step": 1},
        {"op": "hash", "step": 2},
        {"op": "save", "step": 1, "seed": 3},  # committed: refused
        {"op": "save", "step": 2, "seed": 3, "async": True},  # committed: refused
        {"op": "load", "step": None},
        {"op": "load", "step": 1},
        {"op": "export", "step": 3, "seed": 6},  # weights as safetensors, a state-dict step
        {"op": "export", "step": 3, "seed": 7},  # committed: refused
    ]
    reports = _run(checkpoint_root, 2, actions, tmp_path)
    for rank_reports in reports:
        save1, save2, _, _, resave1, resave2, latest, first, export, reexport = rank_reports
        assert export["ok"], export
        assert (reexport["error"], reexport["cause"]) == ("SaveFailed", "StepRegression")
        assert save1["ok"] and save2["ok"]
        for refused in (resave1, resave2):
            assert (refused["error"], refused["cause"]) == ("SaveFailed", "StepRegression")
        assert latest["ok"] and latest["step"] == 2 and latest["values"] == save2["values"]
        assert first["ok"] and first["step"] == 1 and first["values"] == save1["values"]
    assert reports[0][0]["values"] == reports[1][0]["values"]  # one model, gathered alike

    assert checkpoint_root.committed_steps() == {"state_dict": 3, "checkpoint": 2}
    for step in (1, 2):
        assert checkpoint_root.verify(step, "checkpoint").ok
        manifest = checkpoint_root.manifest(step, "checkpoint")
        assert {(f.path, f.tracked) for f in manifest.files} == {
            (f"global_step_{step}/{name}", True)
            for name in (".metadata", "__0_0.distcp", "__1_0.distcp")
        }
        # The refused re-saves (seed 3) touched no byte of the committed step.
        hashes = {
            path: hashlib.sha256(data).hexdigest()
            for path, data in _files(checkpoint_root, step).items()
        }
        assert hashes == reports[0][1 + step]["hashes"]
    loaded, values = _load_here(checkpoint_root, None)
    assert (loaded, values) == (2, reports[0][1]["values"])
    _check_export(checkpoint_root, 3, reports[0][8]["values"])


def _check_export(root: CheckpointRoot, step: int, values: Any) -> None:
    """Step ``step`` is a committed safetensors model folder holding ``values``."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    report = root.verify(step, "state_dict")
    assert report.ok and report.files == 2
    manifest = root.manifest(step, "state_dict")
    assert {(f.path, f.tracked) for f in manifest.files} == {
        (f"global_step_{step}/model.safetensors", True),
        (f"global_step_{step}/config.json", True),
    }
    storage = root.open()
    weights = safetensors_torch.load(storage.read_bytes(f"global_step_{step}/model.safetensors"))
    assert dcp_ranks.full_values(weights) == values
    config = json.loads(storage.read_bytes(f"global_step_{step}/config.json"))
    assert config == {"model_type": "toy"}


# -- resharding -------------------------------------------------------------------------------
def test_resharding_between_2_4_and_1_ranks(
    local_checkpoint_root: CheckpointRoot, tmp_path: Path
) -> None:
    root = local_checkpoint_root
    saved2 = _run(root, 2, [{"op": "save", "step": 1, "seed": 4}], tmp_path / "save2")
    on4 = _run(
        root,
        4,
        [{"op": "load", "step": 1}, {"op": "save", "step": 2, "seed": 5}],
        tmp_path / "on4",
    )
    assert all(r[0]["values"] == saved2[0][0]["values"] for r in on4)  # 2 -> 4
    assert _load_here(root, 1) == (1, saved2[0][0]["values"])  # 2 -> 1
    assert _load_here(root, 2) == (2, on4[0][1]["values"])  # 4 -> 1
    assert root.verify(2, "checkpoint").files == 5  # four ranks' files and .metadata


# -- failures ---------------------------------------------------------------------------------
def _kill_mid_save(root: CheckpointRoot, work: Path, killed: int) -> None:
    """Start a 2-rank save whose rank ``killed`` stalls after its first write, SIGKILL that
    rank there, and check that the other one exits (no hang) and nothing is committed."""
    actions = [{"op": "stall", "rank": killed}, {"op": "save", "step": 1, "seed": 1}]
    processes = dcp_ranks.start_ranks(2, root.url, root.storage_options, actions, work)
    marker = work / f"stalled-{killed}"
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        assert all(p.poll() is None for p in processes), "a rank exited before the stall"
        time.sleep(0.05)
    assert marker.exists(), "the stalled rank never reached its first write"
    os.kill(processes[killed].pid, signal.SIGKILL)
    ranks = dcp_ranks.wait_ranks(processes, work, timeout=60)
    survivor = 1 - killed
    assert ranks.returncodes[killed] == -signal.SIGKILL
    assert ranks.returncodes[survivor] is not None, "the surviving rank hung"
    assert ranks.reports[survivor][-1]["ok"] is False
    assert root.committed_steps() == {"state_dict": None, "checkpoint": None}
    assert not root.open().exists("global_step_1/.commitpoint-manifest.checkpoint.json")


def test_sigkill_of_a_rank_mid_save_commits_nothing_and_hangs_nothing(
    checkpoint_root: CheckpointRoot, tmp_path: Path
) -> None:
    _kill_mid_save(checkpoint_root, tmp_path / "killed", killed=1)
    if checkpoint_root.backend != "local":
        return  # an object store shows nothing of an unfinished upload; local leaves a temp file
    # A restarted job saves the same step: it commits and verifies despite the leftovers.
    reports = _run(checkpoint_root, 2, [{"op": "save", "step": 1, "seed": 2}], tmp_path / "retry")
    assert all(r[0]["ok"] for r in reports)
    assert checkpoint_root.committed_steps()["checkpoint"] == 1
    assert checkpoint_root.verify(1, "checkpoint").ok


def test_sigkill_of_the_coordinator_rank_mid_save(
    local_checkpoint_root: CheckpointRoot, tmp_path: Path
) -> None:
    _kill_mid_save(local_checkpoint_root, tmp_path, killed=0)


def test_flipped_byte_and_fenced_writer_fail_closed_on_every_rank(
    local_checkpoint_root: CheckpointRoot, tmp_path: Path
) -> None:
    root = local_checkpoint_root
    actions = [
        {"op": "save", "step": 1, "seed": 1},
        {"op": "flip", "path": "global_step_1/__1_0.distcp"},
        {"op": "load", "step": 1},  # only rank 1 reads the damaged file; both fail
        {"op": "fence"},  # a restarted job's monitor takes the writer lease
        {"op": "save", "step": 2, "seed": 2},
        {"op": "save", "step": 3, "seed": 2, "async": True},
    ]
    reports = _run(root, 2, actions, tmp_path)
    for rank_reports in reports:
        assert rank_reports[0]["ok"]
        assert rank_reports[2]["error"] == "CorruptCheckpoint"
        assert "__1_0.distcp" in rank_reports[2]["message"]
        for refused in rank_reports[4:]:
            assert (refused["error"], refused["cause"]) == ("SaveFailed", "WriterFenced")
    with pytest.raises(CorruptCheckpoint, match=r"__1_0\.distcp"):
        _load_here(root, 1)
    assert not root.verify(1, "checkpoint").ok
    # The fenced saves were refused before any rank wrote a byte.
    assert root.list_files("global_step_2") == root.list_files("global_step_3") == []
    assert root.committed_steps()["checkpoint"] == 1


# -- the documented FSDP2 example --------------------------------------------------------------
EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "dcp_fsdp2.py"


def test_dcp_page_embeds_the_example_that_runs() -> None:
    page = (EXAMPLE.parent.parent / "dcp.md").read_text()
    assert f"```python\n{EXAMPLE.read_text().rstrip()}\n```" in page


def test_fsdp2_example_commits_exports_and_resumes(
    local_checkpoint_root: CheckpointRoot, tmp_path: Path
) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    root = local_checkpoint_root
    for run, last in ((1, 4), (2, 8)):
        work = tmp_path / f"run-{run}"
        ranks = dcp_ranks.wait_ranks(dcp_ranks.launch(2, [str(EXAMPLE), root.url], work), work)
        assert ranks.returncodes == [0, 0], ranks.logs
        assert root.committed_steps() == {"state_dict": last, "checkpoint": last}
    for step in (2, 4, 6, 8):
        report = root.verify(step, "checkpoint")
        assert report.ok and report.files == 5  # weights, config, two ranks' parts, .metadata
    weights = safetensors_torch.load_file(os.path.join(root.url, "global_step_8/model.safetensors"))
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        "0.weight": (32, 16),
        "0.bias": (32,),
        "2.weight": (4, 32),
        "2.bias": (4,),
    }
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cdcp.load(state, root.url) == 8  # the latest checkpoint, in one process
    assert all(torch.equal(state["model"][k], v) for k, v in weights.items())


# -- one process: the storage classes themselves ------------------------------------------------
def _coordinator(root: CheckpointRoot) -> CheckpointCoordinator:
    return CheckpointCoordinator(root.monitor())


def test_single_process_state_dict_step_and_plain_dcp_compatibility(
    local_checkpoint_root: CheckpointRoot,
) -> None:
    root = local_checkpoint_root
    _, _, state = _local_state(seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cdcp.save({"model": state["model"]}, _coordinator(root), 4, is_state_dict=True)
        assert root.committed_steps() == {"state_dict": 4, "checkpoint": None}
        # DCP's own reader reads a committed local step as it is.
        plain = {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()}}
        torch_dcp.load(plain, checkpoint_id=os.path.join(root.url, "global_step_4"))
        assert all(torch.equal(plain["model"][k], v) for k, v in state["model"].items())
        ours = {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()}}
        with pytest.raises(CorruptCheckpoint, match="no checkpoint step is committed"):
            cdcp.load(ours, root.url)
        assert cdcp.load(ours, root.url, kind="state_dict") == 4
        assert all(torch.equal(ours["model"][k], v) for k, v in state["model"].items())


def test_metadata_byte_flip_and_unlisted_files_fail_closed(
    memory_checkpoint_root: CheckpointRoot,
) -> None:
    root = memory_checkpoint_root
    coordinator = _coordinator(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cdcp.save({"w": torch.arange(64.0)}, coordinator, 1)
        storage = root.open()
        meta = bytearray(storage.read_bytes("global_step_1/.metadata"))
        meta[10] ^= 0x40
        storage.write_bytes("global_step_1/.metadata", bytes(meta), track=False)
        with pytest.raises(CorruptCheckpoint, match=r"\.metadata"):
            cdcp.load({"w": torch.zeros(64)}, root.url, 1)
        with pytest.raises(CorruptCheckpoint, match="no committed DCP checkpoint"):
            cdcp.load({"w": torch.zeros(64)}, root.url, 7)


def test_metadata_unpickler_refuses_anything_but_dcp_classes() -> None:
    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, ("true",))

    with pytest.raises(pickle.UnpicklingError, match=r"(posix|os)\.system"):
        _MetadataUnpickler(__import__("io").BytesIO(pickle.dumps(Evil()))).load()


def test_writer_refuses_other_places_and_rank_local_saves(
    memory_checkpoint_root: CheckpointRoot,
) -> None:
    coordinator = _coordinator(memory_checkpoint_root)
    writer = cdcp.StorageWriter(coordinator, 2)
    writer.reset(writer.checkpoint_id)  # its own place is fine
    with pytest.raises(InvalidArgument, match="names another place"):
        writer.reset("/somewhere/else")
    with pytest.raises(InvalidArgument, match="use_collectives"):
        writer.set_up_storage_writer(True, rank=0, use_collectives=False)
    with pytest.raises(InvalidArgument, match="needs a CheckpointCoordinator"):
        cdcp.StorageWriter(coordinator.storage, 2).set_up_storage_writer(True, rank=0)
    with pytest.raises(InvalidArgument, match="coordinator must be"):
        cdcp.StorageWriter("memory://x", 2)  # type: ignore[arg-type]


def test_single_process_refusal_is_typed(memory_checkpoint_root: CheckpointRoot) -> None:
    coordinator = _coordinator(memory_checkpoint_root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cdcp.save({"w": torch.ones(4)}, coordinator, 5)
        with pytest.raises(SaveFailed) as refused:
            cdcp.save({"w": torch.zeros(4)}, coordinator, 5)
        assert isinstance(refused.value.cause, StepRegression)
        with pytest.raises(SaveFailed) as refused_async:
            cdcp.async_save({"w": torch.zeros(4)}, coordinator, 4).result(timeout=30)
        assert isinstance(refused_async.value.cause, StepRegression)
        out = {"w": torch.zeros(4)}
        cdcp.load(out, memory_checkpoint_root.url)
    assert torch.equal(out["w"], torch.ones(4))


def test_single_process_export_and_bad_inputs(memory_checkpoint_root: CheckpointRoot) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    root = memory_checkpoint_root
    coordinator = _coordinator(root)
    weights = {
        "embed": torch.arange(12, dtype=torch.bfloat16).reshape(3, 4),
        "flag": torch.tensor([True, False]),
        "scale": torch.tensor(0.5),
    }
    with pytest.raises(InvalidArgument, match="tensors only"):
        cdcp.export_safetensors({"w": torch.ones(2), "n": 3}, coordinator, 1)  # type: ignore[dict-item]
    with pytest.raises(InvalidArgument):
        cdcp.export_safetensors(weights, coordinator, 1, filename="../escape.safetensors")
    assert root.list_files("global_step_1") == []  # refused before writing
    cdcp.export_safetensors(weights, coordinator, 1, metadata={"source": "test"})
    assert root.committed_steps() == {"state_dict": 1, "checkpoint": None}
    data = root.open().read_bytes("global_step_1/model.safetensors")
    loaded = safetensors_torch.load(data)
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())
    with pytest.raises(SaveFailed) as refused:
        cdcp.export_safetensors(weights, coordinator, 1)
    assert isinstance(refused.value.cause, StepRegression)
    assert root.open().read_bytes("global_step_1/model.safetensors") == data


def test_benchmark_smoke_run_writes_its_rows(tmp_path: Path) -> None:
    """``benchmarks/dcp_throughput.py`` end to end at a tiny size, local root only (no timing
    is asserted: figures go to docs/benchmarks.md)."""
    import subprocess

    repo = Path(__file__).resolve().parent.parent
    env = dict(
        os.environ,
        COMMITPOINT_BENCH_RESULTS=str(tmp_path / "results"),
        COMMITPOINT_BENCH_SCRATCH=str(tmp_path / "scratch"),
        PYTHONPATH=str(repo),
    )
    command = ["-m", "benchmarks.dcp_throughput", "--quick", "--sizes", "2M", "--backends", "local"]
    done = subprocess.run(
        [sys.executable, *command],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads((tmp_path / "results" / "dcp_throughput.json").read_text())
    assert {(r["case"], r["method"]) for r in rows} == {
        ("2 MiB, local", "commitpoint.dcp.save (checksums + commit)"),
        ("2 MiB, local", "DCP FileSystemWriter"),
        ("2 MiB, async stall", "commitpoint.dcp.async_save"),
        ("2 MiB, async stall", "DCP async_save (FileSystemWriter)"),
    }
    for r in rows:
        assert r["runs"] == 2 and r["min"] <= r["median"] <= r["max"]
        if r["method"].startswith("commitpoint"):
            assert {"ratio", "goal", "met"} <= set(r)
