"""S3 backend: pointer commits by conditional PutObject, large files by parallel multipart upload.

A pointer is created with ``If-None-Match: *`` and replaced with ``If-Match: <ETag>``; S3 answers
412 when the precondition fails, which becomes :class:`CommitConflict` and sends the core's
compare-and-swap loop back to re-read. Pointer calls and uploads go to the aiobotocore client s3fs
wraps, not through s3fs's error translation, so the S3 error code is kept. Large files stream as
multipart uploads with up to ``max_concurrency`` parts of ``part_size`` bytes in flight
(:mod:`commitpoint_s3.multipart`); a failed upload is aborted. Reads, listings and deletes go
through s3fs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from fsspec.asyn import sync

from commitpoint.core.layout import POINTER_LIMIT, safe_relpath
from commitpoint.core.retry import DeadlineExceeded, retry
from commitpoint.errors import (
    CommitConflict,
    CommitpointError,
    StorageNotFound,
    StoragePermissionError,
    map_errors,
    protect_loggers,
    register_secret,
)
from commitpoint.storage.base import FsspecStorage, check_small
from commitpoint.storage.protocol import PointerState
from commitpoint.storage.upload import bucket_key
from commitpoint_s3.multipart import ParallelMultipartUpload
from commitpoint_s3.options import (
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_PART_SIZE,
    S3Options,
)
from commitpoint_s3.retry import (
    AUTH_CODES,
    answered_transient,
    call_with_retries,
    client_call,
    error_code,
)

T = TypeVar("T")
_CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}
_MISSING_BUCKET = {"NoSuchBucket": "the bucket does not exist"}
__all__ = ["DEFAULT_MAX_CONCURRENCY", "DEFAULT_PART_SIZE", "S3Backend", "S3PermissionError"]


class S3PermissionError(StoragePermissionError):
    """S3 refused the request: bad or expired credentials, or no permission (HTTP 401/403).

    ``code`` is S3's error code (e.g. ``AccessDenied``), ``status`` the HTTP status.
    """

_SECRET_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_CHATTY_LOGGERS = ("botocore", "aiobotocore", "s3fs", "urllib3", "aiohttp")
"""Libraries whose DEBUG logs can show a request's signing headers (with the key id)."""


def _register_environment_secrets() -> None:
    """Credentials from the environment are hidden like those given as options, and the HTTP
    libraries' own log lines pass the same redaction."""
    import os

    for variable in _SECRET_VARIABLES:
        value = os.environ.get(variable)
        if value not in ("anon", "testing"):  # moto's placeholders are no secret
            register_secret(value)
    protect_loggers(_CHATTY_LOGGERS)


async def _close_body(body: Any) -> None:
    """Let go of a response body without reading it (an oversized pointer)."""
    body.close()


