"""Staging: snapshots hold the values of stage time, buffers are reused, memory is bounded,
failures fail the save, and the coordinator commits staged saves end to end."""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import threading
from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar, NamedTuple

import pytest
import torch

from commitpoint import CheckpointCoordinator, InvalidArgument, SaveFailed, load_torch, save_torch
from commitpoint.errors import StagingFailed, StagingTimeout
from commitpoint.save.staging import StagedStateDict, Stager, StagingOptions, _plan_chunks
from commitpoint.testing import CheckpointRoot

KiB = 1024
SMALL_CHUNKS = StagingOptions(chunk_bytes=64 * KiB)  # so test-sized tensors are split too


class _Moments(NamedTuple):
    mean: torch.Tensor
    count: int


class _CopyHookTensor(torch.Tensor):
    """A tensor that runs ``on_copy`` before every ``copy_`` into or out of it."""

    @classmethod
    def on_copy(cls) -> None:
        raise NotImplementedError

    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if func is torch.Tensor.copy_:
            cls.on_copy()
        return super().__torch_function__(func, types, args, kwargs or {})


class _BrokenTensor(_CopyHookTensor):
    """A tensor whose copy fails, like one on a device that went away."""

    @classmethod
    def on_copy(cls) -> None:
        raise RuntimeError("device went away")


class _GatedTensor(_CopyHookTensor):
    """A tensor whose copy waits for ``gate``: lets a test hold a copy in progress."""

    gate: ClassVar[threading.Event] = threading.Event()

    @classmethod
    def on_copy(cls) -> None:
        assert cls.gate.wait(30), "test never opened the gate"


