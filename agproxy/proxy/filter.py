"""The filter contract: what a policy may do to one request.

Theory of operation: a filter is built once from its config section (errors are
config errors, at load). Per request the chain calls `on_request(ex)`; the return
value decides what happens next, without costing a task for filters that do no I/O:

- `None`: continue with the next filter;
- a `LocalReply`: stop and answer the client with it (401, 403, 429, ...);
- an awaitable: the chain awaits it; it resolves to `None` or a `LocalReply`.

`on_response(ex, head)` runs when the backend's response head is known, in reverse
order, and may edit `head.headers` (it must not block). Filters that need the whole
request body set `body_limit` (bytes); the chain buffers it once into `ex.body`
(413 when over) before the first such filter runs.

Filters are placed on a route in the fixed order of their stages (each policy
module declares its `STAGE`, proxy/registry.py), whatever the order of the TOML:
authentication → authorization → rate limits → external authorization →
transformations / claims headers → token exchange / signing.

At load, once a route's whole chain is built, `check_route(chain)` lets a filter
(and the backend) check what it needs from the others. They ask the built chain,
through what filters declare (`provides`, `sets_request_headers`), never another
policy's TOML.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Awaitable, Iterable, Union

import orjson

from agproxy.http.messages import Headers, ResponseHead

if TYPE_CHECKING:
    from agproxy.proxy.exchange import Exchange


class Provides(enum.Enum):
    """What a filter establishes on the Exchange for the filters and the backend after it."""

    CALLER_TOKEN = "caller_token"   # ex.jwt_token / ex.jwt_claims: a validated caller credential
    OBO_TOKEN = "obo_token"         # ex.facts["obo_token"]: a token exchanged for this route


class LocalReply:
    """A response the gateway produces itself."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, body: bytes = b"", headers: Headers | list | None = None):
        self.status = status
        self.body = body
        if headers is None:
            headers = Headers()
        elif not isinstance(headers, Headers):
            headers = Headers(headers)
        self.headers = headers

    @classmethod
    def json(cls, status: int, payload: Any, headers: list[tuple[str, str]] | None = None) -> "LocalReply":
        h = Headers([("content-type", "application/json")])
        if headers:
            h.items.extend(headers)
        return cls(status, orjson.dumps(payload) + b"\n", h)

    @classmethod
    def error(cls, status: int, error: str, message: str, headers: list[tuple[str, str]] | None = None) -> "LocalReply":
        return cls.json(status, {"error": error, "message": message}, headers)


FilterResult = Union[None, LocalReply, Awaitable[Union[None, LocalReply]]]


class Filter:
    """Base class; subclasses override what they need."""

    name = "filter"
    body_limit: int | None = None   # bytes of request body this filter needs buffered

    def on_request(self, ex: "Exchange") -> FilterResult:
        return None

    def on_response(self, ex: "Exchange", head: ResponseHead) -> None:
        return None

    def describe(self) -> dict:
        """What /config shows for this filter (never secrets)."""
        return {"type": self.name}

    # -- load time: what route-level checks see -------------------------------------
    provides: frozenset = frozenset()                 # Provides members
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
