"""Policy semantics: [route.jwt], authorization, transform, claims_to_headers.

Configs go through the real loader (agproxy.config.model.parse + build_runtime), and
requests through the route's real filter chain, as proxy/exchange.py runs it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import tomllib

import pytest

from agproxy.config.model import parse
from agproxy.config.reader import ConfigError
from agproxy.http.messages import ConnInfo, Headers, RequestHead, ResponseHead
from agproxy.proxy.build import build_runtime
from agproxy.proxy.exchange import Exchange
from agproxy.proxy.contract import LocalReply
from tests.support.idp import IdP, hs256_with_public_key, unsigned_token

BASE = """
[[listener]]
name = "main"
bind = "127.0.0.1:0"

[backend.echo]
type = "http"
url = "http://127.0.0.1:9"
"""


@pytest.fixture(scope="module")
def idp():
    server = IdP(key_kinds=("RSA", "EC"))
    yield server
    server.close()


def runtime(text: str, tmp_path=None):
    raw = tomllib.loads(BASE + text)
    path = str(tmp_path / "gw.toml") if tmp_path is not None else "<inline>"
    return build_runtime(parse(raw, path))


def config_errors(text: str, tmp_path=None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        runtime(text, tmp_path)
    return info.value.problems


class _Stream:
    def __init__(self, method: str, target: str, headers: list):
        self.request = RequestHead(method, target, Headers(headers), "http", "gw.local", "HTTP/1.1")
        self.conn = ConnInfo("127.0.0.1", 40000, 8080, False, listener="main")


def request(rt, target: str = "/", headers: list | None = None, method: str = "GET"):
    """Run the request phase of the first route as proxy/exchange.py does: synchronously
    while filters answer None/LocalReply, awaiting only when one returns an awaitable.
    Returns (exchange, reply or None)."""
    ex = Exchange(_Stream(method, target, list(headers or [])))
    route = rt.router.routes[0]
    ex.route = route
    filters = list(route.filters)

    async def finish(pending, rest):
        result = await pending
        if result is not None:
            return result
        for f in rest:
            result = f.on_request(ex)
            if result is not None and not isinstance(result, LocalReply):
                result = await result
            if result is not None:
                return result
        return None

    for i, f in enumerate(filters):
        result = f.on_request(ex)
        if result is None:
            continue
        if isinstance(result, LocalReply):
            return ex, result
        return ex, asyncio.run(finish(result, filters[i + 1:]))
    return ex, None


def body(reply: LocalReply) -> dict:
    return json.loads(reply.body)


def jwt_route(idp, extra: str = "", jwt_extra: str = "", mode: str = "strict") -> str:
    return f"""
