"""`[route.mcp_authorization]` filtering list results through the real gateway: inside SSE
events whatever the chunking (other events pass byte for byte), in JSON documents
(2026-07-28's cacheScope turns private), and page by page across nextCursor."""

from __future__ import annotations

import json
import os

import httpx
import pytest

from tests.support.gateway import GatewayProcess
from tests.support.petstore.service import PetstoreService
from tests.support.strict_http import Conn, Request, StrictHTTPServer

SPEC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "support", "petstore", "openapi.yaml"))
HDR = {"content-type": "application/json", "accept": "application/json, text/event-stream"}

PROGRESS = b'event: message\r\ndata: {"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":1,"progress":1}}\r\n\r\n'
LIST = {"jsonrpc": "2.0", "id": 5, "result": {"tools": [{"name": "a", "inputSchema": {"type": "object"}},
                                                       {"name": "bad_tool", "inputSchema": {"type": "object"}},
                                                       {"name": "c", "inputSchema": {"type": "object"}}],
                                             "nextCursor": "p2"}}
# A list result under another id (a client can make a server deliver one on this stream:
# tests/integration/test_mcp_hostile.py) is filtered too: lists are known by their shape.
OTHER = b'data: {"jsonrpc":"2.0","id":99,"result":{"tools":[{"name":"bad_tool"}]}}\n\n'
OTHER_FILTERED = b'data: {"jsonrpc":"2.0","id":99,"result":{"tools":[]}}\n\n'


class ScriptedSseServer:
    """Answers every request with an SSE stream, written a few bytes a chunk (StrictHTTPServer)."""

    def __init__(self, events: bytes, piece: int = 7):
        self.events = events
        self.piece = piece
        self.server = StrictHTTPServer(self._answer, name="scripted-sse").start()
        self.url = self.server.url + "/mcp"

    def _answer(self, req: Request, conn: Conn) -> None:
        conn.start_chunked(200, [("content-type", "text/event-stream")])
        for i in range(0, len(self.events), self.piece):
            conn.send_chunk(self.events[i:i + self.piece])
        conn.end_chunked()

    def close(self):
        self.server.stop()


def test_sse_list_filtered_event_by_event_other_events_untouched(tmp_path):
    events = PROGRESS + b"event: message\ndata: " + json.dumps(LIST).encode() + b"\n\n" + OTHER
    up = ScriptedSseServer(events)
    gw = GatewayProcess(f"""
[[route]]
name = "tools"
match = {{ path = "/mcp" }}
backend = "scripted"

[route.mcp_authorization]
rules = [{{ deny = 'mcp.tool.name.startsWith("bad")' }}]

[backend.scripted]
type = "mcp"
url = "{up.url}"
""", tmp_path)
    try:
        r = httpx.post(f"http://127.0.0.1:{gw.port}/mcp", json={"jsonrpc": "2.0", "id": 5, "method": "tools/list"},
                       headers=HDR, timeout=10)
    finally:
        gw.stop()
        up.close()
    assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
    assert "content-length" not in r.headers           # re-framed: the body changed
    filtered = dict(LIST, result={"tools": [LIST["result"]["tools"][0], LIST["result"]["tools"][2]],
                                  "nextCursor": "p2"})
    assert r.content == (PROGRESS + b"event: message\ndata: " + json.dumps(filtered, separators=(",", ":")).encode()
                         + b"\n\n" + OTHER_FILTERED)


def test_json_lists_filtered_page_by_page(tmp_path):
    api = PetstoreService()
    gw = GatewayProcess(f"""
[[route]]
name = "pets"
match = {{ path = "/mcp" }}
backend = "petstore"

[route.mcp_authorization]
rules = [{{ deny = 'mcp.method == "tools/call" && mcp.tool.name.startsWith("delete")' }}]

[backend.petstore]
type = "openapi_mcp"
spec_file = "{SPEC}"
base_url = "{api.url}/api"
page_size = 4
""", tmp_path)
    url = f"http://127.0.0.1:{gw.port}/mcp"
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
    modern = {**HDR, "mcp-protocol-version": "2026-07-28", "mcp-method": "tools/list"}
    try:
        names, cursor, pages = [], None, 0
        with httpx.Client(timeout=10) as c:
            while True:
                params = {"_meta": meta, **({"cursor": cursor} if cursor else {})}
                r = c.post(url, json={"jsonrpc": "2.0", "id": pages, "method": "tools/list", "params": params},
                           headers=modern)
                result = r.json()["result"]
                assert result["cacheScope"] == "private"      # per caller now
                names += [t["name"] for t in result["tools"]]
                pages += 1
                cursor = result.get("nextCursor")
                if not cursor:
                    break
            # a handshake-era client, same rules
            r = c.post(url, json={"jsonrpc": "2.0", "id": "x", "method": "tools/list"}, headers=HDR)
            legacy = [t["name"] for t in r.json()["result"]["tools"]]
    finally:
        gw.stop()
        api.close()
    assert pages == 7                                       # 25 tools, 4 a page
    assert "deletePet" not in names and "deleteUser" not in names and len(names) == 23
    assert legacy == names[:4] and r.headers["content-length"] == str(len(r.content))
