"""JWT providers: an issuer, its keys and its checks, reusable across routes.

Theory of operation
===================

A `JwtProvider` is one trusted issuer: a `Verifier` (issuer, audiences,
algorithms, clock skew, required claims), a `KeySource` (static JWKS, or a
remote one kept fresh in the background) and a `TokenCache` of verified tokens.
Named providers (`[jwt_provider.NAME]`) are built once per config by
`build_provider` and shared through `ctx.jwt_providers[NAME]`: by routes
(`[route.jwt] providers = ["NAME"]`), by the token-exchange service (subject and
actor tokens) and by anything else that needs to validate a token. Routes may
also define providers inline; those are built by the same code
(`provider_from_section`).

Public API (what other modules call):

- `await provider.verify(token) -> dict`: the verified claims, or `JwtError`
  whose `.reason` is short and safe for a client ("token expired", "invalid
  audience", "unknown signing key", "signing keys unavailable", ...).
- `provider.verify_now(token) -> dict | Awaitable[dict]`: the same, without a
  coroutine when no I/O is needed (the per-request path: a cache hit, or a
  verification with keys already in memory, stays synchronous). It returns an
  awaitable only when keys must be fetched first: none were ever fetched, or
  the token's `kid` is unknown and a rate-limited refetch is allowed.
- `ProviderGroup`: several providers chosen by the token's `iss` (read from
  the unverified payload, then verified by the chosen provider only).

The verified-token cache is cleared whenever the key set object changes (the
source keeps the same object while the keys are the same), so a token signed by
a key that has been rotated out is refused as soon as the new set is in.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Awaitable, Callable, Iterable

from agproxy.config.reader import Section
from agproxy.identity.jwks import (JwksError, KeySet, KeySource, RemoteKeySource, StaticKeySource,
                                   parse_jwks)
from agproxy.identity.jwt_verify import (
    MAX_TOKEN_BYTES, VerifiedClaims, SUPPORTED_ALGORITHMS, JwtError, TokenCache,
                                         UnknownKeyError, Verifier, peek_claims, token_digest)

__all__ = ["JwtProvider", "ProviderGroup", "JwtError", "build_provider", "provider_from_section",
           "DISCOVERY_SUFFIX"]

DISCOVERY_SUFFIX = "/.well-known/openid-configuration"
DEFAULT_CLOCK_SKEW = 30.0
PROVIDER_KEYS = ("issuer", "audiences", "jwks", "algorithms", "clock_skew", "required_claims",
                 "cache_size")


class JwtProvider:
    """One trusted issuer."""

    def __init__(self, name: str, verifier: Verifier, source: KeySource, *,
                 cache_size: int = 10000, clock: Callable[[], float] = time.time):
        self.name = name
        self.verifier = verifier
        self.source = source
        self.cache = TokenCache(cache_size)
        self._cache_keys: KeySet | None = None
        self._clock = clock

    @property
    def issuer(self) -> str | None:
        return self.verifier.issuer

    # -- verification -------------------------------------------------------------------
    def verify_now(self, token: str) -> "dict | Awaitable[dict]":
        """Claims (a dict) when no I/O is needed, else an awaitable of them; raises JwtError."""
        if len(token) > self.verifier.max_token_bytes:
            raise JwtError("token too large")
        keys = self.source.keys
        if keys is None:
            return self._verify_after_fetch(token, unknown_kid=False)
        try:
            return self._verify_with(token, keys)
        except UnknownKeyError:
            if self.source.can_refetch():
                return self._verify_after_fetch(token, unknown_kid=True)
            raise

    async def verify(self, token: str) -> dict:
        """The verified claims; raises JwtError (reason safe for clients)."""
        result = self.verify_now(token)
        if isinstance(result, dict):
            return result
        return await result  # type: ignore[misc]

    def _verify_with(self, token: str, keys: KeySet) -> dict:
        if keys is not self._cache_keys:
            self.cache.clear()
            self._cache_keys = keys
        now = self._clock()
        digest = token_digest(token)
        claims = self.cache.get(digest, now)
        if claims is not None:
            return claims
        claims, deadline = self.verifier.verify(token, keys, now)
        claims = VerifiedClaims(claims)
        self.cache.put(digest, claims, deadline, now)
        return claims

    async def _verify_after_fetch(self, token: str, unknown_kid: bool) -> dict:
        keys = await (self.source.refetch() if unknown_kid else self.source.ensure())
        if keys is None:
            raise JwtError("signing keys unavailable")
        return self._verify_with(token, keys)

    # -- lifecycle and status ----------------------------------------------------------
    async def start(self) -> None:
        await self.source.start()

    async def stop(self) -> None:
        await self.source.stop()

    def not_ready(self) -> str | None:
        return self.source.not_ready()

    def describe(self) -> dict:
        out = {"name": self.name, **self.verifier.describe(), "jwks": self.source.describe(),
               "cached_tokens": len(self.cache)}
        return out


class ProviderGroup:
    """Providers of one route (or one trust list), selected by the token's `iss`."""

    def __init__(self, providers: Iterable[JwtProvider]):
        self.providers = list(providers)
        self.by_issuer = {p.issuer: p for p in self.providers if p.issuer is not None}
        self.single = self.providers[0] if len(self.providers) == 1 else None

    def select(self, token: str) -> JwtProvider:
        if self.single is not None:
            return self.single
        if len(token) > MAX_TOKEN_BYTES:
            raise JwtError("token too large")
        iss = peek_claims(token).get("iss")
        provider = self.by_issuer.get(iss) if type(iss) is str else None
        if provider is None:
            raise JwtError("untrusted issuer" if iss is not None else "missing issuer")
        return provider

    def verify_now(self, token: str) -> "tuple[JwtProvider, dict | Awaitable[dict]]":
        provider = self.select(token)
        return provider, provider.verify_now(token)

    async def verify(self, token: str) -> tuple[JwtProvider, dict]:
        provider = self.select(token)
        return provider, await provider.verify(token)


