"""MCP backends: `mcp` (proxy.py, an MCP server behind the gateway), `openapi_mcp`
(openapi.py, the gateway as the MCP server of a REST API) and the RFC 9728
metadata endpoint of `[route.mcp_auth]` (metadata.py)."""
