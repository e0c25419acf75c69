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

Filters are placed on a route in the fixed order of `ORDER`, whatever the order
of the TOML: authentication → authorization → rate limits → external
authorization → transformations / claims headers → token exchange / signing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Union

import orjson

from agproxy.http.messages import Headers, ResponseHead

if TYPE_CHECKING:
    from agproxy.proxy.exchange import Exchange

# Stage of each policy key under [[route]]; lower runs first.
ORDER = {
    "jwt": 10,
    "mcp_auth": 11,
    "authorization": 20,
    "mcp_authorization": 21,
    "rate_limit": 30,
    "ext_authz": 40,
    "transform": 50,
    "claims_to_headers": 51,
    "obo": 60,
    "forward_token": 61,
}


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
