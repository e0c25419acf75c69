"""Hostile input against the MCP surfaces (`[route.mcp_auth]`, `[route.mcp_authorization]`),
through the real gateway over real sockets, with strict upstreams (tests/support/strict_http.py)."""

from __future__ import annotations

import json
import socket

import pytest

from tests.support.echo import EchoServer
from tests.support.gateway import GatewayProcess
from tests.support.oauth_as import AuthorizationServer
from tests.support.strict_client import read_response

CALL = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "getPet", "arguments": {}}}

AUTH_CONFIG = """
[[route]]
name = "tools"
match = {{ path = "/mcp" }}
backend = "echo"

[route.mcp_auth]
issuer = "{issuer}"
jwks = {{ url = "{issuer}/jwks.json" }}

[backend.echo]
type = "http"
url = "{echo}"
"""


def raw_post(port: int, host: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 POST with exactly the Host given; the answer read by a strict parser."""
    head = f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n" \
           f"accept: application/json, text/event-stream\r\ncontent-length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "connection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head.encode() + body)
        r = read_response(s)
    return r.status, dict(r.headers), r.body


@pytest.fixture(scope="module")
def auth_world(tmp_path_factory):
    auth = AuthorizationServer()
    echo = EchoServer().start()
    gw = GatewayProcess(AUTH_CONFIG.format(issuer=auth.issuer, echo=echo.url),
                        tmp_path_factory.mktemp("mcp-hostile-auth"))
    yield gw, echo, auth
    gw.stop()
    echo.stop()
    auth.close()


def test_token_for_another_server_refused_whatever_the_host_header(auth_world):
    """RFC 8707 / MCP "tokens must be meant for this server": without `resource`, the gateway
    derives its own URL from the request, and a client chose it with `Host`. A token minted
    (by the same authorization server) for another MCP server must not be accepted by
    sending that server's name as Host."""
    gw, echo, auth = auth_world
    before = echo.requests
    other = auth.mint(sub="mallory", aud="http://other.example/mcp")
    status, headers, _ = raw_post(gw.port, "other.example", "/mcp", json.dumps(CALL).encode(),
                                  {"authorization": f"Bearer {other}"})
    assert status == 401, "a token for http://other.example/mcp was accepted"
    assert 'error="invalid_token"' in headers["www-authenticate"]
    # The legitimate case still works: the token names this gateway as the client reached it.
    mine = auth.mint(sub="alice", aud=f"http://127.0.0.1:{gw.port}/mcp")
    status, _, _ = raw_post(gw.port, f"127.0.0.1:{gw.port}", "/mcp", json.dumps(CALL).encode(),
                            {"authorization": f"Bearer {mine}"})
    assert status == 200
    assert echo.requests == before + 1


# ---------------------------------------------------------------------------------------------
# openapi_mcp: arguments that would set the REST request's framing or Host
# ---------------------------------------------------------------------------------------------

FRAMING_SPEC = json.dumps({
    "openapi": "3.0.3", "info": {"title": "t", "version": "1"},
    "paths": {"/upload": {"post": {
        "operationId": "upload",
        "parameters": [
            {"name": "Content-Length", "in": "header", "schema": {"type": "string"}},
            {"name": "Transfer-Encoding", "in": "header", "schema": {"type": "string"}},
            {"name": "Host", "in": "header", "schema": {"type": "string"}},
            {"name": "Connection", "in": "header", "schema": {"type": "string"}},
            {"name": "X-Tag", "in": "header", "schema": {"type": "string"}},
        ],
        "requestBody": {"content": {"application/json": {"schema": {
            "type": "object", "properties": {"data": {"type": "string"}}, "additionalProperties": False}}}},
        "responses": {"200": {"description": "ok"}}}}},
})

OPENAPI_CONFIG = """
[[route]]
name = "api"
match = {{ path = "/mcp" }}
backend = "api"

[backend.api]
type = "openapi_mcp"
spec_inline = '''{spec}'''
base_url = "{echo}"
timeout = "5s"
"""


@pytest.fixture(scope="module")
def openapi_world(tmp_path_factory):
    echo = EchoServer().start()
    gw = GatewayProcess(OPENAPI_CONFIG.format(spec=FRAMING_SPEC, echo=echo.url),
                        tmp_path_factory.mktemp("mcp-hostile-openapi"))
    yield gw, echo
    gw.stop()
    echo.stop()


def test_openapi_header_arguments_cannot_set_framing_or_host(openapi_world):
    """A spec may declare header parameters named Content-Length, Transfer-Encoding, Host or
    Connection (upload APIs do); their values come from the model. Sent as they are, a second
    Content-Length or a Transfer-Encoding smuggles the body as another request to the API, a
    second Host picks another virtual host. The gateway frames and names the host itself:
    those parameters are not arguments (as OpenAPI says of Accept, Content-Type and
    Authorization), a call that passes them is refused, and the API only ever gets
    well-formed requests."""
    gw, echo = openapi_world
    port = gw.port
    listed = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    status, _, body = raw_post(port, f"127.0.0.1:{port}", "/mcp", json.dumps(listed).encode(), {})
    (tool,) = json.loads(body)["result"]["tools"]
    assert sorted(tool["inputSchema"]["properties"]) == ["X-Tag", "data"]
    before = echo.requests
    smuggle = {"data": "GET /admin HTTP/1.1\r\nhost: internal\r\n\r\n", "Content-Length": "0",
               "Transfer-Encoding": "chunked", "Host": "internal.example", "Connection": "x-tag"}
    call = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "upload", "arguments": smuggle}}
    status, _, body = raw_post(port, f"127.0.0.1:{port}", "/mcp", json.dumps(call).encode(), {})
    assert status == 200 and json.loads(body)["error"]["code"] == -32602, body
    call["params"]["arguments"] = {"data": smuggle["data"], "X-Tag": "kept"}
    status, _, body = raw_post(port, f"127.0.0.1:{port}", "/mcp", json.dumps(call).encode(), {})
    assert status == 200 and json.loads(body)["result"]["isError"] is False, body
    assert echo.rejected == [], f"the API refused what the gateway sent: {echo.rejected}"
    assert echo.requests == before + 1
    seen = echo.received[-1]
    assert [seen.header_all(n) for n in ("content-length", "transfer-encoding", "host", "x-tag")] == \
        [[str(len(seen.body))], [], [echo.url.split("//")[1]], ["kept"]]
    assert json.loads(seen.body) == {"data": smuggle["data"]}
