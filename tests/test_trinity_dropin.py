"""commitpoint as a drop-in for Trinity-RFT's checkpoint module, driven by Trinity's call sites.

``trinity_shapes`` retells upstream's trainer, workers, engine save, train loop and readers with
only the import changed; these tests run them against a real monitor actor, real gloo process
groups and real files, then read the result the way verl and Trinity do.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

import trinity_shapes as shapes
from commitpoint import (
    CheckpointCoordinator,
    CheckpointMonitor,
    CheckpointReader,
    ForeignPointer,
    InvalidArgument,
    MonitorNotFound,
    SaveFailed,
)
from commitpoint.core.layout import Kind
from commitpoint.core.manifest import read_manifest
from commitpoint.maintenance.rewind import read_history

ray = pytest.importorskip("ray")
ray.cloudpickle.register_pickle_by_value(shapes)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.ray


def _namespace() -> str:
    return f"trinity-{uuid.uuid4().hex[:8]}"


def _pointer(root: Path, tracker: str) -> int | None:
    path = root / tracker
    return int(path.read_text().strip()) if path.exists() else None


def _pointers(root: Path) -> tuple[int | None, int | None]:
    return _pointer(root, shapes.CHECKPOINT_TRACKER), _pointer(root, shapes.STATE_DICT_TRACKER)


def _assert_every_committed_step_verifies(root: Path) -> list[int]:
    """Every manifest under the root verifies, and both pointers name a step that has one."""
    reader = CheckpointReader(str(root))
    committed = []
    for step in shapes.step_folders(str(root)):
        for kind in Kind:
            if read_manifest(reader.storage, step, kind) is not None:
                report = reader.verify(step, kind)
                assert report.ok, f"step {step} ({kind.value}): {report.problems}"
                committed.append(step)
    for kind in Kind:
        named = reader.latest_step(kind)
        if named is not None:
            reader.manifest(named, kind)  # raises if the named step has no manifest
    return sorted(set(committed))


def _expected(*runs: shapes.RunResult) -> Any:
    """The weights the trainer had at a step, newest run first (a resumed run re-trains)."""

    def expected(step: int) -> list[torch.Tensor] | None:
        for run in runs:
            if step in run.trainer.weights_at:
                return run.trainer.weights_at[step]
        return None

    return expected


def _cleanup(*results: shapes.RunResult) -> None:
    for result in results:
        result.trainer.kill()


# -- get_actor, strategies, handles --
def test_get_actor_takes_upstream_keywords_and_a_lookup_finds_the_running_actor(
    ray_cluster: Any, tmp_path: Path
) -> None:
    namespace = _namespace()
    created = CheckpointMonitor.get_actor(
        namespace=namespace,
        save_strategy=shapes.SaveStrategy.SINGLE_THREAD,
        default_local_dir=str(tmp_path),
        default_hdfs_dir=None,
    )
    try:
        found = CheckpointMonitor.get_actor(namespace=namespace)
        assert found._actor_id == created._actor_id
        url, _ = ray.get(found.storage_config.remote())
        assert url == str(tmp_path)
        assert ray.get(found.save_strategy.remote()) == "single_thread"
        with pytest.raises(MonitorNotFound, match="checkpoint_monitor"):
            CheckpointMonitor.get_actor(namespace=_namespace())
        with pytest.raises(InvalidArgument, match="save_strategy"):
            CheckpointMonitor.get_actor(
                namespace=_namespace(), save_strategy="bogus", default_local_dir=str(tmp_path)
            )
        with pytest.raises(InvalidArgument, match="default_local_dir"):
            CheckpointMonitor.get_actor(
                _namespace(), str(tmp_path / "a"), default_local_dir=str(tmp_path / "b")
            )
        replicated = CheckpointMonitor.get_actor(
            namespace=_namespace(),
            default_local_dir=str(tmp_path / "local"),
            default_hdfs_dir=str(tmp_path / "replica"),
        )
        assert ray.get(replicated.replication_target.remote()) == str(tmp_path / "replica")
        ray.kill(replicated)
    finally:
        ray.kill(created)


def test_an_upstream_monitor_handle_is_refused_with_a_typed_error(ray_cluster: Any) -> None:
    upstream = (
        ray.remote(shapes.UpstreamMonitorShape)
        .options(name="checkpoint_monitor", namespace=_namespace())
        .remote(save_strategy="single_thread", default_local_dir="/tmp/x")
    )
    try:
        with pytest.raises(InvalidArgument, match="not a commitpoint monitor"):
            CheckpointCoordinator(upstream)
    finally:
        ray.kill(upstream)


# -- full runs --
def test_full_run_weights_every_step_checkpoints_at_the_same_steps_two_ranks(
    ray_cluster: Any, tmp_path: Path
) -> None:
    """Sync every step, checkpoint every 2nd: both at steps 2, 4, 6; the weights of each of those
    steps are committed before the checkpoint save starts (the delayed ordering), then the final
    re-save of step 6 runs on both ranks (its engine save holds barriers)."""
    root = tmp_path / "job"
    config = shapes.RunConfig(
        checkpoint_job_dir=str(root),
        ray_namespace=_namespace(),
        save_strategy="SINGLE_THREAD",
        world_size=2,
        total_steps=6,
        sync_interval=1,
        save_interval=2,
        wait_for_weights_before_save=True,
    )
    trainer = shapes.VERLTrainerShape(config)
    result = shapes.RunResult(trainer)
    try:
        with shapes.SynchronizerPoll(str(root), 2, _expected(result)) as poll:
            shapes.run_prepared(trainer, result)
            assert result.errors == []
            shapes.wait_for_pointer(str(root), shapes.STATE_DICT_TRACKER, 6)
        assert _pointers(root) == (6, 6)
        assert poll.problems == []
        assert poll.loaded == sorted(set(poll.loaded)) and poll.loaded[-1] == 6

        # verl's resume and Trinity's lookups find step 6 and its files
        assert shapes.find_latest_ckpt_path(str(root)) == str(root / "global_step_6")
        step, actor, critic = shapes.load_like_ray_ppo_trainer(str(root), 2)
        assert step == 6
        assert all(torch.equal(a, b) for a, b in zip(actor, trainer.weights_at[6], strict=True))
        assert critic is not None
        assert shapes.get_latest_state_dict(str(root)) == (str(root / "global_step_6/actor"), 6)
        assert (root / "global_step_6/actor/huggingface/model.bin").exists()  # final HF export

        committed = _assert_every_committed_step_verifies(root)
        assert {2, 4, 6} <= set(committed)
        reopened = [e for e in read_history(CheckpointReader(str(root)).storage) if e.get("reason")]
        assert any(e["from"] == 6 and "reopen" in str(e["reason"]) for e in reopened)
        lines = trainer.actor_rollout_wg.call("log_lines")[0]
        assert any("step 6" in line and "process group" in line for line in lines), lines
    finally:
        _cleanup(result)


@pytest.mark.parametrize("style", ["streamed", "sharded"])
def test_full_run_disjoint_schedule_one_rank_final_resave_is_a_no_op(
    ray_cluster: Any, tmp_path: Path, style: str
) -> None:
    """Sync every 2nd step, checkpoint every 3rd (both at 6, in whichever order the saves land);
    the final save of step 6 re-saves a committed step: its save function is not run."""
    root = tmp_path / "job"
    config = shapes.RunConfig(
        checkpoint_job_dir=str(root),
        ray_namespace=_namespace(),
        save_strategy=shapes.SaveStrategy.SINGLE_PROCESS,
        world_size=1,
        state_dict_style=style,
        total_steps=6,
        sync_interval=2,
        save_interval=3,
        save_hf_checkpoint="never",
    )
    trainer = shapes.VERLTrainerShape(config)
    result = shapes.RunResult(trainer)
    before: dict[str, tuple[int, int, bytes]] = {}

    def snapshot() -> None:
        for path in sorted((root / "global_step_6" / "actor").rglob("*")):
            if path.is_file():
                stat = path.stat()
                before[str(path)] = (stat.st_ino, stat.st_mtime_ns, path.read_bytes())

    config.before_final_save = snapshot
    try:
        with shapes.SynchronizerPoll(str(root), 1, _expected(result)) as poll:
            shapes.run_prepared(trainer, result)
            assert result.errors == []
            shapes.wait_for_pointer(str(root), shapes.STATE_DICT_TRACKER, 6)
        assert _pointers(root) == (6, 6)
        assert poll.problems == []
        assert before, "step 6 had files before the final save"
        for path, (inode, mtime, data) in before.items():
            stat = os.stat(path)
            assert (stat.st_ino, stat.st_mtime_ns) == (inode, mtime), path
            assert Path(path).read_bytes() == data
        lines = trainer.actor_rollout_wg.call("log_lines")[0]
        assert any(
            line.startswith("INFO") and "step 6" in line and "not run" in line for line in lines
        ), lines
        committed = _assert_every_committed_step_verifies(root)
        assert {3, 6} <= set(committed)
        step, actor, _ = shapes.load_like_ray_ppo_trainer(str(root), 1)
        assert step == 6 and torch.equal(actor[0], trainer.weights_at[6][0])
    finally:
        _cleanup(result)


# -- crash and resume --
def test_crash_and_resume_from_the_checkpoint_pointer_retrains_the_abandoned_weights(
    ray_cluster: Any, tmp_path: Path
) -> None:
    """Run 1 publishes weights up to step 7 or 8 but checkpoints only up to 6, then the job dies
    (step 8's weights may still be half-written). Run 2 resumes from step 6 (the checkpoint
    pointer) with different data and saves weights of steps 7 and 8 again: the state-dict pointer
    is moved back to 6 before anything of run 2 is written, the published steps above 6 are
    recorded as abandoned, and every later read gets run 2's weights."""
    root = tmp_path / "job"
    first = shapes.RunConfig(
        checkpoint_job_dir=str(root),
        ray_namespace=_namespace(),
        world_size=2,
        total_steps=10,
        sync_interval=1,
        save_interval=3,
        crash_after_step=8,
        crash_waits_for_saves=False,
    )
    run1 = shapes.run_training(first)
    shapes.wait_for_pointer(str(root), shapes.STATE_DICT_TRACKER, 7)
    run1.trainer.kill()
    assert run1.crashed and run1.errors == []
    checkpoint, published = _pointers(root)
    assert checkpoint == 6 and published in (7, 8)

    second = shapes.RunConfig(
        checkpoint_job_dir=str(root),
        ray_namespace=_namespace(),
        world_size=2,
        total_steps=10,
        sync_interval=1,
        save_interval=3,
        data_seed=1,
    )
    seen_at_first_step: list[tuple[int | None, int | None]] = []
    second.before_step = lambda step: seen_at_first_step.append(_pointers(root))
    trainer = shapes.VERLTrainerShape(second)  # the new job's monitor: moves weights back
    assert _pointers(root) == (6, 6)
    run2 = shapes.RunResult(trainer)
    try:
        # the poll keeps old folders here, so steps 7 and 8 can be read back afterwards
        with shapes.SynchronizerPoll(
            str(root), 2, _expected(run2, run1), remove_previous=False
        ) as poll:
            shapes.run_prepared(trainer, run2)
            assert run2.errors == []
            shapes.wait_for_pointer(str(root), shapes.STATE_DICT_TRACKER, 10)
        assert seen_at_first_step[0] == (6, 6)
        assert _pointers(root) == (10, 10)
        assert poll.problems == []
        history = read_history(CheckpointReader(str(root)).storage)
        resume = [e for e in history if e.get("kind") == "state_dict" and e["from"] == published]
        assert resume and resume[0]["to"] == 6
        assert resume[0]["abandoned"] == list(range(7, published + 1))
        # the re-trained steps hold run 2's weights, whole, and verify
        for step in (7, 8):
            weights = shapes.load_actor_weights(str(root / f"global_step_{step}/actor"), 2)
            assert all(
                torch.equal(a, b)
                for a, b in zip(weights, run2.trainer.weights_at[step], strict=True)
            )
            assert not all(
                torch.equal(a, b)
                for a, b in zip(weights, run1.trainer.weights_at[step], strict=True)
            )
        assert {6, 7, 8, 9, 10} <= set(_assert_every_committed_step_verifies(root))
        step, actor, _ = shapes.load_like_ray_ppo_trainer(str(root), 2)
        assert step == 10
        assert all(torch.equal(a, b) for a, b in zip(actor, trainer.weights_at[10], strict=True))
    finally:
        _cleanup(run2)


