"""The RFC 8693 token exchange library (identity/token_exchange.py), in process."""

from __future__ import annotations

import time

import jwt
import pytest

from agproxy.identity.actor import ActorCredential, ActorError, ClientRegistry, check_actor_shape
from agproxy.identity.token_exchange import ClaimPolicy, ExchangeError, ExchangeRequest
from tests.support.tokens import (AGENT_SA, POLICY, k8s_token, make_world, run, service, user_token,
                                  verify_obo)


@pytest.fixture(scope="module")
def world():
    return make_world()


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


def test_signing_key_curve_must_match_its_alg():
    import pytest as _pytest
    from cryptography.hazmat.primitives.asymmetric import ec as _ec
    from agproxy.identity.minting import KeyError_, make_signing_key
    p384 = _ec.generate_private_key(_ec.SECP384R1())
    assert make_signing_key(p384, "k").alg == "ES384"
    with _pytest.raises(KeyError_, match="ES256 needs a key on secp256r1"):
        make_signing_key(p384, "k", "ES256")


