"""S3 backend: pointer commits by conditional PutObject, everything else through s3fs.

A pointer is created with ``If-None-Match: *`` and replaced with ``If-Match: <ETag>``; S3 answers
412 when the precondition fails, which becomes :class:`CommitConflict` and sends the core's
compare-and-swap loop back to re-read. Pointer calls go to the client s3fs wraps, not through
s3fs's error translation, so the S3 error code is kept. Large files stream as multipart uploads
(s3fs), one part of ``part_size`` bytes at a time; a failed upload is aborted.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from fsspec.asyn import sync

from commitpoint.errors import CommitConflict, StorageError
from commitpoint.layout import safe_relpath
from commitpoint.storage.base import FsspecStorage
from commitpoint.storage.protocol import PointerState

logger = logging.getLogger(__name__)

DEFAULT_PART_SIZE = 64 * 1024 * 1024
_TRANSIENT_CODES = {
    "SlowDown",
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeout",
    "503",
    "500",
}
_CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}
_CAUSES = {
    "NoSuchBucket": "the bucket does not exist",
    "AccessDenied": "access denied",
    "InvalidAccessKeyId": "the access key is not valid (bad credentials)",
    "SignatureDoesNotMatch": "the secret key does not match (bad credentials)",
    "ExpiredToken": "the session token has expired",
}


def _error_code(exc: BaseException) -> tuple[str | None, int | None]:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None, None
    code = response.get("Error", {}).get("Code")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code, status


class S3Backend(FsspecStorage):
    """Checkpoints under ``s3://bucket/prefix``.

    Options consumed here: ``part_size`` (bytes per multipart part, default 64 MiB),
    ``retries`` (attempts for pointer operations and for s3fs's data transfers, default 5).
    Everything else goes to
    :class:`s3fs.S3FileSystem` (``endpoint_url``, ``key``, ``secret``, ``token``, ``profile``,
    ``client_kwargs``, ...); the usual AWS environment variables work as with s3fs.
    """

    def __init__(
        self,
        url: str,
        *,
        part_size: int | str = DEFAULT_PART_SIZE,
        retries: int | str = 5,
        **storage_options: Any,
    ) -> None:
        import s3fs

        self._part_size = int(part_size)
        self._retries = max(1, int(retries))
        fs = s3fs.S3FileSystem(**storage_options)
        fs.retries = self._retries  # s3fs's own retry count for data transfers
        path = url.split("://", 1)[1] if "://" in url else url
        super().__init__(
            "s3://" + path.strip("/"),
            fs,
            path.strip("/"),
            part_size=self._part_size,
            retries=self._retries,
            **storage_options,
        )

    def __repr__(self) -> str:
        return f"S3Backend({self.url!r})"

    # -- raw client calls -------------------------------------------------------------------
    def _bucket_key(self, name: str) -> tuple[str, str]:
        bucket, _, key = self.full_path(safe_relpath(name)).partition("/")
        return bucket, key

    def _raw(self, method: str, **kwargs: Any) -> Any:
        """Call the S3 client directly (keeping its error codes), retrying transient failures."""
        fs: Any = self.fs

        async def call() -> Any:
            await fs.set_session()
            return await getattr(fs.s3, method)(**kwargs)

        for attempt in range(self._retries):
            try:
                return sync(fs.loop, call)
            except Exception as exc:
                code, status = _error_code(exc)
                transient = (
                    code in _TRANSIENT_CODES
                    or (status is not None and status >= 500)
                    or (code is None and isinstance(exc, OSError | TimeoutError))
                    or type(exc).__name__
                    in {
                        "EndpointConnectionError",
                        "ConnectionClosedError",
                        "ReadTimeoutError",
                        "ConnectTimeoutError",
                        "ServerDisconnectedError",
                        "ClientOSError",
                    }
                )
                if not transient or attempt == self._retries - 1:
                    raise
                delay = min(2.0, 0.05 * 2**attempt) * (0.5 + random.random())
                logger.warning(
                    "S3 %s failed (%s); retrying in %.2f s",
                    method,
                    code or type(exc).__name__,
                    delay,
                )
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _translate_error(self, operation: str, relpath: str, exc: BaseException) -> Exception:
        code, _ = _error_code(exc)
        if code is None and isinstance(exc.__cause__ or exc.__context__, Exception):
            code, _ = _error_code(exc.__cause__ or exc.__context__)  # type: ignore[arg-type]
        where = self.url_for(relpath) if relpath else self.url
        if code in _CAUSES:
            return StorageError(operation, where, f"{_CAUSES[code]} ({code})")
        if isinstance(exc, PermissionError):
            return StorageError(operation, where, "access denied or bad credentials")
        if isinstance(exc, FileNotFoundError) and "bucket" in str(exc).lower():
            return StorageError(operation, where, "the bucket does not exist (NoSuchBucket)")
        return super()._translate_error(operation, relpath, exc)

    # -- pointers ---------------------------------------------------------------------------
    def read_pointer(self, name: str) -> PointerState:
        bucket, key = self._bucket_key(name)
        try:
            response = self._raw("get_object", Bucket=bucket, Key=key)
            body = response["Body"]

            async def read_all() -> bytes:
                async with body as stream:
                    return bytes(await stream.read())

            data = sync(self.fs.loop, read_all)
        except Exception as exc:
            if _error_code(exc)[0] in {"NoSuchKey", "404"}:
                return PointerState(None, None)
            raise self._translate_error("read pointer", name, exc) from exc
        return PointerState(self._decode_pointer(name, data), str(response["ETag"]))

    def write_pointer_if(self, name: str, value: int, token: str | None) -> str:
        bucket, key = self._bucket_key(name)
        condition = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token}
        try:
            response = self._raw(
                "put_object",
                Bucket=bucket,
                Key=key,
                Body=self._encode_pointer(value),
                ContentType="text/plain",
                **condition,
            )
        except Exception as exc:
            code, status = _error_code(exc)
            if code in _CONFLICT_CODES or status in (409, 412):
                raise CommitConflict(self.url_for(name), code or str(status)) from exc
            raise self._translate_error("commit pointer", name, exc) from exc
        return str(response["ETag"])

    # -- streaming writes -------------------------------------------------------------------
    def _open_raw_write(self, full: str) -> Any:
        return self.fs.open(full, "wb", block_size=self._part_size)

    def _abort_raw_write(self, raw: Any, relpath: str) -> None:
        # s3fs's discard aborts the multipart upload, so no parts are left behind.
        raw.discard()
        raw.closed = True
