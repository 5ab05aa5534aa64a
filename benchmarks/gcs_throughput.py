"""GCS upload throughput on fake-gcs-server: commitpoint vs gcsfs ``put_file``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks.object_store import run

NAME = "gcs_throughput"


def _raw(root: Any) -> dict[str, Callable[[str, str], None]]:
    import gcsfs

    fs = gcsfs.GCSFileSystem(**root.storage_options)
    base = root.url[len("gs://") :]
    return {"gcsfs put_file (raw)": lambda src, key: fs.put_file(src, f"{base}/{key}")}


def main(argv: list[str] | None = None) -> int:
    from commitpoint.testing.gcs import gcs_root

    return run(NAME, gcs_root, _raw, argv)


if __name__ == "__main__":
    raise SystemExit(main())
