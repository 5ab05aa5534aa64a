"""GCS upload throughput on fake-gcs-server: commitpoint vs gcsfs ``put_file`` and DCP.

The baseline is gcsfs's ``put_file`` with its defaults (a resumable upload in 50 MiB chunks).
commitpoint runs with its defaults (100 MiB chunks, the next one filling while the last is sent).
Two more columns separate the client from the emulator: ``put_file`` with commitpoint's chunk
size, and a bare ``http.client`` resumable upload in those chunks (no client library at all: the
fastest this emulator accepts them). fake-gcs-server recomputes the MD5 and CRC32C of the whole
object received so far on every chunk, so an upload costs it O(size^2 / chunk) and bigger chunks
win on the emulator by far more than they would on GCS. DCP's ``FsspecWriter`` gets the same URL
and storage options (gcsfs underneath, 5 MiB blocks by default).
"""

from __future__ import annotations

import http.client
import json
import sys
import time
from typing import Any
from urllib.parse import quote, urlparse

from benchmarks.common import GiB
from benchmarks.object_store import Store, Upload, dcp_save, run

NAME = "gcs_throughput"
BASELINE = "gcsfs put_file (raw)"


def bare_http_upload(endpoint: str, bucket: str, name: str, source: str, chunk: int) -> list[float]:
    """A resumable upload with nothing but ``http.client``: the emulator's own speed limit.

    Returns the seconds each chunk took, from sending it to GCS's answer.
    """
    target = urlparse(endpoint)
    conn = http.client.HTTPConnection(target.hostname, target.port, timeout=3600)
    try:
        conn.request(
            "POST",
            f"/upload/storage/v1/b/{quote(bucket)}/o?uploadType=resumable&name={quote(name)}",
            body=json.dumps({"name": name}),
            headers={"Content-Type": "application/json"},
        )
        response = conn.getresponse()
        response.read()
        location = urlparse(response.getheader("Location") or "")
        path = f"{location.path}?{location.query}"
        offset = 0
        seconds: list[float] = []
        with open(source, "rb") as f:
            data = f.read(chunk)
            while data:
                following = f.read(chunk)
                total = str(offset + len(data)) if not following else "*"
                headers = {"Content-Range": f"bytes {offset}-{offset + len(data) - 1}/{total}"}
                start = time.perf_counter()
                conn.request("POST", path, body=data, headers=headers)
                response = conn.getresponse()
                response.read()
                seconds.append(time.perf_counter() - start)
                if response.status not in (200, 201, 308):
                    raise RuntimeError(f"chunk at {offset}: HTTP {response.status}")
                offset += len(data)
                data = following
    finally:
        conn.close()
    return seconds


def emulator_scan(argv: list[str]) -> int:
    """Bare-HTTP uploads of one file in several chunk sizes: what the emulator itself allows.

    For each chunk size: total seconds and GB/s, and the seconds of the first, middle and last
    chunk; on fake-gcs-server a chunk's time grows with the bytes already received.
    """
    import os

    from benchmarks.common import MiB, base_parser, parse_size, report, row, scratch_dir
    from commitpoint.testing.gcs import gcs_root

    parser = base_parser(emulator_scan.__doc__)
    parser.add_argument("--emulator-scan", action="store_true")
    parser.add_argument("--chunks", default="32M,50M,100M,256M")
    args = parser.parse_args(argv)
    size = parse_size(args.sizes) if args.sizes else (64 * MiB if args.quick else GiB)
    chunks = [parse_size(c) for c in args.chunks.split(",")]
    repeats = args.repeats or (1 if args.quick else 3)
    rows = []
    with scratch_dir("gcs-scan") as scratch, gcs_root() as root:
        source = str(scratch / "blob")
        with open(source, "wb") as f:
            for _ in range(size // MiB):
                f.write(os.urandom(MiB))
        bucket, _, prefix = root.url[len("gs://") :].partition("/")
        for chunk in chunks:
            totals: list[float] = []
            first: list[float] = []
            middle: list[float] = []
            last: list[float] = []
            for index in range(repeats):
                name = f"{prefix}/scan-{chunk}-{index}"
                per_chunk = bare_http_upload(
                    root.storage_options["endpoint_url"], bucket, name, source, chunk
                )
                totals.append(sum(per_chunk))
                first.append(per_chunk[0])
                middle.append(per_chunk[len(per_chunk) // 2])
                last.append(per_chunk[-1])
                root.open().delete(name.split("/", 1)[1])
            case = f"{size >> 20} MiB in {chunk >> 20} MiB chunks"
            rows.append(row(case, "bare HTTP upload", "GB/s", [size / t / 1e9 for t in totals]))
            for label, samples in (("first", first), ("middle", middle), ("last", last)):
                rows.append(row(case, f"{label} chunk", "s", samples))
    return report("gcs_emulator_scan", rows)


def _store(root: Any) -> Store:
    import gcsfs

    from commitpoint_gcs.backend import DEFAULT_CHUNK_SIZE

    options = root.storage_options
    fs = gcsfs.GCSFileSystem(skip_instance_cache=True, **options)
    base = root.url[len("gs://") :]
    bucket, _, prefix = base.partition("/")
    stored = root.open()
    ours = f"{DEFAULT_CHUNK_SIZE >> 20} MiB chunks"

    def put_file(upload: Upload) -> None:
        fs.put_file(upload.source, f"{base}/{upload.key}")

    def put_file_same_chunks(upload: Upload) -> None:
        fs.put_file(upload.source, f"{base}/{upload.key}", chunksize=DEFAULT_CHUNK_SIZE)

    def bare(upload: Upload) -> None:
        name = f"{prefix}/{upload.key}"
        bare_http_upload(options["endpoint_url"], bucket, name, upload.source, DEFAULT_CHUNK_SIZE)

    def dcp(upload: Upload) -> int:
        return dcp_save(f"{root.url}/{upload.key}", options, upload, stored)

    return Store(
        methods={
            BASELINE: put_file,
            f"gcsfs put_file (raw, {ours})": put_file_same_chunks,
            f"bare HTTP resumable upload ({ours}, emulator limit)": bare,
            "DCP FsspecWriter (gcsfs)": dcp,
        },
        baseline=BASELINE,
        sizes=(GiB, 2 * GiB),
        # DCP writes at about a quarter of the others here: 2 GiB would cost 15 minutes alone.
        only_at={"DCP FsspecWriter (gcsfs)": (GiB,)},
    )


def main(argv: list[str] | None = None) -> int:
    """The comparison; with ``--emulator-scan``, the emulator's own limits per chunk size."""
    from commitpoint.testing.gcs import gcs_root

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--emulator-scan" in argv:
        return emulator_scan(argv)
    return run(NAME, gcs_root, _store, argv)


if __name__ == "__main__":
    raise SystemExit(main())