def _model_state(seed: int = 0) -> dict[str, Any]:
    """Weights of several sizes and dtypes, one large enough to be split into chunks."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(512, 256, generator=generator),  # 512 KiB: 8 chunks
        "layer.weight": torch.randn(64, 64, generator=generator),
        "layer.bias": torch.randn(64, generator=generator),
        "half": torch.randn(300, generator=generator).to(torch.float16),
        "counts": torch.arange(1000, dtype=torch.int64),
        "mask": torch.rand(77, generator=generator) > 0.5,
        "scale": torch.tensor(3.5),
    }


def _clone(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def _mutate(state: dict[str, Any]) -> None:
    """What optimizer.step() does: change every tensor in place."""
    with torch.no_grad():
        for tensor in state.values():
            if tensor.dtype == torch.bool:
                tensor.logical_not_()
            else:
                tensor.add_(1)


def _assert_equal(actual: dict[str, Any], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key], tensor), key


@pytest.fixture
def stager() -> Any:
    with Stager(SMALL_CHUNKS) as stager:
        yield stager


# -- snapshots -----------------------------------------------------------------------------------
def test_snapshot_keeps_stage_time_values_when_tensors_change_after_wait(stager: Stager) -> None:
    state = _model_state()
    for _ in range(20):
        reference = _clone(state)
        with stager.stage(state) as staged:
            staged.wait()
            _mutate(state)  # the next optimizer.step(), right after wait()
            _assert_equal(staged.state_dict(), reference)
            assert not any(
                staged.state_dict()[k].data_ptr() == state[k].data_ptr() for k in state
            ), "staged tensors must not share memory with the live ones"


def test_wait_blocks_until_the_copy_is_done(stager: Stager) -> None:
    _GatedTensor.gate.clear()
    gated = torch.arange(10.0).as_subclass(_GatedTensor)
    staged = stager.stage({"w": gated, "b": torch.ones(3)})
    assert not staged.done()
    with pytest.raises(StagingTimeout):
        staged.wait(timeout=0.05)
    _GatedTensor.gate.set()
    staged.wait(timeout=30)
    assert staged.done()
    assert torch.equal(staged.state_dict()["w"], torch.arange(10.0))
    staged.release()


def test_nested_structures_and_leaves_are_preserved(stager: Stager) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(3, 8)).sum().backward()
    optimizer.step()
    shared = torch.randn(5)
    moments = _Moments(torch.randn(4), 7)
    state: dict[str, Any] = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "nested": {"list": [shared, 1, "two", None, (2.5, shared)], "moments": moments},
        "again": shared,
        "tied": model[0].weight.detach(),  # another tensor object on the same memory
        "transposed": torch.randn(16, 12).t(),
        "plain": {"epoch": 3, "name": "run-1", "tags": {"a", "b"}},
    }
    reference_lr = state["optimizer"]["param_groups"][0]["lr"]
    reference_weight = model[0].weight.detach().clone()

    with stager.stage(state) as handle:
        state["optimizer"]["param_groups"][0]["lr"] = 99.0  # a scheduler step after stage()
        state["plain"]["tags"].add("c")
        staged = handle.state_dict()

    assert type(staged["model"]) is collections.OrderedDict
    assert staged["model"]._metadata == state["model"]._metadata  # load_state_dict uses it
    assert staged["optimizer"]["param_groups"][0]["lr"] == reference_lr
    assert staged["optimizer"]["param_groups"][0]["params"] == [0, 1, 2, 3]
    assert staged["plain"] == {"epoch": 3, "name": "run-1", "tags": {"a", "b"}}
    nested = staged["nested"]
    assert isinstance(nested["list"], list) and isinstance(nested["list"][4], tuple)
    assert nested["list"][1:4] == [1, "two", None]
    assert type(nested["moments"]) is _Moments and nested["moments"].count == 7
    assert torch.equal(nested["moments"].mean, moments.mean)
    # one tensor listed three times stays one staged tensor, as torch.save would store it
    assert nested["list"][0] is nested["list"][4][1] is staged["again"]
    assert torch.equal(staged["again"], shared)
    assert staged["tied"] is staged["model"]["0.weight"]
    assert torch.equal(staged["tied"], reference_weight)
    assert staged["transposed"].shape == (12, 16)
    assert torch.equal(staged["transposed"], state["transposed"])
    for key, value in state["optimizer"]["state"][0].items():
        assert torch.equal(staged["optimizer"]["state"][0][key], value)


def test_meta_and_sparse_tensors(stager: Stager) -> None:
    meta = torch.empty(4, 4, device="meta")
    sparse = torch.sparse_coo_tensor([[0, 2]], [1.0, 2.0], (4,), check_invariants=True)
    with stager.stage({"meta": meta, "sparse": sparse}) as handle:
        sparse.mul_(10)
        staged = handle.state_dict()
    assert staged["meta"] is meta
    assert torch.equal(staged["sparse"].to_dense(), torch.tensor([1.0, 0.0, 2.0, 0.0]))


def test_a_state_dict_must_be_a_mapping(stager: Stager) -> None:
    for bad in ([torch.ones(2)], torch.ones(2), None, "weights"):
        with pytest.raises(InvalidArgument, match="mapping"):
            stager.stage(bad)  # type: ignore[arg-type]
    assert stager.stats.in_flight == 0


def test_options_are_checked() -> None:
    for bad in ({"max_in_flight": 0}, {"workers": 0}, {"chunk_bytes": -1}, {"slot_timeout": 0}):
        with pytest.raises(InvalidArgument):
            StagingOptions(**bad)


def test_large_tensors_are_split_and_small_ones_grouped() -> None:
    large, small = torch.zeros(256 * KiB), [torch.zeros(KiB) for _ in range(40)]  # 1 MiB, 4 KiB
    pairs = [("large", torch.empty_like(large), large)]
    pairs += [(f"small.{i}", torch.empty_like(t), t) for i, t in enumerate(small)]
    chunks = _plan_chunks(pairs, 64 * KiB)
    assert len(chunks) == 16 + 3  # 1 MiB in 64 KiB pieces; 160 KiB of small ones in 3 groups
    assert sum(c.nbytes for c in chunks) == 4 * (256 * KiB + 40 * KiB)


# -- buffers and memory --------------------------------------------------------------------------
def test_second_checkpoint_of_the_same_shapes_allocates_nothing(stager: Stager) -> None:
    state = _model_state()
    with stager.stage(state) as first:
        pointers = sorted(t.data_ptr() for t in first.state_dict().values())
    allocated = stager.stats.allocations
    assert allocated == len(state)
    _mutate(state)
    with stager.stage(state) as second:
        _assert_equal(second.state_dict(), _clone(state))
        assert sorted(t.data_ptr() for t in second.state_dict().values()) == pointers
    stats = stager.stats
    assert (stats.allocations, stats.reuses, stats.in_flight) == (allocated, len(state), 0)


def test_max_in_flight_blocks_then_raises_after_the_timeout() -> None:
    with Stager(StagingOptions(max_in_flight=1)) as stager:
        first = stager.stage({"w": torch.ones(8)})
        with pytest.raises(StagingTimeout, match="unreleased"):
            stager.stage({"w": torch.ones(8)}, timeout=0.05)

        staged: list[StagedStateDict] = []
        waiter = threading.Thread(target=lambda: staged.append(stager.stage({"w": torch.ones(8)})))
        waiter.start()
        waiter.join(0.2)
        assert waiter.is_alive(), "stage() must wait while max_in_flight snapshots are unreleased"
        first.release()
        waiter.join(30)
        assert not waiter.is_alive() and len(staged) == 1
        staged[0].wait()
        staged[0].release()
        assert stager.stats.in_flight == 0


def test_memory_stays_within_max_in_flight_times_the_state_dict() -> None:
    size = 64 * KiB
    with Stager(StagingOptions(max_in_flight=1)) as stager:
        for shape in ((16, 1024), (1024, 16), (16384,), (128, 128)):  # same bytes, new shapes
            with stager.stage({"w": torch.zeros(shape)}) as staged:
                staged.wait()
            assert stager.stats.held_bytes <= 1 * size
        assert stager.stats.evictions == 3
        assert stager.trim() == size
        assert stager.stats.held_bytes == 0


def test_release_is_idempotent(stager: Stager) -> None:
    with Stager(StagingOptions(max_in_flight=1)) as single:
        staged = single.stage({"w": torch.ones(4)})
        staged.release()
        staged.release()
        with pytest.raises(InvalidArgument, match="released"):
            staged.state_dict()
        again = single.stage({"w": torch.ones(4)})
        with pytest.raises(StagingTimeout):  # a double release must not free two slots
            single.stage({"w": torch.ones(4)}, timeout=0.05)
        with again:
            again.wait()
        with again:  # a second with-block releases nothing more
            pass
        assert single.stats.in_flight == 0


def test_a_handle_dropped_without_release_gives_its_slot_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with Stager(StagingOptions(max_in_flight=1)) as stager:
        stager.stage({"w": torch.ones(4)}).wait()  # handle dropped at once
        gc.collect()
        with caplog.at_level(logging.WARNING), stager.stage({"w": torch.ones(4)}, timeout=30) as s:
            s.wait()
        assert "without release()" in caplog.text
        assert stager.stats.in_flight == 0


# -- failures ------------------------------------------------------------------------------------
def test_a_failed_copy_is_raised_by_wait_and_frees_the_buffers(stager: Stager) -> None:
    broken = torch.ones(16).as_subclass(_BrokenTensor)
    staged = stager.stage({"good": torch.ones(4), "layers": {"0": {"weight": broken}}})
    with pytest.raises(StagingFailed, match="device went away") as info:
        staged.wait()
    assert info.value.tensor == "layers.0.weight"
    with pytest.raises(StagingFailed):
        staged.state_dict()
    staged.release()
    assert stager.stats.in_flight == 0


# -- with the coordinator ------------------------------------------------------------------------
@pytest.fixture(params=["local", "memory"])
def root(request: pytest.FixtureRequest) -> CheckpointRoot:
    found: CheckpointRoot = request.getfixturevalue(f"{request.param}_checkpoint_root")
    return found


def test_saved_files_hold_stage_time_values_over_many_steps(root: CheckpointRoot) -> None:
    coordinator = CheckpointCoordinator(root.monitor(), staging=SMALL_CHUNKS)
    storage = coordinator.storage
    state = _model_state()
    references: dict[int, dict[str, torch.Tensor]] = {}
    for step in range(1, 13):
        references[step] = _clone(state)
        staged = coordinator.stage(state)
        save = partial(save_torch, storage, f"{coordinator.step_dir(step)}/model.pt")
        coordinator.save_staged_async("model", staged, save, step, is_state_dict=True)
        asyncio.run(coordinator.register_and_monitor(step, True, state_dict_thread_count=1))
        staged.wait()
        _mutate(state)  # the optimizer step, while the save may still be writing
    coordinator.wait_all()

    assert root.committed_steps()["state_dict"] == 12
    for step, reference in references.items():
        _assert_equal(load_torch(storage, f"global_step_{step}/model.pt"), reference)
    assert root.verify(12).ok
    stats = coordinator.stager.stats
    assert stats.in_flight == 0
    assert stats.allocations <= 2 * len(state)  # at most max_in_flight sets, then reuse


def test_a_failed_copy_fails_the_save_and_the_next_step_still_commits(
    root: CheckpointRoot, caplog: pytest.LogCaptureFixture
) -> None:
    coordinator = CheckpointCoordinator(root.monitor())
    storage = coordinator.storage
    broken = {"w": torch.ones(16).as_subclass(_BrokenTensor)}
    staged = coordinator.stage(broken)
    save = partial(save_torch, storage, "global_step_1/model.pt")
    coordinator.save_staged_async("model", staged, save, 1, is_state_dict=True)
    coordinator.register_and_monitor_sync(1, True, state_dict_thread_count=1)
    with pytest.raises(StagingFailed):
        staged.wait()

    good = coordinator.stage({"w": torch.full((16,), 2.0)})
    save = partial(save_torch, storage, "global_step_2/model.pt")
    coordinator.save_staged_async("model", good, save, 2, is_state_dict=True)
    coordinator.register_and_monitor_sync(2, True, state_dict_thread_count=1)
    with pytest.raises(SaveFailed) as info:
        coordinator.wait_all()

    failure = info.value
    assert (failure.step, failure.name, len(failure.failures)) == (1, "model", 1)
    assert isinstance(failure.cause, StagingFailed)
    assert "device went away" in str(failure)
    assert any("device went away" in r.getMessage() for r in caplog.records)
    assert not storage.exists("global_step_1/model.pt")
    assert root.committed_steps()["state_dict"] == 2
    assert torch.equal(load_torch(storage, "global_step_2/model.pt")["w"], torch.full((16,), 2.0))
    assert coordinator.stager.stats.in_flight == 0


def test_a_failing_save_still_releases_the_buffers(root: CheckpointRoot) -> None:
    coordinator = CheckpointCoordinator(root.monitor())

    def save(state: dict[str, Any]) -> None:
        raise OSError("disk full")

    staged = coordinator.stage({"w": torch.ones(4)})
    coordinator.save_staged_async("model", staged, save, 1, is_state_dict=True)
    coordinator.register_and_monitor_sync(1, True, state_dict_thread_count=1)
    with pytest.raises(SaveFailed, match="disk full"):
        coordinator.wait_all()
    assert coordinator.stager.stats.in_flight == 0
    assert root.committed_steps()["state_dict"] is None


def test_a_staged_state_dict_belongs_to_one_save(root: CheckpointRoot) -> None:
    coordinator = CheckpointCoordinator(root.monitor())
    release = threading.Event()
    seen: list[torch.Tensor] = []

    def save(state: dict[str, Any]) -> None:
        assert release.wait(30)
        seen.append(state["w"].clone())

    staged = coordinator.stage({"w": torch.ones(4)})
    coordinator.save_staged_async("model", staged, save, 1, is_state_dict=True)
    staged.release()  # the save owns it now: this must not free the buffers under it
    assert coordinator.stager.stats.in_flight == 1
    with pytest.raises(InvalidArgument, match="handed to a save"):
        coordinator.save_staged_async("other", staged, save, 1, is_state_dict=True)
    release.set()
    coordinator.register_and_monitor_sync(1, True, state_dict_thread_count=1)
    coordinator.wait_all()
    assert torch.equal(seen[0], torch.ones(4))
    assert coordinator.stager.stats.in_flight == 0
    with pytest.raises(InvalidArgument, match="released"):
        coordinator.save_staged_async("model", staged, save, 2, is_state_dict=True)
    with pytest.raises(InvalidArgument, match="stage"):
        coordinator.save_staged_async("model", {"w": 1}, save, 2)  # type: ignore[arg-type]


def test_save_async_and_torch_helpers_still_work_beside_staging(root: CheckpointRoot) -> None:
    coordinator = CheckpointCoordinator(root.monitor())
    storage = coordinator.storage
    state = _model_state()
    staged = coordinator.stage(state)
    coordinator.save_staged_async(
        "model", staged, partial(save_torch, storage, "global_step_3/model.pt"), 3, True
    )
    coordinator.save_async(
        "extra", partial(save_torch, storage, "global_step_3/extra.pt", {"epoch": 1}), 3
    )
    coordinator.register_and_monitor_sync(
        3, False, state_dict_thread_count=1, checkpoint_thread_count=1
    )
    coordinator.wait_all()
    assert root.committed_steps() == {"state_dict": 3, "checkpoint": 3}
    _assert_equal(load_torch(storage, "global_step_3/model.pt"), _clone(state))
    assert load_torch(storage, "global_step_3/extra.pt") == {"epoch": 1}
