"""Peers for the ext_authz tests: an HTTP authorization server and a raw HTTP/1.1 client.

- `HttpAuthServer(handler)`: a handler on StrictHTTPServer on 127.0.0.1 (llhttp;
  every request recorded byte for byte: method, raw target, headers in order, body;
  `server.received` has the exact bytes) whose answer is `handler(request)`: a
  `(status, headers, body)` tuple, `HANG` (accept, read, never answer) or raw
  `bytes` written as they are (garbage), then the connection closes. `port=` lets
  a test bring a stopped server back on the same port (stop() frees it). `wait_for(n)` waits, with a
  deadline, until n requests arrived.
- `h1_request(port, ...)`: one HTTP/1.1 request written as given, the response
  parsed strictly (strict_client, llhttp); returns the status, the headers as received
  (lowercase names, order and repeats kept), the body and the client's own port
  (what the gateway reports as the source address).
"""

from __future__ import annotations

import socket
from typing import Callable, NamedTuple

from tests.support.recorder import RecordingPeer, as_dict
from tests.support.strict_client import read_response
from tests.support.strict_http import Conn, Request

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
        r = read_response(s)
        return Reply(r.status, r.headers, r.body, local_port)


class HttpAuthServer(RecordingPeer):
    label = "the auth server"
    wait_timeout = 10.0

    def __init__(self, handler: Callable[[dict], object] | None = None, port: int = 0):
        self.handler = handler or (lambda req: (200, [], b""))
        super().__init__(port, name="http-authz")

    def _handle(self, req: Request, conn: Conn) -> None:
        answer = self.handler(as_dict(req))
        if answer == HANG:
            conn.hang()          # until the client gives up or we stop
        elif isinstance(answer, bytes):
            conn.send(answer)
            conn.close()
        else:
            status, headers, body = answer
            conn.respond(status, headers, body)