[[route]]
name = "r"
backend = "echo"
match = {{ path_prefix = "/" }}
[route.jwt]
mode = "{mode}"
issuer = "{idp.issuer}"
audiences = ["agents"]
jwks = {{ inline = '{idp.jwks_json()}' }}
{jwt_extra}
{extra}
"""


def bearer(token: str) -> list:
    return [("authorization", f"Bearer {token}")]


# ---------------------------------------------------------------------------------
# [route.jwt]
# ---------------------------------------------------------------------------------

def test_strict_missing_token_is_a_plain_bearer_challenge(idp):
    rt = runtime(jwt_route(idp))
    _, reply = request(rt)
    assert reply.status == 401
    assert reply.headers.get("www-authenticate") == "Bearer"
    assert body(reply)["error"] == "unauthorized"
    # another scheme is not a bearer token
    _, reply = request(rt, headers=[("authorization", "Basic YTpi")])
    assert reply.status == 401 and reply.headers.get("www-authenticate") == "Bearer"


def test_valid_token_sets_claims_and_strips_credential(idp):
    rt = runtime(jwt_route(idp))
    token = idp.mint(sub="alice")
    ex, reply = request(rt, headers=bearer(token) + [("x-other", "1")])
    assert reply is None
    assert ex.jwt_claims["sub"] == "alice" and ex.jwt_token == token
    assert ex.jwt_provider == "route[0].jwt"
    assert "authorization" not in ex.request.headers
    assert ex.request.headers.get("x-other") == "1"
    # the scheme is case-insensitive
    ex, reply = request(rt, headers=[("authorization", f"bearer   {token}")])
    assert reply is None and ex.jwt_claims["sub"] == "alice"


def test_forward_true_keeps_the_credential(idp):
    rt = runtime(jwt_route(idp, jwt_extra="forward = true"))
    token = idp.mint()
    ex, reply = request(rt, headers=bearer(token))
    assert reply is None and ex.request.headers.get("authorization") == f"Bearer {token}"
    assert ex.jwt_token == token


@pytest.mark.parametrize("case", [
    "expired", "nbf", "issuer", "audience", "unknown kid", "alg none", "hs256", "garbled", "truncated", "20k",
])
def test_invalid_tokens_get_invalid_token_challenge(idp, case):
    now = int(time.time())
    token = {
        "expired": lambda: idp.mint(exp=now - 3600),
        "nbf": lambda: idp.mint(nbf=now + 3600),
        "issuer": lambda: idp.mint(iss="https://evil.example"),
        "audience": lambda: idp.mint(aud="other"),
        "unknown kid": lambda: idp.mint(kid="nope"),
        "alg none": lambda: unsigned_token(idp.claims()),
        "hs256": lambda: hs256_with_public_key(idp.claims(), idp.keys[0]),
        "garbled": lambda: idp.mint()[:-8] + "%%%%$$$$",
        "truncated": lambda: idp.mint()[:60],
        "20k": lambda: "e" * 20_000,
    }[case]()
    rt = runtime(jwt_route(idp))
    ex, reply = request(rt, headers=bearer(token))
    assert reply.status == 401
    challenge = reply.headers.get("www-authenticate")
    assert challenge.startswith('Bearer error="invalid_token", error_description="')
    b = body(reply)
    assert b["error"] == "invalid_token" and b["message"]
    assert "Traceback" not in reply.body.decode() and "BEGIN" not in reply.body.decode()
    assert ex.jwt_claims is None


def test_duplicate_authorization_headers(idp):
    rt = runtime(jwt_route(idp))
    token = idp.mint()
    _, reply = request(rt, headers=bearer(token) + bearer(token))
    assert reply.status == 401 and "multiple credentials" in reply.headers.get("www-authenticate")


def test_modes(idp):
    bad = bearer(idp.mint(aud="other"))
    good = bearer(idp.mint())
    # optional: anonymous passes, invalid is refused
    rt = runtime(jwt_route(idp, mode="optional"))
    ex, reply = request(rt)
    assert reply is None and ex.jwt_claims is None
    assert request(rt, headers=bad)[1].status == 401
    assert request(rt, headers=good)[0].jwt_claims["sub"] == "alice"
    # permissive: never rejects; claims only when valid; an invalid token is left alone
    rt = runtime(jwt_route(idp, mode="permissive"))
    ex, reply = request(rt, headers=bad)
    assert reply is None and ex.jwt_claims is None
    assert ex.request.headers.get("authorization") == bad[0][1]
    ex, reply = request(rt, headers=bearer(idp.mint()) * 2)
    assert reply is None and ex.jwt_claims is None
    ex, reply = request(rt, headers=good)
    assert reply is None and ex.jwt_claims["sub"] == "alice" and "authorization" not in ex.request.headers


def test_query_location(idp):
    rt = runtime(jwt_route(idp, jwt_extra='location = { query = "token" }'))
    token = idp.mint()
    ex, reply = request(rt, f"/a/b?x=1&token={token}&y=%20")
    assert reply is None and ex.jwt_claims["sub"] == "alice"
    assert ex.request.target == "/a/b?x=1&y=%20"
    ex, reply = request(rt, f"/p?token={token}")
    assert reply is None and ex.request.target == "/p"
    # twice: ambiguous
    _, reply = request(rt, f"/p?token={token}&token={token}")
    assert reply.status == 401
    # a header is not where this route looks
    _, reply = request(rt, "/p", bearer(token))
    assert reply.status == 401 and reply.headers.get("www-authenticate") == "Bearer"


def test_header_only_route_ignores_query_token(idp):
    rt = runtime(jwt_route(idp))
    _, reply = request(rt, f"/p?access_token={idp.mint()}")
    assert reply.status == 401 and reply.headers.get("www-authenticate") == "Bearer"


def test_cookie_location(idp):
    rt = runtime(jwt_route(idp, jwt_extra='location = { cookie = "id" }'))
    token = idp.mint()
    ex, reply = request(rt, headers=[("cookie", f"a=1; id={token}; b=2")])
    assert reply is None and ex.jwt_claims["sub"] == "alice"
    assert ex.request.headers.get_all("cookie") == ["a=1; b=2"]
    ex, reply = request(rt, headers=[("cookie", f"id={token}")])
    assert reply is None and "cookie" not in ex.request.headers


def test_custom_header_and_several_locations(idp):
    rt = runtime(jwt_route(idp, jwt_extra='location = [{ header = "x-token" }, { query = "t" }]'))
    token = idp.mint()
    ex, reply = request(rt, headers=[("x-token", token)])
    assert reply is None and "x-token" not in ex.request.headers
    ex, reply = request(rt, f"/?t={token}")
    assert reply is None
    _, reply = request(rt, f"/?t={token}", [("x-token", token)])
    assert reply.status == 401


def test_several_providers_chosen_by_issuer(idp):
    other = IdP()
    try:
        text = f"""
