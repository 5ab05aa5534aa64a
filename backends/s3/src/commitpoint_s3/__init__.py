"""commitpoint's S3 backend (``s3://`` and ``s3a://``), registered through entry points."""

from commitpoint_s3.backend import S3Backend, S3PermissionError

__all__ = ["S3Backend", "S3PermissionError"]
