"""agproxy/mcp/server.py: the stateless MCP server logic (both generations), with a stub REST call."""

from __future__ import annotations

import asyncio
import os

import orjson
import pytest

from agproxy.http.messages import Headers
from agproxy.mcp.openapi import ToolSet
from agproxy.mcp.server import CAPABILITIES_META, PROTOCOL_META, ToolServer

PETSTORE = os.path.join(os.path.dirname(__file__), "..", "support", "petstore", "openapi.yaml")
TOOLS = ToolSet.load(spec_file=PETSTORE)
MODERN = "2026-07-28"


async def _call(tool, args, version):
    return {"content": [{"type": "text", "text": f"{tool.name} {orjson.dumps(args).decode()} {version}"}],
            "isError": False}


def run(body, headers=(), method="POST", page_size=None):
    h = Headers([("content-type", "application/json"), ("accept", "application/json, text/event-stream"),
                 *headers])
    server = ToolServer(TOOLS, name="pets", page_size=page_size)
    ans = asyncio.run(server.handle(method, h, orjson.dumps(body) if not isinstance(body, bytes) else body, _call))
    return ans.status, (orjson.loads(ans.body) if ans.body else None), ans


def modern(method, params=None, id=1, **headers):
    p = dict(params or {})
    p["_meta"] = {PROTOCOL_META: MODERN, CAPABILITIES_META: {}}
    h = [("mcp-protocol-version", MODERN), ("mcp-method", method)] + [(k.replace("_", "-"), v)
                                                                       for k, v in headers.items()]
    return run({"jsonrpc": "2.0", "id": id, "method": method, "params": p}, h)


def test_handshake_initialize_list_call():
    s, doc, ans = run({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                       "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}})
    assert s == 200 and doc["result"]["protocolVersion"] == "2025-06-18"
    assert doc["result"]["capabilities"] == {"tools": {"listChanged": False}}
    assert not any(k == "mcp-session-id" for k, _ in ans.headers)     # stateless
    s, doc, _ = run({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "1999-01-01"}})
    assert doc["result"]["protocolVersion"] == "2025-11-25"
    s, doc, _ = run({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, [("mcp-protocol-version", "2025-11-25")])
    assert len(doc["result"]["tools"]) == 25 and "resultType" not in doc["result"]
    s, doc, _ = run({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "getPet", "arguments": {"petId": 4}}})
    assert doc["result"]["content"][0]["text"] == 'getPet {"petId":4} 2025-03-26'


def test_modern_discover_list_call_ping():
    s, doc, _ = modern("server/discover")
    r = doc["result"]
    assert s == 200 and r["supportedVersions"] == [MODERN] and r["resultType"] == "complete"
    assert r["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "pets"
    s, doc, _ = modern("tools/list")
    assert doc["result"]["cacheScope"] == "public" and doc["result"]["ttlMs"] == 0
    s, doc, _ = modern("tools/call", {"name": "getPet", "arguments": {"petId": 4}}, mcp_name="getPet")
    assert doc["result"]["resultType"] == "complete" and doc["result"]["content"][0]["text"].endswith(MODERN)
    s, doc, _ = modern("ping")              # removed in 2026-07-28
    assert s == 404 and doc["error"]["code"] == -32601


def test_modern_errors_have_http_status():
    s, doc, _ = modern("tools/call", {"name": "getPet", "arguments": {"petId": "x"}}, mcp_name="getPet")
    assert s == 400 and doc["error"]["code"] == -32602 and doc["error"]["data"]["field"] == "/petId"
    s, doc, _ = modern("tools/call", {"name": "getPet", "arguments": {"petId": 1}}, mcp_name="deletePet")
    assert s == 400 and doc["error"]["code"] == -32020 and doc["id"] == 1
    s, doc, _ = modern("nope/nope")
    assert s == 404 and doc["error"]["code"] == -32601
    s, doc, _ = run({"jsonrpc": "2.0", "id": 5, "method": "ping"}, [("mcp-protocol-version", MODERN), ("mcp-method", "ping")])
    assert s == 400 and doc["error"]["code"] == -32602          # no envelope
    s, doc, _ = modern("initialize")
    assert s == 404


def test_handshake_errors_are_200_and_notifications_202():
    s, doc, _ = run({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "nope"}})
    assert s == 200 and doc["error"]["code"] == -32602 and doc["id"] == 9
    s, doc, ans = run({"jsonrpc": "2.0", "method": "notifications/initialized"})
    assert (s, ans.body) == (202, b"")
    s, doc, _ = run(b"{oops")
    assert s == 400 and doc["error"]["code"] == -32700
    s, doc, _ = run({"jsonrpc": "2.0", "id": 1, "method": "ping"}, [("mcp-protocol-version", "2099-01-01")])
    assert s == 400 and doc["error"]["code"] == -32022


def test_http_layer():
    assert run({}, method="GET")[2].status == 405
    assert run({}, method="DELETE")[2].headers == [("allow", "POST")]
    h = Headers([("content-type", "text/plain")])
    assert asyncio.run(ToolServer(TOOLS).handle("POST", h, b"{}", _call)).status == 415
    h = Headers([("content-type", "application/json"), ("accept", "text/html")])
    assert asyncio.run(ToolServer(TOOLS).handle("POST", h, b"{}", _call)).status == 406


def test_batch_and_pages():
    s, doc, _ = run([{"jsonrpc": "2.0", "id": 1, "method": "ping"}, {"jsonrpc": "2.0", "method": "x"},
                     {"jsonrpc": "2.0", "id": 2, "method": "nope"}])
    assert [d["id"] for d in doc] == [1, 2] and doc[1]["error"]["code"] == -32601
    seen, cursor = [], None
    for _ in range(10):
        params = {"cursor": cursor} if cursor else {}
        _, doc, _ = run({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": params}, page_size=10)
        seen += [t["name"] for t in doc["result"]["tools"]]
        cursor = doc["result"].get("nextCursor")
        if not cursor:
            break
    assert seen == [t.name for t in TOOLS.tools]
    _, doc, _ = run({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"cursor": "zz"}}, page_size=10)
    assert doc["error"]["code"] == -32602