[[route]]
name = "r"
backend = "echo"
[route.jwt]
required_claims = ["sub"]
[[route.jwt.providers]]
issuer = "{idp.issuer}"
audiences = ["agents"]
jwks = {{ inline = '{idp.jwks_json()}' }}
[[route.jwt.providers]]
issuer = "{other.issuer}"
audiences = ["other-aud"]
jwks = {{ inline = '{other.jwks_json()}' }}
"""
        rt = runtime(text)
        ex, reply = request(rt, headers=bearer(other.mint(aud="other-aud", sub="bob")))
        assert reply is None and ex.jwt_claims["sub"] == "bob"
        assert ex.jwt_provider == "route[0].jwt.providers[1]"
        ex, reply = request(rt, headers=bearer(idp.mint()))
        assert reply is None and ex.jwt_claims["sub"] == "alice"
        # right issuer, wrong key (signed by the other IdP)
        _, reply = request(rt, headers=bearer(other.mint(iss=idp.issuer)))
        assert reply.status == 401
        _, reply = request(rt, headers=bearer(idp.mint(iss="https://nobody")))
        assert "untrusted issuer" in reply.headers.get("www-authenticate")
        # inherited required_claims
        _, reply = request(rt, headers=bearer(idp.mint(sub=None)))
        assert "missing required claim" in body(reply)["message"]
    finally:
        other.close()


def test_named_provider(idp):
    text = f"""
[jwt_provider.idp]
issuer = "{idp.issuer}"
audiences = ["agents"]
jwks = {{ inline = '{idp.jwks_json()}' }}

