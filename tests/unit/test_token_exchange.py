"""The RFC 8693 token service, the OBO filter and forward_token, in process."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agproxy.http.messages import Headers
from agproxy.identity.actor import ActorCredential, ClientRegistry, TokenFileActor, check_actor_shape, ActorError
from agproxy.identity.minting import KeySet, make_signing_key, public_jwk
from agproxy.identity.providers import static_provider
from agproxy.identity.token_exchange import (GRANT_TYPE, TT_ACCESS, TT_JWT, ClaimPolicy, ExchangeError,
                                             ExchangeRequest, TokenExchangeService)
from agproxy.filters.forward_token import ForwardTokenFilter
from agproxy.filters.obo import OboFilter
from agproxy.proxy.filter import LocalReply

IDP = "https://idp.example.com"
K8S = "https://kubernetes.default.svc"
SPIFFE_ISS = "https://spire.example.com"
GW = "https://gateway.example.com"
AGENT_SA = "system:serviceaccount:agents:support"


class Issuer:
    def __init__(self, iss: str, kid: str):
        self.iss, self.kid = iss, kid
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.jwks = {"keys": [public_jwk(self.key, kid, "ES256")]}

    def token(self, **claims) -> str:
        now = int(time.time())
        base = {"iss": self.iss, "iat": now, "exp": now + 600}
        base.update(claims)
        base = {k: v for k, v in base.items() if v is not None}
        return jwt.encode(base, self.key, algorithm="ES256", headers={"kid": self.kid})


@pytest.fixture(scope="module")
def world():
    idp, k8s, spire, rogue = (Issuer(IDP, "idp1"), Issuer(K8S, "k8s1"), Issuer(SPIFFE_ISS, "sp1"),
                              Issuer("https://rogue.example.com", "r1"))
    obo_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    next_key = ec.generate_private_key(ec.SECP256R1())
    keys = KeySet([make_signing_key(obo_key, "obo-1"), make_signing_key(next_key, "obo-2")])
    return idp, k8s, spire, rogue, keys


def service(world, **kw) -> TokenExchangeService:
    idp, k8s, spire, rogue, keys = world
    clients = ClientRegistry()
    clients.add("support-agent", "s3cret")
    svc = TokenExchangeService(
        issuer=GW, keys=keys, ttl=300,
        subject_providers={"idp": static_provider("idp", idp.jwks, issuer=IDP, audiences=["agents"])},
        actor_providers={"k8s": static_provider("k8s", k8s.jwks, issuer=K8S, audiences=["gateway"]),
                         "spiffe": static_provider("spiffe", spire.jwks, issuer=SPIFFE_ISS)},
        clients=clients, **kw)
    svc.register_audience("support-agent")
    return svc


def user_token(idp: Issuer, **extra) -> str:
    claims = dict(sub="alice", aud="agents", groups=["eng"], department="cx", ssn="123-45-6789",
                  scope="agents:invoke agents:read")
    claims.update(extra)
    return idp.token(**claims)


def k8s_token(k8s: Issuer, **extra) -> str:
    claims = dict(sub=AGENT_SA, aud=["gateway"],
                  **{"kubernetes.io": {"namespace": "agents", "serviceaccount": {"name": "support", "uid": "u1"}}})
    claims.update(extra)
    return k8s.token(**claims)


def verify_obo(world, token: str) -> dict:
    keys = world[4]
    header = jwt.get_unverified_header(token)
    assert header["kid"] == "obo-1" and header["alg"] == "RS256"
    pub = keys.keys[0].private.public_key()
    return jwt.decode(token, pub, algorithms=["RS256"], audience="support-agent", issuer=GW)


def run(coro):
    return asyncio.run(coro)


POLICY = ClaimPolicy(("groups", "department"), ("kubernetes.io",), False, True)


def test_obo_token_claims(world):
    idp, k8s, *_ = world
    svc = service(world)
    subject = user_token(idp, act={"sub": "upstream-agent"})
    issued = run(svc.exchange(ExchangeRequest(subject, actor=ActorCredential("kubernetes", token=k8s_token(k8s)),
                                              audiences=["support-agent"]), POLICY))
    claims = verify_obo(world, issued.token)
    assert claims["sub"] == "alice"
    assert claims["act"] == {"sub": AGENT_SA,
                             "kubernetes.io": {"namespace": "agents", "serviceaccount": {"name": "support", "uid": "u1"}},
                             "act": {"sub": "upstream-agent"}}
    assert claims["client_id"] == "agproxy"
    assert claims["groups"] == ["eng"] and claims["department"] == "cx"
    assert "ssn" not in claims                       # not allowed: never leaks
    assert claims["scope"] == "agents:invoke agents:read"
    assert claims["exp"] <= jwt.decode(subject, options={"verify_signature": False})["exp"]
    assert set(claims) == {"iss", "sub", "aud", "client_id", "iat", "nbf", "exp", "jti", "scope", "act",
                           "groups", "department"}


def test_exp_capped_by_subject(world):
    idp, k8s, *_ = world
    svc = service(world)
    subject = user_token(idp, exp=int(time.time()) + 20)
    issued = run(svc.exchange(ExchangeRequest(subject, actor=ActorCredential("kubernetes", token=k8s_token(k8s)),
                                              audiences=["support-agent"]), POLICY))
    assert issued.claims["exp"] <= int(time.time()) + 20


@pytest.mark.parametrize("case,error", [
    ("expired_subject", "invalid_request"),
    ("untrusted_subject", "invalid_request"),
    ("actor_untrusted", "unauthorized_client"),
    ("actor_wrong_kind", "unauthorized_client"),
    ("actor_expired", "invalid_request"),
    ("bad_target", "invalid_target"),
    ("scope_exceeds", "invalid_scope"),
    ("no_actor", "invalid_request"),
])
def test_refusals(world, case, error):
    idp, k8s, spire, rogue, _ = world
    svc = service(world)
    subject = user_token(idp)
    actor = ActorCredential("kubernetes", token=k8s_token(k8s))
    aud, scope = ["support-agent"], None
    if case == "expired_subject":
        subject = user_token(idp, exp=int(time.time()) - 120)
    elif case == "untrusted_subject":
        subject = rogue.token(sub="alice", aud="agents")
    elif case == "actor_untrusted":
        actor = ActorCredential("kubernetes", token=rogue.token(sub=AGENT_SA, aud="gateway"))
    elif case == "actor_wrong_kind":
        actor = ActorCredential("kubernetes", token=spire.token(sub="spiffe://example.org/agent", aud="gw"))
    elif case == "actor_expired":
        actor = ActorCredential("kubernetes", token=k8s_token(k8s, exp=int(time.time()) - 120))
    elif case == "bad_target":
        aud = ["billing-agent"]
    elif case == "scope_exceeds":
        scope = "agents:admin"
    elif case == "no_actor":
        actor = None
    with pytest.raises(ExchangeError) as ei:
        run(svc.exchange(ExchangeRequest(subject, actor=actor, audiences=aud, scope=scope), POLICY))
    assert ei.value.error == error
    assert subject not in ei.value.description


def test_spiffe_actor(world):
    idp, _, spire, *_ = world
    svc = service(world)
    svid = spire.token(sub="spiffe://example.org/ns/agents/sa/support", aud=["gateway"])
    issued = run(svc.exchange(ExchangeRequest(user_token(idp), actor=ActorCredential("spiffe", token=svid),
                                              audiences=["support-agent"]), POLICY))
    assert issued.claims["act"]["sub"] == "spiffe://example.org/ns/agents/sa/support"
    with pytest.raises(ActorError):
        check_actor_shape({"sub": "spiffe://example.org/x", "exp": 1})   # aud required


def test_may_act(world):
    idp, k8s, *_ = world
    svc = service(world)
    policy = ClaimPolicy((), (), True, True)
    actor = ActorCredential("kubernetes", token=k8s_token(k8s))
    ok = user_token(idp, may_act={"sub": AGENT_SA})
    run(svc.exchange(ExchangeRequest(ok, actor=actor, audiences=["support-agent"]), policy))
    for bad in (user_token(idp), user_token(idp, may_act={"sub": "system:serviceaccount:x:y"})):
        with pytest.raises(ExchangeError) as ei:
            run(svc.exchange(ExchangeRequest(bad, actor=actor, audiences=["support-agent"]), policy))
        assert ei.value.error == "invalid_grant"


def test_client_credentials_actor(world):
    idp, *_ = world
    svc = service(world)
    good = ActorCredential("client", client_id="support-agent", client_secret="s3cret")
    issued = run(svc.exchange(ExchangeRequest(user_token(idp), actor=good, audiences=["support-agent"]), POLICY))
    assert issued.claims["act"] == {"sub": "support-agent"}
    bad = ActorCredential("client", client_id="support-agent", client_secret="s3cre7")
    with pytest.raises(ExchangeError) as ei:
        run(svc.exchange(ExchangeRequest(user_token(idp), actor=bad, audiences=["support-agent"]), POLICY))
    assert ei.value.error == "invalid_client" and ei.value.status == 401
    reg = ClientRegistry()
    reg.add("a", "x")
    assert reg.authenticate("a", "x") and not reg.authenticate("a", "y") and not reg.authenticate("b", "x")


# -- the HTTP door ------------------------------------------------------------------------

def form(**kw) -> list[tuple[str, str]]:
    out = []
    for k, v in kw.items():
        for item in (v if isinstance(v, list) else [v]):
            out.append((k, item))
    return out


def test_token_endpoint(world):
    idp, k8s, *_ = world
    svc = service(world)
    status, body = run(svc.handle_token_request(form(
        grant_type=GRANT_TYPE, subject_token=user_token(idp), subject_token_type=TT_ACCESS,
        actor_token=k8s_token(k8s), actor_token_type=TT_JWT, audience="support-agent",
        scope="agents:invoke"), None))
    assert status == 200, body
    doc = json.loads(body)
    assert doc["issued_token_type"] == TT_ACCESS and doc["token_type"] == "Bearer"
    assert 0 < doc["expires_in"] <= 300 and "scope" not in doc
    claims = verify_obo(world, doc["access_token"])
    assert claims["scope"] == "agents:invoke" and "groups" not in claims   # endpoint policy: no claims


@pytest.mark.parametrize("fields,auth,error,status", [
    (dict(subject_token="x"), None, "invalid_request", 400),
    (dict(grant_type="client_credentials"), None, "unsupported_grant_type", 400),
    (dict(grant_type=GRANT_TYPE, subject_token_type=TT_ACCESS), None, "invalid_request", 400),
    (dict(grant_type=GRANT_TYPE, subject_token="a.b.c", subject_token_type=TT_ACCESS, actor_token="x"),
     None, "invalid_request", 400),
    (dict(grant_type=GRANT_TYPE, subject_token="SUBJ", subject_token_type=TT_ACCESS, audience="nope"),
     "basic:support-agent:s3cret", "invalid_target", 400),
    (dict(grant_type=GRANT_TYPE, subject_token="SUBJ", subject_token_type=TT_ACCESS, audience="support-agent"),
     "basic:support-agent:wrong", "invalid_client", 401),
    (dict(grant_type=GRANT_TYPE, subject_token="SUBJ", subject_token_type=TT_ACCESS, audience="support-agent",
          resource="not-a-uri"), None, "invalid_target", 400),
])
def test_token_endpoint_errors(world, fields, auth, error, status):
    idp = world[0]
    fields = {k: (user_token(idp) if v == "SUBJ" else v) for k, v in fields.items()}
    authz = None
    if auth:
        _, u, p = auth.split(":")
        authz = "Basic " + base64.b64encode(f"{u}:{p}".encode()).decode()
    st, body = run(service(world).handle_token_request(form(**fields), authz))
    assert st == status and json.loads(body)["error"] == error


def test_client_post_auth_makes_client_the_actor(world):
    idp = world[0]
    st, body = run(service(world).handle_token_request(form(
        grant_type=GRANT_TYPE, subject_token=user_token(idp), subject_token_type=TT_ACCESS,
        audience="support-agent", client_id="support-agent", client_secret="s3cret"), None))
    assert st == 200, body
    claims = verify_obo(world, json.loads(body)["access_token"])
    assert claims["client_id"] == "support-agent" and claims["act"] == {"sub": "support-agent"}


def test_discovery_and_jwks(world):
    svc = service(world)
    doc = json.loads(svc.discovery_doc)
    assert doc["issuer"] == GW and doc["jwks_uri"] == GW + "/jwks.json"
    assert doc["token_endpoint"] == GW + "/oauth2/token"
    assert GRANT_TYPE in doc["grant_types_supported"]
    jwks = json.loads(svc.keys.jwks_bytes())
    assert [k["kid"] for k in jwks["keys"]] == ["obo-1", "obo-2"]
    assert all("d" not in k for k in jwks["keys"])          # public parts only
    assert "PRIVATE" not in repr(svc.describe()) and "s3cret" not in repr(svc.describe())


# -- the OBO filter -------------------------------------------------------------------------

class FakeEx:
    def __init__(self, token: str | None):
        self.jwt_token = token
        self.facts: dict = {}
        self.request = type("R", (), {})()
        self.request.headers = Headers([("authorization", f"Bearer {token}")] if token else [])


def _resolve(result):
    if result is None or isinstance(result, LocalReply):
        return result
    return asyncio.get_event_loop().run_until_complete(result)


def test_obo_filter_caches_and_follows_rotation(world, tmp_path):
    idp, k8s, *_ = world
    svc = service(world)
    path = tmp_path / "agent-token"
    path.write_text(k8s_token(k8s))
    actor = TokenFileActor(str(path), "kubernetes", recheck=0)
    actor.load()
    f = OboFilter(svc, actor, "support-agent", POLICY, None, 30.0, 100)
    subject = user_token(idp)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        ex1 = FakeEx(subject)
        assert _resolve(f.on_request(ex1)) is None
        tok1 = ex1.facts["obo_token"]
        assert ex1.request.headers.get("authorization") == "Bearer " + tok1
        ex2 = FakeEx(subject)
        assert f.on_request(ex2) is None                      # cache hit: synchronous
        assert ex2.facts["obo_token"] == tok1 and f.hits == 1
        # rotate the actor token file (atomic rename, as kubelet does)
        new = tmp_path / "agent-token.new"
        new.write_text(k8s_token(k8s, jti="second"))
        os.replace(new, path)
        ex3 = FakeEx(subject)
        assert _resolve(f.on_request(ex3)) is None
        assert ex3.facts["obo_token"] != tok1 and actor.reloads == 2
        # refusals
        r = _resolve(f.on_request(FakeEx(user_token(idp, exp=int(time.time()) - 100))))
        assert r.status == 401
        r = _resolve(f.on_request(FakeEx(None)))
        assert r.status == 401
    finally:
        loop.close()
        asyncio.set_event_loop(None)


def test_obo_filter_coalesces_concurrent_misses(world, tmp_path):
    idp, k8s, *_ = world
    svc = service(world)
    path = tmp_path / "agent-token"
    path.write_text(k8s_token(k8s))
    actor = TokenFileActor(str(path), "kubernetes")
    actor.load()
    f = OboFilter(svc, actor, "support-agent", POLICY, None, 30.0, 100)
    subject = user_token(idp)
    exs = [FakeEx(subject) for _ in range(5)]

    async def go():
        return await asyncio.gather(*[f.on_request(ex) for ex in exs])

    assert asyncio.run(go()) == [None] * 5
    assert svc.issued == 1 and len({ex.facts["obo_token"] for ex in exs}) == 1


def test_obo_filter_actor_not_trusted(world, tmp_path):
    idp, _, _, rogue, _ = world
    path = tmp_path / "agent-token"
    path.write_text(rogue.token(sub=AGENT_SA, aud="gateway"))
    actor = TokenFileActor(str(path), "kubernetes")
    actor.load()
    f = OboFilter(service(world), actor, "support-agent", POLICY, None, 30.0, 100)
    loop = asyncio.new_event_loop()
    try:
        r = loop.run_until_complete(f.on_request(FakeEx(user_token(idp))))
    finally:
        loop.close()
    assert r.status == 403 and json.loads(r.body)["error"] == "unauthorized_client"


def test_forward_token_limits_and_strips():
    f = ForwardTokenFilter("X-Amzn-Bedrock-AgentCore-Runtime-Custom-User-Token", "subject", "", 4096)
    ex = FakeEx("a.b.c")
    ex.request.headers.add("x-amzn-bedrock-agentcore-runtime-custom-user-token", "spoofed")
    assert f.on_request(ex) is None
    assert ex.request.headers.get_all("x-amzn-bedrock-agentcore-runtime-custom-user-token") == ["a.b.c"]
    big = FakeEx("a." + "x" * 5000 + ".c")
    r = f.on_request(big)
    assert r.status == 431 and b"4096" in r.body
    obo = ForwardTokenFilter("X-Custom", "obo", "", 4096)
    r = obo.on_request(FakeEx("a.b.c"))
    assert r.status == 401


def test_signing_key_curve_must_match_its_alg():
    import pytest as _pytest
    from cryptography.hazmat.primitives.asymmetric import ec as _ec
    from agproxy.identity.minting import KeyError_, make_signing_key
    p384 = _ec.generate_private_key(_ec.SECP384R1())
    assert make_signing_key(p384, "k").alg == "ES384"
    with _pytest.raises(KeyError_, match="ES256 needs a key on secp256r1"):
        make_signing_key(p384, "k", "ES256")


def test_token_exchange_config_checks_listener_and_reserved_claims(tmp_path):
    import subprocess
    from tests.support.gateway import ROOT, agproxy_cmd
    conf = ROOT / "conf"
    cfg = tmp_path / "te.toml"
    cfg.write_text(f'''
[[listener]]
name = "main"
bind = "127.0.0.1:8080"

[jwt_provider.idp]
issuer = "https://idp.example.com"
jwks = {{ file = "{conf}/agentcore/idp-jwks.json" }}

[token_exchange]
issuer = "http://127.0.0.1:8080"
signing_keys = [{{ file = "{conf}/agentcore/obo-signing-1.pem", kid = "k1" }}]
subject_issuers = ["idp"]
listener = "mian"
allowed_subject_claims = ["groups", "sub"]

[[route]]
name = "r"
match = {{ path_prefix = "/" }}
backend = "s"

[backend.s]
type = "static"
''')
    r = subprocess.run(agproxy_cmd() + ["validate", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "token_exchange.listener: unknown listener 'mian' (did you mean \"main\"?)" in r.stderr
    assert "token_exchange.allowed_subject_claims: 'sub' is set by the token service" in r.stderr


def test_obo_audience_outside_token_exchange_audiences_is_a_config_error(tmp_path):
    import subprocess
    from tests.support.gateway import ROOT, agproxy_cmd
    text = (ROOT / "conf" / "agentcore-obo.toml").read_text()
    text = text.replace('subject_issuers = ["idp"]', 'subject_issuers = ["idp"]\naudiences = ["other-agent"]')
    cfg = ROOT / "conf" / f".test-{tmp_path.name}.toml"     # beside the demo files it names
    cfg.write_text(text)
    try:
        r = subprocess.run(agproxy_cmd() + ["validate", str(cfg)], capture_output=True, text=True, timeout=60)
    finally:
        cfg.unlink()
    assert r.returncode == 1
    assert "route[0].obo.audience: 'support-agent' is not in [token_exchange].audiences" in r.stderr
