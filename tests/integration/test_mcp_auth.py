"""`[route.mcp_auth]` + `[route.mcp_authorization]` + `[route.claims_to_headers]` on one route,
through the real gateway, with the official `mcp` SDK client's OAuth flow (client
credentials against tests/support/oauth_as.py) and raw HTTP for the exact challenges."""

from __future__ import annotations

import asyncio
import json
import os

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.auth.extensions.client_credentials import ClientCredentialsOAuthProvider
from mcp.client.streamable_http import streamable_http_client

from tests.support.gateway import GatewayProcess
from tests.support.oauth_as import AuthorizationServer
from tests.support.petstore.service import PetstoreService

SPEC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "support", "petstore", "openapi.yaml"))

CONFIG = """
[[route]]
name = "pets"
match = {{ path = "/mcp" }}
backend = "petstore"

[route.mcp_auth]
issuer = "{issuer}"
jwks = {{ url = "{issuer}/jwks.json" }}
resource_metadata = {{ scopes_supported = ["tools:read", "tools:write"], resource_name = "Petstore" }}

[route.mcp_authorization]
rules = [
  {{ deny = 'mcp.method == "tools/call" && mcp.tool.name.startsWith("delete") && !("admin" in jwt.groups)' }},
  {{ require = 'mcp.method != "tools/call" || mcp.tool.name != "listPets" || mcp.tool.arguments.status == "available"' }},
]

[route.claims_to_headers]
"x-user" = "jwt.sub"

[[route]]
name = "scoped"
match = {{ path = "/scoped/mcp" }}
backend = "petstore"

[route.mcp_auth]
issuer = "{issuer}"
jwks = {{ url = "{issuer}/jwks.json" }}
required_scopes = ["tools:write"]

# "Members of staff, 5 calls a minute per user, the user id passed upstream": one route.
[[route]]
name = "team"
match = {{ path = "/team/mcp" }}
backend = "petstore"

[route.mcp_auth]
issuer = "{issuer}"
jwks = {{ url = "{issuer}/jwks.json" }}

[route.mcp_authorization]
rules = [
  {{ require = '"staff" in jwt.groups' }},
  {{ deny = 'mcp.method == "tools/call" && mcp.tool.name.startsWith("delete")' }},
]

[[route.rate_limit.local]]
key = "jwt.sub"
capacity = 5
refill = {{ tokens = 5, every = "60s" }}

[route.claims_to_headers]
"x-user" = "jwt.sub"

# An MCP backend, a rate limit and no MCP policy: the body is not read before the limit.
[[route]]
name = "bare"
match = {{ path = "/bare/mcp" }}
backend = "petstore"

[[route.rate_limit.local]]
capacity = 1
refill = {{ tokens = 1, every = "600s" }}

[backend.petstore]
type = "openapi_mcp"
spec_file = "{spec}"
base_url = "{api}/api"
"""


class MemoryStorage:
    def __init__(self):
        self.tokens = None
        self.client = None

    async def get_tokens(self):
        return self.tokens

    async def set_tokens(self, tokens):
        self.tokens = tokens

    async def get_client_info(self):
        return self.client

    async def set_client_info(self, info):
        self.client = info


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    auth = AuthorizationServer({"alice": {"secret": "a-secret", "claims": {"groups": ["staff"]}},
                                "root": {"secret": "r-secret", "claims": {"groups": ["admin"]}}})
    api = PetstoreService()
    gw = GatewayProcess(CONFIG.format(issuer=auth.issuer, spec=SPEC, api=api.url),
                        tmp_path_factory.mktemp("mcp-auth"))
    yield gw, api, auth
    gw.stop()
    api.close()
    auth.close()


def mcp_url(gw, path="/mcp") -> str:
    return f"http://127.0.0.1:{gw.port}{path}"


async def sdk_session(gw, auth, client_id, secret, mode, fn, scope="tools:read"):
    provider = ClientCredentialsOAuthProvider(server_url=mcp_url(gw), storage=MemoryStorage(), client_id=client_id,
                                              client_secret=secret, scope=scope, issuer=auth.issuer)
    async with httpx2.AsyncClient(auth=provider, timeout=10) as http:
        async with Client(streamable_http_client(mcp_url(gw), http_client=http), mode=mode) as client:
            return await fn(client)


