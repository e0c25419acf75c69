"""One request's journey through the gateway.

Theory of operation: the server adapter hands the proxy a `ServerStream`; the
`Exchange` wraps it with what the gateway learns along the way (the route, the
verified JWT, facts filters leave for each other, the CEL activation) and with the
accounting the access log and metrics need (status, bytes, upstream, timings).
Backends answer through `ex.send_head / send_data / end`, so response-phase
filters and byte counts are applied in one place whatever the backend is.
"""

from __future__ import annotations

import time
from random import getrandbits
from typing import TYPE_CHECKING, Any, Callable

from agproxy import cel
from agproxy.http.messages import ConnInfo, Headers, RequestHead, ResponseHead, ServerStream

if TYPE_CHECKING:
    from agproxy.proxy.route import Route


def new_request_id() -> str:
    # 128 random bits from the process PRNG (reseeded in every forked worker):
    # unique enough for correlation, and no getrandom() syscall per request.
    return "%032x" % getrandbits(128)


class Exchange:
    __slots__ = ("stream", "request", "conn", "route", "request_id", "start", "jwt_claims",
                 "jwt_token", "facts", "body", "status", "bytes_in", "bytes_out", "upstream",
                 "_activation", "error", "response_filters", "upstream_start", "upstream_time")

    def __init__(self, stream: ServerStream):
        self.stream = stream
        self.request: RequestHead = stream.request
        self.conn: ConnInfo = stream.conn
        self.route: "Route | None" = None
        self.start = time.monotonic()
        rid = self.request.headers.get("x-request-id")
        self.request_id = rid if rid and len(rid) <= 128 and rid.isprintable() else new_request_id()
        self.jwt_claims: dict | None = None   # verified claims (set by authentication filters)
        self.jwt_token: str | None = None     # the validated caller credential
        self.facts: dict[str, Any] = {}       # what filters leave for later filters/backends
        self.body: bytes | None = None        # set when a filter asked for the buffered body
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.upstream: str | None = None
        self._activation = None
        self.error: str | None = None
        self.response_filters: tuple = ()
        self.upstream_start = 0.0
        self.upstream_time: float | None = None

    # -- CEL ------------------------------------------------------------------------
    @property
    def activation(self):
        """The lazily built CEL activation (`request`, `source`, `jwt`, ...)."""
        act = self._activation
        if act is None:
            providers: dict[str, Callable[[], object]] = {
                "request": self._cel_request,
                "source": self._cel_source,
                "jwt": self._cel_jwt,
            }
            extra = self.facts.get("cel")
            if extra:
                providers.update(extra)
            act = self._activation = cel.Activation(providers)
        return act

    def add_cel_variable(self, name: str, provider: Callable[[], object]) -> None:
        """Filters that learn something CEL may use (mcp, llm, response) register it here."""
        self.facts.setdefault("cel", {})[name] = provider
        if self._activation is not None:
            self._activation.set_provider(name, provider)

    def _cel_request(self) -> dict:
        r = self.request
        return {
            "method": r.method,
            "path": r.path,
            "host": r.host,
            "scheme": r.scheme,
            "headers": r.headers.as_dict(),
            "query": _parse_query(r.query),
            "protocol": r.protocol,
            "id": self.request_id,
        }

    def _cel_source(self) -> dict:
        c = self.conn
        return {"address": c.peer_host, "port": c.peer_port, "tls": c.tls}

    def _cel_jwt(self) -> dict:
        return self.jwt_claims or {}

    # -- answering --------------------------------------------------------------------
    def send_head(self, status: int, headers: Headers) -> None:
        head = ResponseHead(status, headers)
        for f in self.response_filters:
            f.on_response(self, head)
        self.status = head.status
        self.stream.send_head(head.status, head.headers)

    async def send_data(self, data: bytes) -> None:
        self.bytes_out += len(data)
        await self.stream.send_data(data)

    async def end(self, trailers: Headers | None = None) -> None:
        await self.stream.end(trailers)

    async def reply(self, status: int, headers: Headers, body: bytes) -> None:
        """A complete local response (the gateway's own answer)."""
        if body:
            headers.set("content-length", str(len(body)))
        else:
            headers.set("content-length", "0")
        self.send_head(status, headers)
        if body and self.request.method != "HEAD":
            await self.send_data(body)
        await self.end()


def _parse_query(query: str) -> dict[str, str]:
    if not query:
        return {}
    from urllib.parse import parse_qsl
    out: dict[str, str] = {}
    for k, v in parse_qsl(query, keep_blank_values=True):
        out.setdefault(k, v)
    return out
