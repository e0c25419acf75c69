"""The petstore REST API of openapi.yaml, as a strict HTTP/1.1 test peer.

A handler on StrictHTTPServer (llhttp; exact bytes kept in `server.received`) that
records every request exactly as it arrived (`seen`: method, raw target, headers,
body); a refused request is answered 400, recorded in `errors` and closes the
connection. Keep-alive, content-length answers. A small in-memory store backs the
operations the tests call; `/echo/{value}` answers with what it received,
`/fail/{status}` with that status. `wait_for(n)` waits, with a deadline.
"""

from __future__ import annotations

import json
import threading
from urllib.parse import parse_qsl, unquote, urlsplit

from tests.support.recorder import RecordingPeer, as_dict
from tests.support.strict_http import Conn, Request

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 8


class PetstoreService(RecordingPeer):
    label = "the REST API"

    def __init__(self, port: int = 0) -> None:
        self.pets: dict[int, dict] = {1: {"id": 1, "name": "rex", "status": "available"},
                                      2: {"id": 2, "name": "tom", "status": "sold"}}
        super().__init__(port, name="petstore")

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

    def _handle(self, req: Request, conn: Conn) -> None:
        status, ctype, body = self.answer(as_dict(req))
        conn.respond(status, [("content-type", ctype)] if ctype else [], body)


if __name__ == "__main__":      # python -m tests.support.petstore.service [--port 9100]
    import argparse

    p = argparse.ArgumentParser(description="the petstore REST API of openapi.yaml")
    p.add_argument("--port", type=int, default=9100)
    a = p.parse_args()
    svc = PetstoreService(a.port)
    print(f"petstore API on {svc.url}/api", flush=True)
    threading.Event().wait()
