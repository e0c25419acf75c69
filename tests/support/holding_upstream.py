"""A strict HTTP/1.1 upstream that counts requests in flight: it holds them, or streams big bodies.

A handler on StrictHTTPServer (llhttp, Node's parser): a framing mistake by the
gateway is refused there (400, the connection closed) and listed in `errors`. A
request is "in flight" from its complete arrival until its response is complete or
its connection closes, whichever comes first; `max_in_flight` is the most at once.

Paths:
  /hold/...        never answered (the gateway must give up on it: a reset, a timeout)
  /big?n=N         200 with N bytes, written as fast as the gateway reads them
State changes notify `cond`; `wait_for(predicate, timeout)` waits on it (no sleeps).
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from tests.support.strict_http import Conn, Request, StrictHTTPServer, StrictPeer


class HoldingUpstream(StrictPeer):
    def __init__(self):
        self.server = StrictHTTPServer(self._handle, name="holding-upstream")
        self.seen = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.body_bytes_sent = 0

    @property
    def connections(self) -> int:
        return self.server.connections

    @property
    def open_connections(self) -> int:
        return self.server.open_connections

    @property
    def errors(self) -> list[str]:
        with self.cond:
            return [r.error for r in self.server.rejected]

    def wait_for(self, predicate, timeout: float = 10.0) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: predicate(self), timeout):
                raise AssertionError(f"upstream condition not met within {timeout}s: seen={self.seen} "
                                     f"in_flight={self.in_flight} max={self.max_in_flight} "
                                     f"open={self.open_connections} errors={self.errors}")

    def _change(self, **delta) -> None:
        with self.cond:
            for k, v in delta.items():
                setattr(self, k, getattr(self, k) + v)
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.cond.notify_all()

    def _handle(self, req: Request, conn: Conn) -> None:
        self._change(seen=1, in_flight=1)
        try:
            parts = urlsplit(req.target)
            if not parts.path.startswith("/big"):
                conn.hang()          # until the gateway gives up on it (or we stop)
                return
            n = int(parse_qs(parts.query).get("n", ["1000000"])[0])
            if not conn.send(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                             b"content-length: %d\r\n\r\n" % n):
                return
            chunk, sent = b"x" * 16384, 0
            while sent < n:
                piece = chunk[:min(len(chunk), n - sent)]
                if not conn.send(piece):     # blocks while the gateway does not read
                    conn.close()
                    return
                sent += len(piece)
                self._change(body_bytes_sent=len(piece))
        finally:
            self._change(in_flight=-1)
