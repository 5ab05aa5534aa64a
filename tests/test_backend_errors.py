"""Backend errors belong to the one error tree and survive a pickle round trip (for Ray)."""

from __future__ import annotations

import pickle

import pytest

from commitpoint import errors
from commitpoint.core.retry import DeadlineExceeded


def _backend_errors() -> list[BaseException]:
    from commitpoint_gcs import ChecksumMismatch, GCSPermissionError
    from commitpoint_s3 import S3PermissionError

    return [
        S3PermissionError(
            "write", "s3://b/k", "access denied (AccessDenied)", code="AccessDenied", status=403
        ),
        S3PermissionError("list", "s3://b", "access denied or bad credentials"),
        GCSPermissionError("read", "gs://b/k", "bad or expired credentials (401)", status=401),
        ChecksumMismatch("gs://b/k", "GCS stored 3 bytes, 8 were written"),
        errors.UploadFailed("s3://b/k", "more than 10000 parts (the object is over the limit)"),
        DeadlineExceeded("S3 get_object s3://b/k", 120.0, 3),
    ]


def test_backend_permission_errors_are_the_shared_permission_error() -> None:
    from commitpoint_gcs import ChecksumMismatch, GCSPermissionError
    from commitpoint_s3 import S3PermissionError

    for cls in (S3PermissionError, GCSPermissionError):
        assert issubclass(cls, errors.StoragePermissionError)
        assert issubclass(cls, PermissionError) and issubclass(cls, errors.StorageError)
    assert issubclass(ChecksumMismatch, errors.StorageError)


@pytest.mark.parametrize("error", _backend_errors(), ids=lambda e: type(e).__name__)
def test_backend_errors_survive_a_pickle_round_trip(error: BaseException) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    for name, value in vars(error).items():
        assert getattr(copy, name) == value, name
