"""A real identity provider for tests: a strict (llhttp) HTTP server on 127.0.0.1 in a thread.

It serves OIDC discovery (`/.well-known/openid-configuration`) and a JWKS
(`/jwks.json`) that tests can rotate, take down (503), slow down, or serve with any
Cache-Control; it counts every fetch. Tokens are minted with `cryptography` keys
through pyjwt, and a few forgeries (alg none, HS256 keyed with the RSA public key)
are built by hand, since pyjwt refuses to make them.

    with IdP() as idp:
        token = idp.mint({"sub": "alice", "aud": "agents"})
        ...  # [route.jwt] jwks = { discovery = idp.discovery_url }
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections import Counter
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tests.support.strict_http import Conn, Request, StrictHTTPServer

DISCOVERY_PATH = "/.well-known/openid-configuration"
JWKS_PATH = "/jwks.json"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


_RSA_POOL: list = []
_rsa_next = [0]
_RSA_POOL_SIZE = 16


def _rsa_private_key() -> rsa.RSAPrivateKey:
    """2048-bit RSA keys cost 50-500 ms each to generate: tests cycle through a small
    lazily filled pool (16 consecutive calls always give distinct keys)."""
    i = _rsa_next[0] % _RSA_POOL_SIZE
    _rsa_next[0] += 1
    if i >= len(_RSA_POOL):
        _RSA_POOL.append(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    return _RSA_POOL[i]


class SigningKey:
    """A private key with its kid and default algorithm."""

    def __init__(self, kind: str = "RSA", kid: str | None = None, alg: str | None = None):
        self.kind = kind
        self.kid = kid or f"{kind.lower()}-{uuid.uuid4().hex[:8]}"
        if kind == "RSA":
            self.private = _rsa_private_key()
            self.alg = alg or "RS256"
        elif kind == "EC":
            self.private = ec.generate_private_key(ec.SECP256R1())
            self.alg = alg or "ES256"
        elif kind == "EC384":
            self.private = ec.generate_private_key(ec.SECP384R1())
            self.alg = alg or "ES384"
        elif kind == "Ed25519":
            self.private = ed25519.Ed25519PrivateKey.generate()
            self.alg = alg or "EdDSA"
        else:
            raise ValueError(kind)
        self.public = self.private.public_key()

    def public_pem(self) -> bytes:
        return self.public.public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)

    def jwk(self, with_alg: bool = True) -> dict:
        if isinstance(self.public, rsa.RSAPublicKey):
            nums = self.public.public_numbers()
            out = {"kty": "RSA", "n": b64url(nums.n.to_bytes((nums.n.bit_length() + 7) // 8, "big")),
                   "e": b64url(nums.e.to_bytes((nums.e.bit_length() + 7) // 8, "big"))}
        elif isinstance(self.public, ec.EllipticCurvePublicKey):
            nums = self.public.public_numbers()
            size = (self.public.curve.key_size + 7) // 8
            crv = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}[self.public.curve.name]
            out = {"kty": "EC", "crv": crv, "x": b64url(nums.x.to_bytes(size, "big")),
                   "y": b64url(nums.y.to_bytes(size, "big"))}
        else:
            raw = self.public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            out = {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}
        out.update({"kid": self.kid, "use": "sig"})
        if with_alg:
            out["alg"] = self.alg
        return out


class IdP:
    """The server. `issuer` defaults to its own base URL (as OIDC discovery requires)."""

    def __init__(self, *, issuer: str | None = None, cache_control: str | None = "max-age=300",
                 key_kinds: tuple[str, ...] = ("RSA",)):
        self.cache_control = cache_control
        self.down = False            # True → every request answers 503
        self.delay = 0.0             # seconds to sleep before answering
        self.fetches: Counter = Counter()
        self.lock = threading.Lock()
        self.keys: list[SigningKey] = [SigningKey(k) for k in key_kinds]
        self.unpublished: set[str] = set()
        self.extra_jwks: list[dict] = []
        self.server = StrictHTTPServer(self._handle, name="test-idp").start()
        self.port = self.server.port
        self.url = f"http://127.0.0.1:{self.port}"
        self.issuer = issuer or self.url

    def _handle(self, req: Request, conn: Conn) -> None:
        if req.method != "GET":
            conn.respond(405, [("content-type", "application/json")], b'{"error":"method"}')
            return
        path = req.path
        with self.lock:
            self.fetches[path] += 1
        if self.delay:
            time.sleep(self.delay)
        json_type = [("content-type", "application/json")]
        if self.down:
            conn.respond(503, json_type, b'{"error":"down"}')
        elif path == DISCOVERY_PATH:
            body = json.dumps({"issuer": self.issuer, "jwks_uri": self.jwks_url,
                               "id_token_signing_alg_values_supported": ["RS256", "ES256"]})
            conn.respond(200, json_type, body.encode())
        elif path == JWKS_PATH:
            extra = [("cache-control", self.cache_control)] if self.cache_control else []
            conn.respond(200, json_type + extra, json.dumps(self.jwks()).encode())
        else:
            conn.respond(404, json_type, b'{"error":"not found"}')

    # -- endpoints --------------------------------------------------------------------
    @property
    def discovery_url(self) -> str:
        return self.url + DISCOVERY_PATH

    @property
    def jwks_url(self) -> str:
        return self.url + JWKS_PATH

    @property
    def jwks_fetches(self) -> int:
        return self.fetches[JWKS_PATH]

    @property
    def discovery_fetches(self) -> int:
        return self.fetches[DISCOVERY_PATH]

    def jwks(self) -> dict:
        return {"keys": [k.jwk() for k in self.keys if k.kid not in self.unpublished] + self.extra_jwks}

    def jwks_json(self) -> str:
        return json.dumps(self.jwks())

    # -- keys -------------------------------------------------------------------------
    @property
    def key(self) -> SigningKey:
        """The current signing key (the newest)."""
        return self.keys[-1]

    def add_key(self, kind: str = "RSA", *, publish: bool = True, kid: str | None = None) -> SigningKey:
        k = SigningKey(kind, kid)
        with self.lock:
            self.keys.append(k)
            if not publish:
                self.unpublished.add(k.kid)
        return k

    def publish(self, kid: str) -> None:
        with self.lock:
            self.unpublished.discard(kid)

    def rotate(self, kind: str = "RSA") -> SigningKey:
        """A new signing key; the oldest one is dropped from the JWKS."""
        k = SigningKey(kind)
        with self.lock:
            self.keys.append(k)
            self.keys.pop(0)
        return k

    def remove_key(self, kid: str) -> None:
        with self.lock:
            self.keys = [k for k in self.keys if k.kid != kid]

    # -- tokens -----------------------------------------------------------------------
    def claims(self, **overrides: Any) -> dict:
        now = int(time.time())
        c = {"iss": self.issuer, "sub": "alice", "aud": "agents", "iat": now, "nbf": now - 5,
             "exp": now + 300, "jti": uuid.uuid4().hex}
        for k, v in overrides.items():
            if v is None:
                c.pop(k, None)
            else:
                c[k] = v
        return c

    def mint(self, claims: dict | None = None, *, key: SigningKey | None = None, alg: str | None = None,
             kid: str | None = "", headers: dict | None = None, **overrides: Any) -> str:
        """A signed token. `claims` default to `self.claims(**overrides)`; kid="" means
        the key's kid, None means no kid header."""
        key = key or self.key
        payload = claims if claims is not None else self.claims(**overrides)
        h = dict(headers or {})
        if kid == "":
            h["kid"] = key.kid
        elif kid is not None:
            h["kid"] = kid
        return jwt.encode(payload, key.private, algorithm=alg or key.alg, headers=h)

    def close(self) -> None:
        self.server.stop()

    def __enter__(self) -> "IdP":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# -- forgeries ------------------------------------------------------------------------
def unsigned_token(claims: dict, kid: str | None = None) -> str:
    """`alg: none` (RFC 7519 §6): empty signature."""
    header = {"alg": "none", "typ": "JWT"}
    if kid:
        header["kid"] = kid
    return f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}."


def hs256_with_public_key(claims: dict, key: SigningKey, pem: bool = True) -> str:
    """HS256 whose HMAC secret is the RSA/EC public key (the key-confusion attack)."""
    header = {"alg": "HS256", "typ": "JWT", "kid": key.kid}
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    secret = key.public_pem() if pem else json.dumps(key.jwk()).encode()
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(sig)}"


def with_header(token: str, **header_changes: Any) -> str:
    """The same payload and signature under a modified header (breaks the signature)."""
    h, p, s = token.split(".")
    header = json.loads(base64.urlsafe_b64decode(h + "=" * (-len(h) % 4)))
    header.update(header_changes)
    return f"{b64url(json.dumps(header).encode())}.{p}.{s}"
