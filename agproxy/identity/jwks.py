"""JSON Web Key Sets: parsing, and the sources that keep a provider's keys current.

Theory of operation
===================

A `KeySet` is an immutable view of one JWKS document: the usable verification
keys (RSA, EC P-256/384/521, Ed25519/Ed448) as `cryptography` public-key objects,
indexed by `kid` and by the algorithm each can verify. Keys that cannot verify a
signature are left out when the set is parsed, never at request time: symmetric
(`oct`) keys (HMAC is never accepted: no shared secret exists between an IdP and
us, and an HMAC token "signed" with a public key is the classic key-confusion
attack), encryption keys (`use: enc`), keys whose `key_ops` lack `verify`, RSA
keys shorter than 2048 bits, and points not on their curve. A set with no usable
key at all is an error.

`KeySet.fingerprint` identifies the key material (kid, thumbprint pairs). A
source replaces its current set only when the fingerprint changes, so that
"the same keys again" keeps the same object; providers compare the object's
identity to know when to drop their verified-token caches (a token verified with
a key that has rotated out must not stay valid through the cache).

Sources (`KeySource`):

- `StaticKeySource`: a JWKS from a file or inline JSON, parsed at config load
  (errors are config errors). A changed file is picked up by a config reload.
- `RemoteKeySource`: a JWKS URL, or an OIDC discovery document whose `jwks_uri`
  it follows (the document's `issuer` must equal the provider's issuer, as OIDC
  Discovery §4.3 requires). No network I/O at load; `start()` launches a
  background task that fetches the keys and refreshes them at 80 % of their
  lifetime. The lifetime is the response's `Cache-Control: max-age` (minus `Age`),
  clamped to `[min_ttl, max_ttl]`, or `default_ttl` without one. A failed
  refresh keeps the last good keys (indefinitely: an IdP outage must not become a
  gateway outage) and retries with exponential backoff (1 s doubling, at most
  `min_ttl`). Before any key was ever fetched, requests fail closed and the
  readiness check reports why.

Unknown `kid`: a token may be signed with a key published after our last fetch.
`refetch()` fetches again at once, but at most once per `refetch_interval`
seconds per source; concurrent callers share the one fetch in flight. So an
attacker sending tokens with random kids costs the IdP at most one request per
interval, and everyone else's requests fail fast in between.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import time
from typing import Any, Awaitable, Callable

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

log = logging.getLogger("agproxy.identity")

# Algorithm → the key family that can verify it (matches pyjwt's algorithm table).
ALGORITHM_FAMILY: dict[str, str] = {
    "RS256": "RSA", "RS384": "RSA", "RS512": "RSA",
    "PS256": "RSA", "PS384": "RSA", "PS512": "RSA",
    "ES256": "EC:P-256", "ES384": "EC:P-384", "ES512": "EC:P-521",
    "EdDSA": "OKP",
}
SUPPORTED_ALGORITHMS = tuple(ALGORITHM_FAMILY)

_CURVES = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1, "P-521": ec.SECP521R1}
_CURVE_BYTES = {"P-256": 32, "P-384": 48, "P-521": 66}
_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
MIN_RSA_BITS = 2048
MAX_KEYS = 100               # a JWKS with more keys than this is refused


class JwksError(ValueError):
    """A JWKS document (or the fetch of one) that cannot be used."""


# '-' and '_' become the standard alphabet; '+', '/' and '=' (not base64url, or
# padding, which JWS omits) become '*', which the strict decoder refuses.
_B64URL = bytes.maketrans(b"-_+/=", b"+/***")


def b64url_decode(text: str) -> bytes:
    """Strict base64url (RFC 7515 §2: URL-safe alphabet only, no padding)."""
    if type(text) is not str:
        raise ValueError("expected a base64url string")
    rem = len(text) % 4
    if rem == 1:
        raise ValueError("invalid base64url length")
    try:
        raw = text.encode("ascii").translate(_B64URL)
    except UnicodeEncodeError:
        raise ValueError("invalid base64url character") from None
    if rem:
        raw += b"==" if rem == 2 else b"="
    try:
        return binascii.a2b_base64(raw, strict_mode=True)
    except binascii.Error:
        raise ValueError("invalid base64url") from None


def _b64_int(jwk: dict, name: str) -> int:
    value = jwk.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"missing or invalid {name!r}")
    return int.from_bytes(b64url_decode(value), "big")


class Key:
    """One verification key."""

    __slots__ = ("kid", "family", "alg", "public_key", "thumbprint")

    def __init__(self, kid: str | None, family: str, alg: str | None, public_key: Any, thumbprint: str):
        self.kid = kid
        self.family = family          # "RSA", "EC:P-256", "OKP"
        self.alg = alg                # the JWK's own "alg", when it names one
        self.public_key = public_key
        self.thumbprint = thumbprint  # RFC 7638 thumbprint (SHA-256, base64url)

    def can_verify(self, alg: str) -> bool:
        return ALGORITHM_FAMILY.get(alg) == self.family and (self.alg is None or self.alg == alg)

    def __repr__(self) -> str:
        return f"Key(kid={self.kid!r}, {self.family}, alg={self.alg!r})"


def _thumbprint(members: dict[str, str]) -> str:
    canon = json.dumps(members, sort_keys=True, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(hashlib.sha256(canon).digest()).rstrip(b"=").decode()


def parse_jwk(jwk: Any) -> Key | None:
    """One JWK → Key; None for a key that is not for signature verification.

    Raises ValueError for a key that claims to be a verification key but is broken.
    """
    if not isinstance(jwk, dict):
        raise ValueError("a key must be a JSON object")
    kty = jwk.get("kty")
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ValueError("'kid' must be a string")
    use = jwk.get("use")
    if use is not None and use != "sig":
        return None
    ops = jwk.get("key_ops")
    if isinstance(ops, list) and "verify" not in ops:
        return None
    alg = jwk.get("alg")
    if alg is not None:
        if not isinstance(alg, str):
            raise ValueError("'alg' must be a string")
        if alg not in ALGORITHM_FAMILY:
            return None      # e.g. RSA-OAEP (encryption) or HS256: never for us
    if kty == "oct":
        return None          # symmetric keys are never accepted
    if kty == "RSA":
        if "n" in jwk:
            n, e = _b64_int(jwk, "n"), _b64_int(jwk, "e")
            pub = rsa.RSAPublicNumbers(e, n).public_key()
        else:
            pub = _from_x5c(jwk, rsa.RSAPublicKey)
            nums = pub.public_numbers()
            n, e = nums.n, nums.e
        if pub.key_size < MIN_RSA_BITS:
            raise ValueError(f"RSA key of {pub.key_size} bits is too short (minimum {MIN_RSA_BITS})")
        tp = _thumbprint({"e": _int_b64(e), "kty": "RSA", "n": _int_b64(n)})
        family = "RSA"
    elif kty == "EC":
        crv = jwk.get("crv")
        if crv not in _CURVES:
            raise ValueError(f"unsupported EC curve {crv!r}")
        if "x" in jwk:
            xb, yb = b64url_decode(jwk.get("x", "")), b64url_decode(jwk.get("y", "") or "")
            size = _CURVE_BYTES[crv]
            if len(xb) != size or len(yb) != size:
                raise ValueError(f"invalid {crv} point coordinates")
            pub = ec.EllipticCurvePublicNumbers(int.from_bytes(xb, "big"), int.from_bytes(yb, "big"),
                                                _CURVES[crv]()).public_key()
        else:
            pub = _from_x5c(jwk, ec.EllipticCurvePublicKey)
            if _CURVE_NAMES.get(pub.curve.name) != crv:
                raise ValueError("certificate curve does not match 'crv'")
        nums = pub.public_numbers()
        size = _CURVE_BYTES[crv]
        tp = _thumbprint({"crv": crv, "kty": "EC",
                          "x": _bytes_b64(nums.x.to_bytes(size, "big")),
                          "y": _bytes_b64(nums.y.to_bytes(size, "big"))})
        family = f"EC:{crv}"
    elif kty == "OKP":
        crv = jwk.get("crv")
        x = b64url_decode(jwk.get("x", ""))
        if crv == "Ed25519":
            pub = ed25519.Ed25519PublicKey.from_public_bytes(x)
        elif crv == "Ed448":
            pub = ed448.Ed448PublicKey.from_public_bytes(x)
        else:
            return None      # X25519/X448 are key-agreement keys
        tp = _thumbprint({"crv": crv, "kty": "OKP", "x": _bytes_b64(x)})
        family = "OKP"
    else:
        return None          # unknown key types are skipped (RFC 7517 §5)
    if alg is not None and ALGORITHM_FAMILY[alg] != family:
        raise ValueError(f"'alg' {alg} does not fit a {kty} key")
    return Key(kid, family, alg, pub, tp)


def _from_x5c(jwk: dict, kind: type) -> Any:
    chain = jwk.get("x5c")
    if not isinstance(chain, list) or not chain or not isinstance(chain[0], str):
        raise ValueError("missing key parameters")
    cert = x509.load_der_x509_certificate(base64.b64decode(chain[0], validate=True))
    pub = cert.public_key()
    if not isinstance(pub, kind):
        raise ValueError("certificate key type does not match 'kty'")
    return pub


def _int_b64(value: int) -> str:
    return _bytes_b64(value.to_bytes((value.bit_length() + 7) // 8 or 1, "big"))


def _bytes_b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class KeySet:
    """The usable keys of one JWKS document. Immutable."""

    __slots__ = ("keys", "fingerprint", "_by_kid", "_lookup", "skipped")

    def __init__(self, keys: list[Key], skipped: list[str] | None = None):
        self.keys = tuple(keys)
        self.skipped = skipped or []
        self.fingerprint = frozenset((k.kid, k.thumbprint, k.alg) for k in keys)
        by_kid: dict[str, list[Key]] = {}
        for k in keys:
            if k.kid is not None:
                by_kid.setdefault(k.kid, []).append(k)
        self._by_kid = by_kid
        # (kid or None, alg) → candidate keys, precomputed for every known kid.
        lookup: dict[tuple[str | None, str], tuple[Key, ...]] = {}
        for alg in ALGORITHM_FAMILY:
            lookup[(None, alg)] = tuple(k for k in keys if k.can_verify(alg))
            for kid, ks in by_kid.items():
                lookup[(kid, alg)] = tuple(k for k in ks if k.can_verify(alg))
        self._lookup = lookup

    def candidates(self, kid: str | None, alg: str) -> tuple[Key, ...] | None:
        """Keys that may have signed a token with this kid and alg.

        None when the kid is unknown (the caller may refetch); an empty tuple when
        the kid is known but its key cannot verify `alg`.
        """
        found = self._lookup.get((kid, alg))
        if found is None and kid is not None and kid not in self._by_kid:
            return None
        return found or ()

    @property
    def kids(self) -> list[str]:
        return sorted(self._by_kid)

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return f"KeySet({list(self.keys)!r})"


def parse_jwks(document: str | bytes | dict) -> KeySet:
    """A JWKS document → KeySet; raises JwksError (with a reason fit for a log)."""
    if isinstance(document, (str, bytes)):
        try:
            document = json.loads(document)
        except (ValueError, UnicodeDecodeError) as exc:
            raise JwksError(f"invalid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise JwksError('expected a JSON object with "keys"')
    keys = document.get("keys")
    if not isinstance(keys, list):
        if "kty" in document:
            keys = [document]       # a single JWK is accepted as a one-key set
        else:
            raise JwksError('missing "keys" list')
    if len(keys) > MAX_KEYS:
        raise JwksError(f"too many keys ({len(keys)} > {MAX_KEYS})")
    out: list[Key] = []
    skipped: list[str] = []
    for i, jwk in enumerate(keys):
        try:
            key = parse_jwk(jwk)
        except (ValueError, TypeError) as exc:
            kid = jwk.get("kid") if isinstance(jwk, dict) else None
            skipped.append(f"key {i}" + (f" (kid {kid!r})" if isinstance(kid, str) else "") + f": {exc}")
            continue
        if key is not None:
            out.append(key)
    if not out:
        detail = "; ".join(skipped)
        raise JwksError("no usable signature verification key" + (f" ({detail})" if detail else ""))
    return KeySet(out, skipped)


# ----------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------

class KeySource:
    """Where a provider's keys come from."""

    kind = "static"
    keys: KeySet | None = None

    def can_refetch(self) -> bool:
        """Whether refetch() would actually fetch (or join a fetch in flight) now."""
        return False

    async def refetch(self) -> KeySet | None:
        return self.keys

    async def ensure(self) -> KeySet | None:
        """The keys, fetching them if there are none yet (rate limited)."""
        return self.keys

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def not_ready(self) -> str | None:
        return None if self.keys is not None else "no signing keys"

    def describe(self) -> dict:
        return {"source": self.kind, "keys": len(self.keys) if self.keys else 0}


