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
