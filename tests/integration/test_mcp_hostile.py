"""Hostile input against the MCP surfaces (`[route.mcp_auth]`, `[route.mcp_authorization]`),
through the real gateway over real sockets, with strict upstreams (tests/support/strict_http.py)."""

from __future__ import annotations

import json
import socket

import pytest

from tests.support.echo import EchoServer
from tests.support.gateway import GatewayProcess
from tests.support.oauth_as import AuthorizationServer
from tests.support.strict_client import read_response, request
from tests.support.strict_http import Conn, Request, StrictHTTPServer

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


# ---------------------------------------------------------------------------------------------
# mcp_authorization list filtering: a list result must be filtered whatever request it answers
# ---------------------------------------------------------------------------------------------

TOOLS = [{"name": "read_a", "inputSchema": {"type": "object"}}, {"name": "admin_wipe", "inputSchema": {"type": "object"}}]


class ScriptedMcp:
    """A strict MCP peer that answers each request with the next scripted (content-type, body)."""

    def __init__(self, answers: list[tuple[str, bytes]]):
        self.answers = list(answers)
        self.seen: list[Request] = []
        self.server = StrictHTTPServer(self._answer, name="scripted-mcp").start()
        self.url = self.server.url + "/mcp"

    def _answer(self, req: Request, conn: Conn) -> None:
        self.seen.append(req)
        ctype, body = self.answers.pop(0)
        if ctype == "text/event-stream":
            conn.start_chunked(200, [("content-type", ctype)])
            conn.send_chunk(body)
            conn.end_chunked()
        else:
            conn.respond(200, [("content-type", ctype)], body)

    def close(self) -> None:
        self.server.stop()


def filtered_gateway(tmp_path, up: ScriptedMcp) -> GatewayProcess:
    return GatewayProcess(f"""
[[route]]
name = "tools"
match = {{ path = "/mcp" }}
backend = "scripted"

[route.mcp_authorization]
rules = [{{ deny = 'mcp.tool.name.startsWith("admin_")' }}]

[backend.scripted]
type = "mcp"
url = "{up.url}"
""", tmp_path)


def names_in(doc) -> list[str]:
    out = []
    for msg in doc if isinstance(doc, list) else [doc]:
        out += [t["name"] for t in msg.get("result", {}).get("tools", [])]
    return out