# ----------------------------------------------------------------------------------
# Building from config
# ----------------------------------------------------------------------------------

def build_provider(name: str, sec: Section, ctx: Any) -> JwtProvider | None:
    """`[jwt_provider.NAME]` → a shared provider (None when the section is invalid)."""
    provider = provider_from_section(sec, ctx, name=name)
    sec.done()
    return provider


def provider_from_section(sec: Section, ctx: Any, *, name: str,
                          defaults: dict[str, Any] | None = None,
                          register: bool = True) -> JwtProvider | None:
    """Read issuer/audiences/jwks/algorithms/clock_skew/required_claims/cache_size.

    `defaults` supplies values for keys the section lacks (route-level settings
    inherited by `[[route.jwt.providers]]` entries). The caller calls `sec.done()`.
    Registers start/stop/readiness on ctx unless `register` is false.
    """
    defaults = defaults or {}
    before = len(sec.problems.items)
    issuer = sec.str("issuer", None)
    audiences = sec.str_list("audiences", defaults.get("audiences", []))
    if isinstance(audiences, list):
        for i, a in enumerate(audiences):
            if not a:
                sec.problems.add(f"{sec.sub('audiences')}[{i}]", "must not be empty")
    algorithms = sec.str_list("algorithms", defaults.get("algorithms", list(SUPPORTED_ALGORITHMS)))
    if isinstance(algorithms, list) and sec.has("algorithms"):
        check_algorithms(sec, algorithms)
    skew = sec.duration("clock_skew", defaults.get("clock_skew", DEFAULT_CLOCK_SKEW))
    required = sec.str_list("required_claims", defaults.get("required_claims", []))
    cache_size = sec.int("cache_size", defaults.get("cache_size", 10000), min=0, max=10_000_000)

    jsec = sec.section("jwks", required=True)
    source: KeySource | None = None
    if jsec is not None:
        source, derived_issuer = _key_source(jsec, ctx, issuer, name)
        if issuer is None:
            issuer = derived_issuer
        jsec.done()
    if issuer is None and sec.has("jwks") and not (jsec is not None and jsec.has("discovery")):
        sec.error("issuer", "required")
    elif issuer is None and jsec is not None and jsec.has("discovery") and source is not None:
        jsec.error("discovery", f"cannot derive the issuer: the URL does not end in {DISCOVERY_SUFFIX}; "
                   "set issuer")
    if len(sec.problems.items) > before or source is None:
        return None
    try:
        verifier = Verifier(issuer=issuer, audiences=audiences or (), algorithms=algorithms,
                            leeway=skew or 0.0, required_claims=required or ())
    except ValueError as exc:
        sec.error("algorithms", str(exc))
        return None
    provider = JwtProvider(name, verifier, source, cache_size=cache_size)
    if register and ctx is not None:
        ctx.on_start(provider.start)
        ctx.on_stop(provider.stop)
        if isinstance(source, RemoteKeySource):
            ctx.add_readiness(f"jwt {name}", provider.not_ready)
    return provider


