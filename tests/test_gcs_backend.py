"""GCS specifics on fake-gcs-server over real HTTP: generation preconditions, plain-gcsfs
readability, resumable uploads, racing processes, typed errors without secrets, faults."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from commitpoint import (
    CheckpointCoordinator,
    CheckpointMonitor,
    CommitConflict,
    SaveFailed,
    StorageError,
    advance_pointer,
    open_storage,
    save_torch,
)
from commitpoint.testing import CheckpointRoot
from fault_proxy import FaultPlan, fault_proxy
from test_s3_backend import RACER

pytestmark = pytest.mark.gcs

POINTER = "latest_state_dict_iteration.txt"


def test_pointer_is_plain_ascii_digits_for_gcsfs(gcs_checkpoint_root: CheckpointRoot) -> None:
    import gcsfs

    advance_pointer(gcs_checkpoint_root.open(), POINTER, 21)
    fs = gcsfs.GCSFileSystem(**gcs_checkpoint_root.storage_options)
    path = gcs_checkpoint_root.url[len("gs://") :] + "/" + POINTER
    assert fs.cat(path).strip() == b"21"


def test_tokens_are_generations_and_stale_ones_conflict(
    gcs_checkpoint_root: CheckpointRoot,
) -> None:
    storage = gcs_checkpoint_root.open()
    first = storage.write_pointer_if(POINTER, 1, None)
    assert first.isdigit()  # a GCS generation
    with pytest.raises(CommitConflict, match="412"):
        storage.write_pointer_if(POINTER, 2, None)
    second = storage.write_pointer_if(POINTER, 3, first)
    assert second != first
    with pytest.raises(CommitConflict):
        storage.write_pointer_if(POINTER, 4, first)
    assert storage.read_pointer(POINTER).token == second
    assert storage.read_pointer(POINTER).value == 3


def test_resumable_upload_round_trips(gcs_checkpoint_root: CheckpointRoot) -> None:
    torch = pytest.importorskip("torch")
    root = CheckpointRoot(
        gcs_checkpoint_root.url,
        {**gcs_checkpoint_root.storage_options, "chunk_size": 1 << 20},
        "gcs",
    )
    coordinator = CheckpointCoordinator(root.monitor())
    weights = {"w": torch.randn(1 << 20)}  # 4 MiB: several 1 MiB chunks
    coordinator.save_async(
        "model", lambda: save_torch(coordinator.storage, "global_step_1/model.pt", weights), 1, True
    )
    coordinator.register_and_monitor_sync(1, True, state_dict_thread_count=1)
    coordinator.wait_all()
    reader = root.reader()
    assert reader.verify(1).ok
    assert reader.manifest(1).files[0].size > 4 << 20
    assert torch.equal(reader.load(1, "model.pt")["w"], weights["w"])


def test_racing_processes_never_lose_or_regress(gcs_checkpoint_root: CheckpointRoot) -> None:
    options = json.dumps(gcs_checkpoint_root.storage_options)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, gcs_checkpoint_root.url, options, str(start)],
            stdout=subprocess.PIPE,
            text=True,
            env={"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", **__import__("os").environ},
        )
        for start in (1, 2, 3)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    for output in outputs:
        seen = json.loads(output)
        assert seen == sorted(seen)
    assert gcs_checkpoint_root.open().read_pointer(POINTER).value == 120


def test_missing_bucket_is_clear_and_secret_free(
    gcs_checkpoint_root: CheckpointRoot, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="commitpoint")
    caplog.set_level(logging.DEBUG, logger="commitpoint_gcs")
    options = {**gcs_checkpoint_root.storage_options}
    storage = open_storage("gs://no-such-bucket-anywhere/run", **options)
    with pytest.raises(StorageError, match="bucket does not exist") as info:
        storage.write_pointer_if(POINTER, 1, None)
    assert "no-such-bucket-anywhere" in str(info.value)
    assert repr(storage) == "GCSBackend('gs://no-such-bucket-anywhere/run')"
    for text in (str(info.value), repr(info.value), caplog.text):
        assert "token" not in text and "'anon'" not in text


def test_transient_faults_are_retried(gcs_checkpoint_root: CheckpointRoot) -> None:
    root = gcs_checkpoint_root
    plan = FaultPlan(kind="503")
    with fault_proxy(root.storage_options["endpoint_url"], plan) as endpoint:
        options = {**root.storage_options, "endpoint_url": endpoint}
        coordinator = CheckpointCoordinator(CheckpointMonitor(root.url, options))
        plan.faults = 2
        storage = coordinator.storage
        coordinator.save_sync(
            lambda: storage.write_bytes("global_step_1/m.bin", b"w" * 999), 1, True
        )
        coordinator.register_and_monitor_sync(1, True, state_dict_thread_count=1)
    assert plan.injected == 2
    assert root.committed_steps()["state_dict"] == 1
    assert root.verify(1).ok


def test_persistent_faults_fail_without_commit(gcs_checkpoint_root: CheckpointRoot) -> None:
    root = gcs_checkpoint_root
    plan = FaultPlan(kind="drop")
    with fault_proxy(root.storage_options["endpoint_url"], plan) as endpoint:
        options = {**root.storage_options, "endpoint_url": endpoint}
        coordinator = CheckpointCoordinator(CheckpointMonitor(root.url, options))
        storage = coordinator.storage
        coordinator.register_and_monitor_sync(2, True, state_dict_thread_count=1)
        plan.always = True
        with pytest.raises(SaveFailed):
            coordinator.save_sync(lambda: storage.write_bytes("global_step_2/m.bin", b"x"), 2, True)
    assert root.committed_steps()["state_dict"] is None
