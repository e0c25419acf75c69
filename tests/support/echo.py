"""A real, strict HTTP/1.1 upstream for tests: echoes what it saw, streams, stalls or misbehaves.

It parses with llhttp (tests/support/strict_http.py): a request that Node's HTTP
server would refuse (duplicate or conflicting Content-Length, Content-Length with
Transfer-Encoding, bare LF, obs-fold...) gets 400 and the connection is closed,
so a framing mistake by the gateway fails the test that made it. The exact bytes
of every request are kept (`raw`, `received`), refused ones in `rejected`.

Paths:
  /sse?n=N&interval=S   N server-sent events, one every S seconds (chunked)
  /slow?delay=S         answer after S seconds
  /die                  send a head promising 1000 bytes, 10 of them, then close
  /status/N             answer with status N
  /bytes?n=N            N bytes of body
  /drop                 read the request, close the connection without answering
  /drop-once?key=K      the same, the first time K is seen; an echo afterwards
  /barrier?n=N          hold each request until N of them wait, then answer all
  /stray                answer, then write a second, unsolicited response (in the
                        same write; with ?after=K: once the test calls release(K))
  /hop                  a response whose Connection header nominates x-hop-secret
  /bighead?kb=N&count=C a response head of N KiB (or C small headers)
  anything else         JSON: method, path, headers, body (latin-1 text), count
Counts requests and TCP connections (`requests`, `connections`).
"""

from __future__ import annotations

import json
import threading
import time
from urllib.parse import parse_qs, urlsplit

from tests.support.strict_http import Conn, Request, StrictHTTPServer, StrictPeer, format_response

STRAY = b"HTTP/1.1 200 OK\r\nx-evil: injected\r\ncontent-length: 5\r\n\r\nEVIL!"


class EchoServer(StrictPeer):
    def __init__(self, port: int = 0, tls: dict | None = None):
        self.server = StrictHTTPServer(self._handle, port=port, tls=tls, name="echo")
        self.seen: list[dict] = []
        self.raw: list[bytes] = []          # the raw bytes of each request in `seen`, same order
        self.sse_finished = threading.Event()
        self._lock = threading.Lock()
        self._dropped: set[str] = set()
        self._barrier_waiting = 0
        self._barrier = threading.Condition()
        self._gates: dict[str, threading.Event] = {}

    # -- the interface tests use ---------------------------------------------------------
    @property
    def scheme(self) -> str:
        return self.server.scheme

    @property
    def requests(self) -> int:
        """Requests answered or dropped (refused ones are in `rejected`)."""
        return len(self.seen)

    @property
    def connections(self) -> int:
        return self.server.connections

    @property
    def received(self) -> list[Request]:
        return self.server.received

    @property
    def rejected(self):
        return self.server.rejected

    def stop(self) -> None:
        for gate in list(self._gates.values()):
            gate.set()
        self.server.stop()

    def wait_until(self, predicate, timeout: float = 10.0) -> None:
        self.server.wait_until(predicate, timeout)

    def release(self, key: str) -> None:
        self._gate(key).set()

    def _gate(self, key: str) -> threading.Event:
        with self._lock:
            return self._gates.setdefault(key, threading.Event())

    # -- the handler -------------------------------------------------------------------
    def _handle(self, req: Request, conn: Conn) -> None:
        with self._lock:
            count = len(self.seen) + 1
            record = {"method": req.method, "path": req.target,
                      "headers": [[k, v] for k, v in req.headers],
                      "body": req.body.decode("latin-1"), "count": count}
            self.seen.append(record)
            self.raw.append(req.raw)
        url = urlsplit(req.target)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        path = url.path
        head_only = req.method == "HEAD"
        if path == "/sse":
            n, interval = int(q.get("n", 5)), float(q.get("interval", 0.1))
            conn.start_chunked(200, [("content-type", "text/event-stream")])
            for i in range(n):
                if not conn.send_chunk(f"data: event {i}\n\n".encode()):
                    return
                time.sleep(interval)
            conn.end_chunked()
            self.sse_finished.set()
            return
        if path == "/slow":
            time.sleep(float(q.get("delay", 5)))
        if path == "/die":
            conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n" + b"x" * 10)
            conn.close()
            return
        if path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
            conn.respond(status, [("content-type", "application/json")],
                         json.dumps({"status": status}).encode(), head_only=head_only)
            return
        if path == "/bytes":
            conn.respond(200, [], b"b" * int(q.get("n", 1024)), head_only=head_only)
            return
        if path == "/drop":
            conn.close()
            return
        if path == "/drop-once":
            key = q.get("key", "")
            with self._lock:
                first = key not in self._dropped
                self._dropped.add(key)
            if first:
                conn.close()
                return
        if path == "/barrier":
            n = int(q.get("n", 2))
            with self._barrier:
                self._barrier_waiting += 1
                self._barrier.notify_all()
                if not self._barrier.wait_for(lambda: self._barrier_waiting >= n, timeout=10):
                    conn.close()
                    return
        if path == "/hop":
            conn.respond(200, [("connection", "keep-alive, x-hop-secret"), ("x-hop-secret", "1"),
                               ("keep-alive", "timeout=30"), ("x-kept", "yes")], b"hop")
            return
        if path == "/bighead":
            if "count" in q:
                headers = [(f"x-h{i}", "v") for i in range(int(q["count"]))]
            else:
                kib = int(q.get("kb", 100))
                headers = [(f"x-big{i}", "a" * 1020) for i in range(kib)]
            conn.respond(200, headers, b"big head")
            return
        payload = json.dumps(record).encode()
        headers = [("content-type", "application/json"), ("x-upstream", "echo")]
        if path == "/stray":
            after = q.get("after")
            if after is None:
                conn.send(format_response(200, headers, payload) + STRAY)
            else:
                conn.respond(200, headers, payload)
                self._gate(after).wait(10)
                conn.send(STRAY)
            return
        conn.respond(200, headers, payload, head_only=head_only)

