"""A strict recording HTTP/1.1 upstream for tests: a handler on StrictHTTPServer (llhttp,
what Node uses; exact bytes kept in `server.received`), answering 200 with the raw
request target as the body.

`seen` holds one dict per request: method, target (the raw bytes of the request line's
target, decoded latin-1), headers (list of (lowercase name, value)), body. A refused
request (bad framing, not exactly one Host) is answered 400, recorded in `errors` and
closes that connection. `wait_for(n)` waits (with a deadline) until n requests have
been recorded.
"""

from __future__ import annotations

from tests.support.strict_http import Conn, Request, StrictHTTPServer, StrictPeer


def as_dict(req: Request) -> dict:
    """The dict form of a request that the recording peers' `seen` lists hold."""
    return {"method": req.method, "target": req.target, "headers": list(req.headers), "body": req.body}


class RecordingPeer(StrictPeer):
    """A StrictHTTPServer whose requests read as `seen` dicts: the base of the recording peers.
    A subclass answers in `_handle(req, conn)`; `label` names it in a failed wait."""

    label = "upstream"
    wait_timeout = 5.0

    def __init__(self, port: int = 0, name: str = "recorder") -> None:
        self.server = StrictHTTPServer(self._handle, port=port, name=name).start()

    @property
    def seen(self) -> list[dict]:
        with self.cond:
            return [as_dict(r) for r in self.server.received]

    @property
    def errors(self) -> list[str]:
        """Requests the strict server refused (framing, Host): why, one each."""
        with self.cond:
            return [r.error for r in self.server.rejected]

    def targets(self) -> list[str]:
        with self.cond:
            return [r.target for r in self.server.received]

    def wait_for(self, n: int, timeout: float | None = None) -> list[dict]:
        try:
            self.server.wait_until(lambda: len(self.server.received) >= n, timeout or self.wait_timeout)
        except AssertionError:
            raise AssertionError(f"{self.label} saw {len(self.server.received)} requests, expected {n}") from None
        return self.seen

    def close(self) -> None:
        self.stop()

    def _handle(self, req: Request, conn: Conn) -> None:
        raise NotImplementedError


class RecordingUpstream(RecordingPeer):
    def _handle(self, req: Request, conn: Conn) -> None:
        conn.respond(200, [("content-type", "text/plain")], req.target.encode("latin-1"))