@pytest.mark.parametrize("mode", ["auto", "legacy"])
def test_oauth_flow_then_rules_on_tools_and_arguments(world, mode):
    gw, api, auth = world
    before_api, before_tokens = len(api.seen), len(auth.token_requests)

    async def fn(client):
        names = [t.name for t in (await client.list_tools()).tools]
        pet = await client.call_tool("getPet", {"petId": 1})
        denied = await _error_of(client.call_tool("deletePet", {"petId": 2, "X-Api-Reason": "x"}))
        sold = await _error_of(client.call_tool("listPets", {"status": "sold"}))
        available = await client.call_tool("listPets", {"status": "available"})
        return names, pet, denied, sold, available

    names, pet, denied, sold, available = asyncio.run(sdk_session(gw, auth, "alice", "a-secret", mode, fn))
    # The SDK got the 401, read the metadata, and asked for a token for exactly this resource.
    req = auth.token_requests[before_tokens]
    assert req["resource"] == mcp_url(gw) and req["scope"] == "tools:read tools:write"   # the challenge's
    # The list is filtered to what alice may call; listPets stays (its rule reads the
    # arguments, which only the call has).
    assert "deletePet" not in names and "deleteUser" not in names
    assert "listPets" in names and "getPet" in names and len(names) == 23
    assert pet.structured_content["name"] == "rex"
    assert denied.code == -32003 and "deletePet" in denied.message
    assert sold.code == -32003
    assert [p["status"] for p in json.loads(available.content[0].text)] == ["available"]
    seen = api.wait_for(before_api + 2)[before_api:]
    assert [(r["method"], r["target"]) for r in seen] == [("GET", "/api/pets/1"), ("GET", "/api/pets?status=available")]
    for r in seen:
        h = dict(r["headers"])
        assert h["x-user"] == "alice"          # claims_to_headers reached the REST API
        assert "authorization" not in h        # the caller's token did not


def test_admin_may_delete(world):
    gw, api, auth = world
    api.pets.setdefault(7, {"id": 7, "name": "gone", "status": "sold"})

    async def fn(client):
        names = [t.name for t in (await client.list_tools()).tools]
        return names, await client.call_tool("deletePet", {"petId": 7, "X-Api-Reason": "cleanup"})
    names, res = asyncio.run(sdk_session(gw, auth, "root", "r-secret", "auto", fn))
    assert len(names) == 25 and "deletePet" in names
    assert res.is_error is not True and 7 not in api.pets


async def _error_of(awaitable):
    try:
        await awaitable
    except Exception as exc:
        return exc
    raise AssertionError("expected a JSON-RPC error")


HDR = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
CALL = {"jsonrpc": "2.0", "id": "c-1", "method": "tools/call", "params": {"name": "deletePet",
                                                                         "arguments": {"petId": 1, "X-Api-Reason": "x"}}}


def test_challenges_and_metadata_exactly(world):
    gw, api, auth = world
    base = mcp_url(gw)
    meta = f"http://127.0.0.1:{gw.port}/.well-known/oauth-protected-resource/mcp"
    with httpx.Client(timeout=5) as c:
        r = c.post(base, json=CALL, headers=HDR)
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == f'Bearer resource_metadata="{meta}", scope="tools:read tools:write"'
        doc = c.get(meta).json()
        assert doc == {"resource_name": "Petstore", "resource": base, "authorization_servers": [auth.issuer],
                       "bearer_methods_supported": ["header"], "scopes_supported": ["tools:read", "tools:write"]}
        assert c.get(f"http://127.0.0.1:{gw.port}/.well-known/oauth-protected-resource").json() == doc
        # A token minted for another MCP server is refused (RFC 8707).
        other = auth.mint(sub="alice", aud="http://other.example/mcp", groups=["admin"])
        r = c.post(base, json=CALL, headers={**HDR, "authorization": f"Bearer {other}"})
        assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]
        assert f'resource_metadata="{meta}"' in r.headers["www-authenticate"]
        r = c.post(base, json=CALL, headers={**HDR, "authorization": "Bearer not.a.jwt"})
        assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]
        # A denied call: HTTP 200, the request's id, never reaches the API.
        before = len(api.seen)
        bob = auth.mint(sub="bob", aud=base, groups=["staff"])
        r = c.post(base, json=CALL, headers={**HDR, "authorization": f"Bearer {bob}"})
        assert r.status_code == 200 and r.json() == {"jsonrpc": "2.0", "id": "c-1", "error": {
            "code": -32003, "message": "the gateway's policy does not allow this tool: deletePet"}}
        # A header that lies about the body fails that request only.
        r = c.post(base, json={**CALL, "params": {"name": "getPet", "arguments": {"petId": 1}}},
                   headers={**HDR, "authorization": f"Bearer {bob}", "mcp-method": "tools/call", "mcp-name": "x"})
        assert r.status_code == 400 and r.json()["error"]["code"] == -32020
        r = c.post(base, content=b"garbage", headers={**HDR, "authorization": f"Bearer {bob}"})
        assert r.status_code == 400 and r.json()["error"]["code"] == -32700
        r = c.post(base, json={**CALL, "params": {"name": "getPet", "arguments": {"petId": 1}}},
                   headers={**HDR, "authorization": f"Bearer {bob}"})
        assert r.status_code == 200 and r.json()["result"]["structuredContent"]["id"] == 1
        assert [x["target"] for x in api.wait_for(before + 1)[before:]] == ["/api/pets/1"]


