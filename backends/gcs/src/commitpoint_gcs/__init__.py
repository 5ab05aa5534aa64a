"""commitpoint's Google Cloud Storage backend (``gs://`` and ``gcs://``), found by entry points."""

from commitpoint_gcs.backend import GCSBackend

__all__ = ["GCSBackend"]
