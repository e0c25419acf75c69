"""Peers for the ext_authz tests: an HTTP authorization server and a raw HTTP/1.1 client.

- `HttpAuthServer(handler)`: a strict HTTP/1.1 server on 127.0.0.1 (parses with
  httptools, records every request byte for byte: method, raw target, headers in
  order, body) whose answer is `handler(request)`: a `(status, headers, body)`
  tuple, `HANG` (accept, read, never answer) or raw `bytes` written as they are
  (garbage). `port=` lets a test bring a stopped server back on the same port.
  `wait_for(n)` waits, with a deadline, until n requests arrived.
- `h1_request(port, ...)`: one HTTP/1.1 request written as given, the response
  parsed strictly (httptools); returns the status, the headers as received
  (lowercase names, order and repeats kept), the body and the client's own port
  (what the gateway reports as the source address).
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Callable, NamedTuple

import httptools

HANG = "hang"


class Reply(NamedTuple):
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    local_port: int

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]


def h1_request(port: int, method: str = "GET", target: str = "/", headers: list[tuple[str, str]] | None = None,
               body: bytes = b"", host: str = "gw.test", timeout: float = 10.0) -> Reply:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers or []]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        local_port = s.getsockname()[1]
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        out: dict = {"headers": [], "body": b"", "done": False}

        class P:
            def on_header(self, name: bytes, value: bytes) -> None:
                out["headers"].append((name.decode("latin-1").lower(), value.decode("latin-1")))

            def on_body(self, b: bytes) -> None:
                out["body"] += b

            def on_message_complete(self) -> None:
                out["done"] = True

        parser = httptools.HttpResponseParser(P())
        while not out["done"]:
            data = s.recv(65536)
            if not data:
                break
            parser.feed_data(data)
        if not out["done"]:
            raise AssertionError("the gateway closed the connection before a complete response")
        return Reply(parser.get_status_code(), out["headers"], out["body"], local_port)


class HttpAuthServer:
    def __init__(self, handler: Callable[[dict], object] | None = None, port: int = 0):
        self.handler = handler or (lambda req: (200, [], b""))
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.seen: list[dict] = []
        self.errors: list[str] = []
        self.cond = threading.Condition()
        self._closed = False
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.seen) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"the auth server saw {len(self.seen)} requests, expected {n}")
                self.cond.wait(left)
            return list(self.seen)

    def stop(self) -> None:
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)   # wakes the accept() thread: the port is free
        except OSError:
            pass
        self.sock.close()
        with self.cond:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- server side --------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.cond:
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        done: list[dict] = []

        class Proto:
            def __init__(self) -> None:
                self.cur: dict = {}

            def on_message_begin(self) -> None:
                self.cur = {"target": b"", "headers": [], "body": b""}

            def on_url(self, url: bytes) -> None:
                self.cur["target"] += url

            def on_header(self, name: bytes, value: bytes) -> None:
                self.cur["headers"].append((name.decode("latin-1").lower(), value.decode("latin-1")))

            def on_body(self, body: bytes) -> None:
                self.cur["body"] += body

            def on_message_complete(self) -> None:
                self.cur["method"] = parser.get_method().decode()
                self.cur["target"] = self.cur["target"].decode("latin-1")
                done.append(self.cur)

        parser = httptools.HttpRequestParser(Proto())
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                try:
                    parser.feed_data(data)
                except httptools.HttpParserError as exc:
                    with self.cond:
                        self.errors.append(str(exc))
                        self.cond.notify_all()
                    return
                while done:
                    req = done.pop(0)
                    with self.cond:
                        self.seen.append(req)
                        self.cond.notify_all()
                    answer = self.handler(req)
                    if answer == HANG:
                        while not self._closed:      # until the client gives up or we stop
                            try:
                                if not conn.recv(65536):
                                    return
                            except OSError:
                                return
                        return
                    if isinstance(answer, bytes):
                        conn.sendall(answer)
                        return
                    status, headers, body = answer
                    head = [f"HTTP/1.1 {status} X"] + [f"{k}: {v}" for k, v in headers]
                    head.append(f"content-length: {len(body)}")
                    conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