def test_insufficient_scope(world):
    gw, api, auth = world
    base = mcp_url(gw, "/scoped/mcp")
    meta = f"http://127.0.0.1:{gw.port}/.well-known/oauth-protected-resource/scoped/mcp"
    with httpx.Client(timeout=5) as c:
        r = c.post(base, json=CALL, headers={**HDR, "authorization": "Bearer " + auth.mint(
            sub="a", aud=base, scope="tools:read")})
        assert r.status_code == 403
        assert r.headers["www-authenticate"] == (
            f'Bearer error="insufficient_scope", error_description="the token lacks required scopes", '
            f'resource_metadata="{meta}", scope="tools:write"')
        r = c.post(base, json={"jsonrpc": "2.0", "id": 1, "method": "ping"}, headers={
            **HDR, "authorization": "Bearer " + auth.mint(sub="a", aud=base, scope="tools:read tools:write")})
        assert r.status_code == 200 and r.json()["result"] == {}


# -- the same route with a rate limit per user ------------------------------------------

def _call(rid, name="getPet", arguments=None) -> dict:
    return {"jsonrpc": "2.0", "id": rid, "method": "tools/call",
            "params": {"name": name, "arguments": arguments or {"petId": 1}}}


def test_rate_limit_per_user_composes_with_auth_and_rules(world):
    """5 calls a minute per jwt.sub, after mcp_auth and mcp_authorization: what those
    refuse (a 401, a denied tool) costs nothing; the sixth call is a 429 whose body is
    a JSON-RPC error with the request's id; another user still passes; the user id
    (not the client's own x-user) reaches the REST API."""
    gw, api, auth = world
    base = mcp_url(gw, "/team/mcp")
    carol = {**HDR, "authorization": "Bearer " + auth.mint(sub="carol", aud=base, groups=["staff"])}
    dave = {**HDR, "authorization": "Bearer " + auth.mint(sub="dave", aud=base, groups=["staff"])}
    before, decided = len(api.seen), _decisions(gw)
    with httpx.Client(timeout=5) as c:
        # Refused before the rate limit (authentication, then authorization): not charged.
        wrong_aud = auth.mint(sub="carol", aud="http://other.example/mcp", groups=["staff"])
        for _ in range(3):
            r = c.post(base, json=_call("x"), headers={**HDR, "authorization": f"Bearer {wrong_aud}"})
            assert r.status_code == 401 and "x-ratelimit-limit" not in r.headers
            r = c.post(base, json=_call("d", "deletePet", {"petId": 1, "X-Api-Reason": "x"}), headers=carol)
            assert r.status_code == 200 and r.json()["error"]["code"] == -32003
            assert "x-ratelimit-remaining" not in r.headers
        outsider = auth.mint(sub="carol", aud=base, groups=["guests"])     # lacks "staff"
        r = c.post(base, json=_call("g"), headers={**HDR, "authorization": f"Bearer {outsider}"})
        assert r.status_code == 200 and r.json()["error"]["code"] == -32003
        # Five calls pass, each saying how many are left; the client's x-user is replaced.
        for i in range(5):
            r = c.post(base, json=_call(f"c-{i}"), headers={**carol, "x-user": "root"})
            assert r.status_code == 200 and r.json()["result"]["structuredContent"]["id"] == 1
            assert r.headers["x-ratelimit-limit"] == "5"
            assert r.headers["x-ratelimit-remaining"] == str(4 - i)
        # The sixth: 429 with the headers, and a JSON-RPC error an MCP client can read.
        r = c.post(base, json=_call("c-5"), headers=carol)
        assert r.status_code == 429
        assert r.headers["content-type"] == "application/json"
        assert r.headers["x-ratelimit-limit"] == "5" and r.headers["x-ratelimit-remaining"] == "0"
        retry = int(r.headers["retry-after"])
        assert 1 <= retry <= 12 and 1 <= int(r.headers["x-ratelimit-reset"]) <= 60
        assert r.json() == {"jsonrpc": "2.0", "id": "c-5", "error": {
            "code": -32029, "message": "too many requests: the route's rate limit is reached",
            "data": {"retryAfter": retry}}}
        # Another user has a bucket of their own.
        r = c.post(base, json=_call("d-0"), headers=dave)
        assert r.status_code == 200 and r.headers["x-ratelimit-remaining"] == "4"
    seen = api.wait_for(before + 6)[before:]
    assert [(x["target"], dict(x["headers"])["x-user"]) for x in seen] == \
        [("/api/pets/1", "carol")] * 5 + [("/api/pets/1", "dave")]
    assert "authorization" not in dict(seen[0]["headers"])
    after = _decisions(gw)
    assert {k: after[k] - decided.get(k, 0) for k in after} == {"allowed": 6, "limited": 1}


