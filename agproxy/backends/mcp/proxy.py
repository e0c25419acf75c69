"""`type = "mcp"`: an MCP server (streamable HTTP) behind the gateway, both generations.

Theory of operation: streamable HTTP is plain HTTP to one endpoint, so this is
the relay of backends/http.py plus what MCP needs:

- POST: the JSON-RPC body is buffered (at most `max_message_bytes`, else 413
  with a JSON-RPC error) and parsed once (filters/mcp_common.py; the
  `[route.mcp_authorization]` filter may have done it already), so a body that
  is not JSON-RPC gets -32700 / -32600 and a header that disagrees with the body
  -32020 (HTTP 400) without reaching the server, for that request only: nothing
  is remembered, a session is never poisoned. Otherwise the original bytes are
  forwarded unchanged. The answer (JSON, SSE streamed event by event, 202 for
  notifications and client responses, 404 for an expired session) is relayed
  as it comes, with `Mcp-Session-Id` and the other headers.
- GET (the server's SSE stream) and DELETE (end of session) are relayed as they are.
- Client headers pass (Accept, `Mcp-Session-Id`, `MCP-Protocol-Version`,
  `Mcp-Method`, `Mcp-Name`, `Last-Event-ID`); a credential the route validated
  was removed by its authentication filter unless the route forwards it.

The older backend-level `[backend.X.mcp_auth]` table is the same policy as
`[route.mcp_auth]` (filters/mcp_auth.py), applied here for routes that have no
route-level one (a route-level section wins).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from agproxy.config.reader import Section
from agproxy.filters.mcp_common import error_reply, mcp_request
from agproxy.http.messages import BodyTooLarge, Headers
from agproxy.mcp.jsonrpc import INVALID_REQUEST, RpcError
from agproxy.backends.relay import relay, upstream_request_headers
from agproxy.proxy.build import BuildContext
from agproxy.proxy.contract import Backend, LocalReply, Response
from agproxy.upstream.origin import Origin

log = logging.getLogger("agproxy.mcp")

TYPE = "mcp"
DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024


class McpProxyBackend(Backend):
    kind = TYPE

    def __init__(self, url: str, origin: Origin, max_message: int, auth: Any = None):
        self.url = url
        self.origin = origin
        self.base = origin.base_path
        self.max_message = max_message
        self.auth = auth                       # backend-level mcp_auth (an McpAuthFilter) or None
        self._own_auth: set[str] = set()       # routes without a route-level mcp_auth

    def check_route(self, chain: Any) -> None:
        from agproxy.filters.mcp_auth import McpAuthFilter
        if self.auth is not None and not any(isinstance(f, McpAuthFilter) for f in chain.filters):
            self._own_auth.add(chain.name)

    async def _prepare(self, ex) -> LocalReply | None:
        """The local answer when the request must not be forwarded, else None."""
        if self.auth is not None and ex.route is not None and ex.route.name in self._own_auth:
            result = self.auth.on_request(ex)
            if result is not None and not isinstance(result, LocalReply):
                result = await result
            if result is not None:
                return result
        if ex.request.method != "POST":
            return None
        try:
            await ex.read_body(self.max_message)
        except BodyTooLarge:
            ex.error = "mcp: message too large"
            return error_reply(ex, RpcError(INVALID_REQUEST, f"Invalid Request: the message exceeds "
                                                             f"{self.max_message} bytes", status=413))
        req = mcp_request(ex)
        if req.error is not None:
            ex.error = f"mcp: {req.error.message}"
            return error_reply(ex, req.error)
        return None

    def _upstream(self, ex) -> tuple[Headers, str]:
        o = self.origin
        headers = upstream_request_headers(ex, o.authority, o.http2)
        target = ex.request.target
        if not self.base:
            return headers, target
        # MCP has one endpoint: the route's path (/mcp, /tools/mcp) maps onto the url's path.
        _, sep, query = target.partition("?")
        return headers, self.base + (sep + query if sep else "")

    async def respond(self, ex) -> Response:
        reply = await self._prepare(ex)
        if reply is not None:
            return reply
        headers, target = self._upstream(ex)
        body, length = ex.request_body()
        resp = await relay(ex, self.origin, ex.request.method, target, headers, body, ex.route.timeout, length,
                           self.name)
        if self.auth is not None and self.auth.seal is not None and ex.route.name in self._own_auth \
                and ex.jwt_claims is not None:
            self.auth.seal_session(ex, resp)
        ctype = resp.headers.get("content-type")
        if ctype is not None and ctype.startswith("text/event-stream"):
            # An event stream's first event may be long in coming (a GET stream has none
            # until the server notifies): the client gets the 200 now.
            return EventStream(resp.status, resp.headers, resp.body, resp.source)
        return resp

    def describe(self) -> dict:
        return {"type": self.kind, "url": self.url, "http2": self.origin.http2,
                "max_message_bytes": self.max_message,
                "mcp_auth": self.auth.describe() if self.auth is not None else None}


class EventStream(Response):
    __slots__ = ()
    flush_head = True


def build(name: str, sec: Section, ctx: BuildContext) -> McpProxyBackend | None:
    before = len(sec.problems.items)
    sec.str("type")
    url = sec.str("url")
    ca = sec.str("tls_ca_file", None)
    insecure = sec.bool("tls_insecure_skip_verify", False)
    http2 = sec.bool("http2", False)
    connect_timeout = sec.duration("connect_timeout", 5.0)
    max_message = sec.int("max_message_bytes", DEFAULT_MAX_MESSAGE, min=1024)
    auth_sec = sec.section("mcp_auth")
    sec.done()
    if ca is not None:
        ca = ctx.path(ca)
        if not os.path.isfile(ca):
            sec.error("tls_ca_file", f"file not found: {ca}")
    if not isinstance(url, str):
        return None
    origin = sec.convert("url", url, lambda u: Origin.from_url(
        u, ca_file=ca, insecure=bool(insecure), http2=bool(http2), connect_timeout=connect_timeout or 5.0))
    auth = None
    if auth_sec is not None:
        from agproxy.filters import mcp_auth
        path = _route_path_of_backend(ctx, name)
        auth = mcp_auth.build(auth_sec, ctx, route_path=path or "/mcp")
    if origin is None or len(sec.problems.items) > before:
        return None
    if insecure:
        log.warning("backend %s: TLS certificate verification is DISABLED (tls_insecure_skip_verify)", name)
    return McpProxyBackend(url, origin, max_message, auth)


def _route_path_of_backend(ctx: Any, name: str) -> str | None:
    for r in getattr(getattr(ctx, "cfg", None), "routes", []) or []:
        if r.backend == name:
            return r.match.get("path") or r.match.get("path_prefix")
    return None