[[route]]
name = "r"
backend = "echo"
[route.jwt]
providers = ["idp"]
required_claims = ["tenant"]
"""
    rt = runtime(text)
    assert rt.ctx.jwt_providers["idp"].issuer == idp.issuer
    ex, reply = request(rt, headers=bearer(idp.mint(tenant="t1")))
    assert reply is None and ex.jwt_provider == "idp"
    _, reply = request(rt, headers=bearer(idp.mint()))
    assert reply.status == 401 and "tenant" in body(reply)["message"]


def test_first_request_waits_for_remote_keys(idp):
    """A remote JWKS with no keys yet: the filter returns an awaitable (no task)."""
    text = jwt_route(idp).replace(f"jwks = {{ inline = '{idp.jwks_json()}' }}",
                                  f'jwks = {{ discovery = "{idp.discovery_url}" }}')
    rt = runtime(text)
    assert list(rt.not_ready()) and "no signing keys yet" in rt.not_ready()[0]
    ex, reply = request(rt, headers=bearer(idp.mint()))
    assert reply is None and ex.jwt_claims["sub"] == "alice"


# ---------------------------------------------------------------------------------
# config errors
# ---------------------------------------------------------------------------------

def test_jwt_config_errors(idp, tmp_path):
    (tmp_path / "bad.json").write_text('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}')
    (tmp_path / "good.json").write_text(idp.jwks_json())
    text = """
[jwt_provider.idp]
issuer = "x"
jwks = { file = "missing.json" }

[[route]]
name = "a"
backend = "echo"
[route.jwt]
mode = "lenient"
issuer = "x"
jwks = { file = "bad.json" }
algorithms = ["RS256", "none", "HS256"]

[[route]]
name = "b"
backend = "echo"
[route.jwt]
providers = ["idq"]

[[route]]
name = "c"
backend = "echo"
[route.jwt]
issuer = "x"
jwks = { file = "good.json", url = "https://x" }
clock_skew = "forever"
location = { header = "authorization", cookie = "c" }

[[route]]
name = "d"
backend = "echo"
[route.jwt]
jwks = { file = "good.json" }
isuser = "x"
"""
    problems = "\n".join(config_errors(text, tmp_path))
    for expected in [
        "jwt_provider.idp.jwks.file: cannot read missing.json",
        "route[0].jwt.mode: must be one of",
        "route[0].jwt.jwks.file: invalid JWKS: no usable",
        "route[0].jwt.algorithms[1]: 'none' is never accepted",
        "route[0].jwt.algorithms[2]: 'HS256' is never accepted",
        "route[1].jwt.providers[0]: unknown JWT provider 'idq' (did you mean \"idp\"?)",
        "route[2].jwt.jwks: exactly one of url, file, inline or discovery",
        "route[2].jwt.clock_skew: invalid duration",
        "route[2].jwt.location: exactly one of header, query or cookie",
        "route[3].jwt.isuser: unknown key",
        "route[3].jwt.issuer: required",
    ]:
        assert expected in problems, (expected, problems)


def test_duplicate_issuers_are_a_config_error(idp):
    text = f"""
[[route]]
name = "r"
backend = "echo"
[route.jwt]
issuer = "{idp.issuer}"
jwks = {{ inline = '{idp.jwks_json()}' }}
[[route.jwt.providers]]
issuer = "{idp.issuer}"
jwks = {{ inline = '{idp.jwks_json()}' }}
"""
    assert any("issuer" in p and "could not choose" in p for p in config_errors(text))


def test_discovery_derives_issuer_and_validates_urls():
    text = """
