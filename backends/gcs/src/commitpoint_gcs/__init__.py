"""commitpoint's Google Cloud Storage backend (``gs://`` and ``gcs://``), found by entry points."""

from commitpoint_gcs.backend import GCSBackend, GCSPermissionError
from commitpoint_gcs.resumable import ChecksumMismatch

__all__ = ["ChecksumMismatch", "GCSBackend", "GCSPermissionError"]
