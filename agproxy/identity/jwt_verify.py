"""JWT (JWS compact) verification on the request path, and the verified-token cache.

Theory of operation
===================

`Verifier.verify(token, keyset)` checks one token against one provider's settings
and returns its claims, or raises `JwtError` whose `reason` is short and safe to
show a client (no key material, no stack, nothing echoed from the token).

Why not `jwt.decode`: pyjwt spends 150-210 µs on an RS256 token here, of which
the RSA signature check is 30-40 µs; the rest is a per-character base64url check
written in Python, key preparation and option handling. This module does the
same checks with `cryptography` directly and the C base64 decoder in strict
mode (`validate=True`), keeping pyjwt's semantics where they matter for safety:

- algorithms: exactly pyjwt's asymmetric table (RS/PS 256/384/512, ES256/384/512,
  EdDSA), intersected with the configured allowlist. `none` and every HMAC
  algorithm are never accepted, whatever the config says, and no symmetric key
  ever reaches the key set (jwks.py), so an HS256 token "signed" with the RSA
  public key (key confusion) cannot verify. A key is used only for the family
  its JWK describes, and only for its own `alg` when the JWK names one.
  PSS uses MGF1 with the same hash and a salt as long as the digest (RFC 7518
  §3.5, as pyjwt). ECDSA signatures are the fixed-size r‖s form, length checked.
- an unknown `crit` header parameter is refused (RFC 7515 §4.1.11); JWE (five
  parts) is refused.
- claims, checked after the signature: required claims (present and not null),
  `iat` / `nbf` not in the future and `exp` not past, each with the clock skew
  (pyjwt's comparisons: expired when `exp <= now - skew`); these must be numbers
  (pyjwt also takes numeric strings; we do not). `iss` must equal the issuer;
  `aud` (a string or a list of strings) must contain one of the audiences when
  audiences are configured (with none configured `aud` is not checked: a
  documented difference from pyjwt, which then refuses any token that has one).
  `sub` and `jti`, when present, must be strings.

The test suite checks these decisions against `jwt.decode` on a table of good and
bad tokens.

`TokenCache` remembers verified tokens: key = SHA-256 of the token, value =
(claims, deadline). The deadline is `exp + skew` (a token without `exp`: `max_ttl`,
5 minutes), which is exactly when the uncached check would start failing; the
`nbf`/`iat` checks, once passed, stay passed. The cache is bounded (oldest
insertions are evicted first) and owned by one provider, whose settings never
change; the provider clears it whenever its key set changes, so a token signed
with a key that rotated out stops being accepted at the next refresh. Claims
dicts handed out from the cache are shared: treat them as read-only.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Iterable

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from agproxy.identity.jwks import ALGORITHM_FAMILY, SUPPORTED_ALGORITHMS, KeySet, b64url_decode

MAX_TOKEN_BYTES = 16 * 1024
FORBIDDEN_ALGORITHMS = frozenset({"none", "HS256", "HS384", "HS512"})

__all__ = [
    "JwtError", "UnknownKeyError", "Verifier", "TokenCache", "peek_claims", "token_digest",
    "SUPPORTED_ALGORITHMS", "MAX_TOKEN_BYTES",
]


class JwtError(Exception):
    """A token that is not accepted. `reason` is safe to show the client."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class UnknownKeyError(JwtError):
    """The token's `kid` is not in the key set (a refetch may find it)."""

    def __init__(self, reason: str = "unknown signing key"):
        super().__init__(reason)


# -- signature checks: alg → fn(public_key, signature, signing_input) (raises on failure)
def _rsa_pkcs1(h: hashes.HashAlgorithm):
    pad = padding.PKCS1v15()

    def verify(key: Any, sig: bytes, data: bytes) -> None:
        key.verify(sig, data, pad, h)
    return verify


def _rsa_pss(h: hashes.HashAlgorithm):
    pad = padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size)

    def verify(key: Any, sig: bytes, data: bytes) -> None:
        key.verify(sig, data, pad, h)
    return verify


def _ecdsa(h: hashes.HashAlgorithm, size: int):
    algo = ec.ECDSA(h)

    def verify(key: Any, sig: bytes, data: bytes) -> None:
        if len(sig) != 2 * size:
            raise InvalidSignature()
        der = encode_dss_signature(int.from_bytes(sig[:size], "big"), int.from_bytes(sig[size:], "big"))
        key.verify(der, data, algo)
    return verify


