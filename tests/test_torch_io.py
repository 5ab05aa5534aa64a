"""torch round trip through the backends, and the reader's verified load."""

from __future__ import annotations

import pytest
import torch

from commitpoint import (
    CheckpointCoordinator,
    CheckpointReader,
    CorruptCheckpoint,
    load_torch,
    save_torch,
)
from commitpoint.testing import CheckpointRoot


@pytest.fixture(params=["memory", "local"])
def root(request: pytest.FixtureRequest) -> CheckpointRoot:
    root: CheckpointRoot = request.getfixturevalue(f"{request.param}_checkpoint_root")
    return root


def test_round_trip_preserves_tensors(root: CheckpointRoot) -> None:
    storage = root.open()
    state = {
        "weight": torch.randn(64, 32),
        "bias": torch.arange(10, dtype=torch.int64),
        "half": torch.randn(5, dtype=torch.bfloat16),
        "nested": {"step": 3, "lr": [0.1, 0.01]},
    }
    save_torch(storage, "global_step_1/model.pt", state)
    loaded = load_torch(storage, "global_step_1/model.pt")
    assert loaded.keys() == state.keys()
    for key in ("weight", "bias", "half"):
        assert torch.equal(loaded[key], state[key])
    assert loaded["nested"] == {"step": 3, "lr": [0.1, 0.01]}


def test_reader_loads_committed_step_and_catches_corruption(root: CheckpointRoot) -> None:
    coordinator = CheckpointCoordinator(root.monitor())
    weights = {"w": torch.randn(100)}
    coordinator.save_async(
        "model", lambda: save_torch(coordinator.storage, "global_step_4/model.pt", weights), 4, True
    )
    coordinator.register_and_monitor_sync(4, True, state_dict_thread_count=1)
    coordinator.wait_all()

    reader = CheckpointReader(root.url, **root.storage_options)
    assert reader.latest_state_dict_step() == 4
    assert reader.latest_checkpoint_step() is None
    assert reader.step_url(4).endswith("global_step_4")
    assert torch.equal(reader.load(4, "model.pt")["w"], weights["w"])

    storage = root.open()
    data = bytearray(storage.read_bytes("global_step_4/model.pt"))
    data[len(data) // 2] ^= 0xFF
    storage.fs.pipe_file(storage.full_path("global_step_4/model.pt"), bytes(data))
    with pytest.raises(CorruptCheckpoint, match=r"model\.pt"):
        reader.load(4, "model.pt")
    report = reader.verify(4)
    assert not report.ok and "manifest" in str(report.problems[0])


def test_load_refuses_arbitrary_pickles_by_default(root: CheckpointRoot) -> None:
    import pickle

    class Sneaky:
        def __reduce__(self) -> tuple[object, ...]:
            return (print, ("code ran",))

    storage = root.open()
    with storage.open_write("global_step_1/evil.pt") as f:
        torch.save({"x": Sneaky()}, f)
    with pytest.raises(pickle.UnpicklingError):
        load_torch(storage, "global_step_1/evil.pt")
