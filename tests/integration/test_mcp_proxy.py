"""`type = "mcp"` through the real gateway: the official SDK client (both generations)
against an SDK-built MCPServer (streamable HTTP, SSE answers, sessions), with
`[route.mcp_authorization]` on the route."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from mcp import Client

from tests.support.gateway import GatewayProcess
from tests.support.mcp_server import McpTestServer
from tests.support.strict_http import Conn, Request, StrictHTTPServer

CONFIG = """
[[route]]
name = "tools"
match = {{ path = "/mcp" }}
backend = "tools"

[route.mcp_authorization]
rules = [
  {{ deny = 'mcp.method == "tools/call" && mcp.tool.name == "delete_file"' }},
  {{ require = 'mcp.method != "tools/call" || mcp.tool.name != "query" || mcp.tool.arguments.database == "reporting"' }},
  {{ deny = 'mcp.method == "resources/read" && mcp.resource.uri == "file:///secret"' }},
]

[[route]]
name = "open"
match = {{ path = "/open/mcp" }}
backend = "tools"

[backend.tools]
type = "mcp"
url = "{url}"
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    server = McpTestServer()
    gw = GatewayProcess(CONFIG.format(url=server.url), tmp_path_factory.mktemp("mcp-proxy"))
    yield gw, server
    gw.stop()
    server.close()


def gw_url(gw, path="/mcp"):
    return f"http://127.0.0.1:{gw.port}{path}"


def denied_count(gw, method: str) -> float:
    """agproxy_mcp_denied_total{route="tools", method} from /metrics (0 before the first)."""
    for line in gw.metrics().splitlines():
        if line.startswith("agproxy_mcp_denied_total{") and f'method="{method}"' in line \
                and 'route="tools"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _err(aw):
    try:
        await aw
    except Exception as exc:
        return exc
    raise AssertionError("expected an MCP error")


@pytest.mark.parametrize("mode,version", [("auto", "2026-07-28"), ("legacy", "2025-11-25")])
def test_sdk_client_through_the_gateway(world, mode, version):
    gw, server = world
    n = len(server.calls)
    calls_before, reads_before = denied_count(gw, "tools/call"), denied_count(gw, "resources/read")

    async def go():
        async with Client(gw_url(gw), mode=mode) as c:
            tools = sorted(t.name for t in (await c.list_tools()).tools)
            resources = sorted(str(r.uri) for r in (await c.list_resources()).resources)
            prompts = [p.name for p in (await c.list_prompts()).prompts]
            read = await c.call_tool("read_file", {"path": "/etc/motd"})
            denied = await _err(c.call_tool("delete_file", {"path": "/"}))
            wrong_db = await _err(c.call_tool("query", {"database": "prod", "sql": "select 1"}))
            right_db = await c.call_tool("query", {"database": "reporting", "sql": "select 1"})
            progress = []

            async def on_progress(p, total, message):
                progress.append(p)
            counted = await c.call_tool("slow_count", {"n": 3}, progress_callback=on_progress)
            prompt = await c.get_prompt("greet", {"name": "Ann"})
            readme = await c.read_resource("file:///readme")
            secret = await _err(c.read_resource("file:///secret"))
            return (c.protocol_version, (tools, resources, prompts), read, denied, wrong_db, right_db, counted, progress, prompt, readme,
                    secret)

    (negotiated, tools, read, denied, wrong_db, right_db, counted, progress, prompt, readme,
     secret) = asyncio.run(go())
    assert negotiated == version
    # Lists are filtered to what may be used (the SDK server answers them in SSE events
    # on the handshake era, in JSON on 2026-07-28); query stays: its rule reads arguments.
    assert tools == (["query", "read_file", "slow_count"], ["file:///readme"], ["greet"])
    assert read.content[0].text == "contents of /etc/motd"
    assert denied.code == -32003 and "delete_file" in denied.message
    assert wrong_db.code == -32003
    assert right_db.is_error is not True and '"reporting"' in right_db.content[0].text
    assert counted.content[0].text == "counted 3" and progress == [1, 2, 3]
    assert prompt.messages[0].content.text == "Hello Ann"
    assert readme.contents[0].text == "read me"
    assert secret.code == -32003
    # Denied calls never reached the server, and are counted.
    assert server.calls[n:] == [("read_file", "/etc/motd"), ("query", "reporting"), ("slow_count", 3)]
    assert denied_count(gw, "tools/call") - calls_before == 2
    assert denied_count(gw, "resources/read") - reads_before == 1


HDR = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}


