"""Real servers on 127.0.0.1 for the remote-URL tests, started by fixtures and stopped after.

:class:`RangeHTTPServer` serves a directory over HTTP/1.1 the way object stores and
CDNs do for ranged reads: ``HEAD`` with ``Content-Length``, ``GET`` with one
``Range: bytes=a-b`` answered ``206``.  It counts the body bytes it sends, logs each
request, and injects faults per path: a 404, a 403, or a connection dropped midway
through a body (for a number of requests, then healthy).  It can also require a
query string or basic-auth credentials, to prove they are sent and never shown.

:class:`MotoS3` is moto's standalone S3 server (``ThreadedMotoServer``, as s3fs's
own tests use), with a WSGI wrapper that counts the body bytes of its answers.
Nothing here talks to any address but 127.0.0.1.
"""

from __future__ import annotations

import base64
import http.server
import os
import re
import socket
import threading
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class Fault:
    """What to do to requests whose path ends with ``suffix``: "404", "403" or "drop" (send half the body, then close)."""

    suffix: str
    kind: str
    times: int | None = None  # None: every time; else this many requests, then the path is healthy


@dataclass
class Logged:
    method: str
    path: str
    range: str | None
    status: int
    sent: int


@dataclass
class _State:
    root: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: int = 0
    log: list[Logged] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    query: str | None = None          # required query string ("token=..."), else 403
    auth: tuple[str, str] | None = None  # required basic-auth user and password, else 401


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as aiohttp expects of a real server
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # quiet: the tests read RangeHTTPServer.log instead

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _record(self, status: int, rng: str | None) -> Logged:
        """Log the request before any of its answer goes out, so a client that has its answer always finds it logged."""
        st = self.server.state
        entry = Logged(self.command, self.path, rng, status, 0)
        with st.lock:
            st.log.append(entry)
        return entry

    def _count(self, entry: Logged, n: int) -> None:
        st = self.server.state
        with st.lock:
            st.sent += n
            entry.sent += n

    def _empty(self, status: int) -> None:
        self._record(status, self.headers.get("Range"))
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _fault(self, path: str) -> str | None:
        st = self.server.state
        with st.lock:
            for f in st.faults:
                if f.kind == "drop" and self.command != "GET":
                    continue  # a HEAD has no body to cut short
                if path.endswith(f.suffix) and (f.times is None or f.times > 0):
                    if f.times is not None:
                        f.times -= 1
                    return f.kind
        return None

    def _serve(self, body: bool) -> None:
        st = self.server.state
        parts = urllib.parse.urlsplit(self.path)
        rng = self.headers.get("Range")
        if st.query is not None and parts.query != st.query:
            return self._empty(403)
        if st.auth is not None:
            want = "Basic " + base64.b64encode(f"{st.auth[0]}:{st.auth[1]}".encode()).decode()
            if self.headers.get("Authorization") != want:
                return self._empty(401)
        fault = self._fault(parts.path)
        if fault in ("404", "403"):
            return self._empty(int(fault))
        rel = urllib.parse.unquote(parts.path).lstrip("/")
        full = os.path.realpath(os.path.join(st.root, rel))
        if not (full == st.root or full.startswith(st.root + os.sep)) or not os.path.isfile(full):
            return self._empty(404)
        size = os.path.getsize(full)
        start, end, status = 0, size, 200
        if rng is not None:
            m = _RANGE.match(rng.strip())
            if m is None:
                return self._empty(416)
            start = int(m.group(1))
            end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            if start >= size or start >= end:
                return self._empty(416)
            status = 206
        n = end - start
        self.send_response(status)
        self.send_header("Content-Length", str(n))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        entry = self._record(status, rng)
        self.end_headers()
        if not body:
            return
        limit = n // 2 if fault == "drop" else n
        sent = 0
        with open(full, "rb") as f:
            f.seek(start)
            while sent < limit:
                chunk = f.read(min(1 << 20, limit - sent))
                if not chunk:
                    break
                self._count(entry, len(chunk))  # counted before it is written: a client never holds more than the count
                self.wfile.write(chunk)
                sent += len(chunk)
        if fault == "drop":
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    state: _State


class _Server6(_Server):
    address_family = socket.AF_INET6


class RangeHTTPServer:
    """An HTTP server on 127.0.0.1 (or ``host``, such as ``::1``) serving ``root`` with Range support, byte counts and faults."""

    def __init__(self, root: str, host: str = "127.0.0.1") -> None:
        self.state = _State(root=os.path.realpath(root))
        self._server = (_Server6 if ":" in host else _Server)((host, 0), _Handler)
        self._server.state = self.state
        self._thread = threading.Thread(target=self._server.serve_forever, name="range-http", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> RangeHTTPServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    # --- what tests read and set ---------------------------------------------

    @property
    def sent(self) -> int:
        """Body bytes sent so far."""
        with self.state.lock:
            return self.state.sent

    @property
    def log(self) -> list[Logged]:
        with self.state.lock:
            return list(self.state.log)

    def reset(self) -> None:
        """Forget counts, log and faults (not the required credentials)."""
        with self.state.lock:
            self.state.sent = 0
            self.state.log.clear()
            self.state.faults.clear()

    def fault(self, suffix: str, kind: str, times: int | None = None) -> None:
        with self.state.lock:
            self.state.faults.append(Fault(suffix, kind, times))

    def require(self, *, query: str | None = None, auth: tuple[str, str] | None = None) -> None:
        with self.state.lock:
            self.state.query, self.state.auth = query, auth


class _CountingApp:
    """A WSGI wrapper that counts the body bytes an app answers with."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.sent = 0

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        body: Iterable[bytes] = self.app(environ, start_response)
        try:
            for chunk in body:
                with self.lock:
                    self.sent += len(chunk)
                yield chunk
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()


class MotoS3:
    """moto's standalone S3 server on 127.0.0.1 (a free port), counting the body bytes it sends."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._counter: _CountingApp | None = None

    def start(self) -> MotoS3:
        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request on stderr
        self._moto.start()
        server = self._moto._server
        assert server is not None
        self._counter = _CountingApp(server.app)
        server.app = self._counter  # werkzeug's handler looks the app up per request
        # moto keeps its buckets in the process, not in the server: without a reset, a bucket made by an
        # earlier test module's server is found by this one (and "mkdir" of it fails with FileExistsError).
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(self.endpoint + "/moto-api/reset", method="POST"), timeout=30).close()
        self._counter.sent = 0
        return self

    @property
    def endpoint(self) -> str:
        host, port = self._moto.get_host_and_port()
        return f"http://{host}:{port}"

    @property
    def sent(self) -> int:
        assert self._counter is not None
        with self._counter.lock:
            return self._counter.sent

    def stop(self) -> None:
        self._moto.stop()
