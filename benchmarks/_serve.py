"""A local HTTP server with Range support for run.py's "export over HTTP" case (run in its own process).

    python benchmarks/_serve.py DIR [--server sendfile|python]

Serves DIR on 127.0.0.1 (a free port), prints its URL on one line, and runs until its
standard input closes.  ``sendfile`` (the default) answers ``HEAD`` and ``GET`` with one
``Range: bytes=a-b`` by ``socket.sendfile``: the kernel moves the bytes, so the server
costs little CPU and is not the floor's bottleneck on a small machine.  ``python`` is the
test suite's own server (tests/servers.py, Python reads and writes of 1 MB), for
comparison: both the export and ``curl`` share whichever server runs.
"""

from __future__ import annotations

import argparse
import http.server
import os
import re
import sys
import threading
import urllib.parse

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as curl and aiohttp use it
    root = "."

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _empty(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _serve(self, body: bool) -> None:
        rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        full = os.path.realpath(os.path.join(self.root, rel))
        if not full.startswith(self.root + os.sep) or not os.path.isfile(full):
            return self._empty(404)
        size = os.path.getsize(full)
        start, end, status = 0, size, 200
        rng = self.headers.get("Range")
        if rng is not None:
            m = _RANGE.match(rng.strip())
            if m is None:
                return self._empty(416)
            start = int(m.group(1))
            end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            if start >= end:
                return self._empty(416)
            status = 206
        self.send_response(status)
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if body:
            self.wfile.flush()
            with open(full, "rb") as f:
                self.connection.sendfile(f, start, end - start)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir")
    p.add_argument("--server", choices=["sendfile", "python"], default="sendfile")
    args = p.parse_args()
    root = os.path.realpath(args.dir)
    if args.server == "python":
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
        from servers import RangeHTTPServer

        server = RangeHTTPServer(root).start()
        print(server.url, flush=True)
        sys.stdin.read()
        server.stop()
        return
    handler = type("Handler", (_Handler,), {"root": root})
    httpd = _Server(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    print(f"http://127.0.0.1:{httpd.server_address[1]}", flush=True)
    sys.stdin.read()
    httpd.shutdown()
    httpd.server_close()


if __name__ == "__main__":
    main()