[[route]]
name = "r"
backend = "echo"
[route.jwt]
jwks = { discovery = "https://idp.example.com/.well-known/openid-configuration" }
[[route]]
name = "s"
backend = "echo"
[route.jwt]
jwks = { discovery = "https://idp.example.com/meta" }
[[route]]
name = "t"
backend = "echo"
[route.jwt]
issuer = "i"
jwks = { url = "ftp://x/jwks" }
"""
    problems = "\n".join(config_errors(text))
    assert "route[0]" not in problems
    assert "route[1].jwt.jwks.discovery: cannot derive the issuer" in problems
    assert "route[2].jwt.jwks.url: must be an http:// or https:// URL" in problems


# ---------------------------------------------------------------------------------
# authorization
# ---------------------------------------------------------------------------------

AUTHZ = """
[route.authorization]
rules = [
  'jwt.sub != ""',
  { deny = '"contractor" in jwt.groups' },
  { require = 'request.headers["x-tenant"] == jwt.tenant_id' },
]
"""


def test_authorization_semantics(idp):
    rt = runtime(jwt_route(idp, extra=AUTHZ))
    ok = bearer(idp.mint(groups=["eng"], tenant_id="t1")) + [("x-tenant", "t1")]
    assert request(rt, headers=ok)[1] is None
    # deny matches
    _, reply = request(rt, headers=bearer(idp.mint(groups=["contractor"], tenant_id="t1")) + [("x-tenant", "t1")])
    assert reply.status == 403 and body(reply) == {"error": "forbidden", "message": body(reply)["message"]}
    # require fails
    _, reply = request(rt, headers=bearer(idp.mint(groups=[], tenant_id="t1")) + [("x-tenant", "t2")])
    assert reply.status == 403
    # allow rule false
    _, reply = request(rt, headers=bearer(idp.mint(groups=[], tenant_id="t1", sub="")) + [("x-tenant", "t1")])
    assert reply.status == 403


def test_evaluation_errors_never_allow(idp, caplog):
    rt = runtime(jwt_route(idp, extra=AUTHZ))
    # missing groups claim: the deny rule errors → deny
    with caplog.at_level(logging.WARNING, logger="agproxy.policy"):
        ex, reply = request(rt, headers=bearer(idp.mint(tenant_id="t1")) + [("x-tenant", "t1")])
    assert reply.status == 403 and "rules[1]" in ex.error
    assert any("jwt.groups" in r.getMessage() for r in caplog.records)
    # missing header in a require rule → deny
    _, reply = request(rt, headers=bearer(idp.mint(groups=[], tenant_id="t1")))
    assert reply.status == 403


@pytest.mark.parametrize("rules,claims,allowed", [
    ("['jwt.role == \"admin\"']", {}, False),                           # allow on a missing claim
    ("['jwt.role == \"admin\"']", {"role": "admin"}, True),
    ("['jwt.role == \"admin\"', 'jwt.sub == \"alice\"']", {}, True),    # any allow
    ("[{ deny = 'jwt.banned' }]", {}, False),                            # deny on a missing claim
    ("[{ deny = 'jwt.banned' }]", {"banned": False}, True),              # only deny rules, none matched
    ("[{ require = 'jwt.mfa' }]", {}, False),
    ("[{ require = 'jwt.mfa' }]", {"mfa": True}, True),
    ("[{ allow = 'jwt.sub == \"alice\"' }]", {}, True),
    ("[{ require = 'jwt.sub' }]", {}, False),                            # not a bool: error → deny
    ("[]", {}, True),
])
def test_authorization_table(idp, rules, claims, allowed):
    rt = runtime(jwt_route(idp, extra=f"[route.authorization]\nrules = {rules}\n"))
    _, reply = request(rt, headers=bearer(idp.mint(**claims)))
    assert (reply is None) == allowed, reply and reply.body


def test_authorization_without_token_denies(idp):
    rt = runtime(jwt_route(idp, mode="optional", extra="[route.authorization]\nrules = ['jwt.sub == \"alice\"']\n"))
    assert request(rt)[1].status == 403


def test_cel_config_errors_have_paths(idp):
    text = jwt_route(idp, extra="""
