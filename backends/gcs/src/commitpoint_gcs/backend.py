"""GCS backend: pointer commits by generation preconditions, uploads checked against GCS's crc32c.

A pointer is created with ``ifGenerationMatch=0`` and replaced with
``ifGenerationMatch=<generation read a moment ago>``; GCS answers 412 when the precondition
fails, which becomes :class:`CommitConflict`. The upload is a multipart upload issued through
gcsfs's own authenticated session: real GCS honours preconditions on every upload type, the
fake-gcs-server emulator only on multipart uploads. Large files stream as resumable uploads in
chunks of ``chunk_size`` (:mod:`commitpoint_gcs.resumable`), the next chunk filling while the last
one is sent; when an upload finishes, the size and crc32c GCS reports are compared with what was
written. gcsfs retries transient (408/429/5xx) failures with backoff.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote

from fsspec.asyn import sync

from commitpoint.core.layout import safe_relpath
from commitpoint.errors import CommitConflict, CommitpointError, InvalidArgument, StorageError
from commitpoint.storage.base import FsspecStorage, FsspecWriter
from commitpoint.storage.protocol import PointerState
from commitpoint_gcs.resumable import CHUNK_ALIGNMENT, ResumableUpload, multipart_body

DEFAULT_CHUNK_SIZE = 100 * 1024 * 1024


class GCSPermissionError(StorageError, PermissionError):
    """GCS refused the request: bad or expired credentials (401) or no permission (403).

    Also a :class:`PermissionError`, so ``except PermissionError`` catches it on any backend that
    raises one; ``status`` is the HTTP status.
    """

    def __init__(
        self, operation: str, path: str, cause: BaseException | str, *, status: int | None = None
    ) -> None:
        super().__init__(operation, path, cause)
        self.status = status

    def __reduce__(self) -> tuple[Any, ...]:
        args = (self.operation, self.path, str(self.cause), self.status)
        return (_rebuild_permission_error, args)


def _rebuild_permission_error(
    operation: str, path: str, cause: str, status: int | None
) -> GCSPermissionError:
    return GCSPermissionError(operation, path, cause, status=status)


def auth_status(exc: BaseException) -> int | None:
    """401 or 403 when ``exc`` is gcsfs's way of reporting that HTTP status, else None."""
    code = getattr(exc, "code", None)
    if code in (401, 403, "401", "403"):
        return int(code)
    text = str(exc)
    if isinstance(exc, OSError) and text.startswith("Forbidden"):
        return 403  # gcsfs raises OSError("Forbidden: <path>\n<message>") for 403
    if "Invalid Credentials" in text or text.startswith("Unauthorized"):
        return 401
    return None


class _CheckedWriter(FsspecWriter):
    """Hands the writer's running CRC32C to the upload, which compares it with GCS's own."""

    def close(self) -> None:
        checksum = self._checksum
        if not self.closed and checksum.algorithm == "crc32c":
            raw = self._raw
            if isinstance(raw, ResumableUpload):
                raw.expect_crc32c(int(checksum.hexdigest(), 16))
        super().close()