def _eddsa(key: Any, sig: bytes, data: bytes) -> None:
    key.verify(sig, data)


_VERIFY = {
    "RS256": _rsa_pkcs1(hashes.SHA256()), "RS384": _rsa_pkcs1(hashes.SHA384()),
    "RS512": _rsa_pkcs1(hashes.SHA512()),
    "PS256": _rsa_pss(hashes.SHA256()), "PS384": _rsa_pss(hashes.SHA384()),
    "PS512": _rsa_pss(hashes.SHA512()),
    "ES256": _ecdsa(hashes.SHA256(), 32), "ES384": _ecdsa(hashes.SHA384(), 48),
    "ES512": _ecdsa(hashes.SHA512(), 66),
    "EdDSA": _eddsa,
}
assert set(_VERIFY) == set(ALGORITHM_FAMILY)


def token_digest(token: str) -> bytes:
    """The cache key of a token."""
    return hashlib.sha256(token.encode("latin-1", "replace")).digest()


def _json_object(segment: str) -> dict:
    try:
        value = orjson.loads(b64url_decode(segment))
    except (ValueError, orjson.JSONDecodeError):
        raise JwtError("malformed token") from None
    if type(value) is not dict:
        raise JwtError("malformed token")
    return value


def _split(token: str) -> list[str]:
    if len(token) > MAX_TOKEN_BYTES:
        raise JwtError("token too large")
    if not token.isascii():
        # A JWS compact token is base64url and dots; a header (latin-1), a percent-decoded
        # query parameter or cookie can carry anything else. Refused here, before any
        # segment is decoded or encoded (the signing input is encoded as ASCII below).
        raise JwtError("malformed token")
    parts = token.split(".")
    if len(parts) != 3:
        if len(parts) == 5:
            raise JwtError("encrypted tokens are not supported")
        raise JwtError("malformed token")
    return parts


def peek_claims(token: str) -> dict:
    """The payload *without any verification*: only for choosing a provider by `iss`."""
    return _json_object(_split(token)[1])


def _number(claims: dict, name: str) -> float | int | None:
    value = claims.get(name)
    if value is None:
        return None
    t = type(value)
    if t is int or t is float:
        return value
    raise JwtError(f"invalid '{name}' claim")


