"""Token minting: the gateway's own signing keys, their JWKS, and signed JWTs.

Theory of operation: `KeySet` holds the private keys listed in
`[token_exchange].signing_keys` (PEM files; RSA → RS256, EC P-256 → ES256, P-384 →
ES384, or the `alg` given). The first key signs; every key is published in the
JWKS, so a rotation is: add the next key (published, not yet signing), wait for
relying parties' JWKS caches to pick it up, move it first, drop the old one after
the longest token lifetime. Keys are parsed once at load into cryptography key
objects (PyJWT would otherwise re-parse the PEM on every signature); a JWT is
then one JSON encoding plus one signature. Private key material never leaves this
module: `describe()` shows kids and algorithms only.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

SUPPORTED_ALGS = ("RS256", "RS384", "RS512", "PS256", "ES256", "ES384")


class KeyError_(Exception):
    """A signing key that cannot be used (the message names the problem, not the key)."""


@dataclass
class SigningKey:
    kid: str
    alg: str
    private: Any        # cryptography private key object
    public_jwk: dict

    def __repr__(self) -> str:  # never show key material
        return f"SigningKey(kid={self.kid!r}, alg={self.alg!r})"


def _default_alg(key: Any) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        name = key.curve.name
        if name == "secp256r1":
            return "ES256"
        if name == "secp384r1":
            return "ES384"
        raise KeyError_(f"unsupported EC curve {name} (use P-256 or P-384)")
    raise KeyError_("unsupported key type (use an RSA or EC P-256/P-384 private key)")


def _b64(n: int) -> str:
    raw = n.to_bytes((n.bit_length() + 7) // 8 or 1, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def public_jwk(key: Any, kid: str, alg: str) -> dict:
    pub = key.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        nums = pub.public_numbers()
        jwk = {"kty": "RSA", "n": _b64(nums.n), "e": _b64(nums.e)}
    else:
        nums = pub.public_numbers()
        size = (pub.curve.key_size + 7) // 8
        crv = {"secp256r1": "P-256", "secp384r1": "P-384"}[pub.curve.name]
        jwk = {"kty": "EC", "crv": crv,
               "x": base64.urlsafe_b64encode(nums.x.to_bytes(size, "big")).rstrip(b"=").decode(),
               "y": base64.urlsafe_b64encode(nums.y.to_bytes(size, "big")).rstrip(b"=").decode()}
    jwk.update(kid=kid, alg=alg, use="sig")
    return jwk


def load_private_key(path: str, password: bytes | None = None) -> Any:
    """Read a PEM private key; errors never include the file's content."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise KeyError_(f"cannot read key file {path}: {exc.strerror or exc}") from None
    try:
        return serialization.load_pem_private_key(data, password=password)
    except (ValueError, TypeError):
        raise KeyError_(f"{path} is not a PEM private key (or needs a password)") from None


def make_signing_key(private: Any, kid: str, alg: str | None = None) -> SigningKey:
    alg = alg or _default_alg(private)
    if alg not in SUPPORTED_ALGS:
        raise KeyError_(f"unsupported algorithm {alg!r} (one of {', '.join(SUPPORTED_ALGS)})")
    if alg.startswith(("RS", "PS")) and not isinstance(private, rsa.RSAPrivateKey):
        raise KeyError_(f"{alg} needs an RSA key")
    if alg.startswith("ES") and not isinstance(private, ec.EllipticCurvePrivateKey):
        raise KeyError_(f"{alg} needs an EC key")
    if alg.startswith("ES"):
        curve = {"ES256": "secp256r1", "ES384": "secp384r1"}[alg]
        if private.curve.name != curve:
            raise KeyError_(f"{alg} needs a key on {curve}, this one is on {private.curve.name}")
    if isinstance(private, rsa.RSAPrivateKey) and private.key_size < 2048:
        raise KeyError_("RSA keys must be at least 2048 bits")
    return SigningKey(kid, alg, private, public_jwk(private, kid, alg))


class KeySet:
    """The gateway's signing keys: the first signs, all are published."""

    def __init__(self, keys: list[SigningKey]):
        if not keys:
            raise KeyError_("at least one signing key is required")
        kids = [k.kid for k in keys]
        if len(set(kids)) != len(kids):
            raise KeyError_("kids must be unique")
        self.keys = keys
        self.active = keys[0]
        self._jwks = json.dumps({"keys": [k.public_jwk for k in keys]}, separators=(",", ":")).encode()

    def sign(self, claims: dict) -> str:
        k = self.active
        return jwt.encode(claims, k.private, algorithm=k.alg, headers={"kid": k.kid, "typ": "JWT"})

    def jwks(self) -> dict:
        return {"keys": [dict(k.public_jwk) for k in self.keys]}

    def jwks_bytes(self) -> bytes:
        return self._jwks

    def algorithms(self) -> list[str]:
        return sorted({k.alg for k in self.keys})

    def describe(self) -> list[dict]:
        return [{"kid": k.kid, "alg": k.alg, "signing": k is self.active} for k in self.keys]


def generate_rsa_pem(path: str, bits: int = 2048) -> None:
    """Write a fresh RSA private key (tests, examples); file mode 0600."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
