"""GCS backend: pointer commits by generation preconditions, everything else through gcsfs.

A pointer is created with ``ifGenerationMatch=0`` and replaced with
``ifGenerationMatch=<generation read a moment ago>``; GCS answers 412 when the precondition
fails, which becomes :class:`CommitConflict`. The upload is a multipart upload issued through
gcsfs's own authenticated session: real GCS honours preconditions on every upload type, the
fake-gcs-server emulator only on multipart uploads. Large files stream as resumable uploads in
chunks of ``chunk_size``; gcsfs retries transient (429/5xx) failures with backoff.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import quote

from fsspec.asyn import sync

from commitpoint.errors import CommitConflict, StorageError
from commitpoint.layout import safe_relpath
from commitpoint.storage.base import FsspecStorage
from commitpoint.storage.protocol import PointerState

DEFAULT_CHUNK_SIZE = 32 * 1024 * 1024
_BOUNDARY = "==commitpoint=="


class GCSBackend(FsspecStorage):
    """Checkpoints under ``gs://bucket/prefix``.

    Options consumed here: ``chunk_size`` (bytes per resumable-upload chunk, a multiple of
    256 KiB, default 32 MiB). Everything else goes to :class:`gcsfs.GCSFileSystem` (``project``,
    ``token``, ``endpoint_url``, ...). With an emulator, set ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT``
    to ``false`` (gcsfs otherwise probes it over gRPC for a minute); this module does so by
    default when an ``endpoint_url`` is given.
    """

    def __init__(
        self, url: str, *, chunk_size: int | str = DEFAULT_CHUNK_SIZE, **storage_options: Any
    ) -> None:
        if storage_options.get("endpoint_url"):
            os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        import gcsfs

        self._chunk_size = int(chunk_size)
        fs = gcsfs.GCSFileSystem(**storage_options)
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
        where = self.url_for(relpath) if relpath else self.url
        text = str(exc)
        code = getattr(exc, "code", None)
        if code == 401 or "401" in text[:40] or "Invalid Credentials" in text:
            return StorageError(operation, where, "bad or expired credentials (401)")
        if (isinstance(exc, OSError) and text.startswith("Forbidden")) or code == 403:
            return StorageError(operation, where, "access denied (403)")
        if isinstance(exc, FileNotFoundError) and "bucket" in text.lower():
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
        metadata = json.dumps({"name": key, "contentType": "text/plain"})
        body = (
            (
                f"--{_BOUNDARY}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
                f"{metadata}\r\n"
                f"--{_BOUNDARY}\r\nContent-Type: text/plain\r\n\r\n"
            ).encode()
            + self._encode_pointer(value)
            + f"\r\n--{_BOUNDARY}--".encode()
        )
        fs: Any = self.fs
        try:
            result = self._call(
                "POST",
                f"{fs._location}/upload/storage/v1/b/{quote(bucket)}/o",
                uploadType="multipart",
                ifGenerationMatch="0" if token is None else token,
                headers={"Content-Type": f'multipart/related; boundary="{_BOUNDARY}"'},
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
        return str(result["generation"])

    # -- streaming writes -------------------------------------------------------------------
    def _open_raw_write(self, full: str) -> Any:
        return self.fs.open(full, "wb", block_size=self._chunk_size)

    def _abort_raw_write(self, raw: Any, relpath: str) -> None:
        raw.discard()
        raw.closed = True
