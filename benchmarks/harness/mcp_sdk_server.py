"""The MCP server of benchmarks/mcp_bench.py: the official SDK's `MCPServer`, streamable
HTTP under uvicorn (uvloop + httptools when installed), stateless and answering JSON
(no SSE), one process. Its one tool, `get_root(database)`, returns 99 bytes of text.

    python benchmarks/harness/mcp_sdk_server.py --port 8000
"""

from __future__ import annotations

import argparse

import uvicorn
from mcp.server.mcpserver import MCPServer

ANSWER = "a" * 99


def build() -> MCPServer:
    mcp = MCPServer("bench", version="1")

    @mcp.tool()
    def get_root(database: str) -> str:
        """A fixed answer."""
        return ANSWER

    return mcp


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    a = p.parse_args()
    app = build().streamable_http_app(json_response=True, stateless_http=True)
    uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning", access_log=False)