class StaticKeySource(KeySource):
    """A JWKS read once (file or inline JSON)."""

    def __init__(self, keys: KeySet, kind: str = "inline", origin: str | None = None):
        self.keys = keys
        self.kind = kind
        self.origin = origin

    def describe(self) -> dict:
        out = super().describe()
        if self.origin:
            out[self.kind] = self.origin
        out["kids"] = self.keys.kids if self.keys else []
        return out


Fetcher = Callable[..., Awaitable[Any]]


def cache_lifetime(headers: Any, default: float, lo: float, hi: float) -> float:
    """Seconds a JWKS response may be used: Cache-Control max-age minus Age, clamped."""
    cc = headers.get("cache-control") if headers is not None else None
    ttl = default
    if cc:
        directives = {}
        for part in cc.split(","):
            name, _, value = part.strip().partition("=")
            directives[name.strip().lower()] = value.strip().strip('"')
        if "no-store" in directives or "no-cache" in directives:
            ttl = lo
        elif "max-age" in directives:
            try:
                ttl = float(int(directives["max-age"]))
                age = headers.get("age")
                if age and age.strip().isdigit():
                    ttl -= int(age.strip())
            except ValueError:
                ttl = default
    return min(max(ttl, lo), hi)


class RemoteKeySource(KeySource):
    """A JWKS fetched over HTTP(S), directly or through OIDC discovery."""

    def __init__(self, *, url: str | None = None, discovery: str | None = None,
                 issuer: str | None = None, name: str = "", timeout: float = 5.0,
                 ca_file: str | None = None, default_ttl: float = 600.0,
                 min_ttl: float = 30.0, max_ttl: float = 86400.0,
                 refetch_interval: float = 5.0, fetcher: Fetcher | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if (url is None) == (discovery is None):
            raise ValueError("exactly one of url or discovery is required")
        self.kind = "discovery" if discovery else "url"
        self.url = url
        self.discovery = discovery
        self.issuer = issuer
        self.name = name
        self.timeout = timeout
        self.ca_file = ca_file
        self.default_ttl = default_ttl
        self.min_ttl = min(min_ttl, max_ttl)
        self.max_ttl = max_ttl
        self.refetch_interval = refetch_interval
        self._fetcher = fetcher
        self._clock = clock
        self.keys: KeySet | None = None
        self.jwks_uri: str | None = url
        self.fetched_at: float | None = None      # clock() of the last success
        self.ttl: float = default_ttl
        self.last_attempt: float | None = None    # clock() when the last fetch started
        self.last_error: str | None = None
        self.fetch_count = 0
        self.failures = 0                         # consecutive failed fetches
        self._inflight: asyncio.Future | None = None
        self._task: asyncio.Task | None = None

    # -- fetching ---------------------------------------------------------------------
    async def _get(self, url: str) -> tuple[Any, Any]:
        fetch = self._fetcher
        if fetch is None:
            from agproxy.upstream.fetch import fetch
        from agproxy.upstream.errors import UpstreamError
        try:
            res = await fetch(url, headers=[("accept", "application/json")], timeout=self.timeout,
                              ca_file=self.ca_file)
        except UpstreamError as exc:
            raise JwksError(f"fetching {url}: {exc}") from None
        except asyncio.TimeoutError:
            raise JwksError(f"fetching {url}: timed out") from None
        except OSError as exc:
            raise JwksError(f"fetching {url}: {exc}") from None
        if res.status != 200:
            raise JwksError(f"fetching {url}: HTTP {res.status}")
        try:
            return json.loads(res.body), res.headers
        except (ValueError, UnicodeDecodeError):
            raise JwksError(f"fetching {url}: response is not JSON") from None

    async def _fetch_once(self, full: bool) -> KeySet:
        if self.discovery and (full or self.jwks_uri is None):
            doc, _ = await self._get(self.discovery)
            if not isinstance(doc, dict):
                raise JwksError(f"{self.discovery}: discovery document is not a JSON object")
            if self.issuer is not None and doc.get("issuer") != self.issuer:
                raise JwksError(f"{self.discovery}: discovery issuer {doc.get('issuer')!r} "
                                f"does not match the configured issuer {self.issuer!r}")
            uri = doc.get("jwks_uri")
            if not isinstance(uri, str) or not uri.startswith(("https://", "http://")):
                raise JwksError(f"{self.discovery}: discovery document has no usable jwks_uri")
            self.jwks_uri = uri
        assert self.jwks_uri is not None
        doc, headers = await self._get(self.jwks_uri)
        keys = parse_jwks(doc)
        self.ttl = cache_lifetime(headers, self.default_ttl, self.min_ttl, self.max_ttl)
        return keys

    def _fetch(self, full: bool = False) -> asyncio.Future:
        """Start a fetch unless one is in flight; returns the shared future."""
        fut = self._inflight
        if fut is not None and not fut.done():
            return fut
        fut = self._inflight = asyncio.ensure_future(self._run_fetch(full))
        return fut

    async def _run_fetch(self, full: bool) -> KeySet | None:
        self.last_attempt = self._clock()
        self.fetch_count += 1
        try:
            keys = await self._fetch_once(full)
        except JwksError as exc:
            self.failures += 1
            self.last_error = str(exc)
            level = logging.WARNING if self.keys is not None else logging.ERROR
            log.log(level, "JWKS %s: %s%s", self.name or self.discovery or self.url, exc,
                    "; keeping the last good keys" if self.keys is not None else "; no keys yet, requests fail closed")
            return self.keys
        except Exception as exc:  # never let a bug kill the refresher
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("JWKS %s: unexpected error", self.name)
            return self.keys
        self.failures = 0
        self.last_error = None
        self.fetched_at = self._clock()
        if keys.skipped:
            log.warning("JWKS %s: skipped %s", self.name, "; ".join(keys.skipped))
        old = self.keys
        if old is None or old.fingerprint != keys.fingerprint:
            if old is not None:
                log.info("JWKS %s: key set changed: %s → %s", self.name, old.kids, keys.kids)
            self.keys = keys
        return self.keys

    def can_refetch(self) -> bool:
        if self._inflight is not None and not self._inflight.done():
            return True
        return self.last_attempt is None or self._clock() - self.last_attempt >= self.refetch_interval

    async def refetch(self) -> KeySet | None:
        """Fetch now (for an unknown kid), unless a fetch happened very recently."""
        if not self.can_refetch():
            return self.keys
        return await asyncio.shield(self._fetch(full=False))

    async def ensure(self) -> KeySet | None:
        if self.keys is not None:
            return self.keys
        return await self.refetch()

    # -- background refresh -----------------------------------------------------------
    def next_refresh_delay(self) -> float:
        """Seconds until the background task should fetch again."""
        now = self._clock()
        if self.failures:
            backoff = min(2.0 ** (self.failures - 1), max(self.min_ttl, 1.0))
            return max(backoff - (now - (self.last_attempt or now)), 0.0)
        if self.fetched_at is None:
            return 0.0
        return max(self.fetched_at + self.ttl * 0.8 - now, 0.0)

    async def _refresher(self) -> None:
        while True:
            delay = self.next_refresh_delay()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                await asyncio.shield(self._fetch(full=True))
            except asyncio.CancelledError:
                raise
            except Exception:  # pragma: no cover - _run_fetch never raises
                await asyncio.sleep(1.0)

    async def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._refresher(),
                                                                name=f"jwks-refresh:{self.name}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        fut, self._inflight = self._inflight, None
        if fut is not None and not fut.done():
            fut.cancel()

    # -- status -----------------------------------------------------------------------
    def not_ready(self) -> str | None:
        if self.keys is not None:
            return None
        if self.last_error:
            return f"no signing keys yet: {self.last_error}"
        return "no signing keys yet (first fetch pending)"

    def describe(self) -> dict:
        out: dict[str, Any] = {"source": self.kind, "keys": len(self.keys) if self.keys else 0}
        if self.discovery:
            out["discovery"] = self.discovery
        if self.jwks_uri:
            out["url"] = self.jwks_uri
        if self.keys is not None:
            out["kids"] = self.keys.kids
        if self.fetched_at is not None:
            out["age_seconds"] = round(self._clock() - self.fetched_at, 1)
            out["ttl_seconds"] = self.ttl
        if self.last_error:
            out["last_error"] = self.last_error
        return out
