"""GCS specifics on fake-gcs-server over real HTTP: generation preconditions, plain-gcsfs
readability, resumable uploads (byte-exact, aborted on failure), the crc32c cross-check against
corruption in transit, racing processes, typed errors (401/403 included) without secrets, faults."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import logging
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from commitpoint import (
    CheckpointCoordinator,
    CheckpointMonitor,
    CommitConflict,
    InvalidArgument,
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
CHUNK = 256 * 1024  # the smallest resumable-upload chunk GCS accepts


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


# -- resumable uploads --------------------------------------------------------------------------
def _object_path(root: CheckpointRoot, relpath: str) -> str:
    return root.url[len("gs://") :] + "/" + relpath


def _gcsfs(root: CheckpointRoot) -> Any:
    import gcsfs

    return gcsfs.GCSFileSystem(skip_instance_cache=True, **root.storage_options)


def _stream(storage: Any, relpath: str, data: bytes, piece: int = 100_003) -> Any:
    with storage.open_write(relpath) as writer:
        for start in range(0, len(data), piece):
            writer.write(data[start : start + piece])
    return writer.record


@pytest.mark.parametrize(
    "size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 12_345], ids=lambda n: f"{n}B"
)
def test_uploads_are_byte_exact_and_match_the_server_crc32c(
    gcs_checkpoint_root: CheckpointRoot, size: int
) -> None:
    from commitpoint.core.checksum import available_algorithms
    from commitpoint_gcs.resumable import crc32c_from_base64

    root = gcs_checkpoint_root
    storage = open_storage(root.url, **root.storage_options, chunk_size=CHUNK)
    data = os.urandom(size)
    record = _stream(storage, "global_step_1/f.bin", data)
    fs = _gcsfs(root)
    assert fs.cat(_object_path(root, "global_step_1/f.bin")) == data
    info = fs.info(_object_path(root, "global_step_1/f.bin"))
    assert record.size == size == int(info["size"])
    if "crc32c" in available_algorithms():
        assert record.algorithm == "crc32c"
        assert crc32c_from_base64(info["crc32c"]) == int(record.checksum, 16)


def test_failed_resumable_upload_leaves_nothing(gcs_checkpoint_root: CheckpointRoot) -> None:
    storage = open_storage(
        gcs_checkpoint_root.url, **gcs_checkpoint_root.storage_options, chunk_size=CHUNK
    )
    with pytest.raises(RuntimeError), storage.open_write("global_step_1/big.bin") as writer:
        writer.write(os.urandom(3 * CHUNK + 5))
        raise RuntimeError("serialisation failed")
    assert not storage.exists("global_step_1/big.bin")
    assert storage.records.take("global_step_1") == []


def test_chunk_size_is_validated(gcs_checkpoint_root: CheckpointRoot) -> None:
    with pytest.raises(InvalidArgument, match="256 KiB"):
        open_storage(
            gcs_checkpoint_root.url, **gcs_checkpoint_root.storage_options, chunk_size=CHUNK + 1
        )


# -- crc32c cross-check -------------------------------------------------------------------------
def test_crc32c_is_compared_in_gcs_encoding() -> None:
    from commitpoint_gcs import ChecksumMismatch
    from commitpoint_gcs.resumable import check_stored, crc32c_from_base64, crc32c_to_base64

    value = 0xE3069283  # CRC32C of b"123456789", the standard check value
    assert crc32c_to_base64(value) == "4waSgw=="
    assert crc32c_from_base64("4waSgw==") == value
    check_stored("gs://b/k", {"crc32c": "4waSgw==", "size": "9"}, 9, value)
    check_stored("gs://b/k", {"size": "9"}, 9, value)  # nothing to compare with
    check_stored("gs://b/k", {"crc32c": "AAAAAA==", "size": "9"}, 9, None)  # not crc32c here
    with pytest.raises(ChecksumMismatch, match="4waSgw==") as info:
        check_stored("gs://b/k", {"crc32c": "AAAAAA==", "size": "9"}, 9, value)
    assert isinstance(info.value, StorageError) and "gs://b/k" in str(info.value)
    with pytest.raises(ChecksumMismatch, match="8 bytes"):
        check_stored("gs://b/k", {"crc32c": "4waSgw==", "size": "8"}, 9, value)
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is ChecksumMismatch and str(copy) == str(info.value)


def _flip_victim_byte(method: str, path: str, body: bytes) -> bytes:
    """Flip one content byte of uploads of objects named ``victim*``."""
    if method != "POST" or not body:
        return body
    if "upload_id=" in path and "victim" in path:  # a resumable chunk: flip its first byte
        return bytes([body[0] ^ 0xFF]) + body[1:]
    closing = b"\r\n--==commitpoint==--"
    if b"/victim" in body[:1000] and body.endswith(closing):  # a one-request upload
        at = len(body) - len(closing) - 1
        return body[:at] + bytes([body[at] ^ 0xFF]) + body[at + 1 :]
    return body


@pytest.mark.parametrize("size", [1000, 3 * CHUNK + 7], ids=["one-request", "resumable"])
def test_corruption_in_transit_is_caught_and_never_committed(
    gcs_checkpoint_root: CheckpointRoot, size: int
) -> None:
    from commitpoint.core.checksum import available_algorithms
    from commitpoint_gcs import ChecksumMismatch

    if "crc32c" not in available_algorithms():
        pytest.skip("the writer's checksum is not crc32c here; nothing to cross-check")
    root = gcs_checkpoint_root
    plan = FaultPlan(rewrite=_flip_victim_byte)
    with fault_proxy(root.storage_options["endpoint_url"], plan) as endpoint:
        options = {**root.storage_options, "endpoint_url": endpoint, "chunk_size": CHUNK}
        storage = open_storage(root.url, **options)
        with pytest.raises(ChecksumMismatch, match="crc32c") as info:
            _stream(storage, "global_step_1/victim.bin", os.urandom(size))
        assert "global_step_1/victim.bin" in str(info.value)
        assert plan.altered  # the proxy really did corrupt the upload
        assert not storage.exists("global_step_1/victim.bin")  # the bad object was deleted
        assert storage.records.take("global_step_1") == []

        coordinator = CheckpointCoordinator(CheckpointMonitor(root.url, options))
        cstorage = coordinator.storage
        with pytest.raises(SaveFailed) as failed:
            coordinator.save_sync(
                lambda: _stream(cstorage, "global_step_2/victim.bin", os.urandom(size)), 2, True
            )
        assert isinstance(failed.value.cause, ChecksumMismatch)
        coordinator.register_and_monitor_sync(2, True, state_dict_thread_count=1)
    assert root.committed_steps()["state_dict"] is None


# -- 401 / 403 ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("error", "status"),
    [
        ("http-401", 401),
        ("forbidden", 403),
        ("http-403", 403),
    ],
)
def test_auth_errors_map_to_permission_errors(
    gcs_checkpoint_root: CheckpointRoot, error: str, status: int
) -> None:
    from gcsfs.retry import HttpError

    from commitpoint_gcs import GCSPermissionError

    exc: Exception = {
        "http-401": HttpError({"code": 401, "message": "Invalid Credentials"}),
        "http-403": HttpError({"code": 403, "message": "no storage.objects.create access"}),
        "forbidden": OSError("Forbidden: b/o\nno storage.objects.create access"),
    }[error]
    storage: Any = gcs_checkpoint_root.open()
    mapped = storage._translate_error("write", "global_step_1/a.bin", exc)
    assert isinstance(mapped, GCSPermissionError) and isinstance(mapped, PermissionError)
    assert isinstance(mapped, StorageError) and mapped.status == status
    assert f"({status})" in str(mapped) and "global_step_1/a.bin" in str(mapped)
    copy = pickle.loads(pickle.dumps(mapped))  # errors travel from Ray workers to the caller
    assert type(copy) is GCSPermissionError and str(copy) == str(mapped)
    assert copy.status == status
    other = storage._translate_error("write", "a", HttpError({"code": 400, "message": "bad"}))
    assert not isinstance(other, PermissionError)


@contextlib.contextmanager
def _refusing_server(status: int, message: str) -> Iterator[str]:
    """An endpoint that answers every request with ``status`` and a GCS JSON error."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _refuse(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            body = json.dumps({"error": {"code": status, "message": message}}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _refuse

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("status", "message"),
    [(401, "Login Required."), (403, "caller does not have storage.objects.create access")],
)
def test_refused_requests_raise_permission_errors_without_secrets(
    status: int, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    from commitpoint_gcs import GCSPermissionError

    caplog.set_level(logging.DEBUG, logger="commitpoint")
    caplog.set_level(logging.DEBUG, logger="commitpoint_gcs")
    with _refusing_server(status, message) as endpoint:
        storage = open_storage(
            "gs://locked-bucket/run",
            endpoint_url=endpoint,
            token="anon",
            project="test",
            chunk_size=CHUNK,
        )
        for attempt in (
            lambda: storage.write_pointer_if(POINTER, 1, None),
            lambda: storage.write_bytes("global_step_1/a.bin", b"x"),
            lambda: storage.write_bytes("global_step_1/b.bin", os.urandom(CHUNK + 1)),
            lambda: storage.read_bytes("global_step_1/a.bin"),
        ):
            with pytest.raises(GCSPermissionError) as info:
                attempt()
            assert info.value.status == status and "gs://locked-bucket/run/" in str(info.value)
            assert "anon" not in str(info.value)
    assert "anon" not in caplog.text
