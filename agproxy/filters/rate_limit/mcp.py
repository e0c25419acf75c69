"""The rate limit's refusals on an MCP route, as JSON-RPC errors.

Theory of operation
===================

An MCP client reads every POST answer as JSON-RPC. The official Python SDK (2.x),
given a non-2xx answer, hands the caller the JSON-RPC error in the body when the
body is `application/json` and one (with the request's id, also when the body says
`id: null`); any other body becomes a generic -32603 "Server returned an error
response" and the reason is lost. So on a route to an `mcp` or `openapi_mcp`
backend, or with `mcp_auth` / `mcp_authorization`, the rate limit's answers keep
their status and headers (429 with `retry-after` and `x-ratelimit-*`, what HTTP
clients and intermediaries read; 500 when the step failed closed) and their body
becomes a JSON-RPC error:

    {"jsonrpc": "2.0", "id": 7, "error": {"code": -32029, "message": "too many requests: ...",
     "data": {"retryAfter": 12}}}

The id is the request's when the body was parsed already (a route with
`mcp_authorization` reads it before the rate limit), else null: the body of a
plain `mcp` route is read after the rate limit, by the backend, and a refused
request must not be read for nothing. MCP defines no code for "rate limited";
-32029 is in JSON-RPC's server-error range, clear of the codes MCP uses.

Only refusals pay for this: an allowed request runs RateLimitFilter's code as is.
"""

from __future__ import annotations

from typing import Any

import orjson

from agproxy.filters.rate_limit import RateLimitFilter
from agproxy.mcp.call import McpRequest
from agproxy.mcp.jsonrpc import INTERNAL_ERROR, INVALID_REQUEST, error_body
from agproxy.proxy.contract import FilterResult, LocalReply

RATE_LIMITED = -32029

MCP_BACKENDS = ("mcp", "openapi_mcp")
MCP_POLICIES = ("mcp_auth", "mcp_authorization")


def is_mcp_route(rcfg: Any, cfg: Any) -> bool:
    """The route speaks MCP: its backend is an MCP one, or it has MCP policies."""
    if rcfg is None:
        return False
    if any(k in rcfg.policies for k in MCP_POLICIES):
        return True
    bcfg = getattr(cfg, "backends", {}).get(rcfg.backend)
    return bcfg is not None and bcfg.type in MCP_BACKENDS


class McpRateLimitFilter(RateLimitFilter):
    """RateLimitFilter whose refusals are JSON-RPC errors."""

    def on_request(self, ex: Any) -> FilterResult:
        res = RateLimitFilter.on_request(self, ex)
        if res is None:
            return None
        if isinstance(res, LocalReply):
            return as_jsonrpc(ex, res)
        return self._later(ex, res)

    @staticmethod
    async def _later(ex: Any, pending: Any) -> LocalReply | None:
        res = await pending
        return None if res is None else as_jsonrpc(ex, res)


def as_jsonrpc(ex: Any, reply: LocalReply) -> LocalReply:
    """The same answer (status, headers) with a JSON-RPC error body."""
    try:
        message = orjson.loads(reply.body).get("message") or "rate limit"
    except (orjson.JSONDecodeError, AttributeError):
        message = "rate limit"
    data = None
    headers = [(k, v) for k, v in reply.headers.items if k != "content-type"]
    if reply.status == 429:
        code = RATE_LIMITED
        for k, v in headers:
            if k == "retry-after" and v.isdigit():
                data = {"retryAfter": int(v)}
    else:
        code = INVALID_REQUEST if reply.status == 400 else INTERNAL_ERROR
    req = ex.mcp
    rid = None
    if isinstance(req, McpRequest) and req.body is not None and not req.body.batch:
        rid = req.id
    headers.insert(0, ("content-type", "application/json"))
    return LocalReply(reply.status, error_body(rid, code, message, data), headers)
