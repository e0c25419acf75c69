"""A strict recording HTTP/1.1 upstream for tests: parses with httptools (llhttp, what
Node uses), records every request exactly as it arrived, answers 200 with the raw
request target as the body.

`seen` holds one dict per request: method, target (the raw bytes of the request line's
target, decoded latin-1), headers (list of (lowercase name, value)), body. A parse
error is recorded in `errors` and closes that connection. `wait_for(n)` waits (with a
deadline) until n requests have been recorded.
"""

from __future__ import annotations

import socket
import threading
import time

import httptools


class RecordingUpstream:
    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.seen: list[dict] = []
        self.errors: list[str] = []
        self.cond = threading.Condition()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def targets(self) -> list[str]:
        with self.cond:
            return [r["target"] for r in self.seen]

    def wait_for(self, n: int, timeout: float = 5.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.seen) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"upstream saw {len(self.seen)} requests, expected {n}")
                self.cond.wait(left)
            return list(self.seen)

    def close(self) -> None:
        self._closed = True
        self.sock.close()

    # -- server side --------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        up = self
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
                    with up.cond:
                        up.errors.append(str(exc))
                        up.cond.notify_all()
                    return
                while done:
                    req = done.pop(0)
                    with up.cond:
                        up.seen.append(req)
                        up.cond.notify_all()
                    body = req["target"].encode("latin-1")
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (len(body), body))