class S3Backend(FsspecStorage):
    """Checkpoints under ``s3://bucket/prefix``.

    Options consumed here (validated; see :class:`~commitpoint_s3.options.S3Options`):
    ``part_size`` (bytes of the first multipart parts, 5 MiB to 5 GiB, default 8 MiB; parts
    double in size after every 1,000), ``max_concurrency`` (parts uploaded at once per open file,
    default 10; an open file buffers at most ``part_size * (max_concurrency + 1)`` bytes while
    its parts are of the first size), ``retries`` (tries of every call, default 5),
    ``connect_timeout`` (default 5 s), ``read_timeout`` (default 60 s) and ``deadline`` (one
    whole operation with its retries, default 120 s, plus 1 s per MiB of body). Every other
    option must be an :class:`s3fs.S3FileSystem` keyword (``endpoint_url``, ``key``, ``secret``,
    ``token``, ``profile``, ``client_kwargs``, ``config_kwargs``, ...); the usual AWS environment
    variables work as with s3fs. An unknown option raises ``InvalidArgument``.
    """

    def __init__(self, url: str, **storage_options: Any) -> None:
        import s3fs

        _register_environment_secrets()
        self._options, fs_options = S3Options.parse(storage_options)
        self._policy = self._options.retry_policy
        fs_options["config_kwargs"] = self._options.botocore_config(
            fs_options.get("config_kwargs")
        )
        # Listings are always fresh: uploads bypass s3fs, and other processes write the same root.
        fs_options.setdefault("use_listings_cache", False)
        # A private filesystem: s3fs caches instances by their options, and this backend sets
        # the instance's retry count, which must not leak into other backends or users.
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **fs_options)
        # s3fs retries its own calls' dropped connections and timeouts (botocore does not).
        fs.retries = self._options.retries
        path = url.split("://", 1)[1] if "://" in url else url
        super().__init__("s3://" + path.strip("/"), fs, path.strip("/"), **storage_options)

    def __repr__(self) -> str:
        return f"S3Backend({self.url!r})"

    # -- raw client calls -------------------------------------------------------------------
    def _bucket_key(self, name: str) -> tuple[str, str]:
        return bucket_key(self.full_path(safe_relpath(name)))

    def _raw(self, method: str, **kwargs: Any) -> Any:
        """Call the S3 client directly (keeping its error codes), retrying transient failures
        within the deadline."""
        fs: Any = self.fs
        what = f"{method} s3://{kwargs.get('Bucket', '')}/{kwargs.get('Key', '')}"

        async def call() -> Any:
            client = await fs.set_session()
            request = client_call(client, method, **kwargs)
            return await call_with_retries(what, self._policy, request)

        return sync(fs.loop, call)

    def _fs_call(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """An s3fs call within the deadline; S3 answers s3fs does not retry (5xx) retried here."""
        deadline = self._options.timeouts.deadline
        started = time.monotonic()

        def attempt() -> T:
            left = deadline - (time.monotonic() - started)
            if left <= 0:
                raise DeadlineExceeded(getattr(call, "__name__", "call"), deadline, 0)
            return call(*args, timeout=left, **kwargs)

        return retry(attempt, self._policy, retry_on=answered_transient, what="S3 call")

    def _translate_error(self, operation: str, relpath: str, exc: BaseException) -> Exception:
        """Map S3's answer to a typed error naming the object; 401/403 become S3PermissionError."""
        code, status = error_code(exc)
        if code is None:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, Exception):
                code, status = error_code(cause)
        where = self.url_for(relpath) if relpath else self.url
        if code in AUTH_CODES or status in (401, 403):
            reason = AUTH_CODES.get(code or "", "access denied or bad credentials")
            return S3PermissionError(
                operation, where, f"{reason} ({code or status})", code=code, status=status
            )
        if code in _MISSING_BUCKET:
            return StorageNotFound(operation, where, f"{_MISSING_BUCKET[code]} ({code})")
        if isinstance(exc, PermissionError):
            return S3PermissionError(operation, where, "access denied or bad credentials")
        if isinstance(exc, FileNotFoundError) and "bucket" in str(exc).lower():
            return StorageNotFound(operation, where, "the bucket does not exist (NoSuchBucket)")
        return super()._translate_error(operation, relpath, exc)

    def _pointer_errors(self, name: str, exc: BaseException) -> BaseException:
        code, status = error_code(exc)
        if code in _CONFLICT_CODES or status in (409, 412):
            return CommitConflict(self.url_for(name), code or str(status))
        return self._translate_error("commit pointer", name, exc)

    # -- pointers ---------------------------------------------------------------------------
    def read_pointer(self, name: str) -> PointerState:
        bucket, key = self._bucket_key(name)
        try:
            response = self._raw("get_object", Bucket=bucket, Key=key)
            body = response["Body"]
            size = int(response.get("ContentLength") or 0)

            async def read_all() -> bytes:
                async with body as stream:
                    # Bounded: a pointer never needs more (the size is checked below).
                    return bytes(await stream.read(min(size, POINTER_LIMIT) + 1))

            if size > POINTER_LIMIT:
                sync(self.fs.loop, _close_body, body)
                check_small(self.url_for(name), size, POINTER_LIMIT)

            data = sync(self.fs.loop, read_all, timeout=self._options.timeouts.deadline)
        except CommitpointError:
            raise
        except Exception as exc:
            if error_code(exc)[0] in {"NoSuchKey", "404"}:
                return PointerState(None, None)
            raise self._translate_error("read pointer", name, exc) from exc
        check_small(self.url_for(name), len(data), POINTER_LIMIT)
        return PointerState(self._decode_pointer(name, data), str(response["ETag"]))

    def write_pointer_if(self, name: str, value: int, token: str | None) -> str:
        bucket, key = self._bucket_key(name)
        condition = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token}
        with map_errors(lambda exc: self._pointer_errors(name, exc)):
            response = self._raw(
                "put_object",
                Bucket=bucket,
                Key=key,
                Body=self._encode_pointer(value),
                ContentType="text/plain",
                **condition,
            )
        self.fs.invalidate_cache(self.full_path(name))
        return str(response["ETag"])

    # -- streaming writes -------------------------------------------------------------------
    def _open_raw_write(self, full: str) -> Any:
        return ParallelMultipartUpload(
            self.fs,
            full,
            part_size=self._options.part_size,
            max_concurrency=self._options.max_concurrency,
            policy=self._policy,
            where=f"s3://{full}",
        )

    def _abort_raw_write(self, raw: Any, relpath: str) -> None:
        # Stops the running parts and aborts the multipart upload, so no parts are left behind.
        raw.discard()
