"""Parallel multipart upload: the streaming writer behind :meth:`S3Backend.open_write`.

An :class:`~commitpoint.storage.upload.session.UploadSession` whose pieces are multipart parts:
bytes are cut into parts of ``part_size``, each full part is uploaded on the s3fs event loop while
the caller keeps writing, at most ``max_concurrency`` at once, so one open file holds at most
``part_size * (max_concurrency + 1)`` bytes of buffers. A file smaller than one part is a single
``PutObject``. This module supplies only S3's requests.

The size of a streamed file is not known in advance, and S3 takes at most 10,000 parts. Parts
therefore double in size after every 1,000 (8 MiB parts cover 7.8 GiB before the first doubling,
and any object up to S3's 5 TiB limit fits); small parts keep memory low and many requests in
flight for the common case.

Every request is retried on transient errors within the deadline (see
:mod:`commitpoint_s3.retry`). Any failure aborts the multipart upload, so no parts are left behind
to be billed, and is raised by the next ``write`` or by ``close``; ``close`` returns only once S3
has assembled the object.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import weakref
from collections.abc import Awaitable
from dataclasses import replace
from typing import Any

from commitpoint.core.checksum import DEFAULT_ALGORITHM, Checksum
from commitpoint.core.retry import RetryPolicy
from commitpoint.storage.upload import BufferBody, UploadSession, request_deadline
from commitpoint_s3.options import MAX_PART_SIZE, MIN_PART_SIZE
from commitpoint_s3.retry import call_with_retries, client_call, error_code

logger = logging.getLogger(__name__)

__all__ = ["MAX_PARTS", "MAX_PART_SIZE", "MIN_PART_SIZE", "ParallelMultipartUpload"]

MAX_PARTS = 10_000
PARTS_PER_SIZE = 1_000
"""Parts of one size before the size doubles: ten doublings reach 1023x the first size."""


def part_size_of(number: int, first: int) -> int:
    """Size of part ``number`` (from 1) of an upload whose first part is ``first`` bytes."""
    return min(MAX_PART_SIZE, first << ((number - 1) // PARTS_PER_SIZE))


_HOOKED_CLIENTS: weakref.WeakSet[Any] = weakref.WeakSet()


def declare_header_checksum(request: Any, **_: Any) -> None:
    """Tell the request signer that the body's checksum travels in an ``x-amz-checksum-*`` header.

    botocore records this itself for checksums it computes; for one the caller supplies it does
    not, and then hashes the whole body with SHA-256 for the signature even over TLS, on the
    event-loop thread. With the checksum declared, TLS uploads go with an unsigned payload plus
    the (signed) checksum header, exactly as botocore's own checksummed uploads do; plain-HTTP
    endpoints still get a signed payload.
    """
    context = getattr(request, "context", None)
    if not isinstance(context, dict):
        return
    for name in list(request.headers.keys()):
        lowered = name.lower()
        if lowered.startswith("x-amz-checksum-") and lowered != "x-amz-checksum-type":
            algorithm = {"algorithm": lowered[len("x-amz-checksum-") :], "in": "header"}
            context.setdefault("checksum", {}).setdefault(
                "request_algorithm", {**algorithm, "name": lowered}
            )
            return


def _hook(client: Any) -> Any:
    if client not in _HOOKED_CLIENTS:
        for operation in ("UploadPart", "PutObject"):
            client.meta.events.register(f"before-sign.s3.{operation}", declare_header_checksum)
        _HOOKED_CLIENTS.add(client)
    return client


class ParallelMultipartUpload(UploadSession):
    """A write-only file object that uploads ``s3://bucket/key`` in concurrent parts."""

    max_pieces = MAX_PARTS
    piece_name = "parts"
    abort_hint = (
        "; a bucket lifecycle rule for incomplete multipart uploads removes its parts"
    )

    def __init__(
        self,
        fs: Any,
        path: str,
        *,
        part_size: int,
        max_concurrency: int,
        policy: RetryPolicy,
        where: str,
    ) -> None:
        super().__init__(
            fs,
            path,
            piece_size=part_size,
            max_in_flight=max_concurrency,
            where=where,
            deadline=policy.deadline,
        )
        self._policy = policy
        self._upload_id: str | None = None
        self._checksum_algorithm: str | None = None

    def _piece_size(self, number: int) -> int:
        return part_size_of(number, self._first_size)

    def _part_checksum(self, body: memoryview) -> dict[str, str]:
        """The part's checksum as a request parameter, computed here rather than on the loop."""
        if self._checksum_algorithm is None:
            return {}
        checksum = Checksum(self._checksum_algorithm.lower())
        checksum.update(body)
        value = int(checksum.hexdigest(), 16).to_bytes(4, "big")
        return {f"Checksum{self._checksum_algorithm}": base64.b64encode(value).decode()}

    # -- requests (run on the filesystem's event loop) ---------------------------------------
    async def _client(self) -> Any:
        return _hook(await self._fs.set_session())

    async def _retrying(
        self, operation: str, method: str, body_bytes: int = 0, **kwargs: Any
    ) -> Any:
        client = await self._client()
        policy = self._policy
        if policy.deadline is not None and body_bytes:
            policy = replace(policy, deadline=request_deadline(policy.deadline, body_bytes))
        return await call_with_retries(
            f"{operation} {self._where}", policy, client_call(client, method, **kwargs)
        )

    async def _send_whole(self, body: memoryview) -> None:
        await self._retrying(
            "put",
            "put_object",
            len(body),
            Bucket=self._bucket,
            Key=self._key,
            Body=BufferBody(body),
        )

    async def _start(self) -> None:
        client = await self._client()
        extra: dict[str, Any] = {}
        # As boto3's upload_file does: with flexible checksums on, S3 checks every part's checksum.
        # CRC32C when it is compiled here (it is then nearly free), else CRC32.
        if getattr(client.meta.config, "request_checksum_calculation", None) == "when_supported":
            self._checksum_algorithm = "CRC32C" if DEFAULT_ALGORITHM == "crc32c" else "CRC32"
            extra["ChecksumAlgorithm"] = self._checksum_algorithm
        response = await self._retrying(
            "create multipart upload",
            "create_multipart_upload",
            Bucket=self._bucket,
            Key=self._key,
            **extra,
        )
        self._upload_id = str(response["UploadId"])

    def _send(self, number: int, body: memoryview, final: bool) -> Awaitable[dict[str, Any]]:
        return self._upload_part(number, body, self._part_checksum(body))

    async def _upload_part(
        self, number: int, body: memoryview, checksum: dict[str, str]
    ) -> dict[str, Any]:
        response = await self._retrying(
            f"upload part {number}",
            "upload_part",
            len(body),
            Bucket=self._bucket,
            Key=self._key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=BufferBody(body),
            **checksum,
        )
        return {"PartNumber": number, "ETag": response["ETag"], **checksum}

    async def _finish(self) -> None:
        parts = sorted(self._results, key=lambda p: int(p["PartNumber"]))
        try:
            await self._retrying(
                "complete multipart upload",
                "complete_multipart_upload",
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": parts},
            )
        except Exception as exc:
            # A retried completion whose first attempt did succeed (its answer was lost) finds
            # the upload gone: accept it if the object now there is exactly these parts.
            if error_code(exc)[0] != "NoSuchUpload" or not await self._is_assembled(parts):
                raise
            logger.info("completion of %s was retried after it had succeeded", self._where)
        self._upload_id = None

    async def _is_assembled(self, parts: list[dict[str, Any]]) -> bool:
        """Whether the object's ETag is the multipart ETag of ``parts`` (MD5 of their MD5s)."""
        try:
            digests = b"".join(bytes.fromhex(str(p["ETag"]).strip('"')) for p in parts)
            head = await self._retrying("head", "head_object", Bucket=self._bucket, Key=self._key)
        except Exception:
            return False
        expected = f"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{len(parts)}"
        return str(head.get("ETag", "")).strip('"') == expected

    async def _cancel(self) -> None:
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is None:
            return
        await self._retrying(
            "abort multipart upload",
            "abort_multipart_upload",
            Bucket=self._bucket,
            Key=self._key,
            UploadId=upload_id,
        )
