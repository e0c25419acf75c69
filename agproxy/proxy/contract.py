"""The contracts between the exchange, policies and backends (a neutral module).

Theory of operation: `proxy/exchange.py` runs one request; filters (`filters/*`)
and backends (`backends/*`) plug into it through the types here, and this module
imports nothing of theirs, so exchange, route and filter modules depend on it and
never on each other in a circle.

- `Response`: what a backend returns and the exchange commits to the client: a
  status, headers, and a body that is either `bytes` (in memory) or a stream with
  `async read() -> bytes` (b"" at the end) and `.trailers` once it ended. `source`
  is what to `abort()` when the exchange gives up on the body (the upstream
  response); `discard()` does that, so a backend may look at an answer (429, 5xx)
  and try elsewhere first: nothing reaches the client before the exchange commits.
  A `LocalReply` is a Response the gateway produces itself, with an in-memory body.
- `Filter`: a policy on a route. Request phase `on_request(ex)`: None (continue),
  a Response (answer it, stop), or an awaitable resolving to one of those (only
  filters that do I/O return one: the common path costs no task). A filter that
  reads the request body declares `body_limit`; the exchange buffers the body into
  `ex.body` right before the first such filter, so never before authentication
  (stages are ordered), and answers 413 over the limit. Response phase
  `on_response(ex, resp)`: may edit `resp.status` / `resp.headers`, and may return
  a `BodyHook`; filters that may do so set `reads_response_body` (the route then
  asks upstream for identity content coding, see proxy/body.py).
- `BodyHook`: synchronous and I/O-free. `feed(chunk)` returns the bytes to send in
  its place, `end()` the bytes to send last. `transforms = False` marks an
  observe-only hook: what `feed`/`end` return is ignored and the chunk passes on as
  the same object, so observing copies nothing and `content-length` stays.
- `Backend`: what a route points at; `respond(ex)` returns a Response or raises
  (`UpstreamError` becomes 502/504 in the exchange, `BodyTooLarge` 413). It never
  writes to the client.

At load, once a route's whole chain is built, `check_route(chain)` lets a filter
(and the backend) check what it needs from the others. They ask the built chain
(`RouteChain`), through what filters declare (`provides`, `sets_request_headers`),
never another policy's TOML. Stages (the order filters run in) are declared by
the policy modules (proxy/registry.py).
"""

from __future__ import annotations

import enum
from typing import Any, Awaitable, Iterable, Union

import orjson

from agproxy.http.messages import Headers

# The `ex` every method receives is a proxy.exchange.Exchange; it is typed `Any`
# here because this module imports nothing of proxy/, not even for annotations.

class Provides(enum.Enum):
    """What a filter establishes on the Exchange for the filters and the backend after it."""

    CALLER_TOKEN = "caller_token"   # ex.jwt_token / ex.jwt_claims: a validated caller credential
    OBO_TOKEN = "obo_token"         # ex.obo_token: a token exchanged for this route


class Response:
    """A response head plus its body (bytes, or a stream read to b"")."""

    __slots__ = ("status", "headers", "body", "source")

    # True: commit sends the head at once instead of with the first body bytes (a stream
    # whose first bytes may be long in coming: an MCP server's GET stream). A class
    # attribute, so the common response pays one lookup, not a header scan.
    flush_head = False

    def __init__(self, status: int, headers: Headers, body: Any = b"", source: Any = None):
        self.status = status
        self.headers = headers
        self.body = body
        self.source = source      # has abort(): given up before the body ended

    @property
    def trailers(self) -> Headers | None:
        """Trailers of a streamed body, once it ended (None for bytes)."""
        return getattr(self.body, "trailers", None)

    def discard(self) -> None:
        """The exchange will not send this response: release what it holds upstream."""
        if self.source is not None:
            self.source.abort()
            self.source = None


class LocalReply(Response):
    """A response the gateway produces itself (headers are copied at commit: replies
    may be shared constants)."""

    __slots__ = ()

    def __init__(self, status: int, body: bytes = b"", headers: Headers | list | None = None):
        if headers is None:
            headers = Headers()
        elif not isinstance(headers, Headers):
            headers = Headers(headers)
        self.status = status
        self.headers = headers
        self.body = body
        self.source = None

    @classmethod
    def json(cls, status: int, payload: Any, headers: list[tuple[str, str]] | None = None) -> "LocalReply":
        h = Headers([("content-type", "application/json")])
        if headers:
            h.items.extend(headers)
        return cls(status, orjson.dumps(payload) + b"\n", h)

    @classmethod
    def error(cls, status: int, error: str, message: str, headers: list[tuple[str, str]] | None = None) -> "LocalReply":
        return cls.json(status, {"error": error, "message": message}, headers)


FilterResult = Union[None, Response, Awaitable[Union[None, Response]]]


class BodyHook:
    """Sees a response body on its way to the client (see the module docstring)."""

    __slots__ = ()

    transforms = True

    def feed(self, chunk: bytes) -> bytes | None:
        return chunk

    def end(self) -> bytes | None:
        return b""


class Filter:
    """Base class; subclasses override what they need."""

    name = "filter"
    body_limit: int | None = None     # bytes of request body this filter reads (ex.body)
    reads_response_body = False       # on_response may return a BodyHook

    def on_request(self, ex: Any) -> FilterResult:
        return None

    def on_response(self, ex: Any, resp: Response) -> BodyHook | None:
        return None

    def describe(self) -> dict:
        """What /config shows for this filter (never secrets)."""
        return {"type": self.name}

    # -- load time: what route-level checks see -------------------------------------
    provides: frozenset = frozenset()                    # Provides members
    sets_request_headers: frozenset[str] = frozenset()   # lowercase names this filter sets

    def check_route(self, chain: "RouteChain") -> None:
        """Once the route's chain is built: report (chain.problems) what it lacks for this filter."""
        return None


class RouteChain:
    """A route's built filters, as `check_route` sees them at load."""

    __slots__ = ("name", "path", "filters", "problems")

    def __init__(self, name: str, path: str, filters: Iterable[Filter], problems: Any):
        self.name = name
        self.path = path              # TOML path of the route: "route[2]"
        self.filters = tuple(filters)
        self.problems = problems

    def provides(self, fact: Provides, before: Filter | None = None) -> bool:
        """Some filter establishes `fact` (ahead of `before`, when given)."""
        for f in self.filters:
            if f is before:
                return False
            if fact in f.provides:
                return True
        return False

    def request_headers_set(self) -> frozenset[str]:
        """Every request header name that some filter of the route sets."""
        return frozenset().union(*(f.sets_request_headers for f in self.filters))


class Backend:
    """What a route points at: `respond(ex)` returns the Response to commit."""

    name = ""
    kind = ""

    async def respond(self, ex: Any) -> Response:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> dict:
        return {"type": self.kind}

    def check_route(self, chain: RouteChain) -> None:
        """At load, once per route pointing here, with the route's built filters."""
        return None
