"""S3 specifics on a moto server over real HTTP: conditional puts, plain-client readability,
parallel multipart streaming (concurrency, byte-exact parts, abort, retries), racing processes,
typed errors (401/403 included) without secrets."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

from commitpoint import (
    CheckpointCoordinator,
    CommitConflict,
    InvalidArgument,
    StorageError,
    advance_pointer,
    open_storage,
    save_torch,
)
from commitpoint.testing import CheckpointRoot
from fault_proxy import FaultPlan, fault_proxy

pytestmark = pytest.mark.s3

POINTER = "latest_state_dict_iteration.txt"
MiB = 1024 * 1024
PART = 5 * MiB  # the smallest part S3 accepts


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
    assert storage.records.take("global_step_1") == []
    bucket = s3_checkpoint_root.url[len("s3://") :].split("/")[0]
    uploads = _boto3_client(s3_checkpoint_root).list_multipart_uploads(Bucket=bucket)
    assert uploads.get("Uploads", []) == []


RACER = textwrap.dedent(
    """
    import json, sys
    from commitpoint import StepRegression, open_storage
    from commitpoint.core.pointer import advance_pointer
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


# -- parallel multipart upload ------------------------------------------------------------------
def _bucket_key(root: CheckpointRoot, relpath: str) -> tuple[str, str]:
    bucket, _, prefix = root.url[len("s3://") :].partition("/")
    return bucket, f"{prefix}/{relpath}"


def _pending_uploads(root: CheckpointRoot) -> list[Any]:
    bucket, _ = _bucket_key(root, "x")
    return list(_boto3_client(root).list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def _stream(storage: Any, relpath: str, data: bytes, piece: int = 1_000_003) -> Any:
    """Write ``data`` in odd-sized pieces, as a serialiser would; return the file's record."""
    with storage.open_write(relpath) as writer:
        for start in range(0, len(data), piece):
            writer.write(data[start : start + piece])
    return writer.record


class _PartTracker:
    """Wraps the client's upload_part: counts parts in flight, can delay or fail some."""

    def __init__(self, client: Any, delay: float = 0.0, fail_part: int | None = None) -> None:
        self.original = client.upload_part
        self.delay = delay
        self.fail_part = fail_part
        self.running = 0
        self.most = 0
        self.calls = 0

    async def __call__(self, **kwargs: Any) -> Any:
        self.calls += 1
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(self.delay)
            if kwargs["PartNumber"] == self.fail_part:
                from botocore.exceptions import ClientError

                raise ClientError(
                    {
                        "Error": {"Code": "AccessDenied", "Message": "denied"},
                        "ResponseMetadata": {"HTTPStatusCode": 403},
                    },
                    "UploadPart",
                )
            return await self.original(**kwargs)
        finally:
            self.running -= 1


@pytest.fixture
def tracked_storage(
    s3_checkpoint_root: CheckpointRoot, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Any, _PartTracker]]:
    storage = open_storage(
        s3_checkpoint_root.url,
        **s3_checkpoint_root.storage_options,
        part_size=PART,
        max_concurrency=3,
    )
    fs: Any = storage.fs
    client = fs.connect()  # the aiobotocore client the uploads go through
    tracker = _PartTracker(client, delay=0.3)
    monkeypatch.setattr(client, "upload_part", tracker)
    yield storage, tracker


