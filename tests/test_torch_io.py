"""torch round trip through the backends, and the reader's verified load."""

from __future__ import annotations

import io
import pickle
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from commitpoint import (
    CheckpointCoordinator,
    CheckpointReader,
    CorruptCheckpoint,
    load_torch,
    save_torch,
)
from commitpoint.core.checksum import checksum_stream
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


def _committed_reader(root: CheckpointRoot, step: int, state: object) -> CheckpointReader:
    coordinator = CheckpointCoordinator(root.monitor())
    path = f"global_step_{step}/model.pt"
    save = lambda: save_torch(coordinator.storage, path, state)  # noqa: E731
    coordinator.save_async("model", save, step, True)
    coordinator.register_and_monitor_sync(step, True, state_dict_thread_count=1)
    coordinator.wait_all()
    return CheckpointReader(root.url, **root.storage_options)


def test_a_file_too_broken_to_load_is_reported_as_corrupt(root: CheckpointRoot) -> None:
    """The checksum pass runs beside the load; when the load itself fails on the damaged bytes,
    the caller still gets CorruptCheckpoint, not torch's own error."""
    reader = _committed_reader(root, 2, {"w": torch.randn(1000)})
    storage = root.open()
    data = storage.read_bytes("global_step_2/model.pt")
    storage.fs.pipe_file(storage.full_path("global_step_2/model.pt"), b"\0" * len(data))
    with pytest.raises(CorruptCheckpoint, match=r"model\.pt"):
        reader.load(2, "model.pt")


def test_unrestricted_loads_never_unpickle_unverified_bytes(
    root: CheckpointRoot, tmp_path: Path
) -> None:
    """With weights_only=False the pickle could run code, so the file is verified before any of
    it is unpickled: a swapped-in file that would leave a marker is refused untouched."""
    reader = _committed_reader(root, 3, {"w": torch.randn(10)})
    marker = tmp_path / "code-ran"
    storage = root.open()
    swapped = io.BytesIO()
    torch.save({"x": _LeavesMarker(str(marker))}, swapped)
    storage.fs.pipe_file(storage.full_path("global_step_3/model.pt"), swapped.getvalue())
    with pytest.raises(CorruptCheckpoint):
        reader.load(3, "model.pt", weights_only=False)
    assert not marker.exists()
    with pytest.raises(CorruptCheckpoint):  # and the default (restricted) load refuses it too
        reader.load(3, "model.pt")
    assert not marker.exists()


class _LeavesMarker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, ...]:
        return (Path.touch, (Path(self.path),))


def _zip_crc_ok(path: Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        return archive.testzip() is None


@pytest.mark.parametrize("zip_crc32", [False, True])
def test_torch_zip_crc32_is_skipped_unless_asked_for(
    local_checkpoint_root: CheckpointRoot, zip_crc32: bool
) -> None:
    """commitpoint's own checksum covers the file, so torch's per-record CRC32 (the slowest part
    of serialising) is left out by default; the file still loads with plain torch.load."""
    storage = local_checkpoint_root.open()
    state = {"weight": torch.randn(256, 256), "step": 7}
    save_torch(storage, "global_step_1/model.pt", state, zip_crc32=zip_crc32)
    path = Path(storage.full_path("global_step_1/model.pt"))
    assert _zip_crc_ok(path) is zip_crc32
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["weight"], state["weight"]) and loaded["step"] == 7
    [record] = storage.records.take("global_step_1")
    with path.open("rb") as stream:
        assert (record.size, record.checksum) == checksum_stream(stream)


@pytest.mark.parametrize("before", [True, False])
def test_torch_crc_switch_is_put_back_after_saves_and_failures(
    memory_checkpoint_root: CheckpointRoot, tmp_path: Path, before: bool
) -> None:
    storage = memory_checkpoint_root.open()
    torch.serialization.set_crc32_options(before)
    try:
        save_torch(storage, "global_step_1/model.pt", {"w": torch.ones(3)})
        assert torch.serialization.get_crc32_options() is before
        with pytest.raises((pickle.PicklingError, AttributeError)):  # an unpicklable object
            save_torch(storage, "global_step_2/model.pt", {"f": lambda: None})
        assert torch.serialization.get_crc32_options() is before
        # Code outside commitpoint saving after the window closed gets the process setting.
        torch.save({"w": torch.ones(3)}, tmp_path / "user.pt")
        assert _zip_crc_ok(tmp_path / "user.pt") is before
    finally:
        torch.serialization.set_crc32_options(True)


def test_concurrent_saves_share_the_crc_switch(memory_checkpoint_root: CheckpointRoot) -> None:
    """Many threads saving at once: every file loads, none keeps the switch off afterwards."""
    storage = memory_checkpoint_root.open()
    states = {i: {"w": torch.full((64, 64), float(i))} for i in range(16)}

    def save(i: int) -> None:
        save_torch(storage, f"global_step_{i}/model.pt", states[i])

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(save, states))
    assert torch.serialization.get_crc32_options() is True
    for i, state in states.items():
        assert torch.equal(load_torch(storage, f"global_step_{i}/model.pt")["w"], state["w"])
