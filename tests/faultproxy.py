"""A fault-injecting HTTP proxy for the test S3 server: a real HTTP hop on 127.0.0.1.

Jobs pointed at it (AWS_ENDPOINT_URL=proxy.endpoint) talk S3 as usual; the
proxy forwards each request to the upstream server, except that a seeded
fraction of them get a fault instead:

- `503`: `503 SlowDown`, the error S3 gives when throttling;
- `500`: `500 InternalError`;
- `reset`: the connection is reset (TCP RST) without an answer;
- `slow`: the answer comes, but 2 s late.

The faults are decided before the request is forwarded, so a failed request
never took effect upstream. One more, asked for one request at a time with
`lose_answer_once`: the request is forwarded and takes effect, and its answer
is lost (a reset), so the client retries something that already happened. Every request is recorded (method, path) so a test
can tell which objects were read and by whom it was asked.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import struct
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("503", "500", "reset", "slow")
ERRORS = ("503", "500", "reset")  # the faults that fail a request: what "100% failures" draws from
SLOW_S = 2.0
_S3_ERRORS = {
    "503": ("SlowDown", "Please reduce your request rate."),
    "500": ("InternalError", "We encountered an internal error. Please try again."),
}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection", "expect"}


class FaultProxy:
    """Start with `start()`, stop with `stop()`; change the fault rate with `faults(...)`."""

    def __init__(self, upstream: str):
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.fraction, self.kinds = 0.0, FAULTS
        self._rng = random.Random(0)
        self._lock = threading.Lock()
        self.injected: Counter = Counter()  # fault kind -> times injected
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in arrival order
        self._lose: tuple[str, str] | None = None  # (method, path) whose next answer is lost
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.proxy = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    @contextlib.contextmanager
    def faults(self, fraction: float, seed: int = 0, kinds: tuple[str, ...] = FAULTS):
        """Inject faults into `fraction` of the requests made inside the block (drawn from a seeded RNG)."""
        with self._lock:
            self.fraction, self.kinds, self._rng = fraction, kinds, random.Random(seed)
            self.injected.clear()
            self.requests.clear()
        try:
            yield self
        finally:
            with self._lock:
                self.fraction = 0.0

    def lose_answer_once(self, method: str, path: str) -> None:
        """The next `method` request for `path` (e.g. "/bucket/key") is carried out upstream, but its answer is lost."""
        with self._lock:
            self._lose = (method, path)

    def draw(self, method: str, path: str) -> str | None:
        """Record a request and decide its fault (None: forward it as it is)."""
        with self._lock:
            self.requests.append((method, urllib.parse.urlsplit(path).path))
            if self._lose == self.requests[-1]:
                self._lose = None
                self.injected["lost"] += 1
                return "lost"
            if self._rng.random() >= self.fraction:
                return None
            kind = self._rng.choice(self.kinds)
            self.injected[kind] += 1
            return kind


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and `Expect: 100-continue` answered as clients expect

    def log_message(self, format, *args):  # quiet: the test output is the jobs'
        pass

    def _proxy(self) -> None:
        body = self._read_body()
        fault = self.server.proxy.draw(self.command, self.path)
        if fault == "reset":
            self._reset()
        elif fault == "lost":
            self._upstream(body)
            self._reset()
        elif fault in _S3_ERRORS:
            self._s3_error(fault)
        else:
            if fault == "slow":
                time.sleep(SLOW_S)
            self._forward(body)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _proxy

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b""):  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _upstream(self, body: bytes) -> tuple[http.client.HTTPResponse, bytes]:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection(*self.server.proxy.upstream, timeout=120)
        try:
            upstream.request(self.command, self.path, body=body or None, headers=headers)
            response = upstream.getresponse()
            return response, response.read()
        finally:
            upstream.close()

    def _forward(self, body: bytes) -> None:
        response, data = self._upstream(body)
        self.send_response_only(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in _HOP_BY_HOP and not (key.lower() == "content-length" and self.command != "HEAD"):
                self.send_header(key, value)
        if self.command != "HEAD":  # a HEAD answer keeps the object's own Content-Length
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _s3_error(self, kind: str) -> None:
        code, message = _S3_ERRORS[kind]
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<RequestId>fault-{kind}</RequestId></Error>"
        ).encode()
        self.send_response_only(int(kind), code)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _reset(self) -> None:
        # SO_LINGER with a zero timeout makes close() send RST instead of FIN: a reset, not a clean close.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def handle(self) -> None:
        with contextlib.suppress(OSError, ValueError):  # a reset connection, or a client that went away
            super().handle()

    def finish(self) -> None:
        with contextlib.suppress(OSError, ValueError):  # a reset connection has nothing left to flush
            super().finish()
