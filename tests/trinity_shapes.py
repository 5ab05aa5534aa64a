"""Trinity-RFT's checkpoint call sites, retold for the drop-in test.

Written from reading upstream (Trinity-RFT: ``trinity/trainer/verl/trainer.py`` VERLTrainer and its
CheckpointMonitor, ``trinity/trainer/verl/workers.py``, ``trinity/trainer/verl/fsdp_engine.py``,
``trinity/trainer/trainer.py``, ``trinity/manager/synchronizer.py``,
``trinity/common/models/utils.py``; verl: ``verl/utils/checkpoint/checkpoint_manager.py``,
``fsdp_checkpoint_manager.py``, ``verl/trainer/ppo/ray_trainer.py``), not copied. Only what
touches checkpoints is kept, in upstream's order, with its paths, file names, flags and keyword
arguments; models are small tensors and GPUs are gloo process groups. The one line a Trinity user
changes is the import below: everything else calls commitpoint exactly as upstream calls its own
``CheckpointMonitor`` / ``CheckpointCoordinator``.

Call sequence (upstream, per step N of ``Trainer.train``):
- weight sync (``sync_method=checkpoint``): ``VERLTrainer.save_state_dict`` ->
  every actor rank ``save_state_dict(<root>/global_step_N/actor, N)``: rank 0 hands its write to
  ``save_async("model_state_dict", ..., N, is_state_dict=True)``, the other ranks ``torch.save``
  their shard themselves -> trainer ``register_and_monitor(N, is_state_dict=True,
  state_dict_thread_count=1)``;
- checkpoint: ``VERLTrainer.save_checkpoint`` -> ``.full_checkpoint`` marker (plain ``open``) ->
  every actor rank ``save_checkpoint``: rank 0 ``save_sync(engine save, N, is_state_dict=True)``,
  the others run the engine save themselves (it holds barriers) -> the critic group saves with no
  coordinator at all -> trainer ``register_and_monitor(N, state_dict_thread_count=1)`` ->
  ``block_until_saved``: every rank ``wait_all()``;
- after the last step, always ``save_checkpoint(block_until_saved=True)`` again;
- resume: the checkpoint pointer (verl's ``find_latest_ckpt_path``) names the step to load.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import glob
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from commitpoint import CheckpointCoordinator, CheckpointMonitor  # the drop-in import

SHARD = 64
"""Elements of each rank's weight shard."""