def test_trainer_restart_in_the_same_job_reuses_the_monitor_and_still_moves_weights_back(
    ray_cluster: Any, tmp_path: Path
) -> None:
    root = tmp_path / "job"
    namespace = _namespace()
    first = shapes.RunConfig(
        checkpoint_job_dir=str(root),
        ray_namespace=namespace,
        world_size=1,
        use_critic=False,
        total_steps=6,
        sync_interval=1,
        save_interval=2,
        crash_after_step=5,
    )
    run1 = shapes.run_training(first)
    shapes.wait_for_pointer(str(root), shapes.STATE_DICT_TRACKER, 5)
    run1.trainer.actor_rollout_wg.kill()  # the trainer's workers die; the monitor lives on
    assert _pointers(root) == (4, 5)
    monitor = ray.get_actor("checkpoint_monitor", namespace=namespace)

    second = shapes.RunConfig(
        checkpoint_job_dir=str(root),
        ray_namespace=namespace,
        world_size=1,
        use_critic=False,
        total_steps=6,
        sync_interval=1,
        save_interval=2,
        data_seed=1,
    )
    trainer = shapes.VERLTrainerShape(second)
    assert ray.get_actor("checkpoint_monitor", namespace=namespace)._actor_id == monitor._actor_id
    assert _pointers(root) == (4, 4)
    run2 = shapes.RunResult(trainer)
    try:
        shapes.run_prepared(trainer, run2)
        assert run2.errors == []
        assert _pointers(root) == (6, 6)
        _assert_every_committed_step_verifies(root)
        weights = shapes.load_actor_weights(str(root / "global_step_5/actor"), 1)
        assert torch.equal(weights[0], trainer.weights_at[5][0])
    finally:
        _cleanup(run2)


