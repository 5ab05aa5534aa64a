"""A fault-injecting HTTP proxy on 127.0.0.1 for object-store emulators.

It forwards every request to the emulator, except that the next ``faults`` requests (or every
request while ``always`` is set) get the chosen fault instead: an HTTP 503, a dropped connection,
or a delay before forwarding. A ``rewrite(method, path, body)`` hook may alter request bodies in
transit; then Location headers point back at the proxy, so a GCS resumable upload's chunks pass
through it too. Bounded: it serves until stopped, handles one connection per thread.
"""

from __future__ import annotations

import http.client
import http.server
import socket
import threading
import time
from collections.abc import Callable, Iterator
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
    rewrite: Callable[[str, str, bytes], bytes] | None = None
    altered: list[str] = field(default_factory=list)  # paths whose body ``rewrite`` changed
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
            if plan.rewrite is not None:
                new_body = plan.rewrite(self.command, self.path, body)
                if new_body != body:
                    plan.altered.append(self.path)
                body = new_body
            conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
            headers = {
                k: v
                for k, v in self.headers.items()
                if k.lower() not in _HOP and k.lower() != "content-length"
            }
            headers["Host"] = upstream.netloc
            headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            self.send_response(response.status)
            proxy = f"127.0.0.1:{self.server.server_address[1]}"
            for key, value in response.getheaders():
                if key.lower() in _HOP or key.lower() == "content-length":
                    continue
                if key.lower() == "location" and plan.rewrite is not None:
                    value = value.replace(upstream.netloc, proxy)
                self.send_header(key, value)
            # A HEAD answer has no body: pass on the size the store gave for the object.
            length = response.getheader("Content-Length") if self.command == "HEAD" else None
            self.send_header("Content-Length", length or str(len(data)))
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
