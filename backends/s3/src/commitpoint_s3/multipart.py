"""Parallel multipart upload: the streaming writer behind :meth:`S3Backend.open_write`.

Bytes are cut into parts of ``part_size``. Each full part is handed to the event loop of the s3fs
filesystem and uploaded while the caller keeps writing; at most ``max_concurrency`` parts are in
flight, and a ``write`` that fills one more waits until one of them finishes. One open file
therefore holds at most ``part_size * (max_concurrency + 1)`` bytes of buffers. A file smaller than
one part is a single ``PutObject``.

The size of a streamed file is not known in advance, and S3 takes at most 10,000 parts. Parts
therefore double in size after every 1,000 (8 MiB parts cover 7.8 GiB before the first doubling,
and any object up to S3's 5 TiB limit fits); small parts keep memory low and many requests in
flight for the common case.

Every request is retried on transient errors (see :mod:`commitpoint_s3.retry`). Any failure aborts
the multipart upload, so no parts are left behind to be billed, and is raised by the next ``write``
or by ``close``; ``close`` returns only once S3 has assembled the object.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hashlib
import logging
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from fsspec.asyn import sync

from commitpoint.core.checksum import Checksum, available_algorithms
from commitpoint.storage.upload.pieces import BufferBody, Piece
from commitpoint_s3.retry import call_with_retries, client_call, error_code

logger = logging.getLogger(__name__)

MIN_PART_SIZE = 5 * 1024 * 1024
MAX_PART_SIZE = 5 * 1024**3
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


class UploadFailed(OSError):
    """A multipart upload cannot go on (too many parts, or an earlier part failed)."""


class ParallelMultipartUpload:
    """A write-only file object that uploads ``s3://bucket/key`` in concurrent parts."""

    def __init__(
        self,
        fs: Any,
        bucket: str,
        key: str,
        *,
        part_size: int,
        max_concurrency: int,
        attempts: int,
        where: str,
    ) -> None:
        self._fs = fs
        self._bucket = bucket
        self._key = key
        self._part_size = part_size
        self._max_concurrency = max_concurrency
        self._attempts = attempts
        self._where = where  # redacted URL, used in log lines only
        self._piece = Piece()  # the part being filled
        self._filling = part_size  # size of the part being filled (grows, see part_size_of)
        self._spare: list[bytearray] = []  # buffers of finished parts, reused for the next ones
        self._upload_id: str | None = None
        self._checksum_algorithm: str | None = None
        self._next_part = 1
        self._in_flight: dict[concurrent.futures.Future[dict[str, Any]], bytearray] = {}
        self._tasks: set[asyncio.Task[Any]] = set()  # running parts (loop thread only)
        self._parts: list[dict[str, Any]] = []
        self._failure: BaseException | None = None
        self.closed = False

    # -- the file interface FsspecWriter uses -----------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Buffer ``data``; every full part starts uploading (waiting if too many are running)."""
        if self.closed:
            raise ValueError("write to a closed upload")
        self._raise_failure()
        view = memoryview(data).cast("B")
        written = len(view)
        while view:
            view = self._piece.fill(view, self._filling)
            if self._piece.filled == self._filling:
                self._ship()
        return written

    def flush(self) -> None:
        """Nothing to do: a part is sent as soon as it is full, and the rest at ``close``."""

    def close(self) -> None:
        """Upload what is left and assemble the object; on any failure abort, then raise."""
        if self.closed:
            return
        self.closed = True
        try:
            if self._upload_id is None:
                self._run(self._put_object, self._piece.data())
                return
            if self._piece.filled:
                self._ship()
            self._drain(concurrent.futures.ALL_COMPLETED)
            self._raise_failure()
            self._run(self._complete)
        except BaseException:
            self._abort()
            raise
        finally:
            self._release_buffers()
            self._fs.invalidate_cache(f"{self._bucket}/{self._key}")

    def discard(self) -> None:
        """Give up: stop the parts still running and abort the multipart upload."""
        self.closed = True
        self._abort()
        self._release_buffers()

    # -- caller-side helpers ----------------------------------------------------------------
    def _ship(self) -> None:
        """Start uploading the buffer as the next part, keeping at most max_concurrency running."""
        if self._next_part > MAX_PARTS:
            raise UploadFailed(f"more than {MAX_PARTS} parts (the object is over S3's limit)")
        if self._upload_id is None:
            self._upload_id = self._run(self._create)
        while len(self._in_flight) >= self._max_concurrency:
            self._drain(concurrent.futures.FIRST_COMPLETED)
            self._raise_failure()
        piece = self._piece
        number = self._next_part
        self._next_part += 1
        filling = part_size_of(self._next_part, self._part_size)
        if filling != self._filling:
            self._filling = filling
            self._spare.clear()  # buffers of the old size: the next parts are bigger
        self._piece = Piece(self._spare.pop() if self._spare else None)
        body = piece.data()
        checksum = self._part_checksum(body)
        future = asyncio.run_coroutine_threadsafe(
            self._upload_part(number, body, checksum), self._fs.loop
        )
        self._in_flight[future] = piece.buffer

    def _part_checksum(self, body: memoryview) -> dict[str, str]:
        """The part's checksum as a request parameter, computed here rather than on the loop."""
        if self._checksum_algorithm is None:
            return {}
        checksum = Checksum(self._checksum_algorithm.lower())
        checksum.update(body)
        value = int(checksum.hexdigest(), 16).to_bytes(4, "big")
        return {f"Checksum{self._checksum_algorithm}": base64.b64encode(value).decode()}

    def _drain(self, return_when: str) -> None:
        """Wait for running parts; keep each result, remember the first failure."""
        if not self._in_flight:
            return
        done, _ = concurrent.futures.wait(list(self._in_flight), return_when=return_when)
        for future in done:
            buffer = self._in_flight.pop(future)
            if future.cancelled():
                continue
            failure = future.exception()
            if failure is not None:
                if self._failure is None:
                    self._failure = failure
                continue
            self._parts.append(future.result())
            if len(buffer) == self._filling:
                self._spare.append(buffer)

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _release_buffers(self) -> None:
        self._piece = Piece()
        self._spare.clear()

    def _abort(self) -> None:
        """Stop running parts, then abort the upload (best effort; a failure is logged)."""
        upload_id, self._upload_id = self._upload_id, None
        try:
            self._run(self._cancel_parts_and_abort, upload_id)
        except Exception as exc:
            logger.warning(
                "could not abort the multipart upload of %s (%s); a bucket lifecycle rule "
                "for incomplete multipart uploads removes its parts",
                self._where,
                type(exc).__name__,
            )
        finally:
            self._in_flight.clear()

    def _run(self, factory: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        return sync(self._fs.loop, factory, *args)

    # -- requests (run on the filesystem's event loop) ---------------------------------------
    async def _client(self) -> Any:
        return _hook(await self._fs.set_session())

    async def _retrying(self, operation: str, method: str, **kwargs: Any) -> Any:
        client = await self._client()
        return await call_with_retries(
            operation, self._attempts, client_call(client, method, **kwargs), where=self._where
        )

    async def _put_object(self, body: memoryview) -> None:
        await self._retrying(
            "put", "put_object", Bucket=self._bucket, Key=self._key, Body=BufferBody(body)
        )

    async def _create(self) -> str:
        client = await self._client()
        extra: dict[str, Any] = {}
        # As boto3's upload_file does: with flexible checksums on, S3 checks every part's checksum.
        # CRC32C when it is hardware-accelerated here (it is then nearly free), else CRC32.
        if getattr(client.meta.config, "request_checksum_calculation", None) == "when_supported":
            self._checksum_algorithm = "CRC32C" if "crc32c" in available_algorithms() else "CRC32"
            extra["ChecksumAlgorithm"] = self._checksum_algorithm
        response = await self._retrying(
            "create multipart upload",
            "create_multipart_upload",
            Bucket=self._bucket,
            Key=self._key,
            **extra,
        )
        return str(response["UploadId"])

    async def _upload_part(
        self, number: int, body: memoryview, checksum: dict[str, str]
    ) -> dict[str, Any]:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            response = await self._retrying(
                f"upload part {number}",
                "upload_part",
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=BufferBody(body),
                **checksum,
            )
        finally:
            self._tasks.discard(task)
        return {"PartNumber": number, "ETag": response["ETag"], **checksum}

    async def _complete(self) -> None:
        parts = sorted(self._parts, key=lambda p: int(p["PartNumber"]))
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

    async def _cancel_parts_and_abort(self, upload_id: str | None) -> None:
        # Parts submitted from the caller's thread started before this coroutine (the loop runs
        # callbacks in order), so every one of them is in _tasks or already finished.
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if upload_id is None:
            return
        await self._retrying(
            "abort multipart upload",
            "abort_multipart_upload",
            Bucket=self._bucket,
            Key=self._key,
            UploadId=upload_id,
        )
