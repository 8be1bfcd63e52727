"""A loopback HTTP server with injectable faults, shared by the download tests and ``benchmarks/reliability.py``.

It serves in-memory files on 127.0.0.1 only, honours Range/If-Range (ETag = md5 of the content) and applies
per-path faults: ``cut`` (bytes sent before closing), ``no_length`` (no Content-Length), ``chunked``,
``ignore_range`` and ``redirect``.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import threading
from collections.abc import Iterator


class Handler(http.server.BaseHTTPRequestHandler):
    """In-memory files with Range/If-Range and per-path faults; logs every request."""

    files: dict[str, bytes] = {}
    faults: dict[str, dict] = {}  # path -> {"cut": bytes sent, "no_length", "chunked", "ignore_range", "redirect"}
    log: list[tuple[str, str | None, str | None]] = []  # (path, Range, If-Range)

    def log_message(self, *args: object) -> None:  # keep test and benchmark output clean
        return

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        Handler.log.append((self.path, self.headers.get("Range"), self.headers.get("If-Range")))
        fault = Handler.faults.get(self.path, {})
        if "redirect" in fault:
            self.send_response(302)
            self.send_header("Location", fault["redirect"])
            self.end_headers()
            return
        data = Handler.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        etag = f'"{hashlib.md5(data).hexdigest()}"'
        start, rng = 0, self.headers.get("Range")
        if rng and not fault.get("ignore_range") and self.headers.get("If-Range") in (None, etag):
            start = int(rng[len("bytes="):].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("ETag", etag)
        body = data[start:]
        self._send(body, body[: fault.get("cut", len(body))], fault)

    def _send(self, body: bytes, sent: bytes, fault: dict) -> None:
        if fault.get("chunked"):
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(sent), 4096):
                block = sent[i:i + 4096]
                self.wfile.write(f"{len(block):x}\r\n".encode() + block + b"\r\n")
            if len(sent) == len(body):
                self.wfile.write(b"0\r\n\r\n")
            return
        if not fault.get("no_length"):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(sent)


@contextlib.contextmanager
def serve() -> Iterator[str]:
    """Start a fresh server on a free loopback port (files, faults and log cleared); yields its base URL."""
    Handler.files, Handler.faults, Handler.log = {}, {}, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