def _decisions(gw) -> dict[str, float]:
    """The team route's rate-limit decisions by result."""
    return {line.split('result="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in gw.metrics().splitlines()
            if line.startswith("agproxy_rate_limit_decisions_total{") and 'route="team"' in line}


def test_rate_limited_sdk_client_sees_the_json_rpc_error(world):
    """The official SDK client (2026-07-28, a bearer token of its own): every request
    of the session counts (server/discover too); the call that meets the limit raises
    MCPError -32029 with retryAfter, not the SDK's generic -32603."""
    gw, api, auth = world
    base = mcp_url(gw, "/team/mcp")
    token = auth.mint(sub="frank", aud=base, groups=["staff"])

    async def run():
        done, err = 0, None
        async with httpx2.AsyncClient(headers={"authorization": f"Bearer {token}"}, timeout=10) as http:
            async with Client(streamable_http_client(base, http_client=http)) as client:
                for _ in range(6):
                    try:
                        res = await client.call_tool("getPet", {"petId": 1})
                    except Exception as exc:
                        err = exc
                        break
                    assert res.structured_content["name"] == "rex"
                    done += 1
        return done, err

    before = len(api.seen)
    done, err = asyncio.run(run())
    assert err is not None, "the limit was never met"
    assert (err.code, err.message) == (-32029, "too many requests: the route's rate limit is reached")
    assert err.data["retryAfter"] >= 1
    assert 1 <= done < 5                      # the session's own requests took the rest
    assert [dict(x["headers"])["x-user"] for x in api.wait_for(before + done)[before:]] == ["frank"] * done


def test_rate_limit_on_a_bare_mcp_route_answers_json_rpc_with_a_null_id(world):
    """Without mcp_authorization the body is read after the limit (by the backend):
    the 429 is still a JSON-RPC error, with id null, which the SDK maps to its request."""
    gw, api, auth = world
    base = mcp_url(gw, "/bare/mcp")
    with httpx.Client(timeout=5) as c:
        first = c.post(base, json=_call("b-0"), headers=HDR)
        second = c.post(base, json=_call("b-1"), headers=HDR)
    assert first.status_code == 200 and first.json()["result"]["structuredContent"]["id"] == 1
    assert second.status_code == 429 and second.headers["x-ratelimit-limit"] == "1"
    body = second.json()
    assert body["id"] is None and body["error"]["code"] == -32029
    assert body["error"]["data"]["retryAfter"] == int(second.headers["retry-after"]) >= 1