def test_parts_upload_concurrently_and_never_more_than_max_concurrency(
    tracked_storage: tuple[Any, _PartTracker], s3_checkpoint_root: CheckpointRoot
) -> None:
    storage, tracker = tracked_storage
    data = os.urandom(8 * PART + 777)
    record = _stream(storage, "global_step_1/big.bin", data, piece=PART // 3)
    assert tracker.calls == 9
    assert tracker.most == 3  # parts overlapped, and the bound held (memory: 4 parts at most)
    bucket, key = _bucket_key(s3_checkpoint_root, "global_step_1/big.bin")
    body = _boto3_client(s3_checkpoint_root).get_object(Bucket=bucket, Key=key)["Body"].read()
    assert body == data and record.size == len(data)


def test_part_sizes_double_so_any_object_fits_in_ten_thousand_parts() -> None:
    from commitpoint_s3.multipart import MAX_PART_SIZE, MAX_PARTS, part_size_of

    first = 8 * MiB
    assert [part_size_of(n, first) for n in (1, 1000, 1001, 2000, 2001)] == [
        first,
        first,
        2 * first,
        2 * first,
        4 * first,
    ]
    capacity = sum(part_size_of(n, first) for n in range(1, MAX_PARTS + 1))
    assert capacity >= 5 * 1024**4  # S3's largest object
    assert part_size_of(MAX_PARTS, 5 * 1024**3) == MAX_PART_SIZE  # never above S3's part limit


def test_a_long_upload_sends_growing_parts(
    s3_checkpoint_root: CheckpointRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    from commitpoint_s3 import multipart

    monkeypatch.setattr(multipart, "PARTS_PER_SIZE", 2)  # double after every 2 parts
    storage = open_storage(
        s3_checkpoint_root.url, **s3_checkpoint_root.storage_options, part_size=PART
    )
    client = storage.fs.connect()
    original = client.upload_part
    sizes: dict[int, int] = {}

    async def recording(**kwargs: Any) -> Any:
        sizes[kwargs["PartNumber"]] = len(kwargs["Body"].getbuffer())
        return await original(**kwargs)

    monkeypatch.setattr(client, "upload_part", recording)
    data = os.urandom(2 * PART + 2 * 2 * PART + 4 * PART + 3)
    record = _stream(storage, "global_step_1/f.bin", data, piece=3 * MiB + 1)
    assert [sizes[n] for n in sorted(sizes)] == [PART, PART, 2 * PART, 2 * PART, 4 * PART, 3]
    bucket, key = _bucket_key(s3_checkpoint_root, "global_step_1/f.bin")
    response = _boto3_client(s3_checkpoint_root).get_object(Bucket=bucket, Key=key)
    assert response["Body"].read() == data and record.size == len(data)


@pytest.mark.parametrize(
    "size", [0, 1, PART - 1, PART, PART + 1, 2 * PART, 3 * PART + 12_345], ids=lambda n: f"{n}B"
)
def test_parts_reassemble_byte_exactly(s3_checkpoint_root: CheckpointRoot, size: int) -> None:
    storage = open_storage(
        s3_checkpoint_root.url, **s3_checkpoint_root.storage_options, part_size=PART
    )
    data = os.urandom(size)
    record = _stream(storage, "global_step_1/f.bin", data)
    bucket, key = _bucket_key(s3_checkpoint_root, "global_step_1/f.bin")
    response = _boto3_client(s3_checkpoint_root).get_object(Bucket=bucket, Key=key)
    assert response["Body"].read() == data
    parts = -(-size // PART)
    if parts > 1:
        assert response["ETag"].strip('"').endswith(f"-{parts}")  # really a multipart upload
    assert record.size == size
    assert storage.read_bytes("global_step_1/f.bin") == data
    assert _pending_uploads(s3_checkpoint_root) == []


def test_a_failed_part_aborts_the_upload(
    tracked_storage: tuple[Any, _PartTracker], s3_checkpoint_root: CheckpointRoot
) -> None:
    storage, tracker = tracked_storage
    tracker.fail_part = 2
    with pytest.raises(PermissionError) as info:
        _stream(storage, "global_step_1/big.bin", os.urandom(8 * PART), piece=PART)
    assert isinstance(info.value, StorageError)
    assert "global_step_1/big.bin" in str(info.value) and "AccessDenied" in str(info.value)
    assert tracker.calls < 8  # stopped early instead of uploading the rest
    assert _pending_uploads(s3_checkpoint_root) == []
    assert not storage.exists("global_step_1/big.bin")
    assert storage.records.take("global_step_1") == []


def test_a_failed_completion_aborts_the_upload(
    s3_checkpoint_root: CheckpointRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = open_storage(
        s3_checkpoint_root.url, **s3_checkpoint_root.storage_options, part_size=PART
    )
    fs: Any = storage.fs
    client = fs.connect()

    async def refuse(**kwargs: Any) -> Any:
        from botocore.exceptions import ClientError

        error = {"Error": {"Code": "InvalidPart"}, "ResponseMetadata": {"HTTPStatusCode": 400}}
        raise ClientError(error, "CompleteMultipartUpload")  # type: ignore[arg-type]

    monkeypatch.setattr(client, "complete_multipart_upload", refuse)
    with pytest.raises(StorageError, match="InvalidPart"):
        _stream(storage, "global_step_1/big.bin", os.urandom(2 * PART + 1))
    assert _pending_uploads(s3_checkpoint_root) == []
    assert storage.records.take("global_step_1") == []


def test_a_completion_retried_after_it_succeeded_is_accepted(
    s3_checkpoint_root: CheckpointRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first completion succeeds but its answer is lost; the retry is accepted, or finds no
    upload and checks that the object there is made of exactly the parts sent."""
    from botocore.exceptions import ClientError

    storage = open_storage(
        s3_checkpoint_root.url, **s3_checkpoint_root.storage_options, part_size=PART
    )
    fs: Any = storage.fs
    client = fs.connect()
    original = client.complete_multipart_upload
    calls: list[str] = []

    async def lose_first_answer(**kwargs: Any) -> Any:
        answer = await original(**kwargs)
        calls.append("completed")
        if len(calls) == 1:
            error = {
                "Error": {"Code": "InternalError"},
                "ResponseMetadata": {"HTTPStatusCode": 500},
            }
            raise ClientError(error, "CompleteMultipartUpload")  # type: ignore[arg-type]
        return answer

    monkeypatch.setattr(client, "complete_multipart_upload", lose_first_answer)
    data = os.urandom(2 * PART + 3)
    record = _stream(storage, "global_step_1/big.bin", data)
    # S3 may answer the repeated completion again or refuse it (NoSuchUpload, then the object is
    # verified against the parts sent); either way the first completion did land
    assert calls[0] == "completed" and len(calls) <= 2
    assert record.size == len(data)
    assert storage.read_bytes("global_step_1/big.bin") == data


@pytest.mark.parametrize("kind", ["503", "drop"])
def test_parts_survive_injected_faults(s3_checkpoint_root: CheckpointRoot, kind: str) -> None:
    """Faults hit whichever requests come next (create, parts, complete); with botocore's own
    retries off, commitpoint's retry loop alone must carry the upload through."""
    root = s3_checkpoint_root
    plan = FaultPlan(kind=kind)
    with fault_proxy(root.storage_options["endpoint_url"], plan) as endpoint:
        options = {
            **root.storage_options,
            "endpoint_url": endpoint,
            "config_kwargs": {"retries": {"max_attempts": 1}},
        }
        storage = open_storage(root.url, **options, part_size=PART, max_concurrency=2)
        data = os.urandom(4 * PART + 99)
        plan.faults = 4
        record = _stream(storage, "global_step_1/big.bin", data)
    assert plan.injected == 4
    assert record.size == len(data)
    assert root.open().read_bytes("global_step_1/big.bin") == data
    assert _pending_uploads(root) == []


def test_part_bodies_carry_a_checksum_s3_verifies(s3_checkpoint_root: CheckpointRoot) -> None:
    storage = open_storage(
        s3_checkpoint_root.url, **s3_checkpoint_root.storage_options, part_size=PART
    )
    _stream(storage, "global_step_1/big.bin", os.urandom(2 * PART + 5))
    bucket, key = _bucket_key(s3_checkpoint_root, "global_step_1/big.bin")
    head = _boto3_client(s3_checkpoint_root).head_object(
        Bucket=bucket, Key=key, ChecksumMode="ENABLED"
    )
    assert head.get("ChecksumCRC32C") or head.get("ChecksumCRC32")


def test_checksum_header_lets_tls_uploads_skip_payload_hashing() -> None:
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.config import Config
    from botocore.credentials import Credentials

    from commitpoint_s3.multipart import declare_header_checksum

    auth = S3SigV4Auth(Credentials("key", "secret"), "s3", "us-east-1")
    signed = {}
    for url in ("https://s3.example.com/b/k", "http://127.0.0.1:9/b/k"):
        request = AWSRequest("PUT", url, data=b"x", headers={"x-amz-checksum-crc32c": "AAAAAA=="})
        request.context.update({"client_config": Config(), "has_streaming_input": True})
        declare_header_checksum(request)
        signed[url[:5]] = auth._should_sha256_sign_payload(request)
    assert signed == {"https": False, "http:": True}


def test_options_are_validated(s3_checkpoint_root: CheckpointRoot) -> None:
    options = s3_checkpoint_root.storage_options
    with pytest.raises(InvalidArgument, match="part_size"):
        open_storage(s3_checkpoint_root.url, **options, part_size=MiB)
    with pytest.raises(InvalidArgument, match="max_concurrency"):
        open_storage(s3_checkpoint_root.url, **options, max_concurrency=0)


def test_backends_do_not_share_or_mutate_cached_filesystems(
    s3_checkpoint_root: CheckpointRoot,
) -> None:
    import s3fs

    options = s3_checkpoint_root.storage_options
    shared = s3fs.S3FileSystem(**options)
    before = shared.retries
    patient = open_storage(s3_checkpoint_root.url, **options, retries=9)
    hasty = open_storage(s3_checkpoint_root.url, **options, retries=2)
    assert patient.fs is not hasty.fs and shared not in (patient.fs, hasty.fs)
    assert (patient.fs.retries, hasty.fs.retries) == (9, 2)  # type: ignore[attr-defined]
    assert s3fs.S3FileSystem(**options).retries == before


# -- 401 / 403 ----------------------------------------------------------------------------------
def _client_error(code: str, status: int) -> Exception:
    from botocore.exceptions import ClientError

    response = {
        "Error": {"Code": code, "Message": "m"},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, "PutObject")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("code", "status", "words"),
    [
        ("AccessDenied", 403, "access denied"),
        ("InvalidAccessKeyId", 403, "bad credentials"),
        ("SignatureDoesNotMatch", 403, "bad credentials"),
        ("ExpiredToken", 400, "expired"),
        ("Unauthorized", 401, "not authenticated"),
        ("SomethingNew", 403, "access denied"),
    ],
)
def test_auth_errors_map_to_permission_errors(
    s3_checkpoint_root: CheckpointRoot, code: str, status: int, words: str
) -> None:
    from commitpoint_s3 import S3PermissionError

    storage: Any = open_storage(s3_checkpoint_root.url, **s3_checkpoint_root.storage_options)
    error = storage._translate_error("write", "global_step_1/a.bin", _client_error(code, status))
    assert isinstance(error, S3PermissionError) and isinstance(error, PermissionError)
    assert isinstance(error, StorageError) and error.status == status
    assert words in str(error) and "global_step_1/a.bin" in str(error)
    copy = pickle.loads(pickle.dumps(error))  # errors travel from Ray workers to the caller
    assert type(copy) is S3PermissionError and str(copy) == str(error)
    assert (copy.code, copy.status) == (error.code, error.status)
    # s3fs turns the same answers into a bare PermissionError with the ClientError as cause.
    wrapped = PermissionError("denied")
    wrapped.__cause__ = _client_error(code, status)
    assert isinstance(storage._translate_error("list", "", wrapped), S3PermissionError)


def test_other_client_errors_are_not_permission_errors(s3_checkpoint_root: CheckpointRoot) -> None:
    storage: Any = open_storage(s3_checkpoint_root.url, **s3_checkpoint_root.storage_options)
    error = storage._translate_error("write", "a", _client_error("InvalidPart", 400))
    assert isinstance(error, StorageError) and not isinstance(error, PermissionError)


def test_moto_refuses_bad_and_insufficient_credentials(
    s3_checkpoint_root: CheckpointRoot, caplog: pytest.LogCaptureFixture
) -> None:
    """moto checks signatures and IAM policies when authentication is switched on."""
    from moto.core.authorization import enable_iam_authentication

    from commitpoint_s3 import S3PermissionError

    caplog.set_level(logging.DEBUG, logger="commitpoint")
    caplog.set_level(logging.DEBUG, logger="commitpoint_s3")
    root = s3_checkpoint_root
    iam = pytest.importorskip("boto3").client(
        "iam",
        endpoint_url=root.storage_options["endpoint_url"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    user = f"reader-{os.getpid()}-{id(root)}"
    iam.create_user(UserName=user)
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}
        ],
    }
    iam.put_user_policy(UserName=user, PolicyName="read-only", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    reader = open_storage(
        root.url,
        **{**root.storage_options, "key": key["AccessKeyId"], "secret": key["SecretAccessKey"]},
        retries=1,
    )
    stranger = open_storage(
        root.url, **{**root.storage_options, "secret": "SECRETvalue-1234567890"}, retries=1
    )
    errors: list[S3PermissionError] = []
    with enable_iam_authentication():
        assert reader.list_files() == []  # allowed by its policy
        for attempt in (
            lambda: reader.write_pointer_if(POINTER, 1, None),
            lambda: reader.write_bytes("global_step_1/big.bin", os.urandom(PART + 1)),
            lambda: stranger.write_bytes("global_step_1/a.bin", b"x"),
            lambda: stranger.list_files(),
        ):
            with pytest.raises(S3PermissionError) as info:
                attempt()
            errors.append(info.value)
    assert [e.code for e in errors] == [
        "AccessDenied",
        "AccessDenied",
        "InvalidAccessKeyId",
        "InvalidAccessKeyId",
    ]
    assert _pending_uploads(root) == []
    for text in [*(str(e) for e in errors), caplog.text]:
        assert key["SecretAccessKey"] not in text and "SECRETvalue-1234567890" not in text
