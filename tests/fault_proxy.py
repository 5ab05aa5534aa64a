"""A fault-injecting HTTP proxy on 127.0.0.1 for object-store emulators.

It forwards every request to the emulator, except that the next ``faults`` requests (or every
request while ``always`` is set) get the chosen fault instead: an HTTP 503, a dropped connection,
or a delay before forwarding. Bounded: it serves until stopped, handles one connection per thread.
"""

from __future__ import annotations

import http.client
import http.server
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import urlparse

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "host"}


@dataclass
class FaultPlan:
    kind: str = "503"  # "503", "drop" or "delay"
    faults: int = 0
    always: bool = False
    delay: float = 0.2
    injected: int = 0
    forwarded: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self) -> bool:
        with self.lock:
            if self.always or self.faults > 0:
                self.faults = max(0, self.faults - 1)
                self.injected += 1
                return True
            self.forwarded += 1
            return False


@contextmanager
def fault_proxy(target: str, plan: FaultPlan) -> Iterator[str]:
    """Serve a proxy to ``target`` (``http://host:port``); yields the proxy's endpoint URL."""
    upstream = urlparse(target)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            if plan.take():
                if plan.kind == "drop":
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if plan.kind == "503":
                    payload = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                time.sleep(plan.delay)
            conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            headers["Host"] = upstream.netloc
            conn.request(self.command, self.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in _HOP and key.lower() != "content-length":
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            conn.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