class GCSBackend(FsspecStorage):
    """Checkpoints under ``gs://bucket/prefix``.

    Options consumed here: ``chunk_size`` (bytes per resumable-upload chunk, a multiple of
    256 KiB, default 100 MiB as in Google's own client; an open file holds at most two chunks).
    Everything else goes to :class:`gcsfs.GCSFileSystem` (``project``, ``token``,
    ``endpoint_url``, ...). With an emulator, set ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT`` to
    ``false`` (gcsfs otherwise probes it over gRPC for a minute); this module does so by default
    when an ``endpoint_url`` is given.
    """

    writer_class = _CheckedWriter

    def __init__(
        self, url: str, *, chunk_size: int | str = DEFAULT_CHUNK_SIZE, **storage_options: Any
    ) -> None:
        if storage_options.get("endpoint_url"):
            os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        import gcsfs

        try:
            self._chunk_size = int(chunk_size)
        except (TypeError, ValueError):
            raise InvalidArgument(
                f"GCS option chunk_size must be an integer: {chunk_size!r}"
            ) from None
        if self._chunk_size <= 0 or self._chunk_size % CHUNK_ALIGNMENT:
            raise InvalidArgument(
                f"GCS option chunk_size must be a positive multiple of 256 KiB, "
                f"got {self._chunk_size}"
            )
        fs_options = dict(storage_options)
        # Listings are always fresh: uploads bypass gcsfs, and other processes write the same root.
        fs_options.setdefault("use_listings_cache", False)
        fs = gcsfs.GCSFileSystem(**fs_options)
        path = url.split("://", 1)[1] if "://" in url else url
        super().__init__(
            "gs://" + path.strip("/"),
            fs,
            path.strip("/"),
            chunk_size=self._chunk_size,
            **storage_options,
        )

    def __repr__(self) -> str:
        return f"GCSBackend({self.url!r})"

    def _bucket_key(self, name: str) -> tuple[str, str]:
        bucket, _, key = self.full_path(safe_relpath(name)).partition("/")
        return bucket, key

    def _call(self, *args: Any, **kwargs: Any) -> Any:
        fs: Any = self.fs
        return sync(fs.loop, fs._call, *args, **kwargs)

    def _translate_error(self, operation: str, relpath: str, exc: BaseException) -> Exception:
        """Map gcsfs's errors to typed ones naming the object; 401/403 become GCSPermissionError."""
        if isinstance(exc, CommitpointError):
            return exc
        where = self.url_for(relpath) if relpath else self.url
        status = auth_status(exc)
        if status == 401:
            return GCSPermissionError(
                operation, where, "bad or expired credentials (401)", status=401
            )
        if status == 403:
            return GCSPermissionError(operation, where, "access denied (403)", status=403)
        if isinstance(exc, FileNotFoundError) and "bucket" in str(exc).lower():
            return StorageError(operation, where, "the bucket does not exist (404)")
        return super()._translate_error(operation, relpath, exc)

    # -- pointers ---------------------------------------------------------------------------
    def read_pointer(self, name: str) -> PointerState:
        bucket, key = self._bucket_key(name)
        for _ in range(8):  # the object may be replaced between the two requests: read again
            try:
                meta = self._call("GET", "b/{}/o/{}", bucket, key, json_out=True)
                _, data = self._call(
                    "GET", "b/{}/o/{}", bucket, key, alt="media", generation=meta["generation"]
                )
            except FileNotFoundError:
                if not self._bucket_exists(bucket):
                    raise self._translate_error(
                        "read pointer", name, FileNotFoundError(f"bucket {bucket}")
                    ) from None
                try:
                    self._call("GET", "b/{}/o/{}", bucket, key, json_out=True)
                except FileNotFoundError:
                    return PointerState(None, None)
                continue
            except Exception as exc:
                raise self._translate_error("read pointer", name, exc) from exc
            return PointerState(self._decode_pointer(name, bytes(data)), str(meta["generation"]))
        raise StorageError("read pointer", self.url_for(name), "kept changing while being read")

    def _bucket_exists(self, bucket: str) -> bool:
        try:
            self._call("GET", "b/{}", bucket, json_out=True)
        except FileNotFoundError:
            return False
        return True

    def write_pointer_if(self, name: str, value: int, token: str | None) -> str:
        bucket, key = self._bucket_key(name)
        body, content_type = multipart_body(key, "text/plain", self._encode_pointer(value))
        fs: Any = self.fs
        try:
            result = self._call(
                "POST",
                f"{fs._location}/upload/storage/v1/b/{quote(bucket)}/o",
                uploadType="multipart",
                ifGenerationMatch="0" if token is None else token,
                headers={"Content-Type": content_type},
                data=body,
                json_out=True,
            )
        except FileExistsError as exc:  # gcsfs's mapping of HTTP 412 Precondition Failed
            raise CommitConflict(self.url_for(name), "412 precondition failed") from exc
        except FileNotFoundError as exc:
            raise self._translate_error(
                "commit pointer", name, FileNotFoundError(f"bucket {bucket}")
            ) from exc
        except Exception as exc:
            raise self._translate_error("commit pointer", name, exc) from exc
        fs.invalidate_cache(self.full_path(name))
        return str(result["generation"])

    # -- streaming writes -------------------------------------------------------------------
    def _open_raw_write(self, full: str) -> Any:
        bucket, _, key = full.partition("/")
        return ResumableUpload(
            self.fs, bucket, key, chunk_size=self._chunk_size, where=f"gs://{full}"
        )

    def _abort_raw_write(self, raw: Any, relpath: str) -> None:
        raw.discard()
