"""A strict HTTP/1.1 client for tests: raw sockets, responses parsed by httptools (llhttp).

`Response` has the status, the headers as sent (lowercase names, in order) and the
body. `request()` opens a connection, sends one request and reads the answer; with
`keep=True` it returns the open socket too (to hold the connection, e.g. to see
which worker process owns it). `concurrently(n, fn)` runs fn(i) in n threads that
start together (a barrier) and returns their results in order.
"""

from __future__ import annotations

import socket
import threading

import httptools


class Response:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name]
        assert len(values) <= 1, f"{name} sent {len(values)} times: {values}"
        return values[0] if values else None

    def json(self):
        import json
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Response({self.status}, {self.headers}, {self.body[:200]!r})"


def read_response(sock: socket.socket) -> Response:
    out: dict = {"headers": [], "body": b"", "done": False}

    class P:
        def on_header(self, name: bytes, value: bytes) -> None:
            out["headers"].append((name.decode("latin-1").lower(), value.decode("latin-1")))

        def on_body(self, body: bytes) -> None:
            out["body"] += body

        def on_message_complete(self) -> None:
            out["done"] = True

    parser = httptools.HttpResponseParser(P())
    while not out["done"]:
        data = sock.recv(65536)
        assert data, "connection closed before the response was complete"
        parser.feed_data(data)
    return Response(parser.get_status_code(), out["headers"], out["body"])


def request(port: int, path: str = "/", headers: dict | list | None = None, method: str = "GET",
            body: bytes = b"", keep: bool = False, timeout: float = 10.0):
    items = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    for k, v in items:
        head += f"{k}: {v}\r\n"
    if body or method in ("POST", "PUT"):
        head += f"Content-Length: {len(body)}\r\n"
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(head.encode("latin-1") + b"\r\n" + body)
    resp = read_response(sock)
    if keep:
        return resp, sock
    sock.close()
    return resp


def concurrently(n: int, fn, timeout: float = 30.0) -> list:
    barrier = threading.Barrier(n, timeout=timeout)
    results: list = [None] * n
    errors: list = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = fn(i)
        except BaseException as exc:     # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a client thread did not finish in time"
    if errors:
        raise errors[0]
    return results
