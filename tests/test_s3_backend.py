"""S3 specifics on a moto server over real HTTP: conditional puts, plain-client readability,
multipart streaming, racing processes, typed errors without secrets."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from commitpoint import (
    CheckpointCoordinator,
    CommitConflict,
    StorageError,
    advance_pointer,
    open_storage,
    save_torch,
)
from commitpoint.testing import CheckpointRoot

pytestmark = pytest.mark.s3

POINTER = "latest_state_dict_iteration.txt"


def _boto3_client(root: CheckpointRoot) -> Any:
    boto3 = pytest.importorskip("boto3")
    return boto3.client(
        "s3",
        endpoint_url=root.storage_options["endpoint_url"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )


def test_pointer_is_plain_ascii_digits_for_boto3(s3_checkpoint_root: CheckpointRoot) -> None:
    storage = s3_checkpoint_root.open()
    advance_pointer(storage, POINTER, 12)
    bucket, _, prefix = s3_checkpoint_root.url[len("s3://") :].partition("/")
    body = _boto3_client(s3_checkpoint_root).get_object(Bucket=bucket, Key=f"{prefix}/{POINTER}")
    assert body["Body"].read().strip() == b"12"


def test_tokens_are_etags_and_stale_etags_conflict(s3_checkpoint_root: CheckpointRoot) -> None:
    storage = s3_checkpoint_root.open()
    first = storage.write_pointer_if(POINTER, 1, None)
    assert first.startswith('"')  # an S3 ETag
    with pytest.raises(CommitConflict, match=r"PreconditionFailed|412"):
        storage.write_pointer_if(POINTER, 2, None)
    second = storage.write_pointer_if(POINTER, 3, first)
    with pytest.raises(CommitConflict):
        storage.write_pointer_if(POINTER, 4, first)
    assert storage.read_pointer(POINTER).token == second


def test_multipart_upload_round_trips_with_manifest_checksum(
    s3_checkpoint_root: CheckpointRoot,
) -> None:
    torch = pytest.importorskip("torch")
    root = s3_checkpoint_root
    options = {**root.storage_options, "part_size": 5 * 1024 * 1024}
    monitor_root = CheckpointRoot(root.url, options, "s3")
    coordinator = CheckpointCoordinator(monitor_root.monitor())
    weights = {"w": torch.randn(4 * 1024 * 1024)}  # 16 MiB: four parts
    coordinator.save_async(
        "model", lambda: save_torch(coordinator.storage, "global_step_1/model.pt", weights), 1, True
    )
    coordinator.register_and_monitor_sync(1, True, state_dict_thread_count=1)
    coordinator.wait_all()
    reader = monitor_root.reader()
    manifest = reader.manifest(1)
    assert manifest.files[0].size > 16 * 1024 * 1024 and manifest.files[0].tracked
    assert reader.verify(1).ok
    assert torch.equal(reader.load(1, "model.pt")["w"], weights["w"])


def test_failed_upload_is_aborted_and_not_recorded(s3_checkpoint_root: CheckpointRoot) -> None:
    options = {**s3_checkpoint_root.storage_options, "part_size": 5 * 1024 * 1024}
    storage = open_storage(s3_checkpoint_root.url, **options)
    with pytest.raises(RuntimeError), storage.open_write("global_step_1/big.bin") as writer:
        writer.write(b"x" * (11 * 1024 * 1024))
        raise RuntimeError("serialisation failed")
    assert not storage.exists("global_step_1/big.bin")
    assert storage.take_records("global_step_1") == []
    bucket = s3_checkpoint_root.url[len("s3://") :].split("/")[0]
    uploads = _boto3_client(s3_checkpoint_root).list_multipart_uploads(Bucket=bucket)
    assert uploads.get("Uploads", []) == []


RACER = textwrap.dedent(
    """
    import json, sys
    from commitpoint import StepRegression, advance_pointer, open_storage
    url, options, start = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    storage = open_storage(url, **options)
    seen = []
    for step in range(start, start + 120, 3):
        try:
            advance_pointer(storage, "latest_state_dict_iteration.txt", step)
        except StepRegression:
            pass
        seen.append(storage.read_pointer("latest_state_dict_iteration.txt").value)
    print(json.dumps(seen))
    """
)


def test_racing_processes_never_lose_or_regress(s3_checkpoint_root: CheckpointRoot) -> None:
    options = json.dumps(s3_checkpoint_root.storage_options)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, s3_checkpoint_root.url, options, str(start)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for start in (1, 2, 3)
    ]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    for output in outputs:
        seen = json.loads(output)
        assert seen == sorted(seen)  # each process only ever saw the pointer move forward
    final = s3_checkpoint_root.open().read_pointer(POINTER).value
    assert final == max(range(1, 121, 3)[-1], range(2, 122, 3)[-1], range(3, 123, 3)[-1])


def test_missing_bucket_is_a_clear_error(s3_checkpoint_root: CheckpointRoot) -> None:
    storage = open_storage("s3://no-such-bucket-here/run", **s3_checkpoint_root.storage_options)
    with pytest.raises(StorageError, match="bucket does not exist") as info:
        storage.write_pointer_if(POINTER, 1, None)
    assert "no-such-bucket-here" in str(info.value)


def test_secrets_never_appear_in_errors_logs_or_repr(
    s3_checkpoint_root: CheckpointRoot, caplog: pytest.LogCaptureFixture
) -> None:
    secret, token = "SECRETvalue-1234567890", "SESSIONtoken-abcdef"
    options = {
        **s3_checkpoint_root.storage_options,
        "secret": secret,
        "token": token,
        "retries": 1,
    }
    # Our own loggers at DEBUG; botocore's DEBUG wire log prints request headers (including the
    # session-token header) by design and is off unless a user turns it on.
    caplog.set_level(logging.DEBUG, logger="commitpoint")
    caplog.set_level(logging.DEBUG, logger="commitpoint_s3")
    storage = open_storage("s3://missing-bucket-for-secrets/run", **options)
    with pytest.raises(StorageError) as info:
        storage.write_pointer_if(POINTER, 1, None)
    texts = [str(info.value), repr(info.value), repr(storage), storage.url, caplog.text]
    for text in texts:
        assert secret not in text and token not in text