[route.authorization]
rules = ['jwt.sub == ', { deny = 'nosuchfn(jwt.sub)' }, { maybe = 'true' }, 42, { allow = 'true', deny = 'false' }]
[route.transform.request]
set = { "x-a" = 'jwt.sub +', "bad name" = '"v"', "content-length" = '"1"' }
remove = ["transfer-encoding"]
[route.claims_to_headers]
"X-User" = 'undefined_var.x'
""")
    problems = "\n".join(config_errors(text))
    for expected in [
        "route[0].authorization.rules[0]: invalid CEL",
        "route[0].authorization.rules[1].deny: invalid CEL",
        "route[0].authorization.rules[2].maybe: unknown key",
        "route[0].authorization.rules[3]: expected a CEL string",
        "route[0].authorization.rules[4]: a rule has exactly one of",
        'route[0].transform.request.set.x-a: invalid CEL',
        'route[0].transform.request.set."bad name": invalid header name',
        'route[0].transform.request.set.content-length: header \'content-length\' cannot be set',
        "route[0].transform.request.remove[0]: header 'transfer-encoding' cannot be set or removed",
        "route[0].claims_to_headers.X-User: invalid CEL",
    ]:
        assert expected in problems, (expected, problems)


# ---------------------------------------------------------------------------------
# transform
# ---------------------------------------------------------------------------------

TRANSFORM = """
[route.transform.request]
set = { "x-user" = "jwt.sub", "x-path" = "request.path" }
add = { "x-via" = '"agproxy"' }
remove = ["x-debug", "x-via"]
[route.transform.response]
set = { "x-status" = "string(response.code)", "x-who" = "jwt.sub" }
add = { "x-ct" = 'response.headers["content-type"]' }
remove = ["server"]
"""


def test_transform_request_and_response(idp):
    rt = runtime(jwt_route(idp, extra=TRANSFORM))
    ex, reply = request(rt, "/p/q", bearer(idp.mint()) + [("x-debug", "1"), ("x-via", "client"),
                                                            ("x-user", "spoof")])
    assert reply is None
    h = ex.request.headers
    assert h.get_all("x-user") == ["alice"] and h.get("x-path") == "/p/q"
    assert h.get_all("x-via") == ["agproxy"] and "x-debug" not in h
    route = rt.router.routes[0]
    assert len(route.response_filters) == 1
    head = ResponseHead(201, Headers([("content-type", "text/plain"), ("server", "x")]))
    for f in route.response_filters:
        f.on_response(ex, head)
    assert head.headers.get("x-status") == "201" and head.headers.get("x-who") == "alice"
    assert head.headers.get("x-ct") == "text/plain" and "server" not in head.headers


def test_transform_eval_error_is_500(idp, caplog):
    rt = runtime(jwt_route(idp, extra='[route.transform.request]\nset = { "x-t" = "jwt.tenant" }\n'))
    assert rt.router.routes[0].response_filters == ()     # no response side: not called
    with caplog.at_level(logging.ERROR, logger="agproxy.policy"):
        ex, reply = request(rt, headers=bearer(idp.mint()) + [("x-t", "keep")])
    assert reply.status == 500 and body(reply)["error"] == "internal_error"
    assert any("jwt.tenant" in r.getMessage() for r in caplog.records)
    # with default(): no error
    rt = runtime(jwt_route(idp, extra='[route.transform.request]\nset = { "x-t" = \'default(jwt.tenant, "none")\' }\n'))
    ex, reply = request(rt, headers=bearer(idp.mint()))
    assert reply is None and ex.request.headers.get("x-t") == "none"


def test_transform_refuses_header_injection(idp):
    rt = runtime(jwt_route(idp, extra='[route.transform.request]\nset = { "x-t" = "jwt.name" }\n'))
    _, reply = request(rt, headers=bearer(idp.mint(name="a\r\nx-admin: 1")))
    assert reply.status == 500


def test_response_eval_error_leaves_header_unset(idp):
    rt = runtime(jwt_route(idp, extra='[route.transform.response]\nset = { "x-t" = "jwt.tenant", "x-s" = "jwt.sub" }\n'))
    ex, reply = request(rt, headers=bearer(idp.mint()))
    head = ResponseHead(200, Headers())
    rt.router.routes[0].response_filters[0].on_response(ex, head)
    assert head.status == 200 and "x-t" not in head.headers and head.headers.get("x-s") == "alice"


# ---------------------------------------------------------------------------------
# claims_to_headers
# ---------------------------------------------------------------------------------

CLAIMS = """
[route.claims_to_headers]
"X-Amzn-Bedrock-AgentCore-Runtime-Custom-User" = "jwt.sub"
"X-Amzn-Bedrock-AgentCore-Runtime-Custom-Roles" = 'default(jwt.roles, []).join(",")'
"""
USER = "x-amzn-bedrock-agentcore-runtime-custom-user"
ROLES = "x-amzn-bedrock-agentcore-runtime-custom-roles"


def test_claims_to_headers_and_spoofing(idp):
    rt = runtime(jwt_route(idp, extra=CLAIMS))
    spoof = [("X-Amzn-Bedrock-AgentCore-Runtime-Custom-User".lower(), "admin"), (ROLES, "root")]
    ex, reply = request(rt, headers=bearer(idp.mint(sub="alice", roles=["a", "b"])) + spoof)
    assert reply is None
    assert ex.request.headers.get_all(USER) == ["alice"] and ex.request.headers.get_all(ROLES) == ["a,b"]
    ex, reply = request(rt, headers=bearer(idp.mint(sub="bob")) + spoof)
    assert ex.request.headers.get_all(USER) == ["bob"] and ex.request.headers.get_all(ROLES) == [""]


def test_claims_to_headers_anonymous_and_missing_claim(idp):
    # optional mode, no token: spoofed headers removed, nothing set
    rt = runtime(jwt_route(idp, mode="optional", extra=CLAIMS))
    ex, reply = request(rt, headers=[(USER, "admin")])
    assert reply is None and USER not in ex.request.headers and ROLES not in ex.request.headers
    # permissive with a bad token: same
    rt = runtime(jwt_route(idp, mode="permissive", extra=CLAIMS))
    ex, reply = request(rt, headers=bearer(idp.mint(aud="x")) + [(USER, "admin")])
    assert reply is None and USER not in ex.request.headers
    # a verified token without the claim: 500, and still no spoofed header
    rt = runtime(jwt_route(idp, extra='[route.claims_to_headers]\n"X-Tenant" = "jwt.tenant"\n'))
    ex, reply = request(rt, headers=bearer(idp.mint()) + [("x-tenant", "evil")])
    assert reply.status == 500 and "x-tenant" not in ex.request.headers


def test_claims_to_headers_without_jwt_route():
    rt = runtime("""