# -- trinity.common.constants: a case-insensitive enum that is not a str --
class _CaseInsensitiveMeta(enum.EnumMeta):
    def __call__(cls, value: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if isinstance(value, str):
            value = value.lower()
        return super().__call__(value, *args, **kwargs)

    def __getitem__(cls, name: str) -> Any:
        return super().__getitem__(name.upper())


class SaveStrategy(enum.Enum, metaclass=_CaseInsensitiveMeta):
    """Trinity's own strategy enum (``trainer.save_strategy`` in its config)."""

    SINGLE_THREAD = "single_thread"
    SINGLE_PROCESS = "single_process"
    SINGLE_NODE = "single_node"
    UNRESTRICTED = "unrestricted"


# -- the model: one shard per rank, trained deterministically --
def initial_shard(rank: int) -> torch.Tensor:
    return torch.arange(SHARD, dtype=torch.float32) + 1000.0 * rank


def train_update(weights: torch.Tensor, step: int, data_seed: int) -> torch.Tensor:
    """One optimizer step: the result depends on the whole history and on the run's data."""
    return weights * 0.5 + float(step * 10 + data_seed)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Records(logging.Handler):
    """Collects commitpoint's log lines inside a worker process."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")


# -- verl's FSDPCheckpointManager.save_checkpoint, per rank --
def engine_save_checkpoint(
    local_path: str,
    rank: int,
    world_size: int,
    model: torch.Tensor,
    optim: torch.Tensor,
    extra: dict[str, Any],
    save_as_hf: bool,
) -> None:
    """Every rank writes its model / optim / extra shard; rank 0 the HF config and fsdp config;
    barriers in between, as the engine does (so every rank must run it)."""
    import torch.distributed as dist

    os.makedirs(local_path, exist_ok=True)
    _barrier(world_size)
    torch.save({"w": model.clone()}, f"{local_path}/model_world_size_{world_size}_rank_{rank}.pt")
    torch.save({"m": optim.clone()}, f"{local_path}/optim_world_size_{world_size}_rank_{rank}.pt")
    torch.save(extra, f"{local_path}/extra_state_world_size_{world_size}_rank_{rank}.pt")
    if rank == 0:
        os.makedirs(f"{local_path}/huggingface", exist_ok=True)
        with open(f"{local_path}/huggingface/config.json", "w") as f:
            json.dump({"architectures": ["TinyForCausalLM"], "hidden": SHARD}, f)
        with open(f"{local_path}/fsdp_config.json", "w") as f:
            json.dump({"FSDP_version": 2, "world_size": world_size}, f)
    _barrier(world_size)
    if save_as_hf:
        shards = [torch.empty(SHARD) for _ in range(world_size)]
        if world_size > 1:
            dist.all_gather(shards, model)
        else:
            shards = [model.clone()]
        if rank == 0:
            torch.save({"w": torch.cat(shards)}, f"{local_path}/huggingface/model.bin")
        _barrier(world_size)


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


# -- TrinityActorRolloutRefWorker (one rank) --
class ActorRank:
    """One rank of the actor worker group; methods are called on every rank at once."""

    def __init__(self, rank: int, world_size: int, port: int, state_dict_style: str) -> None:
        self.rank = rank
        self.world_size = world_size
        self.port = port
        self.style = state_dict_style
        self.model = initial_shard(rank)
        self.optim = torch.zeros(SHARD)
        self.extra: dict[str, Any] = {"lr_scheduler": {"step": 0}, "rng": 1234 + rank}
        self._ray_namespace: str | None = None
        self._coordinator: CheckpointCoordinator | None = None
        self.fail_engine_save_at: int | None = None
        self.records = _Records()
        logging.getLogger("commitpoint").addHandler(self.records)
        logging.getLogger("commitpoint").setLevel(logging.INFO)

    def init_process_group(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.init_process_group(
                "gloo",
                init_method=f"tcp://127.0.0.1:{self.port}",
                rank=self.rank,
                world_size=self.world_size,
            )

    def set_trinity_config(self, ray_namespace: str) -> None:
        self._ray_namespace = ray_namespace

    def _get_coordinator(self) -> CheckpointCoordinator:
        # workers.py: the running monitor, looked up by namespace alone
        if self._coordinator is None:
            monitor = CheckpointMonitor.get_actor(namespace=self._ray_namespace)
            self._coordinator = CheckpointCoordinator(monitor)
        return self._coordinator

    def train(self, step: int, data_seed: int) -> None:
        self.model = train_update(self.model, step, data_seed)
        self.optim = self.optim + 1.0
        self.extra = {"lr_scheduler": {"step": step}, "rng": self.extra["rng"]}
        _barrier(self.world_size)

    def weights(self) -> torch.Tensor:
        return self.model.clone()

    def save_state_dict(self, local_path: str, global_step: int) -> None:
        coordinator = self._get_coordinator()
        if self.style == "sharded":
            self._save_sharded_state_dict(coordinator, local_path, global_step)
        else:
            self._save_streamed_state_dict(coordinator, local_path, global_step)

    def _save_sharded_state_dict(
        self, coordinator: CheckpointCoordinator, local_path: str, global_step: int
    ) -> None:
        """fsdp_engine.fsdp_save_state_dict: rank 0 saves in the background, the others inline."""
        os.makedirs(local_path, exist_ok=True)
        state_dict = {"w": self.model.clone()}
        if self.rank == 0:
            os.makedirs(f"{local_path}/huggingface", exist_ok=True)
            with open(f"{local_path}/huggingface/config.json", "w") as f:
                json.dump({"architectures": ["TinyForCausalLM"], "hidden": SHARD}, f)
        path = f"{local_path}/model_world_size_{self.world_size}_rank_{self.rank}.pt"
        if self.rank == 0:
            coordinator.save_async(
                "model_state_dict",
                lambda: torch.save(state_dict, path),
                global_step,
                is_state_dict=True,
            )
        else:
            torch.save(state_dict, path)

    def _save_streamed_state_dict(
        self, coordinator: CheckpointCoordinator, local_path: str, global_step: int
    ) -> None:
        """workers.py save_state_dict: the full tensor goes to rank 0, which streams it to a
        temporary file on the main thread; fsync + rename run in the background."""
        import torch.distributed as dist

        shards = [torch.empty(SHARD) for _ in range(self.world_size)]
        if self.world_size > 1:
            dist.all_gather(shards, self.model)
        else:
            shards = [self.model.clone()]
        if self.rank != 0:
            return
        os.makedirs(local_path, exist_ok=True)
        filepath = f"{local_path}/model.safetensors"
        tmp_path = f"{filepath}.tmp"
        torch.save({"w": torch.cat(shards)}, tmp_path)

        def finalize() -> None:
            fd = os.open(tmp_path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp_path, filepath)

        coordinator.save_async("model_state_dict", finalize, global_step, is_state_dict=True)

    def save_checkpoint(self, local_path: str, global_step: int, save_as_hf: bool = False) -> None:
        coordinator = self._get_coordinator()

        def save() -> None:
            if self.fail_engine_save_at == global_step:
                raise OSError(28, "No space left on device", local_path)
            engine_save_checkpoint(
                local_path,
                self.rank,
                self.world_size,
                self.model,
                self.optim,
                self.extra,
                save_as_hf,
            )

        if self.rank == 0:
            coordinator.save_sync(save, global_step, is_state_dict=True)
        else:
            save()

    def wait_on_save_thread(self) -> None:
        if self._coordinator is not None:
            self._coordinator.wait_all()

    def load_checkpoint(self, local_path: str) -> None:
        ws, r = self.world_size, self.rank
        self.model = torch.load(f"{local_path}/model_world_size_{ws}_rank_{r}.pt")["w"]
        self.optim = torch.load(f"{local_path}/optim_world_size_{ws}_rank_{r}.pt")["m"]
        self.extra = torch.load(f"{local_path}/extra_state_world_size_{ws}_rank_{r}.pt")
        _barrier(self.world_size)

    def set_fail_engine_save_at(self, step: int | None) -> None:
        self.fail_engine_save_at = step

    def log_lines(self) -> list[str]:
        return list(self.records.lines)


# -- verl's TrainingWorker as Trinity's critic: saves with no coordinator at all --
class CriticRank:
    def __init__(self) -> None:
        self.model = torch.full((SHARD,), -1.0)

    def train(self, step: int, data_seed: int) -> None:
        self.model = train_update(self.model, step, data_seed)

    def save_checkpoint(self, local_path: str, global_step: int) -> None:
        engine_save_checkpoint(
            local_path, 0, 1, self.model, torch.zeros(SHARD), {"rng": 7}, save_as_hf=False
        )

    def load_checkpoint(self, local_path: str) -> None:
        self.model = torch.load(f"{local_path}/model_world_size_1_rank_0.pt")["w"]

    def weights(self) -> torch.Tensor:
        return self.model.clone()


class WorkerGroup:
    """verl's RayWorkerGroup with ONE_TO_ALL dispatch: call every rank, wait for all."""

    def __init__(self, handles: list[Any]) -> None:
        self.handles = handles

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        import ray

        return list(ray.get([getattr(h, method).remote(*args, **kwargs) for h in self.handles]))

    def kill(self) -> None:
        import ray

        for handle in self.handles:
            ray.kill(handle, no_restart=True)
        for handle in self.handles:
            _wait_dead(handle)


def _wait_dead(handle: Any) -> None:
    """ray.kill returns at once; wait until the actor really is gone (a call fails)."""
    import ray

    with contextlib.suppress(ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        ray.get(handle.__ray_ready__.remote(), timeout=30)


# -- configuration --
@dataclass
class RunConfig:
    checkpoint_job_dir: str
    ray_namespace: str
    save_strategy: Any = SaveStrategy.UNRESTRICTED
    default_hdfs_dir: str | None = None
    world_size: int = 2
    use_critic: bool = True
    state_dict_style: str = "sharded"
    total_steps: int = 6
    sync_interval: int = 1
    save_interval: int = 2
    save_hf_checkpoint: str = "last"
    continue_from_checkpoint: bool = True
    data_seed: int = 0
    wait_for_weights_before_save: bool = False
    """Let the step's state-dict commit land before the checkpoint save (the delayed ordering)."""
    crash_after_step: int | None = None
    crash_waits_for_saves: bool = True
    """False: the job dies with the last step's background save possibly still writing."""
    before_step: Callable[[int], None] | None = None
    before_final_save: Callable[[], None] | None = None


# -- VERLTrainer --
class VERLTrainerShape:
    def __init__(self, config: RunConfig) -> None:
        import ray

        self.config = config
        # VERLTrainer.__init__: creates (or finds) the job's monitor with upstream's keywords
        checkpoint_monitor = CheckpointMonitor.get_actor(
            namespace=config.ray_namespace,
            save_strategy=config.save_strategy,
            default_local_dir=config.checkpoint_job_dir,
            default_hdfs_dir=config.default_hdfs_dir,
        )
        self.checkpoint_coordinator = CheckpointCoordinator(checkpoint_monitor)
        port = free_port()
        actor_cls = ray.remote(num_cpus=0)(ActorRank)
        self.actor_rollout_wg = WorkerGroup(
            [
                actor_cls.remote(rank, config.world_size, port, config.state_dict_style)
                for rank in range(config.world_size)
            ]
        )
        self.actor_rollout_wg.call("init_process_group")
        self.critic_wg = (
            WorkerGroup([ray.remote(num_cpus=0)(CriticRank).remote()])
            if config.use_critic
            else None
        )
        self.global_steps = 0
        self.weights_at: dict[int, list[torch.Tensor]] = {}

    async def prepare(self) -> None:
        self.actor_rollout_wg.call("set_trinity_config", self.config.ray_namespace)
        self.global_steps = 0
        self._load_checkpoint()

    def _load_checkpoint(self) -> None:
        if not self.config.continue_from_checkpoint:
            return
        global_step_folder = find_latest_ckpt_path(self.config.checkpoint_job_dir)
        if global_step_folder is None:
            return
        self.global_steps = int(global_step_folder.split("global_step_")[-1])
        self.actor_rollout_wg.call("load_checkpoint", os.path.join(global_step_folder, "actor"))
        if self.critic_wg is not None:
            self.critic_wg.call("load_checkpoint", os.path.join(global_step_folder, "critic"))

    async def train_step(self) -> None:
        self.global_steps += 1
        self.actor_rollout_wg.call("train", self.global_steps, self.config.data_seed)
        if self.critic_wg is not None:
            self.critic_wg.call("train", self.global_steps, self.config.data_seed)
        self.weights_at[self.global_steps] = self.actor_rollout_wg.call("weights")

    async def save_state_dict(self) -> None:
        actor_local_path = os.path.join(
            self.config.checkpoint_job_dir, f"global_step_{self.global_steps}", "actor"
        )
        self.actor_rollout_wg.call(
            "save_state_dict", actor_local_path, global_step=self.global_steps
        )
        await self.checkpoint_coordinator.register_and_monitor(
            self.global_steps, is_state_dict=True, state_dict_thread_count=1
        )

    async def save_checkpoint(
        self, block_until_saved: bool = False, save_as_hf: bool = False
    ) -> None:
        folder = os.path.join(self.config.checkpoint_job_dir, f"global_step_{self.global_steps}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, ".full_checkpoint"), "w") as f:
            f.write("")
        self.actor_rollout_wg.call(
            "save_checkpoint",
            local_path=os.path.join(folder, "actor"),
            global_step=self.global_steps,
            save_as_hf=save_as_hf,
        )
        if self.critic_wg is not None:
            self.critic_wg.call(
                "save_checkpoint",
                local_path=os.path.join(folder, "critic"),
                global_step=self.global_steps,
            )
        await self.checkpoint_coordinator.register_and_monitor(
            self.global_steps, state_dict_thread_count=1
        )
        if block_until_saved:
            self.actor_rollout_wg.call("wait_on_save_thread")

    def kill(self) -> None:
        """The job dies: every worker goes, and the job's monitor with it."""
        import ray

        self.actor_rollout_wg.kill()
        if self.critic_wg is not None:
            self.critic_wg.kill()
        with contextlib.suppress(ValueError):
            monitor = ray.get_actor("checkpoint_monitor", namespace=self.config.ray_namespace)
            ray.kill(monitor)
            _wait_dead(monitor)


# -- trinity/trainer/trainer.py: Trainer.train --
@dataclass
class RunResult:
    trainer: VERLTrainerShape
    errors: list[BaseException] = field(default_factory=list)
    crashed: bool = False


async def _train(trainer: VERLTrainerShape, result: RunResult) -> None:
    config = trainer.config
    await trainer.prepare()
    last_sync_step = trainer.global_steps
    while trainer.global_steps < config.total_steps:
        try:
            if config.before_step is not None:
                config.before_step(trainer.global_steps + 1)
            await trainer.train_step()
            step = trainer.global_steps
            if last_sync_step != step and step % config.sync_interval == 0:
                await trainer.save_state_dict()
                last_sync_step = step
            if config.save_interval > 0 and step % config.save_interval == 0:
                if config.wait_for_weights_before_save:
                    wait_for_pointer(config.checkpoint_job_dir, STATE_DICT_TRACKER, step)
                await trainer.save_checkpoint(save_as_hf=config.save_hf_checkpoint == "always")
            if config.crash_after_step == step:
                if config.crash_waits_for_saves:
                    trainer.actor_rollout_wg.call("wait_on_save_thread")
                result.crashed = True
                return
        except Exception as exc:  # upstream logs and stops training, then saves once more
            result.errors.append(exc)
            break
    if config.before_final_save is not None:
        config.before_final_save()
    try:
        await trainer.save_checkpoint(
            block_until_saved=True, save_as_hf=config.save_hf_checkpoint != "never"
        )
    except Exception as exc:
        result.errors.append(exc)


def run_training(config: RunConfig) -> RunResult:
    trainer = VERLTrainerShape(config)
    result = RunResult(trainer)
    run_prepared(trainer, result)
    return result


def run_prepared(trainer: VERLTrainerShape, result: RunResult) -> None:
    """Run ``Trainer.train`` on a trainer built already (so a test can look before step 1)."""
    asyncio.run(_train(trainer, result))


# -- readers --
CHECKPOINT_TRACKER = "latest_checkpointed_iteration.txt"
STATE_DICT_TRACKER = "latest_state_dict_iteration.txt"


def find_latest_ckpt_path(path: str) -> str | None:
    """verl's lookup: the tracker's bytes parsed as an int, and the step folder must exist."""
    tracker = os.path.join(path, CHECKPOINT_TRACKER)
    if not os.path.exists(tracker):
        return None
    with open(tracker, "rb") as f:
        iteration = int(f.read().decode())
    folder = os.path.join(path, f"global_step_{iteration}")
    return folder if os.path.exists(folder) else None


def get_latest_state_dict(root: str) -> tuple[str | None, int]:
    """Trinity's lookup of the newest weights: (``<root>/global_step_<N>/actor``, N)."""
    tracker = os.path.join(root, STATE_DICT_TRACKER)
    if not os.path.exists(tracker):
        return None, 0
    with open(tracker, encoding="utf-8") as f:
        iteration = f.read().strip()
    return os.path.join(root, f"global_step_{iteration}", "actor"), int(iteration)


def load_like_ray_ppo_trainer(root: str, world_size: int) -> tuple[int, list[torch.Tensor], Any]:
    """RayPPOTrainer._load_checkpoint: step from the folder name, actor shards, critic model."""
    folder = find_latest_ckpt_path(root)
    assert folder is not None, f"no checkpoint under {root}"
    step = int(folder.split("global_step_")[-1])
    actor = [
        torch.load(f"{folder}/actor/model_world_size_{world_size}_rank_{r}.pt")["w"]
        for r in range(world_size)
    ]
    critic_path = f"{folder}/critic/model_world_size_1_rank_0.pt"
    critic = torch.load(critic_path)["w"] if os.path.exists(critic_path) else None
    return step, actor, critic


def load_actor_weights(actor_dir: str, world_size: int) -> list[torch.Tensor]:
    """What the explorer loads from a state-dict folder (sharded or streamed layout)."""
    streamed = os.path.join(actor_dir, "model.safetensors")
    shards = sorted(glob.glob(os.path.join(actor_dir, f"model_world_size_{world_size}_rank_*.pt")))
    if len(shards) == world_size:
        return [torch.load(p)["w"] for p in shards]
    with open(streamed, "rb") as f:  # torch stand-in bytes under upstream's file name
        full = torch.load(f)["w"]
    return list(full.split(SHARD))


def wait_for_pointer(root: str, tracker: str, step: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    path = os.path.join(root, tracker)
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError), open(path) as f:
            if int(f.read().strip()) >= step:
                return
        time.sleep(0.01)
    raise TimeoutError(f"{tracker} did not reach step {step} within {timeout} s")


class SynchronizerPoll:
    """The Synchronizer's poll for ``sync_method=checkpoint``: read the state-dict tracker, load
    every newer step's actor folder, then delete the previous step's folder unless it holds a
    full checkpoint. Every load is checked against the weights the trainer had at that step."""

    def __init__(
        self,
        root: str,
        world_size: int,
        expected: Callable[[int], list[torch.Tensor] | None],
        interval: float = 0.005,
        remove_previous: bool = True,
    ) -> None:
        self.root = root
        self.world_size = world_size
        self.expected = expected
        self.interval = interval
        self.remove_previous = remove_previous
        self.model_version = 0
        self.loaded: list[int] = []
        self.problems: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="synchronizer-poll", daemon=True)

    def __enter__(self) -> SynchronizerPoll:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        tracker = os.path.join(self.root, STATE_DICT_TRACKER)
        while not self._stop.is_set():
            if os.path.exists(tracker):
                try:
                    with open(tracker) as f:
                        latest = int(f.read().strip())
                except (OSError, ValueError) as exc:
                    self.problems.append(f"tracker unreadable: {exc}")
                    latest = self.model_version
                if latest > self.model_version:
                    self._load(latest)
            time.sleep(self.interval)

    def _load(self, step: int) -> None:
        previous = self.model_version
        actor_dir = os.path.join(self.root, f"global_step_{step}", "actor")
        try:
            weights = load_actor_weights(actor_dir, self.world_size)
        except Exception as exc:
            self.problems.append(f"step {step}: load failed: {type(exc).__name__}: {exc}")
            return
        expected = self.expected(step)
        if (
            expected is None
            or len(expected) != len(weights)
            or not all(torch.equal(a, b) for a, b in zip(weights, expected, strict=True))
        ):
            self.problems.append(f"step {step}: loaded weights are not the trainer's")
        self.model_version = step
        self.loaded.append(step)
        if self.remove_previous:
            old = os.path.join(self.root, f"global_step_{previous}")
            if os.path.exists(old) and not os.path.exists(os.path.join(old, ".full_checkpoint")):
                shutil.rmtree(old, ignore_errors=True)


# -- upstream's own monitor, as a foreign actor handle --
class UpstreamMonitorShape:
    """The methods upstream's CheckpointMonitor actor has (and nothing of commitpoint's)."""

    def __init__(self, save_strategy: str, default_local_dir: str) -> None:
        self.default_local_dir = default_local_dir

    async def register_thread_count(self, step: int, **counts: int) -> None: ...

    async def monitor_step(self, step: int, is_state_dict: bool = False) -> None: ...

    async def notify_started(self, node_id: str, job_id: str) -> None: ...

    async def notify_finished(self, step: int, is_state_dict: bool = False) -> None: ...


def step_folders(root: str) -> Iterator[int]:
    for name in sorted(os.listdir(root)):
        if name.startswith("global_step_") and name[len("global_step_") :].isdigit():
            yield int(name[len("global_step_") :])