class Verifier:
    """One provider's checks (immutable after construction)."""

    __slots__ = ("issuer", "audiences", "algorithms", "leeway", "required_claims",
                 "max_token_bytes", "max_ttl")

    def __init__(self, *, issuer: str | None, audiences: Iterable[str] = (),
                 algorithms: Iterable[str] = SUPPORTED_ALGORITHMS, leeway: float = 0.0,
                 required_claims: Iterable[str] = (), max_token_bytes: int = MAX_TOKEN_BYTES,
                 max_ttl: float = 300.0):
        algs = frozenset(algorithms)
        bad = algs & FORBIDDEN_ALGORITHMS
        if bad:
            raise ValueError(f"algorithm(s) {', '.join(sorted(bad))} are never accepted")
        unknown = algs - set(SUPPORTED_ALGORITHMS)
        if unknown:
            raise ValueError(f"unsupported algorithm(s) {', '.join(sorted(unknown))}"
                             f" (supported: {', '.join(SUPPORTED_ALGORITHMS)})")
        if not algs:
            raise ValueError("at least one algorithm is required")
        self.issuer = issuer
        self.audiences = frozenset(audiences)
        self.algorithms = algs
        self.leeway = float(leeway)
        self.required_claims = tuple(required_claims)
        self.max_token_bytes = max_token_bytes
        self.max_ttl = max_ttl

    def verify(self, token: str, keyset: KeySet, now: float | None = None) -> tuple[dict, float]:
        """Claims and the wall-clock time until which they may be cached.

        Raises JwtError (UnknownKeyError when the kid is not in `keyset`).
        """
        if len(token) > self.max_token_bytes:
            raise JwtError("token too large")
        h64, p64, s64 = _split(token)
        header = _json_object(h64)
        alg = header.get("alg")
        if type(alg) is not str or alg not in self.algorithms:
            raise JwtError("algorithm not allowed")
        if "crit" in header:
            raise JwtError("unsupported critical header parameter")
        kid = header.get("kid")
        if kid is not None and type(kid) is not str:
            raise JwtError("malformed token")
        keys = keyset.candidates(kid, alg)
        if keys is None:
            raise UnknownKeyError()
        if not keys:
            raise JwtError("no signing key for this algorithm")
        try:
            sig = b64url_decode(s64)
        except ValueError:
            raise JwtError("malformed token") from None
        data = token[: len(h64) + 1 + len(p64)].encode("ascii")
        check = _VERIFY[alg]
        for key in keys:
            try:
                check(key.public_key, sig, data)
                break
            except (InvalidSignature, ValueError, TypeError):
                continue
        else:
            raise JwtError("invalid signature")
        claims = _json_object(p64)
        return claims, self.check_claims(claims, time.time() if now is None else now)

    def check_claims(self, claims: dict, now: float) -> float:
        """Raises JwtError; returns the cache deadline (wall clock)."""
        for name in self.required_claims:
            if claims.get(name) is None:
                raise JwtError(f"missing required claim '{name}'")
        leeway = self.leeway
        iat = _number(claims, "iat")
        if iat is not None and iat > now + leeway:
            raise JwtError("token issued in the future")
        nbf = _number(claims, "nbf")
        if nbf is not None and nbf > now + leeway:
            raise JwtError("token not yet valid")
        exp = _number(claims, "exp")
        if exp is not None and exp <= now - leeway:
            raise JwtError("token expired")
        if self.issuer is not None:
            iss = claims.get("iss")
            if iss is None:
                raise JwtError("missing issuer")
            if iss != self.issuer:
                raise JwtError("invalid issuer")
        if self.audiences:
            aud = claims.get("aud")
            if aud is None or aud == "" or aud == []:
                raise JwtError("missing audience")
            if type(aud) is str:
                ok = aud in self.audiences
            elif type(aud) is list:
                if any(type(a) is not str for a in aud):
                    raise JwtError("invalid audience")
                ok = not self.audiences.isdisjoint(aud)
            else:
                raise JwtError("invalid audience")
            if not ok:
                raise JwtError("invalid audience")
        sub = claims.get("sub")
        if sub is not None and type(sub) is not str:
            raise JwtError("invalid 'sub' claim")
        jti = claims.get("jti")
        if jti is not None and type(jti) is not str:
            raise JwtError("invalid 'jti' claim")
        return exp + leeway if exp is not None else now + self.max_ttl

    def describe(self) -> dict:
        out: dict[str, Any] = {"algorithms": sorted(self.algorithms)}
        if self.issuer is not None:
            out["issuer"] = self.issuer
        if self.audiences:
            out["audiences"] = sorted(self.audiences)
        if self.required_claims:
            out["required_claims"] = list(self.required_claims)
        if self.leeway:
            out["clock_skew_seconds"] = self.leeway
        return out


class VerifiedClaims(dict):
    """A verified token's claims, shared by every request that presents that token.

    `memo` holds results of CEL expressions that read nothing but `jwt` (see
    cel.ExpressionGroup): they are pure functions of these claims, so they are
    computed once per token and live exactly as long as its cache entry (which is
    dropped when the key set changes). Treat the mapping as read-only.
    """

    __slots__ = ("memo",)

    def __init__(self, claims: dict):
        super().__init__(claims)
        self.memo: dict = {}


class TokenCache:
    """Verified tokens: digest → (claims, deadline). Bounded; FIFO eviction."""

    __slots__ = ("_entries", "max_entries", "hits", "misses")

    def __init__(self, max_entries: int = 10000):
        self._entries: dict[bytes, tuple[dict, float]] = {}
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0

    def get(self, digest: bytes, now: float) -> dict | None:
        entry = self._entries.get(digest)
        if entry is None:
            self.misses += 1
            return None
        if now >= entry[1]:
            del self._entries[digest]
            self.misses += 1
            return None
        self.hits += 1
        return entry[0]

    def put(self, digest: bytes, claims: dict, deadline: float, now: float) -> None:
        if self.max_entries <= 0 or deadline <= now:
            return
        entries = self._entries
        if len(entries) >= self.max_entries and digest not in entries:
            self._evict(now)
        entries[digest] = (claims, deadline)

    def _evict(self, now: float) -> None:
        entries = self._entries
        expired = [d for d, (_, dl) in entries.items() if dl <= now]
        for d in expired:
            del entries[d]
        # Still full: drop the oldest tenth (insertion order).
        if len(entries) >= self.max_entries:
            drop = max(1, self.max_entries // 10)
            for d in list(entries)[:drop]:
                del entries[d]

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
