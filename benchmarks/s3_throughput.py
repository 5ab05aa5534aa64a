"""S3 upload throughput on moto: commitpoint vs s3fs ``put_file`` vs boto3 ``upload_file``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks.object_store import run

NAME = "s3_throughput"


def _raw(root: Any) -> dict[str, Callable[[str, str], None]]:
    import boto3
    import s3fs

    fs = s3fs.S3FileSystem(**root.storage_options)
    bucket, _, prefix = root.url[len("s3://") :].partition("/")
    client = boto3.client(
        "s3",
        endpoint_url=root.storage_options["endpoint_url"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    return {
        "s3fs put_file (raw)": lambda src, key: fs.put_file(src, f"{bucket}/{prefix}/{key}"),
        "boto3 upload_file (raw)": lambda src, key: client.upload_file(
            src, bucket, f"{prefix}/{key}"
        ),
    }


def main(argv: list[str] | None = None) -> int:
    from commitpoint.testing.s3 import s3_root

    return run(NAME, s3_root, _raw, argv)


if __name__ == "__main__":
    raise SystemExit(main())