def test_sessions_headers_and_bad_input(world):
    gw, server = world
    base = gw_url(gw, "/open/mcp")
    with httpx.Client(timeout=10) as c:
        r = c.post(base, json=INIT, headers=HDR)
        assert r.status_code == 200
        sid = r.headers["mcp-session-id"]
        h = {**HDR, "mcp-session-id": sid, "mcp-protocol-version": "2025-06-18"}
        r = c.post(base, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=h)
        assert (r.status_code, r.content) == (202, b"")
        # A lying header fails that request only...
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "read_file",
                                                                            "arguments": {"path": "x"}}}
        r = c.post(base, json=call, headers={**h, "mcp-method": "tools/call", "mcp-name": "delete_file"})
        assert r.status_code == 400 and r.json()["error"]["code"] == -32020 and r.json()["id"] == 2
        r = c.post(base, content=b'{"jsonrpc": "2.0", "id": 3, "method": ', headers=h)
        assert r.status_code == 400 and r.json()["error"]["code"] == -32700
        r = c.post(base, content=b'{"jsonrpc": "2.0", "id": 3}', headers=h)
        assert r.status_code == 400 and r.json()["error"]["code"] == -32600
        r = c.post(base, content=b"[" + b" " * (5 * 1024 * 1024) + b"]", headers=h)
        assert r.status_code == 413 and r.json()["error"]["code"] == -32600
        # ... and the session goes on: the next call (answered as SSE) works.
        r = c.post(base, json={**call, "id": 4}, headers=h)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert '"contents of x"' in r.text and '"id":4' in r.text
        # The server's GET stream: its head reaches the client at once, before any event
        # (an event stream's first event may be long in coming).
        with c.stream("GET", base, headers={"accept": "text/event-stream", "mcp-session-id": sid,
                                            "mcp-protocol-version": "2025-06-18"}, timeout=3) as s:
            assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        with httpx.Client(http1=False, http2=True, timeout=3) as h2:       # h2c prior knowledge
            sid2 = h2.post(base, json=INIT, headers=HDR).headers["mcp-session-id"]   # one GET per session
            with h2.stream("GET", base, headers={"accept": "text/event-stream", "mcp-session-id": sid2,
                                                 "mcp-protocol-version": "2025-06-18"}) as s:
                assert s.http_version == "HTTP/2" and s.status_code == 200
        r = c.delete(base, headers={"mcp-session-id": sid, "mcp-protocol-version": "2025-06-18"})
        assert r.status_code == 200
        r = c.post(base, json={**call, "id": 5}, headers=h)
        assert r.status_code == 404          # the session ended upstream


class DyingSseServer:
    """An MCP server that answers a request with an SSE head and one event, then dies
    (closes the connection without ending the chunked body). StrictHTTPServer."""

    def __init__(self):
        self.server = StrictHTTPServer(self._answer, name="dying-sse").start()
        self.url = self.server.url + "/mcp"

    def _answer(self, req: Request, conn: Conn) -> None:
        conn.start_chunked(200, [("content-type", "text/event-stream")])
        conn.send_chunk(b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/progress","params":{}}\n\n')
        conn.close()

    def close(self):
        self.server.stop()


def test_upstream_dying_mid_sse_breaks_only_that_stream(tmp_path):
    dying = DyingSseServer()
    healthy = McpTestServer(json_response=True)
    gw = GatewayProcess(f"""
[[route]]
name = "dying"
match = {{ path = "/dying/mcp" }}
backend = "dying"

[[route]]
name = "healthy"
match = {{ path = "/mcp" }}
backend = "healthy"

[backend.dying]
type = "mcp"
url = "{dying.url}"

[backend.healthy]
type = "mcp"
url = "{healthy.url}"
""", tmp_path)
    try:
        with httpx.Client(timeout=10) as c:
            with pytest.raises(httpx.RemoteProtocolError):
                with c.stream("POST", gw_url(gw, "/dying/mcp"), json=INIT, headers=HDR) as s:
                    assert s.status_code == 200
                    for _ in s.iter_raw():
                        pass     # the event arrives, then the cut: never a clean end
            r = c.post(gw_url(gw), json=INIT, headers=HDR)
            assert r.status_code == 200 and r.json()["result"]["serverInfo"]["name"] == "test-tools"
    finally:
        gw.stop()
        lines = [json.loads(x) for x in gw.access_log_path.read_text().splitlines()]
        assert [x["route"] for x in lines if "upstream broke mid-body" in x.get("error", "")] == ["dying"]
        dying.close()
        healthy.close()
