"""Hostile input against the gateway's own RFC 8693 token endpoint (`[token_exchange]`),
over real sockets: scope escalation, actor confusion, duplicate and oversized forms."""

from __future__ import annotations

import json
from urllib.parse import urlencode

import jwt
import pytest

from tests.support.agentcore_emulator import DemoIdentity
from tests.support.gateway import GatewayProcess
from tests.support.strict_client import request

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    identity = DemoIdentity(str(tmp_path_factory.mktemp("token-id"))).create(actor_ttl=3600)
    config = f'''
[jwt_provider.idp]
issuer = "https://idp.agproxy.test"
audiences = ["agents"]
jwks = {{ file = "{identity.p('idp-jwks.json')}" }}

[jwt_provider.k8s]
issuer = "https://kubernetes.default.svc"
audiences = ["agproxy"]
jwks = {{ file = "{identity.p('k8s-jwks.json')}" }}

[token_exchange]
issuer = "http://127.0.0.1:{{port}}"
signing_keys = [{{ file = "{identity.p('obo-signing-1.pem')}", kid = "obo-1" }}]
subject_issuers = ["idp"]
actor_issuers = ["k8s"]
audiences = ["support-agent"]
'''
    gw = GatewayProcess(config, tmp_path_factory.mktemp("token-gw"))
    yield gw, identity
    gw.stop()


def exchange(gw, form: dict | list) -> tuple[int, dict]:
    body = urlencode(form).encode()
    r = request(gw.port, "/oauth2/token", {"content-type": "application/x-www-form-urlencoded"}, "POST", body)
    return r.status, json.loads(r.body)


def base_form(identity, **subject_claims) -> dict:
    return {"grant_type": GRANT, "subject_token": identity.user_token(**subject_claims),
            "subject_token_type": ACCESS, "actor_token": open(identity.p("agent-token")).read().strip(),
            "actor_token_type": JWT_TYPE, "audience": "support-agent"}


def test_scope_cannot_be_granted_beyond_a_subject_without_scope(world):
    """A subject token that carries no scope grants none: asking for `admin` must not
    mint a token with `scope: admin` (scope escalation)."""
    gw, identity = world
    status, doc = exchange(gw, {**base_form(identity, scope=None), "scope": "admin"})
    assert status == 400, f"escalated: {jwt.decode(doc['access_token'], options={'verify_signature': False})}"
    assert doc["error"] == "invalid_scope"
    # Without a requested scope the exchange still works, and grants no scope.
    status, doc = exchange(gw, base_form(identity, scope=None))
    assert status == 200, doc
    assert "scope" not in jwt.decode(doc["access_token"], options={"verify_signature": False})


def test_scope_within_the_subjects_is_granted_and_beyond_refused(world):
    gw, identity = world
    status, doc = exchange(gw, {**base_form(identity), "scope": "agents:invoke"})
    assert status == 200 and jwt.decode(doc["access_token"], options={"verify_signature": False})["scope"] \
        == "agents:invoke"
    status, doc = exchange(gw, {**base_form(identity), "scope": "agents:invoke admin"})
    assert (status, doc["error"]) == (400, "invalid_scope")


def test_user_token_as_actor_and_duplicates_and_oversize(world):
    gw, identity = world
    form = base_form(identity)
    # The user's own token offered as the actor: its issuer is not trusted for actors.
    status, doc = exchange(gw, {**form, "actor_token": identity.user_token()})
    assert (status, doc["error"]) == (400, "unauthorized_client")
    # A repeated single-valued parameter: which one would be used is ambiguous.
    pairs = list(form.items()) + [("subject_token", identity.user_token(sub="root"))]
    status, doc = exchange(gw, pairs)
    assert (status, doc["error"]) == (400, "invalid_request")
    # An unlisted audience.
    status, doc = exchange(gw, {**form, "audience": "billing"})
    assert (status, doc["error"]) == (400, "invalid_target")
    # An oversized form: 413, nothing issued.
    status, doc = exchange(gw, {**form, "pad": "x" * (70 * 1024)})
    assert (status, doc["error"]) == (413, "invalid_request")