[[route]]
name = "r"
backend = "echo"
[route.claims_to_headers]
"X-User" = "jwt.sub"
"X-Peer" = "source.address"
""")
    ex, reply = request(rt, headers=[("x-user", "admin")])
    assert reply is None and "x-user" not in ex.request.headers
    assert ex.request.headers.get("x-peer") == "127.0.0.1"


def test_order_is_fixed_whatever_the_toml_order(idp):
    text = f"""
[[route]]
name = "r"
backend = "echo"
[route.claims_to_headers]
"X-User" = "jwt.sub"
[route.authorization]
rules = ['jwt.sub == "alice"']
[route.jwt]
issuer = "{idp.issuer}"
jwks = {{ inline = '{idp.jwks_json()}' }}
"""
    rt = runtime(text)
    assert [f.name for f in rt.router.routes[0].filters] == ["jwt", "authorization", "claims_to_headers"]
    ex, reply = request(rt, headers=bearer(idp.mint()))
    assert reply is None and ex.request.headers.get("x-user") == "alice"


def test_transform_skips_jwt_values_for_anonymous_callers(idp):
    rt = runtime(jwt_route(idp, mode="optional", extra=TRANSFORM))
    ex, reply = request(rt, "/p", [("x-user", "spoof")])
    assert reply is None
    assert "x-user" not in ex.request.headers and ex.request.headers.get("x-path") == "/p"
    head = ResponseHead(200, Headers([("content-type", "a/b")]))
    rt.router.routes[0].response_filters[0].on_response(ex, head)
    assert "x-who" not in head.headers and head.headers.get("x-status") == "200"