# -- another writer's pointer --
def test_a_higher_pointer_written_by_verl_fails_the_commit_loudly(
    ray_cluster: Any, tmp_path: Path
) -> None:
    root = tmp_path / "job"
    config = shapes.RunConfig(
        checkpoint_job_dir=str(root),
        ray_namespace=_namespace(),
        world_size=1,
        use_critic=False,
        total_steps=4,
        sync_interval=1,
        save_interval=2,
    )

    def verl_writes_its_tracker(step: int) -> None:
        if step == 3:  # verl's RayPPOTrainer._save_checkpoint: a plain write of its own step
            with open(root / shapes.CHECKPOINT_TRACKER, "w") as f:
                f.write(str(9))

    config.before_step = verl_writes_its_tracker
    result = shapes.run_training(config)
    try:
        assert result.errors, "the commit of step 4 must not pass silently"
        error = result.errors[0]
        assert isinstance(error, ForeignPointer), repr(error)
        assert "step 4" in str(error) and "9" in str(error)
        assert _pointer(root, shapes.CHECKPOINT_TRACKER) == 9  # never overwritten
    finally:
        _cleanup(result)


# -- save_sync errors through Ray --
def test_a_failed_engine_save_reaches_the_trainer_as_its_own_type_and_as_save_failed(
    ray_cluster: Any, tmp_path: Path
) -> None:
    root = tmp_path / "job"
    config = shapes.RunConfig(
        checkpoint_job_dir=str(root),
        ray_namespace=_namespace(),
        world_size=1,
        use_critic=False,
        total_steps=2,
        sync_interval=1,
        save_interval=2,
    )
    trainer = shapes.VERLTrainerShape(config)
    trainer.actor_rollout_wg.call("set_fail_engine_save_at", 2)
    result = shapes.RunResult(trainer)
    try:
        shapes.run_prepared(trainer, result)
        assert result.errors
        error = result.errors[0]
        assert isinstance(error, OSError) and isinstance(error, SaveFailed), repr(error)
        assert _pointer(root, shapes.CHECKPOINT_TRACKER) is None
    finally:
        _cleanup(result)


