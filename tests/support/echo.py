"""A real HTTP/1.1 upstream for tests: echoes what it saw, streams, stalls or dies on demand.

Paths:
  /sse?n=N&interval=S   N server-sent events, one every S seconds (chunked)
  /slow?delay=S         answer after S seconds
  /die                  send a head promising 1000 bytes, 10 of them, then close
  /status/N             answer with status N
  /bytes?n=N            N bytes of body
  anything else         JSON: method, path, headers, body (base64-free text), count
Counts requests and TCP connections (`requests`, `connections`).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class EchoServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int = 0, tls: dict | None = None):
        super().__init__(("127.0.0.1", port), _Handler)
        self.scheme = "http"
        if tls is not None:
            import ssl
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(tls["cert"], tls["key"])
            self.socket = ctx.wrap_socket(self.socket, server_side=True)
            self.scheme = "https"
        self.requests = 0
        self.connections = 0
        self.seen: list[dict] = []
        self.sse_finished = threading.Event()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def process_request(self, request, client_address):
        with self._lock:
            self.connections += 1
        super().process_request(request, client_address)

    def start(self) -> "EchoServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: EchoServer

    def log_message(self, *args) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("content-length") or 0)
        return self.rfile.read(n) if n else b""

    def _handle(self) -> None:
        body = self._body()
        with self.server._lock:
            self.server.requests += 1
            count = self.server.requests
            record = {"method": self.command, "path": self.path,
                      "headers": [[k.lower(), v] for k, v in self.headers.items()],
                      "body": body.decode("latin-1"), "count": count}
            self.server.seen.append(record)
        url = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path == "/sse":
            n, interval = int(q.get("n", 5)), float(q.get("interval", 0.1))
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for i in range(n):
                chunk = f"data: event {i}\n\n".encode()
                self.wfile.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                self.wfile.flush()
                time.sleep(interval)
            self.wfile.write(b"0\r\n\r\n")
            self.server.sse_finished.set()
            return
        if url.path == "/slow":
            time.sleep(float(q.get("delay", 5)))
        if url.path == "/die":
            self.send_response(200)
            self.send_header("content-length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if url.path.startswith("/status/"):
            status = int(url.path.rsplit("/", 1)[1])
            self.send_response(status)
            if status in (204, 304):   # no body, no content-length (RFC 9110 §8.6)
                self.end_headers()
                return
            payload = json.dumps({"status": status}).encode()
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        if url.path == "/bytes":
            n = int(q.get("n", 1024))
            self.send_response(200)
            self.send_header("content-length", str(n))
            self.end_headers()
            self.wfile.write(b"b" * n)
            return
        payload = json.dumps(record).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.send_header("x-upstream", "echo")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle
