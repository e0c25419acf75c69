"""The token service endpoints (backends/token_service.py): the HTTP door's form handling,
client authentication, error documents, discovery and JWKS, and `[token_exchange]` config."""

from __future__ import annotations

import base64
import json

import pytest

from agproxy.backends.token_service import TokenServiceBackend
from agproxy.identity.token_exchange import GRANT_TYPE, TT_ACCESS, TT_JWT
from tests.support.tokens import GW, k8s_token, make_world, run, user_token, verify_obo
from tests.support.tokens import service as _service


@pytest.fixture(scope="module")
def world():
    return make_world()


def service(world) -> TokenServiceBackend:
    return TokenServiceBackend(_service(world))


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
    jwks = json.loads(svc.service.keys.jwks_bytes())
    assert [k["kid"] for k in jwks["keys"]] == ["obo-1", "obo-2"]
    assert all("d" not in k for k in jwks["keys"])          # public parts only
    assert "PRIVATE" not in repr(svc.describe()) and "s3cret" not in repr(svc.describe())



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