# -- save strategies --
class _SlotProbe:
    """A worker whose save waits until the other worker's save is running too."""

    def __init__(self, namespace: str, rank: int, gate_dir: str) -> None:
        self.coordinator = CheckpointCoordinator(CheckpointMonitor.get_actor(namespace=namespace))
        self.rank = rank
        self.gate_dir = gate_dir

    def save(self, step: int) -> None:
        import time

        def both_inside() -> None:
            Path(self.gate_dir, f"inside-{self.rank}").touch()
            deadline = time.monotonic() + 20
            while not Path(self.gate_dir, f"inside-{1 - self.rank}").exists():
                if time.monotonic() > deadline:
                    raise TimeoutError("the other worker's save never ran beside this one")
                time.sleep(0.01)

        self.coordinator.save_async("probe", both_inside, step, is_state_dict=True)

    def wait(self) -> None:
        self.coordinator.wait_all()


def test_single_process_lets_two_workers_of_one_ray_job_save_at_once(
    ray_cluster: Any, tmp_path: Path
) -> None:
    """Upstream names a process by node and Ray job; commitpoint does the same under Ray."""
    namespace = _namespace()
    monitor = CheckpointMonitor.get_actor(
        namespace=namespace,
        save_strategy="Single_Process",
        default_local_dir=str(tmp_path / "job"),
    )
    probe = ray.remote(num_cpus=0)(_SlotProbe)
    workers = [probe.remote(namespace, rank, str(tmp_path)) for rank in (0, 1)]
    try:
        ray.get([w.save.remote(1) for w in workers])
        ray.get([w.wait.remote() for w in workers])  # raises if one save had to wait
    finally:
        for handle in [*workers, monitor]:
            ray.kill(handle)


def test_strategy_names_and_values_are_accepted_case_insensitively() -> None:
    from commitpoint import SaveStrategy

    class Elsewhere(str):
        pass

    import enum

    class Numbered(enum.Enum):
        SINGLE_NODE = 3

    assert SaveStrategy.parse(shapes.SaveStrategy.SINGLE_THREAD) is SaveStrategy.SINGLE_THREAD
    assert SaveStrategy.parse("SINGLE_THREAD") is SaveStrategy.SINGLE_THREAD
    assert SaveStrategy.parse("single_process") is SaveStrategy.SINGLE_PROCESS
    assert SaveStrategy.parse(Elsewhere("Unrestricted")) is SaveStrategy.UNRESTRICTED
    assert SaveStrategy.parse(Numbered.SINGLE_NODE) is SaveStrategy.SINGLE_NODE
    for bad in ("bogus", 3, None, Numbered):
        with pytest.raises(InvalidArgument, match="save_strategy"):
            SaveStrategy.parse(bad)
