"""S3 upload throughput on moto: commitpoint vs s3fs ``put_file``, boto3 ``upload_file`` and DCP.

The baseline is boto3's ``upload_file`` (8 MiB parts, 10 threads). commitpoint runs with its
defaults (the same: 8 MiB parts, 10 in flight; parts grow only after the 1,000th). Two columns at
1 GiB send 64 MiB parts, 8 at a time, from both clients (commitpoint's defaults before this
comparison): moto's cost per byte grows with the size of a request body, so the part size alone
moves the figures, whichever client sends the parts. DCP's
``FsspecWriter`` gets the same URL and storage options (s3fs underneath, which sends the parts of a
streamed file one after another). moto runs inside the benchmark process (the testing kit's
``ThreadedMotoServer``), so client and server share one GIL and two cores.
"""

from __future__ import annotations

from typing import Any

from benchmarks.common import GiB, MiB
from benchmarks.object_store import Store, Upload, dcp_save, run, stream

NAME = "s3_throughput"
BASELINE = "boto3 upload_file (raw)"


def _store(root: Any) -> Store:
    import boto3
    import s3fs
    from boto3.s3.transfer import TransferConfig

    from commitpoint import open_storage

    options = root.storage_options
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    bucket, _, prefix = root.url[len("s3://") :].partition("/")
    client = boto3.client(
        "s3",
        endpoint_url=options["endpoint_url"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    stored = root.open()

    def put_file(upload: Upload) -> None:
        fs.put_file(upload.source, f"{bucket}/{prefix}/{upload.key}")

    def upload_file(upload: Upload) -> None:
        client.upload_file(upload.source, bucket, f"{prefix}/{upload.key}")

    def dcp(upload: Upload) -> int:
        return dcp_save(f"{root.url}/{upload.key}", options, upload, stored)

    big_parts = open_storage(root.url, **options, part_size=64 * MiB, max_concurrency=8)
    big_parts_config = TransferConfig(multipart_chunksize=64 * MiB, max_concurrency=8)

    def stream_big_parts(upload: Upload) -> None:
        stream(big_parts, upload.source, upload.key)

    def upload_file_big_parts(upload: Upload) -> None:
        client.upload_file(upload.source, bucket, f"{prefix}/{upload.key}", Config=big_parts_config)

    return Store(
        methods={
            "s3fs put_file (raw)": put_file,
            BASELINE: upload_file,
            "DCP FsspecWriter (s3fs)": dcp,
            "commitpoint, 64 MiB parts x 8": stream_big_parts,
            "boto3 upload_file, 64 MiB parts x 8": upload_file_big_parts,
        },
        baseline=BASELINE,
        sizes=(GiB, 2 * GiB),
        only_at={
            "commitpoint, 64 MiB parts x 8": (GiB,),
            "boto3 upload_file, 64 MiB parts x 8": (GiB,),
        },
    )


def main(argv: list[str] | None = None) -> int:
    from commitpoint.testing.s3 import s3_root

    return run(NAME, s3_root, _store, argv)


if __name__ == "__main__":
    raise SystemExit(main())
