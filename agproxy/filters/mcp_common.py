"""What the MCP policies and the `mcp` backend share: the parsed MCP request of an
exchange (parsed once, kept as the exchange's `mcp` fact) and JSON-RPC replies.

Not a policy module (no KEY): proxy/registry.py never names it.
"""

from __future__ import annotations

from typing import Any

import orjson

from agproxy.mcp.call import McpRequest
from agproxy.mcp.jsonrpc import RpcError
from agproxy.proxy.contract import LocalReply

SSE = "text/event-stream"


def mcp_request(ex: Any) -> McpRequest:
    """The exchange's MCP request, parsed from the buffered body on first use."""
    req = _get(ex)
    if req is None:
        req = McpRequest.parse(ex.request.headers, ex.body or b"")
        _set(ex, req)
        ex.add_cel_variable("mcp", req.cel)
        first = req.first
        if first is not None and first.method:
            # Access-log fields (client text: bounded)
            ex.log("mcp_method", first.method[:64])
            if first.name:
                ex.log("mcp_name", first.name[:128])
    return req


def _get(ex: Any) -> McpRequest | None:
    got = ex.mcp
    return got if isinstance(got, McpRequest) else None


def _set(ex: Any, req: McpRequest) -> None:
    ex.mcp = req


def wants_sse_only(ex: Any) -> bool:
    """The client accepts an SSE answer but not a JSON one."""
    accept = (ex.request.headers.get("accept") or "").lower()
    return SSE in accept and "application/json" not in accept and "*/*" not in accept


def jsonrpc_reply(ex: Any, status: int, body: bytes) -> LocalReply:
    """A JSON-RPC answer as the client expects it: JSON, or one SSE event."""
    if status == 200 and wants_sse_only(ex):
        data = b"event: message\ndata: " + body + b"\n\n"
        return LocalReply(200, data, [("content-type", SSE), ("cache-control", "no-cache")])
    return LocalReply(status, body, [("content-type", "application/json")])


def error_reply(ex: Any, err: RpcError) -> LocalReply:
    return jsonrpc_reply(ex, err.status, err.body())


def batch_reply(ex: Any, docs: list[dict]) -> LocalReply:
    return jsonrpc_reply(ex, 200, orjson.dumps(docs))