def test_list_filtered_when_a_batch_reuses_the_list_requests_id(tmp_path):
    """`[tools/list id 1, prompts/list id 1]`: the filter looked results up by id, the second
    request's method won, and the tools result went out unfiltered."""
    answer = [{"jsonrpc": "2.0", "id": 1, "result": {"tools": TOOLS}},
              {"jsonrpc": "2.0", "id": 1, "result": {"prompts": []}}]
    up = ScriptedMcp([("application/json", json.dumps(answer).encode())])
    gw = filtered_gateway(tmp_path, up)
    try:
        batch = [{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, {"jsonrpc": "2.0", "id": 1, "method": "prompts/list"}]
        status, _, body = raw_post(gw.port, f"127.0.0.1:{gw.port}", "/mcp", json.dumps(batch).encode(), {})
    finally:
        gw.stop()
        up.close()
    assert status == 200
    assert "admin_wipe" not in names_in(json.loads(body)), body


def sse(doc) -> bytes:
    return b"event: message\ndata: " + json.dumps(doc).encode() + b"\n\n"


def test_list_filtered_when_delivered_on_another_requests_stream(tmp_path):
    """The SDK's streamable HTTP server routes a response to the POST stream registered for
    its id (mcp.server.streamable_http `_request_streams[request_id]`): a client that sends
    `tools/list` id 1 and, at once, `ping` id 1 in the same session gets the list on the
    ping's stream, and resumes a stream with GET + Last-Event-ID. Neither carries a list
    request, so neither was filtered."""
    listed = {"jsonrpc": "2.0", "id": 1, "result": {"tools": TOOLS}}
    up = ScriptedMcp([("text/event-stream", sse(listed)), ("text/event-stream", b"id: e1\n" + sse(listed)),
                      ("application/json", json.dumps(listed).encode())])
    gw = filtered_gateway(tmp_path, up)
    try:
        ping = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"}).encode()
        session = {"mcp-session-id": "s1"}
        status, _, on_ping = raw_post(gw.port, f"127.0.0.1:{gw.port}", "/mcp", ping, session)
        resumed = request(gw.port, "/mcp", {"accept": "text/event-stream", "last-event-id": "e0",
                                            "mcp-session-id": "s1"})
        status_json, _, on_ping_json = raw_post(gw.port, f"127.0.0.1:{gw.port}", "/mcp", ping, session)
    finally:
        gw.stop()
        up.close()
    assert (status, resumed.status, status_json) == (200, 200, 200)
    leaked = {"POST ping (SSE)": "admin_wipe" in on_ping.decode(), "GET resume": "admin_wipe" in resumed.body.decode(),
              "POST ping (JSON)": "admin_wipe" in on_ping_json.decode()}
    assert not any(leaked.values()), leaked
    assert "read_a" in on_ping.decode() and "read_a" in resumed.body.decode() and "read_a" in on_ping_json.decode()


def test_denied_call_sent_as_a_notification_never_reaches_the_server(tmp_path):
    """`tools/call` without an id is a notification: the filter decided only requests, so a
    denied tool sent that way was forwarded (a server that runs it, as JSON-RPC 2.0 lets it,
    runs a denied tool; the caller just gets no answer)."""
    up = ScriptedMcp([("application/json", b"")] * 2)
    gw = filtered_gateway(tmp_path, up)
    try:
        note = {"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "admin_wipe", "arguments": {}}}
        status, headers, body = raw_post(gw.port, f"127.0.0.1:{gw.port}", "/mcp", json.dumps(note).encode(), {})
        batch = [note, {"jsonrpc": "2.0", "method": "notifications/initialized"}]
        bstatus, _, bbody = raw_post(gw.port, f"127.0.0.1:{gw.port}", "/mcp", json.dumps(batch).encode(), {})
        metrics = request(gw.admin_port, "/metrics").body.decode()
    finally:
        gw.stop()
        up.close()
    assert up.seen == [], f"forwarded: {[r.body for r in up.seen]}"
    # Streamable HTTP: input the server will not accept → an HTTP error, a JSON-RPC error without id.
    assert status == 403 and json.loads(body) == {"jsonrpc": "2.0", "id": None, "error": {
        "code": -32003, "message": "the gateway's policy does not allow this tool: admin_wipe"}}
    assert bstatus == 403 and json.loads(bbody)["error"]["code"] == -32003
    assert 'agproxy_mcp_denied_total{method="tools/call",route="tools"} 2.0' in metrics


# ---------------------------------------------------------------------------------------------
# Sessions: an Mcp-Session-Id is bound to the identity that created it
# ---------------------------------------------------------------------------------------------

SESSION_CONFIG = """
[[route]]
name = "tools"
match = {{ path = "/mcp" }}
backend = "tools"

[route.mcp_auth]
issuer = "{issuer}"
jwks = {{ url = "{issuer}/jwks.json" }}
audiences = ["tools"]

[backend.tools]
type = "mcp"
url = "{mcp}"
"""

INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}


def test_session_of_another_user_is_not_found(tmp_path):
    """MCP security best practices: session ids are not authentication, and a server binds
    them to the user. Behind the gateway the MCP server never sees the user's token, so only
    the gateway can: Bob, holding Alice's Mcp-Session-Id (a log, a shared proxy, a leaked
    URL), must not act in Alice's session (call tools in it, read its GET stream)."""
    from tests.support.mcp_server import McpTestServer
    auth = AuthorizationServer()
    server = McpTestServer()
    gw = GatewayProcess(SESSION_CONFIG.format(issuer=auth.issuer, mcp=server.url), tmp_path)
    host = f"127.0.0.1:{gw.port}"
    alice = {"authorization": "Bearer " + auth.mint(sub="alice", aud="tools")}
    bob = {"authorization": "Bearer " + auth.mint(sub="bob", aud="tools")}
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
            "params": {"name": "read_file", "arguments": {"path": "/alice/notes"}}}
    try:
        status, headers, _ = raw_post(gw.port, host, "/mcp", json.dumps(INIT).encode(), alice)
        assert status == 200
        sid = headers["mcp-session-id"]
        version = {"mcp-protocol-version": "2025-11-25"}
        note = json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode()
        assert raw_post(gw.port, host, "/mcp", note, {**alice, **version, "mcp-session-id": sid})[0] == 202
        stolen = raw_post(gw.port, host, "/mcp", json.dumps(call).encode(), {**bob, **version, "mcp-session-id": sid})
        stream = request(gw.port, "/mcp", {**bob, **version, "accept": "text/event-stream", "mcp-session-id": sid,
                                           "connection": "close"}, timeout=5) if stolen[0] != 200 else None
        own = raw_post(gw.port, host, "/mcp", json.dumps(call).encode(), {**alice, **version, "mcp-session-id": sid})
    finally:
        gw.stop()
        server.close()
        auth.close()
    assert stolen[0] == 404, f"Bob used Alice's session: {stolen}"
    assert json.loads(stolen[2])["error"]["message"] == "Session not found"
    assert stream.status == 404
    assert own[0] == 200 and "contents of /alice/notes" in own[2].decode()
    assert server.calls == [("read_file", "/alice/notes")]


