"""The petstore REST API of openapi.yaml, as a strict HTTP/1.1 test peer.

Parses with httptools (llhttp) and records every request exactly as it arrived
(`seen`: method, raw target, headers, body); a parse error goes to `errors` and
closes the connection. Keep-alive, content-length answers. A small in-memory
store backs the operations the tests call; `/echo/{value}` answers with what it
received, `/fail/{status}` with that status. `wait_for(n)` waits, with a deadline.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from urllib.parse import parse_qsl, unquote, urlsplit

import httptools

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 8


class PetstoreService:
    def __init__(self, port: int = 0) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.seen: list[dict] = []
        self.errors: list[str] = []
        self.cond = threading.Condition()
        self.pets: dict[int, dict] = {1: {"id": 1, "name": "rex", "status": "available"},
                                      2: {"id": 2, "name": "tom", "status": "sold"}}
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def wait_for(self, n: int, timeout: float = 5.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.seen) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"the REST API saw {len(self.seen)} requests, expected {n}")
                self.cond.wait(left)
            return list(self.seen)

    def close(self) -> None:
        self._closed = True
        self.sock.close()

    # -- the API ----------------------------------------------------------------------
    def answer(self, req: dict) -> tuple[int, str, bytes]:
        parts = urlsplit(req["target"])
        path = parts.path.removeprefix("/api")
        segs = [unquote(s) for s in path.split("/") if s]
        m = req["method"]
        if segs == ["pets"] and m == "GET":
            q = dict(parse_qsl(parts.query))
            pets = [p for p in self.pets.values() if "status" not in q or p["status"] == q["status"]]
            return 200, "application/json", json.dumps(pets).encode()
        if segs == ["pets"] and m == "POST":
            data = json.loads(req["body"])
            pid = max(self.pets, default=0) + 1
            self.pets[pid] = {"id": pid, **data}
            return 201, "application/json", json.dumps(self.pets[pid]).encode()
        if len(segs) == 2 and segs[0] == "pets":
            pid = int(segs[1]) if segs[1].isdigit() else -1
            if pid not in self.pets:
                return 404, "application/json", json.dumps({"code": 404, "message": "no such pet"}).encode()
            if m == "DELETE":
                del self.pets[pid]
                return 204, "", b""
            return 200, "application/json", json.dumps(self.pets[pid]).encode()
        if len(segs) == 3 and segs[0] == "pets" and segs[2] == "photo":
            return 200, "image/png", PNG
        if segs and segs[0] == "echo":
            return 200, "application/json", json.dumps({
                "method": m, "target": req["target"], "headers": req["headers"],
                "body": req["body"].decode("latin-1")}).encode()
        if len(segs) == 2 and segs[0] == "fail":
            return int(segs[1]), "text/plain", b"failed on purpose"
        if segs == ["conformance", "simple-text"]:
            return 200, "text/plain", b"This is a simple text response for testing."
        if segs == ["conformance", "image"]:
            return 200, "image/png", PNG
        if segs == ["conformance", "audio"]:
            return 200, "audio/wav", b"RIFF\x24\x00\x00\x00WAVEfmt "
        if segs == ["conformance", "error"]:
            return 500, "text/plain", b"This tool intentionally returns an error for testing"
        if segs == ["store", "inventory"]:
            return 200, "application/json", b'{"available": 1, "sold": 1}'
        return 404, "text/plain", b"not found"

    # -- HTTP ---------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
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
                    status, ctype, body = self.answer(req)
                    head = f"HTTP/1.1 {status} X\r\ncontent-length: {len(body)}\r\n"
                    if ctype:
                        head += f"content-type: {ctype}\r\n"
                    conn.sendall(head.encode() + b"\r\n" + body)



if __name__ == "__main__":      # python -m tests.support.petstore.service [--port 9100]
    import argparse

    p = argparse.ArgumentParser(description="the petstore REST API of openapi.yaml")
    p.add_argument("--port", type=int, default=9100)
    a = p.parse_args()
    svc = PetstoreService(a.port)
    print(f"petstore API on {svc.url}/api", flush=True)
    threading.Event().wait()
