"""S3 roots for tests: a moto S3 server on 127.0.0.1, reached over real HTTP, a bucket per use.

The server starts on first use on a free loopback port, is shared by the whole process, and is
stopped by :func:`commitpoint.testing.shutdown_servers` (the pytest plugin calls it when the
session ends; interpreter exit is the backstop). It logs no line per request (moto's own server
prints an access log line for each, which buries a script's output); errors are still logged.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from commitpoint.testing import (
    CheckpointRoot,
    MissingTestDependency,
    register_shutdown,
    unique_name,
)

EXTRA = "./backends/s3[testing]"  # the plug-in and moto, from commitpoint's repository
_lock = threading.Lock()
_server: dict[str, Any] = {}


def _start_quiet_server() -> tuple[Any, threading.Thread, str]:
    """moto's WSGI app on a threaded werkzeug server whose handler skips the access log."""
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    class QuietHandler(MotoRequestHandler):
        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            pass

    app = DomainDispatcherApplication(create_backend_app)
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="moto-s3", daemon=True)
    thread.start()
    return server, thread, f"http://127.0.0.1:{server.server_port}"


def moto_endpoint() -> str:
    """URL of the shared moto S3 server, starting it if needed."""
    try:
        import moto.server  # noqa: F401 - moto[server]: the WSGI app and werkzeug
        import werkzeug  # noqa: F401

        import commitpoint_s3  # noqa: F401 - the backend the roots are opened with
    except ImportError as exc:
        raise MissingTestDependency(f"moto S3 server ({exc.name})", EXTRA) from exc
    with _lock:
        if "endpoint" not in _server:
            server, thread, endpoint = _start_quiet_server()
            _server.update(server=server, thread=thread, endpoint=endpoint)
            register_shutdown(_stop)
        return str(_server["endpoint"])


def _stop() -> None:
    with _lock:
        server = _server.pop("server", None)
        thread = _server.pop("thread", None)
        _server.pop("endpoint", None)
    if server is not None:
        server.shutdown()
        server.server_close()
    if thread is not None:
        thread.join(timeout=10)


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
