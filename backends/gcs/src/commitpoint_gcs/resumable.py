"""Streaming uploads to GCS: the writer behind :meth:`GCSBackend.open_write`.

An :class:`~commitpoint.storage.upload.session.UploadSession` whose pieces are resumable-upload
chunks; this module supplies only GCS's requests. A file smaller than one chunk is a single
multipart upload. A larger one is a resumable upload: each full chunk of ``chunk_size`` bytes is
sent on the filesystem's event loop while the caller fills the next one (chunks of one upload must
go in order, so one is in flight at a time and an open file holds at most two chunks). gcsfs's
request layer retries 408/429/5xx answers and dropped connections with backoff.

When the upload finishes, GCS answers with the object's metadata. The size it reports must equal
the bytes sent, and when the writer's checksum is CRC32C (see :mod:`commitpoint.core.checksum`), the
``crc32c`` GCS computed must equal it; otherwise the object is deleted and
:class:`ChecksumMismatch` is raised, so a corrupted upload never reaches a manifest.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Awaitable
from typing import Any
from urllib.parse import quote

from commitpoint.errors import StorageError
from commitpoint.storage.upload import BufferBody, UploadSession

logger = logging.getLogger(__name__)

CHUNK_ALIGNMENT = 256 * 1024  # GCS needs every chunk but the last to be a multiple of this
_BOUNDARY = "==commitpoint=="


class ChecksumMismatch(StorageError):
    """GCS stored something other than what was written (its crc32c or size differs)."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__("write", path, f"upload corrupted in transit: {detail}; object deleted")
        self.detail = detail


def crc32c_to_base64(value: int) -> str:
    """A CRC32C as GCS writes it in object metadata: base64 of the 4 big-endian bytes."""
    return base64.b64encode((value & 0xFFFFFFFF).to_bytes(4, "big")).decode()


def crc32c_from_base64(text: str) -> int:
    """The CRC32C value of GCS's ``crc32c`` metadata field."""
    raw = base64.b64decode(text, validate=True)
    if len(raw) != 4:
        raise ValueError(f"a crc32c is 4 bytes, got {len(raw)}")
    return int.from_bytes(raw, "big")


def check_stored(
    where: str, metadata: dict[str, Any], size: int, expected_crc32c: int | None
) -> None:
    """Compare GCS's account of a finished upload with what was sent; raise on a difference.

    ``expected_crc32c`` is None when the writer's checksum is not CRC32C (nothing to compare).
    """
    stored_size = metadata.get("size")
    if stored_size is not None and int(stored_size) != size:
        raise ChecksumMismatch(where, f"GCS stored {stored_size} bytes, {size} were written")
    if expected_crc32c is None:
        return
    stored = metadata.get("crc32c")
    if not stored:  # e.g. an emulator or proxy that leaves it out: nothing to compare
        logger.debug("no crc32c in the upload response for %s", where)
        return
    if crc32c_from_base64(str(stored)) != expected_crc32c & 0xFFFFFFFF:
        raise ChecksumMismatch(
            where,
            f"GCS crc32c {stored} != written crc32c {crc32c_to_base64(expected_crc32c)} "
            f"({expected_crc32c & 0xFFFFFFFF:08x})",
        )


def multipart_body(
    key: str, content_type: str, data: bytes | bytearray | memoryview
) -> tuple[bytes, str]:
    """The body and Content-Type of a one-request (``uploadType=multipart``) upload."""
    metadata = json.dumps({"name": key, "contentType": content_type})
    body = b"".join(
        (
            f"--{_BOUNDARY}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
            f"{metadata}\r\n--{_BOUNDARY}\r\nContent-Type: {content_type}\r\n\r\n".encode(),
            data,
            f"\r\n--{_BOUNDARY}--".encode(),
        )
    )
    return body, f'multipart/related; boundary="{_BOUNDARY}"'


