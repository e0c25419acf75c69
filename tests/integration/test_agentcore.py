"""AgentCore end to end: client → agproxy (subprocess) → AgentCore emulator → echo agent.

The three patterns (OBO token exchange in JWT mode, JWT pass-through with SigV4,
claims as headers with SigV4), the token service's own endpoints, and the ways
each can fail: a body changed after signing, an expired user token, an
untrusted actor, a claim that is not allowed, a spoofed custom header, errors from
AgentCore, an oversized body or token.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlencode

import jwt
import pytest

from tests.support.agentcore_emulator import (DEFAULT_RUNTIME_ARN, DEMO_AGENT_SA, TEST_ACCESS_KEY,
                                              TEST_SECRET_KEY, AgentCoreEmulator, DemoIdentity)

CUSTOM = "x-amzn-bedrock-agentcore-runtime-custom-"
SESSION = "conv-7f3a9c2e-5b1d-4e8f-a6c0-123456789abc"
AWS_ENV = {"AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
           "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
           "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def identity(tmp_path_factory):
    return DemoIdentity(str(tmp_path_factory.mktemp("agentcore-id"))).create(actor_ttl=3600)


@pytest.fixture
def emulator():
    emu = AgentCoreEmulator().start()
    yield emu
    emu.stop()


@pytest.fixture
def jwt_emulator():
    emu = AgentCoreEmulator(mode="jwt", allowed_audience=["support-agent"],
                            allowed_clients=["agproxy-gateway"]).start()
    yield emu
    emu.stop()


def providers_toml(identity) -> str:
    return f'''
[jwt_provider.idp]
issuer = "https://idp.agproxy.test"
audiences = ["agents"]
jwks = {{ file = "{identity.p('idp-jwks.json')}" }}

[jwt_provider.k8s]
issuer = "https://kubernetes.default.svc"
audiences = ["agproxy"]
jwks = {{ file = "{identity.p('k8s-jwks.json')}" }}
'''


def post(gw, path: str, body: bytes | dict = b"{}", headers: dict | None = None, timeout: float = 10):
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    h = {"content-type": "application/json"}
    h.update(headers or {})
    req = urllib.request.Request(gw.url(path), data=data, headers=h, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def bearer(token: str) -> dict:
    return {"authorization": f"Bearer {token}"}


# ---------------------------------------------------------------------------------------------
# Pattern 1: OBO token exchange, AgentCore in JWT mode
# ---------------------------------------------------------------------------------------------

def obo_config(identity, emu, actor_file: str | None = None, extra_obo: str = "") -> str:
    return providers_toml(identity) + f'''
[token_exchange]
issuer = "http://127.0.0.1:{{port}}"
signing_keys = [{{ file = "{identity.p('obo-signing-1.pem')}", kid = "obo-1" }},
                {{ file = "{identity.p('obo-signing-2.pem')}", kid = "obo-2" }}]
token_ttl = "5m"
subject_issuers = ["idp"]
actor_issuers = ["k8s"]
client_id = "agproxy-gateway"

[[route]]
name = "support"
match = {{ path_prefix = "/agents/support" }}
backend = "support-agent"

[route.jwt]
providers = ["idp"]

[route.obo]
actor = {{ kubernetes_token_file = "{actor_file or identity.p('agent-token')}", recheck = "0s" }}
audience = "support-agent"
allowed_subject_claims = ["groups", "department", "tenant_id"]
allowed_actor_claims = ["kubernetes.io"]
{extra_obo}

[backend.support-agent]
type = "agentcore"
runtime_arn = "{DEFAULT_RUNTIME_ARN}"
auth = "bearer"
endpoint = "{emu.url}"
session_header_from = 'jwt.sub + "-" + request.headers["x-conversation"]'
'''


def start_obo(start_gateway, identity, emu, **kw):
    gw = start_gateway(obo_config(identity, emu, **kw))
    emu.set_discovery(gw.url("/.well-known/openid-configuration"))
    return gw


def test_obo_end_to_end(start_gateway, identity, jwt_emulator):
    gw = start_obo(start_gateway, identity, jwt_emulator)
    user = identity.user_token("alice", act={"sub": "frontend-app"})
    st, h, body = post(gw, "/agents/support/chat", {"prompt": "hi"},
                       {**bearer(user), "x-conversation": SESSION})
    assert st == 200, body
    saw = json.loads(body)["saw"]
    presented = saw["headers"]["authorization"].split(" ", 1)[1]
    assert presented != user
    # The agent can verify the OBO token with the gateway's published keys.
    jwks = jwt.PyJWKClient(gw.url("/jwks.json"))
    claims = jwt.decode(presented, jwks.get_signing_key_from_jwt(presented).key, algorithms=["RS256"],
                        audience="support-agent", issuer=gw.url("").rstrip("/"))
    assert claims["sub"] == "alice" and claims["client_id"] == "agproxy-gateway"
    assert claims["act"]["sub"] == DEMO_AGENT_SA
    assert claims["act"]["kubernetes.io"]["namespace"] == "agents"
    assert claims["act"]["act"] == {"sub": "frontend-app"}          # prior actor kept, nested
    assert claims["groups"] == ["support", "eng"] and claims["tenant_id"] == "t-42"
    assert "email" not in claims                                     # claim not allowed: does not leak
    assert saw["headers"]["x-amzn-bedrock-agentcore-runtime-session-id"] == "alice-" + SESSION
    # Second call: served from the OBO cache (same token, no new exchange).
    st, _, body2 = post(gw, "/agents/support/chat", {"prompt": "again"},
                        {**bearer(user), "x-conversation": SESSION})
    assert st == 200
    assert json.loads(body2)["saw"]["headers"]["authorization"] == saw["headers"]["authorization"]
    cfg = json.loads(gw.admin_get("/config")[1])
    obo = [f for r in cfg["routes"] if r["name"] == "support" for f in r["filters"] if f["type"] == "obo"][0]
    assert obo["cache"]["hits"] >= 1 and obo["cache"]["misses"] == 1
    dump = json.dumps(cfg)
    assert "PRIVATE KEY" not in dump and presented not in dump and user not in dump


def test_obo_expired_user_token(start_gateway, identity, jwt_emulator):
    gw = start_obo(start_gateway, identity, jwt_emulator)
    expired = identity.user_token("alice", ttl=-120)
    st, h, body = post(gw, "/agents/support/chat", {"prompt": "hi"}, {**bearer(expired), "x-conversation": SESSION})
    assert st == 401
    assert not jwt_emulator.requests                                  # never reached AgentCore


def test_obo_actor_not_trusted(start_gateway, identity, jwt_emulator, tmp_path):
    rogue = DemoIdentity(str(tmp_path / "rogue")).create()
    bad_actor = str(tmp_path / "rogue-agent-token")
    rogue.write_actor_token(path=bad_actor)     # right shape, signed by a key the gateway does not trust
    gw = start_obo(start_gateway, identity, jwt_emulator, actor_file=bad_actor)
    st, _, body = post(gw, "/agents/support/chat", {}, {**bearer(identity.user_token()), "x-conversation": SESSION})
    assert st == 403, body
    assert json.loads(body)["error"] == "invalid_request"        # trusted issuer name, untrusted key
    assert "actor token rejected" in json.loads(body)["message"]
    assert not jwt_emulator.requests


def test_obo_actor_token_rotation(start_gateway, identity, jwt_emulator, tmp_path):
    actor_file = str(tmp_path / "agent-token")
    identity.write_actor_token(path=actor_file)
    gw = start_obo(start_gateway, identity, jwt_emulator, actor_file=actor_file)
    user = identity.user_token()
    h = {**bearer(user), "x-conversation": SESSION}
    st, _, b1 = post(gw, "/agents/support/chat", {}, h)
    assert st == 200
    identity.write_actor_token(path=actor_file)
    st, _, b2 = post(gw, "/agents/support/chat", {}, h)
    assert st == 200
    t1 = json.loads(b1)["saw"]["headers"]["authorization"]
    t2 = json.loads(b2)["saw"]["headers"]["authorization"]
    assert t1 != t2                      # the rotated actor credential gave a new exchange


def test_obo_rejected_by_agentcore_allowed_clients(start_gateway, identity):
    emu = AgentCoreEmulator(mode="jwt", allowed_audience=["support-agent"], allowed_clients=["someone-else"]).start()
    try:
        gw = start_obo(start_gateway, identity, emu)
        st, h, body = post(gw, "/agents/support/chat", {}, {**bearer(identity.user_token()), "x-conversation": SESSION})
        assert st == 401
        assert "client_id not allowed" in body.decode()
        assert "invalid_token" in {k.lower(): v for k, v in h.items()}["www-authenticate"]
    finally:
        emu.stop()


def test_token_service_endpoints(start_gateway, identity, jwt_emulator):
    gw = start_obo(start_gateway, identity, jwt_emulator)
    with urllib.request.urlopen(gw.url("/.well-known/openid-configuration"), timeout=5) as r:
        doc = json.loads(r.read())
    assert doc["issuer"] == f"http://127.0.0.1:{gw.port}"
    assert doc["token_endpoint"] == f"http://127.0.0.1:{gw.port}/oauth2/token"
    with urllib.request.urlopen(doc["jwks_uri"], timeout=5) as r:
        assert [k["kid"] for k in json.loads(r.read())["keys"]] == ["obo-1", "obo-2"]
    form = {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token": identity.user_token(), "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "actor_token": open(identity.p("agent-token")).read().strip(),
        "actor_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "audience": "support-agent",
    }
    st, h, body = post(gw, "/oauth2/token", urlencode(form).encode(),
                       {"content-type": "application/x-www-form-urlencoded"})
    assert st == 200, body
    out = json.loads(body)
    assert out["issued_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
    assert out["token_type"] == "Bearer" and h.get("cache-control", h.get("Cache-Control")) == "no-store"
    st, _, body = post(gw, "/oauth2/token", urlencode({**form, "audience": "billing"}).encode(),
                       {"content-type": "application/x-www-form-urlencoded"})
    assert st == 400 and json.loads(body)["error"] == "invalid_target"
    st, _, body = post(gw, "/oauth2/token", urlencode({**form, "subject_token": identity.user_token(ttl=-100)}).encode(),
                       {"content-type": "application/x-www-form-urlencoded"})
    assert st == 400 and json.loads(body)["error"] == "invalid_request"


# ---------------------------------------------------------------------------------------------
# Pattern 2: JWT pass-through with SigV4
# ---------------------------------------------------------------------------------------------

def sigv4_config(identity, endpoint: str, policies: str, backend_extra: str = "") -> str:
    return providers_toml(identity) + f'''
[[route]]
name = "support"
match = {{ path_prefix = "/agents/support" }}
backend = "support-agent"

[route.jwt]
providers = ["idp"]

{policies}

[backend.support-agent]
type = "agentcore"
runtime_arn = "{DEFAULT_RUNTIME_ARN}"
qualifier = "prod"
auth = "sigv4"
endpoint = "{endpoint}"
{backend_extra}
'''


PASSTHROUGH = '''
[route.forward_token]
header = "X-Amzn-Bedrock-AgentCore-Runtime-Custom-User-Token"
token = "subject"
'''


def test_passthrough_end_to_end(start_gateway, identity, emulator):
    gw = start_gateway(sigv4_config(identity, emulator.url, PASSTHROUGH), env=AWS_ENV)
    user = identity.user_token("bob")
    st, h, body = post(gw, "/agents/support/x", {"prompt": "hi"},
                       {**bearer(user), CUSTOM + "user-token": "spoofed", "cookie": "sid=1",
                        "x-amzn-bedrock-agentcore-runtime-session-id": SESSION,
                        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
    assert st == 200, body
    saw = json.loads(body)["saw"]
    assert saw["qualifier"] == "prod"
    assert saw["headers"][CUSTOM + "user-token"] == user               # the validated token, not the spoofed one
    assert "authorization" not in saw["headers"]                      # SigV4: never reaches the agent
    assert saw["headers"]["x-amzn-bedrock-agentcore-runtime-session-id"] == SESSION
    assert saw["headers"]["traceparent"].startswith("00-0af7")
    sent = emulator.requests[-1]
    assert sent.path.startswith("/runtimes/arn%3Aaws%3Abedrock-agentcore%3Aus-east-1%3A111122223333%3Aruntime%2F")
    sent_headers = dict(sent.headers)
    assert sent_headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=" + TEST_ACCESS_KEY)
    assert "cookie" not in sent_headers and "x-forwarded-for" not in sent_headers


def test_passthrough_token_too_large(start_gateway, identity, emulator):
    gw = start_gateway(sigv4_config(identity, emulator.url, PASSTHROUGH), env=AWS_ENV)
    big = identity.user_token("bob", padding="x" * 5000)
    st, _, body = post(gw, "/agents/support/x", {}, bearer(big))
    assert st == 431 and b"4096" in body
    assert not emulator.requests


class TamperingProxy:
    """A TCP relay that changes bytes of the request after the gateway signed it."""

    def __init__(self, target_port: int, old: bytes, new: bytes):
        assert len(old) == len(new)
        self.target_port, self.old, self.new = target_port, old, new
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.tampered = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(c, u, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(u, c, False), daemon=True).start()

    def _pipe(self, src, dst, upstream: bool):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if upstream and self.old in data:
                    data = data.replace(self.old, self.new)
                    self.tampered += 1
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.sock.close()


def test_sigv4_tampered_body_is_rejected(start_gateway, identity, emulator):
    proxy = TamperingProxy(emulator.port, b'"amount": 100', b'"amount": 999')
    try:
        gw = start_gateway(sigv4_config(identity, f"http://127.0.0.1:{proxy.port}", PASSTHROUGH), env=AWS_ENV)
        st, h, body = post(gw, "/agents/support/pay", b'{"amount": 100}', bearer(identity.user_token()))
        assert proxy.tampered == 1
        assert st == 403, body
        assert "signature" in body.decode().lower()
        assert emulator.requests[-1].status == 403 and not emulator.agent_seen
        st, _, body = post(gw, "/agents/support/pay", b'{"amount": 200}', bearer(identity.user_token()))
        assert st == 200, body                               # untouched bodies still verify
    finally:
        proxy.close()


def test_sigv4_wrong_secret_is_rejected(start_gateway, identity, emulator):
    env = {**AWS_ENV, "AWS_SECRET_ACCESS_KEY": "not-the-right-secret"}
    gw = start_gateway(sigv4_config(identity, emulator.url, PASSTHROUGH), env=env)
    st, h, body = post(gw, "/agents/support/x", {}, bearer(identity.user_token()))
    assert st == 403 and b"InvalidSignatureException" in body


# ---------------------------------------------------------------------------------------------
# Pattern 3: claims as headers with SigV4
# ---------------------------------------------------------------------------------------------

CLAIMS = '''
[route.claims_to_headers]
"X-Amzn-Bedrock-AgentCore-Runtime-Custom-User" = "jwt.sub"
"X-Amzn-Bedrock-AgentCore-Runtime-Custom-Roles" = 'jwt.groups.join(",")'
'''


def test_claims_headers_end_to_end(start_gateway, identity, emulator):
    gw = start_gateway(sigv4_config(identity, emulator.url, CLAIMS,
                                    'user_id_from = "jwt.sub"\n'
                                    'session_header_from = \'jwt.sub + "-" + request.headers["x-conversation"]\''),
                       env=AWS_ENV)
    st, h, body = post(gw, "/agents/support/x", {"prompt": "hi"},
                       {**bearer(identity.user_token("carol")), "x-conversation": SESSION,
                        CUSTOM + "user": "mallory",                       # spoofed: replaced
                        CUSTOM + "tenant": "other-tenant",                # not vouched for by the route: dropped
                        "x-amzn-bedrock-agentcore-runtime-user-id": "mallory",   # only the gateway asserts it
                        "mcp-session-id": "mcp-123"})
    assert st == 200, body
    seen = json.loads(body)["saw"]["headers"]
    assert seen[CUSTOM + "user"] == "carol"
    assert seen[CUSTOM + "roles"] == "support,eng"
    assert CUSTOM + "tenant" not in seen
    assert seen["x-amzn-bedrock-agentcore-runtime-user-id"] == "carol"
    assert seen["x-amzn-bedrock-agentcore-runtime-session-id"] == "carol-" + SESSION
    assert seen["mcp-session-id"] == "mcp-123"
    assert not any(k == "authorization" or v.count(".") == 2 and len(v) > 200 for k, v in seen.items())  # no JWT
    # the user id is covered by the signature
    assert "x-amzn-bedrock-agentcore-runtime-user-id" in dict(emulator.requests[-1].headers)["authorization"]


def test_headers_the_route_sets_are_what_agentcore_receives(start_gateway, identity, emulator):
    # The backend learns from the route's built filters which headers they set: those
    # reach AgentCore (whatever their name), a client's own custom header does not.
    policies = '''
[route.claims_to_headers]
"X-Amzn-Bedrock-AgentCore-Runtime-Custom-User" = "jwt.sub"
"Xuser" = "jwt.sub"

[route.transform.request]
set = { "X-Amzn-Bedrock-AgentCore-Runtime-Custom-Tenant" = '"acme"' }
add = { "X-Amzn-Bedrock-AgentCore-Runtime-Custom-Via" = '"agproxy"' }
'''
    gw = start_gateway(sigv4_config(identity, emulator.url, policies), env=AWS_ENV)
    st, _, body = post(gw, "/agents/support/x", {"prompt": "hi"},
                       {**bearer(identity.user_token("erin")), CUSTOM + "tenant": "other-tenant",
                        CUSTOM + "debug": "1", "xuser": "mallory"})
    assert st == 200, body
    sent = emulator.requests[-1].headers
    names = [k for k, _ in sent]
    assert dict(sent)[CUSTOM + "user"] == "erin" and dict(sent)["xuser"] == "erin"
    assert dict(sent)[CUSTOM + "tenant"] == "acme" and dict(sent)[CUSTOM + "via"] == "agproxy"
    assert names.count(CUSTOM + "tenant") == 1 and names.count("xuser") == 1
    assert CUSTOM + "debug" not in names


def test_agentcore_errors_and_streaming(start_gateway, identity, emulator):
    gw = start_gateway(sigv4_config(identity, emulator.url, CLAIMS, 'max_body = 4096'), env=AWS_ENV)
    auth = bearer(identity.user_token("dave"))
    for status in (400, 404, 409, 429, 500):
        st, h, body = post(gw, "/agents/support/x", {"emulate_error": status}, auth)
        assert st == status and json.loads(body)["message"].startswith("emulated")
    st, _, body = post(gw, "/agents/support/x", {"agent_status": 500}, auth)
    assert st == 424
    emulator.fail_next = (403, "AccessDeniedException")
    st, _, body = post(gw, "/agents/support/x", {}, auth)
    assert st == 403 and b"AccessDeniedException" in body
    # over max_body: 413 before anything is sent
    n = len(emulator.requests)
    st, _, body = post(gw, "/agents/support/x", b'{"pad": "' + b"x" * 5000 + b'"}', auth)
    assert st == 413 and len(emulator.requests) == n
    # a bad session id from the client: 400 locally
    st, _, _ = post(gw, "/agents/support/x", {}, {**auth, "x-amzn-bedrock-agentcore-runtime-session-id": "short"})
    assert st == 400
    metrics = gw.metrics()
    for status in ("429", "424", "500", "403"):
        assert f'agentcore_responses_total{{backend="support-agent",status="{status}"}}' in metrics

    # SSE: events reach the client one by one, not at the end.
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    emulator.config.stream_delay = 0.3
    conn.request("POST", "/agents/support/x", body=json.dumps({"stream": 4}),
                 headers={**auth, "content-type": "application/json", "accept": "text/event-stream"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type") == "text/event-stream"
    start = time.monotonic()
    first = resp.readline()
    t_first = time.monotonic() - start
    rest = resp.read()
    t_all = time.monotonic() - start
    assert first.startswith(b"id: 0")
    assert rest.count(b"data:") == 4
    assert t_first < t_all - 0.5, (t_first, t_all)
    conn.close()


def test_config_errors(tmp_path, identity):
    from agproxy.config.model import parse
    from agproxy.config.reader import ConfigError
    from agproxy.proxy.build import build_runtime
    import tomllib
    text = sigv4_config(identity, "http://127.0.0.1:1", PASSTHROUGH) \
        .replace('auth = "sigv4"', 'auth = "bearer"\nuser_id_from = "jwt.sub"') \
        .replace(f'runtime_arn = "{DEFAULT_RUNTIME_ARN}"', 'runtime_arn = "arn:aws:lambda:us-east-1:1:function:x"')
    raw = tomllib.loads('[[listener]]\nname = "main"\nbind = "127.0.0.1:0"\n' + text)
    with pytest.raises(ConfigError) as ei:
        build_runtime(parse(raw))
    msg = str(ei.value)
    assert "backend.support-agent.runtime_arn" in msg
    assert "backend.support-agent.user_id_from" in msg


def test_non_normal_client_path_still_signs_the_agentcore_target(start_gateway, identity, emulator):
    """Path normalisation applies to the client's path (routing), never to the target the
    AgentCore backend builds (its %3A / %2F stay single-encoded, SigV4 still verifies)."""
    gw = start_gateway(sigv4_config(identity, emulator.url, PASSTHROUGH), env=AWS_ENV)
    st, _, body = post(gw, "/x/..//agents/./support/%78", {"prompt": "hi"}, bearer(identity.user_token("bob")))
    assert st == 200, body
    assert json.loads(body)["saw"]["qualifier"] == "prod"
    sent = emulator.requests[-1]
    assert sent.path.startswith("/runtimes/arn%3Aaws%3Abedrock-agentcore%3Aus-east-1%3A111122223333%3Aruntime%2F")
    assert dict(sent.headers)["authorization"].startswith("AWS4-HMAC-SHA256 Credential=" + TEST_ACCESS_KEY)
