"""MCP as a library: JSON-RPC messages, the MCP view of a call, OpenAPI-described tools,
RFC 9728 metadata. Pure code (no I/O, no proxy/, filters/, backends/ or upstream/
imports): the `mcp` / `openapi_mcp` backends and the `mcp_auth` /
`mcp_authorization` filters build on it.
"""