class ResumableUpload(UploadSession):
    """A write-only file object that uploads ``gs://bucket/key`` chunk by chunk."""

    content_type = "application/octet-stream"
    piece_name = "chunks"
    sends_empty_last_piece = True  # the last chunk carries the total size, even when empty

    def __init__(
        self, fs: Any, path: str, *, chunk_size: int, where: str, deadline: float | None = None
    ) -> None:
        # Chunks of one upload must go in order: one in flight while the next one fills.
        super().__init__(
            fs, path, piece_size=chunk_size, max_in_flight=1, where=where, deadline=deadline
        )
        self._location: str | None = None
        self._offset = 0  # bytes GCS has acknowledged
        self._expected_crc32c: int | None = None
        self.metadata: dict[str, Any] | None = None  # GCS's object resource, after close

    def expect_crc32c(self, value: int) -> None:
        """Have ``close`` compare this CRC32C of all written bytes with the one GCS computed."""
        self._expected_crc32c = value

    def close(self) -> None:
        """Send what is left, finish the upload and check what GCS stored; on failure, abort."""
        if self.closed:
            return
        super().close()
        assert self.metadata is not None
        try:
            check_stored(self._where, self.metadata, self._size, self._expected_crc32c)
        except ChecksumMismatch:
            self._delete_generation(self.metadata.get("generation"))
            raise

    def _delete_generation(self, generation: Any) -> None:
        if generation is None:
            return
        try:
            self._run(
                self._fs._call,
                "DELETE",
                "b/{}/o/{}",
                self._bucket,
                self._key,
                ifGenerationMatch=str(generation),
            )
        except Exception as exc:
            logger.warning(
                "could not delete the corrupted upload %s (%s)", self._where, type(exc).__name__
            )

    # -- requests (run on the filesystem's event loop) ---------------------------------------
    async def _send_whole(self, body: memoryview) -> None:
        data, content_type = multipart_body(self._key, self.content_type, body)
        result = await self._fs._call(
            "POST",
            f"{self._fs._location}/upload/storage/v1/b/{quote(self._bucket)}/o",
            uploadType="multipart",
            headers={"Content-Type": content_type},
            data=data,
            json_out=True,
        )
        self.metadata = dict(result)

    async def _start(self) -> None:
        headers, _ = await self._fs._call(
            "POST",
            f"{self._fs._location}/upload/storage/v1/b/{quote(self._bucket)}/o",
            uploadType="resumable",
            json={"name": self._key, "contentType": self.content_type},
            headers={"X-Upload-Content-Type": self.content_type},
        )
        location = headers["Location"]
        self._location = str(location[0] if isinstance(location, list) else location)

    def _send(self, number: int, body: memoryview, final: bool) -> Awaitable[None]:
        return self._send_chunk(body, final)

    async def _finish(self) -> None:
        if self.metadata is None:
            raise StorageError("write", self._where, "GCS did not confirm the finished upload")

    async def _cancel(self) -> None:
        location, self._location = self._location, None
        if location is None:
            return
        try:
            # GCS answers a DELETE of a session URI with 499: the upload is cancelled.
            await self._fs._call("DELETE", location.replace("&ifGenerationMatch=0", ""))
        except Exception as exc:
            logger.debug("cancelling the upload session of %s: %s", self._where, type(exc).__name__)

    async def _send_chunk(self, view: memoryview, final: bool) -> None:
        """Send one chunk; resend whatever GCS did not keep; on the last, keep the metadata."""
        stalls = 0
        while True:
            start = self._offset
            total = str(start + len(view)) if final else "*"
            span = f"{start}-{start + len(view) - 1}" if len(view) else "*"
            assert self._location is not None
            range_header = f"bytes {span}/{total}"
            status, headers, _, contents = await self._fs._request(
                "POST",
                self._location,
                headers={"Content-Range": range_header, "Content-Type": self.content_type},
                data=BufferBody(view) if len(view) else None,
            )
            if status in (200, 201):
                if not final:
                    raise StorageError("write", self._where, "GCS ended the upload early")
                self._offset = start + len(view)
                self.metadata = dict(json.loads(contents))
                return
            # 308 Resume Incomplete: Range says how much GCS holds; send the rest.
            kept = _kept_through(headers)
            persisted = start if kept is None else kept + 1
            if persisted < start or persisted > start + len(view):
                raise StorageError(
                    "write", self._where, f"GCS reports {persisted} bytes held, expected {start}+"
                )
            stalls = stalls + 1 if persisted == start and len(view) else 0
            if stalls > 3:
                raise StorageError("write", self._where, "GCS keeps refusing a chunk")
            view = view[persisted - start :]
            self._offset = persisted
            if not view and not final:
                return


def _kept_through(headers: Any) -> int | None:
    """The last byte offset GCS says it holds (``Range: bytes=0-N``), or None."""
    value = headers.get("Range") if headers is not None else None
    if not value:
        return None
    return int(str(value).rsplit("-", 1)[1])