def check_algorithms(sec: Section, algorithms: list[str]) -> None:
    if not algorithms:
        sec.error("algorithms", "must list at least one algorithm")
    for i, alg in enumerate(algorithms):
        path = f"{sec.sub('algorithms')}[{i}]"
        if alg.lower() == "none" or alg.upper().startswith("HS"):
            sec.problems.add(path, f"{alg!r} is never accepted (unsigned or HMAC tokens)")
        elif alg not in SUPPORTED_ALGORITHMS:
            sec.problems.add(path, f"unsupported algorithm {alg!r} (supported: {', '.join(SUPPORTED_ALGORITHMS)})")


def _key_source(jsec: Section, ctx: Any, issuer: str | None, name: str) -> tuple[KeySource | None, str | None]:
    kinds = [k for k in ("url", "file", "inline", "discovery") if jsec.has(k)]
    if len(kinds) != 1:
        jsec.error(None, "exactly one of url, file, inline or discovery is required"
                   + (f" (got {', '.join(kinds)})" if kinds else ""))
        for k in ("url", "file", "inline", "discovery", "ca_file", "timeout", "refresh",
                  "min_refresh", "max_refresh", "refetch_interval"):
            jsec.raw(k, None)
        return None, None
    kind = kinds[0]
    value = jsec.str(kind)
    if not isinstance(value, str):
        return None, None
    if kind in ("file", "inline"):
        if kind == "file":
            path = ctx.path(value) if ctx is not None else value
            try:
                with open(path, "rb") as f:
                    text = f.read()
            except OSError as exc:
                jsec.error("file", f"cannot read {value}: {exc.strerror or exc}")
                return None, None
        else:
            text = value.encode()
        try:
            keys = parse_jwks(text)
        except JwksError as exc:
            jsec.error(kind, f"invalid JWKS: {exc}")
            return None, None
        return StaticKeySource(keys, kind, value if kind == "file" else None), None

    if not value.startswith(("https://", "http://")):
        jsec.error(kind, f"must be an http:// or https:// URL, got {value!r}")
        return None, None
    ca_file = jsec.str("ca_file", None)
    if isinstance(ca_file, str):
        ca_path = ctx.path(ca_file) if ctx is not None else ca_file
        if not os.path.isfile(ca_path):
            jsec.error("ca_file", f"file not found: {ca_file}")
        ca_file = ca_path
    timeout = jsec.duration("timeout", 5.0)
    refresh = jsec.duration("refresh", 600.0)
    min_refresh = jsec.duration("min_refresh", 30.0)
    max_refresh = jsec.duration("max_refresh", 86400.0)
    refetch = jsec.duration("refetch_interval", 5.0)
    for key, v, lo in (("timeout", timeout, 0.01), ("refresh", refresh, 1.0),
                       ("min_refresh", min_refresh, 1.0), ("max_refresh", max_refresh, 1.0),
                       ("refetch_interval", refetch, 0.1)):
        if v is not None and v < lo:
            jsec.error(key, f"must be at least {lo:g}s")
    if min_refresh and max_refresh and min_refresh > max_refresh:
        jsec.error("min_refresh", "must not exceed max_refresh")
    derived = None
    if kind == "discovery":
        if value.endswith(DISCOVERY_SUFFIX):
            derived = value[: -len(DISCOVERY_SUFFIX)]
    source = RemoteKeySource(
        url=value if kind == "url" else None,
        discovery=value if kind == "discovery" else None,
        issuer=issuer or derived, name=name, timeout=timeout or 5.0, ca_file=ca_file,
        default_ttl=refresh or 600.0, min_ttl=min_refresh or 30.0, max_ttl=max_refresh or 86400.0,
        refetch_interval=refetch or 5.0)
    return source, derived


def static_provider(name: str, jwks: str | bytes | dict, *, issuer: str | None,
                    audiences: Iterable[str] = (), algorithms: Iterable[str] = SUPPORTED_ALGORITHMS,
                    clock_skew: float = DEFAULT_CLOCK_SKEW, required_claims: Iterable[str] = (),
                    cache_size: int = 10000) -> JwtProvider:
    """A provider from an in-memory JWKS (tests, benchmarks, built-in issuers)."""
    if isinstance(jwks, dict):
        jwks = json.dumps(jwks)
    verifier = Verifier(issuer=issuer, audiences=audiences, algorithms=algorithms,
                        leeway=clock_skew, required_claims=required_claims)
    return JwtProvider(name, verifier, StaticKeySource(parse_jwks(jwks)), cache_size=cache_size)
