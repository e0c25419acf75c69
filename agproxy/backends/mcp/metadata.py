"""The RFC 9728 Protected Resource Metadata endpoint of a `[route.mcp_auth]` route.

A gateway-served backend (registered by filters/mcp_auth.py at load, ahead of the
configured routes, so it needs no token): `GET` / `HEAD` answer the metadata JSON
of the resource as the client addressed it (agproxy/mcp/resource.py), with CORS
allowed (browser-based MCP clients read it cross-origin) and a short cache
lifetime; `OPTIONS` is the CORS preflight; other methods get 405.
"""

from __future__ import annotations

from typing import Any

from agproxy.http.messages import Headers
from agproxy.proxy.contract import Backend, Response

_CORS = [("access-control-allow-origin", "*"), ("access-control-allow-methods", "GET, HEAD, OPTIONS"),
         ("access-control-allow-headers", "mcp-protocol-version, authorization")]


class MetadataBackend(Backend):
    kind = "mcp_resource_metadata"

    def __init__(self, auth: Any):
        self.auth = auth            # the McpAuthFilter (its ProtectedResource and resource URL logic)
        self.name = "mcp_resource_metadata"

    def answer(self, ex) -> tuple[int, Headers, bytes]:
        method = ex.request.method
        if method == "OPTIONS":
            return 204, Headers(list(_CORS)), b""
        if method not in ("GET", "HEAD"):
            return 405, Headers([("allow", "GET, HEAD, OPTIONS")]), b""
        doc = self.auth.resource.document(self.auth._resource_url(ex))
        return 200, Headers([("content-type", "application/json"), ("cache-control", "max-age=300"),
                             *_CORS]), doc

    async def respond(self, ex) -> Response:
        status, headers, body = self.answer(ex)
        return Response(status, headers, body)

    def describe(self) -> dict:
        return {"type": self.kind, "paths": list(self.auth.resource.metadata_paths)}
