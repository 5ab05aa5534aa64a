"""S3 roots for tests: a moto S3 server on 127.0.0.1, reached over real HTTP, a bucket per use.

The server starts on first use on a free loopback port, is shared by the whole process, and is
stopped by :func:`commitpoint.testing.shutdown_servers` (the pytest plugin calls it when the
session ends; interpreter exit is the backstop).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

from commitpoint.testing import (
    CheckpointRoot,
    MissingTestDependency,
    register_shutdown,
    unique_name,
)

EXTRA = "commitpoint-s3[testing]"
_lock = threading.Lock()
_server: dict[str, Any] = {}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def moto_endpoint() -> str:
    """URL of the shared moto S3 server, starting it if needed."""
    try:
        from moto.server import ThreadedMotoServer

        import commitpoint_s3  # noqa: F401 - the backend the roots are opened with
    except ImportError as exc:
        raise MissingTestDependency(f"moto S3 server ({exc.name})", EXTRA) from exc
    with _lock:
        if "endpoint" not in _server:
            port = _free_port()
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            server.start()
            _server["server"] = server
            _server["endpoint"] = f"http://127.0.0.1:{port}"
            register_shutdown(_stop)
        return str(_server["endpoint"])


def _stop() -> None:
    with _lock:
        server = _server.pop("server", None)
        _server.pop("endpoint", None)
    if server is not None:
        server.stop()


@contextlib.contextmanager
def s3_root(prefix: str = "run") -> Iterator[CheckpointRoot]:
    """A fresh bucket on the shared moto server; its objects and the bucket are removed after."""
    endpoint = moto_endpoint()
    import s3fs

    options: dict[str, Any] = {
        "endpoint_url": endpoint,
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"region_name": "us-east-1"},
    }
    bucket = unique_name("cp")
    fs = s3fs.S3FileSystem(**options)
    fs.call_s3("create_bucket", Bucket=bucket)
    try:
        yield CheckpointRoot(f"s3://{bucket}/{prefix}", options, "s3")
    finally:
        with contextlib.suppress(Exception):
            fs.rm(bucket, recursive=True)
        with contextlib.suppress(Exception):
            fs.rmdir(bucket)