def test_openapi_ref_outside_the_specs_folder_is_refused(tmp_path):
    """A spec (often a vendor's file) whose `$ref` climbs out of its folder made the gateway
    read any file it can, and its content reached every MCP client in tools/list."""
    import subprocess
    from tests.support.gateway import agproxy_cmd
    (tmp_path / "private.json").write_text(json.dumps({"S": {"type": "string", "description": "SECRET-42"}}))
    spec_dir = tmp_path / "spec"
    spec_dir.mkdir()
    spec = {"openapi": "3.0.3", "info": {"title": "t", "version": "1"}, "paths": {"/x": {"get": {
        "operationId": "x", "parameters": [{"name": "q", "in": "query", "schema": {"$ref": "../private.json#/S"}}],
        "responses": {"200": {"description": "ok"}}}}}}
    (spec_dir / "api.json").write_text(json.dumps(spec))
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'''
[[listener]]
name = "main"
bind = "127.0.0.1:1"

[[route]]
name = "api"
match = {{ path = "/mcp" }}
backend = "api"

[backend.api]
type = "openapi_mcp"
spec_file = "{spec_dir / 'api.json'}"
base_url = "http://127.0.0.1:1"
''')
    r = subprocess.run(agproxy_cmd() + ["validate", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0, "a $ref outside the spec's folder was followed"
    assert "outside" in (r.stdout + r.stderr) and "SECRET-42" not in (r.stdout + r.stderr)


def test_forwarded_host_a_client_prepended_is_not_believed(tmp_path):
    """A trusted proxy that appends to X-Forwarded-Host (Envoy's append_x_forwarded_host)
    leaves the client's own value first: `X-Forwarded-Host: other.example, gw:port`. The
    gateway believed the first value, so a token for other.example was accepted."""
    auth = AuthorizationServer()
    echo = EchoServer().start()
    config = AUTH_CONFIG.format(issuer=auth.issuer, echo=echo.url).replace(
        'jwks = {', 'trusted_proxies = ["127.0.0.1"]\njwks = {', 1)
    gw = GatewayProcess(config, tmp_path)
    me = f"127.0.0.1:{gw.port}"
    try:
        other = auth.mint(sub="mallory", aud="http://other.example/mcp")
        spoofed = raw_post(gw.port, me, "/mcp", json.dumps(CALL).encode(),
                           {"authorization": f"Bearer {other}", "x-forwarded-host": f"other.example, {me}"})
        mine = auth.mint(sub="alice", aud=f"http://{me}/mcp")
        honest = raw_post(gw.port, me, "/mcp", json.dumps(CALL).encode(),
                          {"authorization": f"Bearer {mine}", "x-forwarded-host": f"other.example, {me}"})
        meta = request(gw.port, "/.well-known/oauth-protected-resource/mcp",
                       {"x-forwarded-host": f"other.example, {me}", "x-forwarded-proto": "https, http"})
    finally:
        gw.stop()
        echo.stop()
        auth.close()
    assert spoofed[0] == 401, "the client's X-Forwarded-Host picked the audience"
    assert honest[0] == 200
    assert meta.json()["resource"] == f"http://{me}/mcp"


def test_openapi_batch_of_calls_is_bounded(openapi_world):
    """The gateway is the MCP server of an openapi_mcp backend: each tools/call of a batch is
    one REST call. A 4 MB batch held ~40,000 calls, made one after the other from one
    HTTP request (which rate limits count once). A batch has a budget (`max_batch`, 32)."""
    gw, echo = openapi_world
    before = echo.requests
    one = {"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "upload", "arguments": {"data": "x"}}}
    batch = [{**one, "id": i} for i in range(33)]
    status, _, body = raw_post(gw.port, f"127.0.0.1:{gw.port}", "/mcp", json.dumps(batch).encode(), {})
    assert echo.requests == before, f"{echo.requests - before} REST calls for one HTTP request"
    assert status == 400 and json.loads(body)["error"]["code"] == -32600, body
    status, _, body = raw_post(gw.port, f"127.0.0.1:{gw.port}", "/mcp", json.dumps(batch[:2]).encode(), {})
    assert status == 200 and [d["result"]["isError"] for d in json.loads(body)] == [False, False]
    assert echo.requests == before + 2


def test_authorization_of_a_huge_batch_is_bounded(tmp_path):
    """Each call of a batch is decided by the rules (CEL) synchronously, on the event loop:
    a 4 MB batch of 40,000 tools/call held the worker ~0.6 s per request, so two such
    requests a second stopped it serving anyone else. A batch has a budget (`max_batch`)."""
    up = ScriptedMcp([("application/json", b"[]")] * 2)
    gw = filtered_gateway(tmp_path, up)
    one = {"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "read_a", "arguments": {}}}
    try:
        big = json.dumps([{**one, "id": i} for i in range(33)]).encode()
        status, _, body = raw_post(gw.port, f"127.0.0.1:{gw.port}", "/mcp", big, {})
        small = json.dumps([{**one, "id": i} for i in range(32)]).encode()
        ok = raw_post(gw.port, f"127.0.0.1:{gw.port}", "/mcp", small, {})[0]
    finally:
        gw.stop()
        up.close()
    assert status == 400 and json.loads(body)["error"]["code"] == -32600, body
    assert ok == 200 and len(up.seen) == 1
