"""`type = "openapi_mcp"` through the real gateway: the official `mcp` SDK client (both
protocol generations) against tools made from the petstore OpenAPI document, calling a
strict REST peer (tests/support/petstore/service.py)."""

from __future__ import annotations

import asyncio
import json
import os

import httpx
import pytest
from mcp import Client

from tests.support.gateway import GatewayProcess
from tests.support.petstore.service import PNG, PetstoreService

SPEC = os.path.join(os.path.dirname(__file__), "..", "support", "petstore", "openapi.yaml")

CONFIG = """
[[route]]
name = "pets-mcp"
match = {{ path = "/mcp" }}
backend = "petstore"

[[route.claims_to_headers]]

[backend.petstore]
type = "openapi_mcp"
spec_file = "{spec}"
base_url = "{api}/api"
timeout = "5s"
api_key = {{ header = "x-api-key", env = "PETSTORE_TEST_KEY" }}
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    api = PetstoreService()
    text = CONFIG.format(spec=os.path.abspath(SPEC), api=api.url).replace("[[route.claims_to_headers]]\n", "")
    gw = GatewayProcess(text, tmp_path_factory.mktemp("openapi"), env={"PETSTORE_TEST_KEY": "k-123"})
    yield gw, api
    gw.stop()
    api.close()


def url(gw) -> str:
    return f"http://127.0.0.1:{gw.port}/mcp"


async def _session(gw, mode: str):
    async with Client(url(gw), mode=mode) as client:
        tools = await client.list_tools()
        names = [t.name for t in tools.tools]
        pet = await client.call_tool("getPet", {"petId": 1})
        missing = await client.call_tool("getPet", {"petId": 999})
        bad = None
        try:
            await client.call_tool("getPet", {"petId": "one"})
        except Exception as exc:        # the SDK raises MCPError for a JSON-RPC error
            bad = exc
        photo = await client.call_tool("getPetPhoto", {"petId": 1})
        return client.protocol_version, names, pet, missing, bad, photo


@pytest.mark.parametrize("mode,version", [("auto", "2026-07-28"), ("legacy", "2025-11-25")])
def test_sdk_client_lists_and_calls_tools(world, mode, version):
    gw, api = world
    before = len(api.seen)
    negotiated, names, pet, missing, bad, photo = asyncio.run(_session(gw, mode))
    assert negotiated == version
    assert len(names) == 25 and "listPets" in names and "get_health" in names
    assert pet.is_error is not True and pet.structured_content == {"id": 1, "name": "rex", "status": "available"}
    assert json.loads(pet.content[0].text) == pet.structured_content
    assert missing.is_error is True and missing.content[0].text.startswith("HTTP 404")
    assert bad is not None and getattr(bad, "code", None) == -32602 and "/petId" in str(bad)
    assert photo.content[0].type == "image" and photo.content[0].mime_type == "image/png"
    # What the REST API saw: the built requests, with the static key, nothing of the MCP client's.
    seen = api.wait_for(before + 3)[before:]
    gets = [(r["method"], r["target"]) for r in seen]
    assert gets == [("GET", "/api/pets/1"), ("GET", "/api/pets/999"), ("GET", "/api/pets/1/photo")]
    for r in seen:
        h = dict(r["headers"])
        assert h["x-api-key"] == "k-123" and h["host"] == f"127.0.0.1:{api.port}"
        assert "mcp-protocol-version" not in h and "mcp-method" not in h
    assert not api.errors


def test_request_building_reaches_the_api_exactly(world):
    gw, api = world

    async def go():
        async with Client(url(gw), mode="auto") as client:
            return await client.call_tool("echo", {"value__path": "a/../b c", "value__query": "x&y",
                                                   "value__header": "hv", "value__body": "body", "n": 2})
    res = asyncio.run(go())
    echoed = res.structured_content
    assert echoed["method"] == "POST"
    assert echoed["target"] == "/api/echo/a%2F..%2Fb%20c?value=x%26y"
    assert ["value", "hv"] in echoed["headers"] and ["content-type", "application/json"] in echoed["headers"]
    assert json.loads(echoed["body"]) == {"value": "body", "n": 2}


def test_raw_http_edges(world):
    gw, _ = world
    base = url(gw)
    with httpx.Client(timeout=5) as c:
        hdr = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
        r = c.post(base, content=b"{not json", headers=hdr)
        assert r.status_code == 400 and r.json()["error"]["code"] == -32700
        r = c.post(base, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=hdr)
        assert (r.status_code, r.content) == (202, b"")
        assert c.get(base).status_code == 405
        r = c.post(base, json={"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                               "params": {"name": "getPet", "arguments": {"petId": 1}}},
                   headers={**hdr, "mcp-method": "tools/call", "mcp-name": "deletePet"})
        assert r.status_code == 400 and r.json() == {"jsonrpc": "2.0", "id": 1, "error": {
            "code": -32020, "message": "the Mcp-Name header does not match the body's params.name"}}
        r = c.post(base, content=b"x" * (5 * 1024 * 1024), headers=hdr)
        assert r.status_code == 413
        # and the server still answers
        r = c.post(base, json={"jsonrpc": "2.0", "id": 2, "method": "ping"}, headers=hdr)
        assert r.json() == {"jsonrpc": "2.0", "id": 2, "result": {}}
