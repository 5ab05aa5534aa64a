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

from typing import Any

from fsspec.asyn import sync

from commitpoint.core.layout import safe_relpath
from commitpoint.errors import CommitConflict, InvalidArgument, StorageError
from commitpoint.storage.base import FsspecStorage
from commitpoint.storage.protocol import PointerState
from commitpoint_s3.multipart import MAX_PART_SIZE, MIN_PART_SIZE, ParallelMultipartUpload
from commitpoint_s3.retry import AUTH_CODES, call_with_retries, client_call, error_code

DEFAULT_PART_SIZE = 8 * 1024 * 1024  # boto3's; parts double after every 1,000 (see multipart)
DEFAULT_MAX_CONCURRENCY = 10
_CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}
_MISSING_BUCKET = {"NoSuchBucket": "the bucket does not exist"}


class S3PermissionError(StorageError, PermissionError):
    """S3 refused the request: bad or expired credentials, or no permission (HTTP 401/403).

    Also a :class:`PermissionError`, so ``except PermissionError`` catches it on any backend that
    raises one; ``code`` is S3's error code (e.g. ``AccessDenied``), ``status`` the HTTP status.
    """

    def __init__(
        self,
        operation: str,
        path: str,
        cause: BaseException | str,
        *,
        code: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(operation, path, cause)
        self.code = code
        self.status = status

    def __reduce__(self) -> tuple[Any, ...]:
        state = {"code": self.code, "status": self.status}
        return (_rebuild_permission_error, (self.operation, self.path, str(self.cause)), state)


def _rebuild_permission_error(operation: str, path: str, cause: str) -> S3PermissionError:
    return S3PermissionError(operation, path, cause)


def _positive_int(name: str, value: int | str, low: int = 1, high: int | None = None) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"S3 option {name} must be an integer, got {value!r}") from None
    if number < low or (high is not None and number > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise InvalidArgument(f"S3 option {name} must be {bounds}, got {number}")
    return number


class S3Backend(FsspecStorage):
    """Checkpoints under ``s3://bucket/prefix``.

    Options consumed here: ``part_size`` (bytes of the first multipart parts, 5 MiB to 5 GiB,
    default 8 MiB; parts double in size after every 1,000), ``max_concurrency`` (parts uploaded
    at once per open file, default 10; an open file buffers at most ``part_size *
    (max_concurrency + 1)`` bytes while its parts are of the first size), ``retries`` (attempts
    for every request commitpoint makes, and for s3fs's own reads and listings, default 5).
    Everything else goes to :class:`s3fs.S3FileSystem` (``endpoint_url``, ``key``, ``secret``,
    ``token``, ``profile``, ``client_kwargs``, ``config_kwargs``, ...); the usual AWS environment
    variables work as with s3fs.
    """

    def __init__(
        self,
        url: str,
        *,
        part_size: int | str = DEFAULT_PART_SIZE,
        max_concurrency: int | str = DEFAULT_MAX_CONCURRENCY,
        retries: int | str = 5,
        **storage_options: Any,
    ) -> None:
        import s3fs

        self._part_size = _positive_int("part_size", part_size, MIN_PART_SIZE, MAX_PART_SIZE)
        self._max_concurrency = _positive_int("max_concurrency", max_concurrency)
        self._retries = _positive_int("retries", retries)
        fs_options = dict(storage_options)
        config = dict(fs_options.get("config_kwargs") or {})
        # Enough pooled connections for every part in flight plus pointer and listing calls.
        config.setdefault("max_pool_connections", max(10, self._max_concurrency + 2))
        # botocore's own default; s3fs's 15 s can expire while S3 assembles a multi-GiB object.
        config.setdefault("read_timeout", 60)
        fs_options["config_kwargs"] = config
        # Listings are always fresh: uploads bypass s3fs, and other processes write the same root.
        fs_options.setdefault("use_listings_cache", False)
        # A private filesystem: s3fs caches instances by their options, and this backend sets
        # the instance's retry count, which must not leak into other backends or users.
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **fs_options)
        fs.retries = self._retries
        path = url.split("://", 1)[1] if "://" in url else url
        super().__init__(
            "s3://" + path.strip("/"),
            fs,
            path.strip("/"),
            part_size=self._part_size,
            max_concurrency=self._max_concurrency,
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
        where = f"s3://{kwargs.get('Bucket', '')}/{kwargs.get('Key', '')}"

        async def call() -> Any:
            client = await fs.set_session()
            return await call_with_retries(
                method, self._retries, client_call(client, method, **kwargs), where=where
            )

        return sync(fs.loop, call)

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
            return StorageError(operation, where, f"{_MISSING_BUCKET[code]} ({code})")
        if isinstance(exc, PermissionError):
            return S3PermissionError(operation, where, "access denied or bad credentials")
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
            if error_code(exc)[0] in {"NoSuchKey", "404"}:
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
            code, status = error_code(exc)
            if code in _CONFLICT_CODES or status in (409, 412):
                raise CommitConflict(self.url_for(name), code or str(status)) from exc
            raise self._translate_error("commit pointer", name, exc) from exc
        self.fs.invalidate_cache(self.full_path(name))
        return str(response["ETag"])

    # -- streaming writes -------------------------------------------------------------------
    def _open_raw_write(self, full: str) -> Any:
        bucket, _, key = full.partition("/")
        return ParallelMultipartUpload(
            self.fs,
            bucket,
            key,
            part_size=self._part_size,
            max_concurrency=self._max_concurrency,
            attempts=self._retries,
            where=f"s3://{full}",
        )

    def _abort_raw_write(self, raw: Any, relpath: str) -> None:
        # Stops the running parts and aborts the multipart upload, so no parts are left behind.
        raw.discard()
