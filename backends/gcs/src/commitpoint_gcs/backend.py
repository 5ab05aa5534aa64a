"""GCS backend: pointer commits by generation preconditions, uploads checked against GCS's crc32c.

A pointer is created with ``ifGenerationMatch=0`` and replaced with
``ifGenerationMatch=<generation read a moment ago>``; GCS answers 412 when the precondition
fails, which becomes :class:`CommitConflict`. The upload is a multipart upload issued through
gcsfs's own authenticated session: real GCS honours preconditions on every upload type, the
fake-gcs-server emulator only on multipart uploads. Large files stream as resumable uploads in
chunks of ``chunk_size`` (:mod:`commitpoint_gcs.resumable`), the next chunk filling while the last
one is sent; when an upload finishes, the size and crc32c GCS reports are compared with what was
written. gcsfs retries transient (408/429/5xx) failures with backoff: the one retry layer
(commitpoint adds none). Every call commitpoint makes is bounded by ``deadline``, every attempt by
``connect_timeout`` / ``read_timeout``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

from fsspec.asyn import sync

from commitpoint.core.layout import POINTER_LIMIT, safe_relpath
from commitpoint.errors import (
    CommitConflict,
    CommitpointError,
    InvalidArgument,
    StorageError,
    StorageNotFound,
    StoragePermissionError,
    map_errors,
)
from commitpoint.storage.base import FsspecStorage, FsspecWriter, check_small
from commitpoint.storage.options import Timeouts, accepted_names, integer, refuse_unknown
from commitpoint.storage.protocol import PointerState
from commitpoint.storage.upload import bucket_key
from commitpoint_gcs.resumable import CHUNK_ALIGNMENT, ResumableUpload, multipart_body

T = TypeVar("T")
DEFAULT_CHUNK_SIZE = 100 * 1024 * 1024
OWN_OPTIONS = ("chunk_size", *Timeouts.OPTION_NAMES)


class GCSPermissionError(StoragePermissionError):
    """GCS refused the request: bad or expired credentials (401) or no permission (403).

    ``status`` is the HTTP status.
    """


@dataclass(frozen=True)
class GCSOptions:
    """What the GCS backend itself reads from the storage options (see :class:`GCSBackend`)."""

    chunk_size: int = DEFAULT_CHUNK_SIZE
    timeouts: Timeouts = field(default_factory=Timeouts)

    @classmethod
    def parse(cls, options: dict[str, Any]) -> tuple[GCSOptions, dict[str, Any]]:
        """The backend's options and the rest (for gcsfs); refuses unknown names."""
        import gcsfs

        rest = dict(options)
        chunk_size = integer("GCS", "chunk_size", rest.pop("chunk_size", DEFAULT_CHUNK_SIZE))
        if chunk_size % CHUNK_ALIGNMENT:
            raise InvalidArgument(
                f"GCS option chunk_size must be a positive multiple of 256 KiB, got {chunk_size}"
            )
        parsed = cls(chunk_size, Timeouts.parse("GCS", rest))
        known = accepted_names(gcsfs.GCSFileSystem)
        refuse_unknown("GCS", rest, known, OWN_OPTIONS)
        return parsed, rest

    def requests_timeout(self) -> Any:
        """gcsfs's per-request timeout: the connect and read timeouts (aiohttp's)."""
        import aiohttp

        return aiohttp.ClientTimeout(
            sock_connect=self.timeouts.connect, sock_read=self.timeouts.read
        )


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

    Options consumed here (validated): ``chunk_size`` (bytes per resumable-upload chunk, a
    multiple of 256 KiB, default 100 MiB as in Google's own client; an open file holds at most two
    chunks), ``connect_timeout`` (default 5 s), ``read_timeout`` (default 60 s) and ``deadline``
    (one whole operation with gcsfs's retries, default 120 s, plus 1 s per MiB of body). Every
    other option must be a :class:`gcsfs.GCSFileSystem` keyword (``project``, ``token``,
    ``endpoint_url``, ``requests_timeout`` to replace the two timeouts, ...); an unknown option
    raises ``InvalidArgument``. With an emulator, set ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT`` to
    ``false`` (gcsfs otherwise probes it over gRPC for a minute); this module does so by default
    when an ``endpoint_url`` is given.
    """

    writer_class = _CheckedWriter

    def __init__(self, url: str, **storage_options: Any) -> None:
        if storage_options.get("endpoint_url"):
            os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        import gcsfs

        self._options, fs_options = GCSOptions.parse(storage_options)
        fs_options.setdefault("requests_timeout", self._options.requests_timeout())
        # Listings are always fresh: uploads bypass gcsfs, and other processes write the same root.
        fs_options.setdefault("use_listings_cache", False)
        fs = gcsfs.GCSFileSystem(**fs_options)
        path = url.split("://", 1)[1] if "://" in url else url
        super().__init__("gs://" + path.strip("/"), fs, path.strip("/"), **storage_options)

    def __repr__(self) -> str:
        return f"GCSBackend({self.url!r})"

    def _bucket_key(self, name: str) -> tuple[str, str]:
        return bucket_key(self.full_path(safe_relpath(name)))

    def _call(self, *args: Any, **kwargs: Any) -> Any:
        """One gcsfs request (with gcsfs's retries), within the deadline."""
        fs: Any = self.fs
        return sync(fs.loop, fs._call, *args, timeout=self._options.timeouts.deadline, **kwargs)

    def _fs_call(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return call(*args, timeout=self._options.timeouts.deadline, **kwargs)

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
            return StorageNotFound(operation, where, "the bucket does not exist (404)")
        return super()._translate_error(operation, relpath, exc)

    # -- pointers ---------------------------------------------------------------------------
    def read_pointer(self, name: str) -> PointerState:
        bucket, key = self._bucket_key(name)
        with self._errors("read pointer", name):
            for _ in range(8):  # the object may be replaced between the two requests: read again
                try:
                    meta = self._call("GET", "b/{}/o/{}", bucket, key, json_out=True)
                    check_small(self.url_for(name), int(meta.get("size") or 0), POINTER_LIMIT)
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
                check_small(self.url_for(name), len(data), POINTER_LIMIT)
                value = self._decode_pointer(name, bytes(data))
                return PointerState(value, str(meta["generation"]))
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
        with map_errors(lambda exc: self._pointer_error(name, bucket, exc)):
            result = self._call(
                "POST",
                f"{fs._location}/upload/storage/v1/b/{quote(bucket)}/o",
                uploadType="multipart",
                ifGenerationMatch="0" if token is None else token,
                headers={"Content-Type": content_type},
                data=body,
                json_out=True,
            )
        fs.invalidate_cache(self.full_path(name))
        return str(result["generation"])

    def _pointer_error(self, name: str, bucket: str, exc: BaseException) -> BaseException:
        if isinstance(exc, FileExistsError):  # gcsfs's mapping of HTTP 412 Precondition Failed
            return CommitConflict(self.url_for(name), "412 precondition failed")
        if isinstance(exc, FileNotFoundError):
            exc = FileNotFoundError(f"bucket {bucket}")
        return self._translate_error("commit pointer", name, exc)

    # -- streaming writes -------------------------------------------------------------------
    def _open_raw_write(self, full: str) -> Any:
        return ResumableUpload(
            self.fs,
            full,
            chunk_size=self._options.chunk_size,
            where=f"gs://{full}",
            deadline=self._options.timeouts.deadline,
        )

    def _abort_raw_write(self, raw: Any, relpath: str) -> None:
        raw.discard()
