"""Token issuers, a token service and the tokens the token-exchange tests use (in process)."""

from __future__ import annotations

import asyncio
import time

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agproxy.identity.actor import ClientRegistry
from agproxy.identity.minting import KeySet, make_signing_key, public_jwk
from agproxy.identity.providers import static_provider
from agproxy.identity.token_exchange import ClaimPolicy, TokenExchangeService

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


def make_world():
    """(idp, k8s, spire, rogue issuers, the gateway's signing keys)."""
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
