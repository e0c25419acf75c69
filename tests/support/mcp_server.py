"""A real MCP server for tests, built with the official SDK (`mcp.server.mcpserver.MCPServer`),
served over streamable HTTP by uvicorn in a thread on 127.0.0.1.

Tools: `read_file(path)`, `delete_file(path)`, `query(database, sql)`, `slow_count(n)`
(sends n progress notifications, so its answer is an SSE stream with several
events); a prompt `greet(name)`; resources `file:///readme` and `file:///secret`.
It is stateful by default (sessions, `Mcp-Session-Id`, GET stream) and answers
2026-07-28 requests too (the SDK serves both generations); `json_response=True`
answers JSON instead of SSE. `calls` records the tool calls that reached it.
"""

from __future__ import annotations

import asyncio
import threading
import time

import uvicorn
from mcp.server.mcpserver import Context, MCPServer

from tests.support.ports import free_port


def build_server(calls: list) -> MCPServer:
    mcp = MCPServer("test-tools", version="1.0")

    @mcp.tool()
    def read_file(path: str) -> str:
        """Read a file."""
        calls.append(("read_file", path))
        return f"contents of {path}"

    @mcp.tool()
    def delete_file(path: str) -> str:
        """Delete a file."""
        calls.append(("delete_file", path))
        return f"deleted {path}"

    @mcp.tool()
    def query(database: str, sql: str) -> dict:
        """Run a query."""
        calls.append(("query", database))
        return {"database": database, "rows": [[1]]}

    @mcp.tool()
    async def slow_count(n: int, ctx: Context) -> str:
        """Count to n, reporting progress."""
        calls.append(("slow_count", n))
        for i in range(n):
            await ctx.report_progress(i + 1, n)
        return f"counted {n}"

    @mcp.prompt()
    def greet(name: str) -> str:
        """A greeting."""
        return f"Hello {name}"

    @mcp.resource("file:///readme")
    def readme() -> str:
        return "read me"

    @mcp.resource("file:///secret")
    def secret() -> str:
        return "the secret"

    return mcp


class McpTestServer:
    def __init__(self, *, json_response: bool = False, stateless: bool = False):
        self.calls: list = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        app = build_server(self.calls).streamable_http_app(json_response=json_response, stateless_http=stateless)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the MCP test server did not start")
            time.sleep(0.02)   # polling a readiness condition

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


if __name__ == "__main__":      # python -m tests.support.mcp_server [--port 8000]
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--json", action="store_true", help="answer JSON instead of SSE")
    a = p.parse_args()
    app = build_server([]).streamable_http_app(json_response=a.json)
    uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning")
