"""`[route.jwt]`: JWT authentication of the caller.

Theory of operation
===================

Per request: find the credential in the configured location(s) (a header with a
scheme prefix, a query parameter, a cookie), pick the provider by the token's
`iss` when the route trusts several, and verify (identity/providers.py). The
common case (keys in memory, or the token already in the provider's verified
cache) is synchronous: `on_request` returns None or a LocalReply and costs no
task. Only a first key fetch or an unknown-kid refetch returns an awaitable.

Modes (CONFIG.md):

- strict: a token is required. None → 401 `WWW-Authenticate: Bearer` (RFC 6750
  §3.1: no error code when the request had no credential). Invalid → 401
  `Bearer error="invalid_token", error_description="<reason>"`.
- optional: no token is fine (anonymous, no claims); an invalid one → 401.
- permissive: never rejects; claims are set only when a token verifies. An
  invalid token is left where it was (it was not validated, so it is not ours
  to strip).

Ambiguity is a failure, never a guess: several `Authorization` headers, a query
parameter given twice, or a token in two configured locations → 401 (in
permissive mode: treated as no valid token). Tokens over 16 KB are refused
before any parsing.

On success: `ex.jwt_claims` (read-only dict shared with the verified cache),
`ex.jwt_token` (the raw token, for OBO and forward_token), and
`ex.jwt_provider` (provider name) are set, and the credential is
removed from the request (the header, the query parameter, or the cookie)
unless `forward = true`.

Providers: the route's own (`issuer`/`audiences`/`jwks` at the top level), any
`[[route.jwt.providers]]` tables (`issuer`/`audiences`/`jwks` each, inheriting
the route's `algorithms`, `clock_skew`, `required_claims`), and shared ones by
name (`providers = ["idp"]` → `[jwt_provider.idp]`; the array may mix names and
tables). Named providers keep their own settings; the route's
`required_claims`, when set, are additionally enforced on their tokens.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable
from urllib.parse import unquote, unquote_plus

from agproxy.config.reader import Section, did_you_mean
from agproxy.identity.jwt_verify import MAX_TOKEN_BYTES, JwtError
from agproxy.telemetry import tracing
from agproxy.identity.providers import (JwtProvider, ProviderGroup, check_algorithms,
                                        provider_from_section)
from agproxy.proxy.contract import Filter, FilterResult, LocalReply, Provides
from agproxy.proxy.registry import AUTHENTICATION

KEY = "jwt"
STAGE = AUTHENTICATION

log = logging.getLogger("agproxy.policy")

MODES = ("strict", "optional", "permissive")
_DEFAULT_KEYS = ("algorithms", "clock_skew", "required_claims", "cache_size")
_INLINE_KEYS = ("issuer", "audiences", "jwks")


class _Ambiguous(Exception):
    pass


class Location:
    """Where a credential is looked for, and how it is removed."""

    __slots__ = ("kind", "name", "prefix", "lprefix")

    def __init__(self, kind: str, name: str, prefix: str = ""):
        self.kind = kind          # "header" | "query" | "cookie"
        self.name = name          # lowercase for headers
        self.prefix = prefix
        self.lprefix = prefix.lower()

    def find(self, req: Any) -> str | None:
        """The token here, None when absent; raises _Ambiguous."""
        if self.kind == "header":
            values = req.headers.get_all(self.name)
            if not values:
                return None
            if len(values) > 1:
                raise _Ambiguous()
            value = values[0]
            if self.lprefix:
                if value[: len(self.lprefix)].lower() != self.lprefix:
                    return None   # another scheme (Basic, ...): not our credential
                value = value[len(self.lprefix):]
            return value.strip()
        if self.kind == "query":
            query = req.query
            if not query:
                return None
            found = None
            for part in query.split("&"):
                k, _, v = part.partition("=")
                if unquote_plus(k) == self.name:
                    if found is not None:
                        raise _Ambiguous()
                    found = unquote_plus(v)
            return found
        found = None
        for header in req.headers.get_all("cookie"):
            for part in header.split(";"):
                k, eq, v = part.strip().partition("=")
                if eq and k == self.name:
                    if found is not None:
                        raise _Ambiguous()
                    v = v.strip()
                    if len(v) >= 2 and v[0] == v[-1] == '"':
                        v = v[1:-1]
                    found = unquote(v)
        return found

    def strip(self, req: Any) -> None:
        """Remove the credential from the request."""
        if self.kind == "header":
            req.headers.remove(self.name)
        elif self.kind == "query":
            kept = [p for p in req.query.split("&") if unquote_plus(p.partition("=")[0]) != self.name]
            req.set_target(req.path + ("?" + "&".join(kept) if kept else ""))
        else:
            headers = req.headers
            items = []
            for k, v in headers.items:
                if k == "cookie":
                    parts = [p for p in v.split(";") if p.strip().partition("=")[0] != self.name]
                    v = ";".join(parts).strip()
                    if not v:
                        continue
                items.append((k, v))
            headers.items = items

    def describe(self) -> dict:
        out = {self.kind: self.name}
        if self.prefix:
            out["prefix"] = self.prefix
        return out


class JwtFilter(Filter):
    name = "jwt"
    provides = frozenset({Provides.CALLER_TOKEN})

    def __init__(self, group: ProviderGroup, mode: str, locations: list[Location], forward: bool,
                 extra_required: dict[int, tuple[str, ...]], path: str):
        self.group = group
        self.mode = mode
        self.locations = locations
        self.single_location = locations[0] if len(locations) == 1 else None
        self.forward = forward
        self.extra_required = extra_required    # id(named provider) → route-level required claims
        self.path = path
        self.strict = mode == "strict"
        self.permissive = mode == "permissive"

    # -- request path -------------------------------------------------------------------
    def _find(self, req: Any) -> tuple[str, Location] | None:
        loc = self.single_location
        if loc is not None:
            token = loc.find(req)
            return None if token is None else (token, loc)
        found = None
        for loc in self.locations:
            token = loc.find(req)
            if token is not None:
                if found is not None:
                    raise _Ambiguous()
                found = (token, loc)
        return found

    def on_request(self, ex: Any) -> FilterResult:
        try:
            found = self._find(ex.request)
        except _Ambiguous:
            return self._fail(ex, JwtError("multiple credentials in the request"))
        if found is None:
            if self.strict:
                ex.error = "jwt: missing token"
                return LocalReply.error(401, "unauthorized", "missing bearer token",
                                        [("www-authenticate", "Bearer")])
            return None
        token, loc = found
        if not token:
            return self._fail(ex, JwtError("malformed token"))
        if len(token) > MAX_TOKEN_BYTES:
            return self._fail(ex, JwtError("token too large"))
        try:
            provider, result = self.group.verify_now(token)
        except JwtError as exc:
            return self._fail(ex, exc)
        if isinstance(result, dict):
            return self._accept(ex, token, loc, provider, result)
        return self._later(ex, token, loc, provider, result)

    async def _later(self, ex: Any, token: str, loc: Location, provider: JwtProvider,
                     pending: Awaitable[dict]) -> LocalReply | None:
        span = tracing.jwks_span(ex.span, provider.name, provider.source)
        try:
            claims = await pending
        except JwtError as exc:
            if span is not None:
                self._end_fetch(span, provider.source)
            return self._fail(ex, exc)
        except BaseException:
            if span is not None:
                span.fail("cancelled")
            raise
        if span is not None:
            self._end_fetch(span, provider.source)
        return self._accept(ex, token, loc, provider, claims)

    @staticmethod
    def _end_fetch(span: Any, source: Any) -> None:
        """ERROR when the fetch failed (the token's own faults are not the fetch's)."""
        if getattr(source, "failures", 0):
            span.fail("jwks_unavailable", str(getattr(source, "last_error", "") or "the JWKS fetch failed"))
        else:
            span.end()

    def _accept(self, ex: Any, token: str, loc: Location, provider: JwtProvider,
                claims: dict) -> LocalReply | None:
        extra = self.extra_required.get(id(provider))
        if extra:
            for name in extra:
                if claims.get(name) is None:
                    return self._fail(ex, JwtError(f"missing required claim '{name}'"))
        ex.jwt_claims = claims
        ex.jwt_token = token
        ex.jwt_provider = provider.name
        if not self.forward:
            loc.strip(ex.request)
        return None

    def _fail(self, ex: Any, exc: JwtError) -> LocalReply | None:
        ex.error = f"jwt: {exc.reason}"
        if self.permissive:
            return None
        desc = exc.reason.replace("\\", "").replace('"', "'")
        return LocalReply.error(401, "invalid_token", exc.reason, [
            ("www-authenticate", f'Bearer error="invalid_token", error_description="{desc}"')])

    def describe(self) -> dict:
        return {
            "type": self.name,
            "mode": self.mode,
            "forward": self.forward,
            "locations": [l.describe() for l in self.locations],
            "providers": [p.describe() for p in self.group.providers],
        }


# ----------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------

def _locations(sec: Section) -> list[Location] | None:
    raw = sec.raw("location", None)
    if raw is None:
        return [Location("header", "authorization", "Bearer ")]
    entries = [raw] if isinstance(raw, dict) else raw
    if not isinstance(entries, list) or not entries:
        sec.error("location", "expected a table such as { header = \"authorization\", prefix = \"Bearer \" }"
                  " or a list of them")
        return None
    out: list[Location] = []
    for i, entry in enumerate(entries):
        lsec = Section(sec.sub("location") + (f"[{i}]" if isinstance(raw, list) else ""), entry, sec.problems)
        kinds = [k for k in ("header", "query", "cookie") if lsec.has(k)]
        if len(kinds) != 1:
            lsec.error(None, "exactly one of header, query or cookie is required")
            lsec.raw("header", None), lsec.raw("query", None), lsec.raw("cookie", None), lsec.raw("prefix", None)
            continue
        kind = kinds[0]
        name = lsec.str(kind)
        if not isinstance(name, str) or not name:
            if name == "":
                lsec.error(kind, "must not be empty")
            continue
        if kind == "header":
            lname = name.lower()
            default_prefix = "Bearer " if lname in ("authorization", "proxy-authorization") else ""
            prefix = lsec.str("prefix", default_prefix)
            out.append(Location("header", lname, prefix if isinstance(prefix, str) else default_prefix))
        else:
            out.append(Location(kind, name))
        lsec.done()
    return out


def build(sec: Section, ctx: Any) -> JwtFilter | None:
    problems = sec.problems
    mode = sec.str("mode", "strict", choices=MODES)
    forward = sec.bool("forward", False)
    locations = _locations(sec)

    # Route-level defaults, validated once (they also configure the route's own provider).
    dview = Section(sec.path, {k: sec.data[k] for k in _DEFAULT_KEYS if k in sec.data}, problems)
    defaults: dict[str, Any] = {}
    algs = dview.str_list("algorithms", None)
    if algs is not None:
        check_algorithms(dview, algs)
        defaults["algorithms"] = algs
    skew = dview.duration("clock_skew", None)
    if skew is not None:
        defaults["clock_skew"] = skew
    required = dview.str_list("required_claims", None)
    if required is not None:
        defaults["required_claims"] = required
    cache_size = dview.int("cache_size", None, min=0, max=10_000_000)
    if cache_size is not None:
        defaults["cache_size"] = cache_size
    for k in _DEFAULT_KEYS:
        sec.raw(k, None)

    providers: list[JwtProvider] = []
    failed = False
    extra_required: dict[int, tuple[str, ...]] = {}

    if any(sec.has(k) for k in _INLINE_KEYS):
        pview = Section(sec.path, {k: sec.data[k] for k in _INLINE_KEYS if k in sec.data}, problems)
        p = provider_from_section(pview, ctx, name=sec.path, defaults=defaults)
        pview.done()
        if p is None:
            failed = True
        else:
            providers.append(p)
        for k in _INLINE_KEYS:
            sec.raw(k, None)

    entries = sec.raw("providers", [])
    if isinstance(entries, dict):
        entries = [entries]
    if not isinstance(entries, list):
        sec.error("providers", "expected a list of provider names or tables")
        entries = []
    known = getattr(getattr(ctx, "cfg", None), "jwt_providers", {}) or {}
    shared = getattr(ctx, "jwt_providers", {}) or {}
    for i, entry in enumerate(entries):
        path = f"{sec.sub('providers')}[{i}]"
        if isinstance(entry, str):
            if entry not in known and entry not in shared:
                problems.add(path, f"unknown JWT provider {entry!r}" + did_you_mean(entry, list(known))
                             + " (define it as [jwt_provider." + entry + "])")
                failed = True
                continue
            p = shared.get(entry)
            if p is None:          # its own section was invalid: already reported
                failed = True
                continue
            if any(q is p for q in providers):
                problems.add(path, f"provider {entry!r} is listed twice")
                continue
            providers.append(p)
            if defaults.get("required_claims"):
                extra_required[id(p)] = tuple(defaults["required_claims"])
        elif isinstance(entry, dict):
            psec = Section(path, entry, problems)
            p = provider_from_section(psec, ctx, name=path, defaults=defaults)
            psec.done()
            if p is None:
                failed = True
            else:
                providers.append(p)
        else:
            problems.add(path, "expected a provider name or a table with issuer/audiences/jwks")
            failed = True
    sec.done()

    if not providers:
        if not failed:
            sec.error(None, "no JWT provider: set issuer and jwks, [[route.jwt.providers]], "
                            "or providers = [\"<jwt_provider name>\"]")
        return None
    seen: dict[str, int] = {}
    for p in providers:
        if p.issuer in seen:
            sec.error("providers", f"two providers of this route have the issuer {p.issuer!r}: "
                                   "the token's iss could not choose between them")
            return None
        seen[p.issuer] = 1  # type: ignore[index]
    if failed or locations is None or mode is None or forward is None:
        return None
    return JwtFilter(ProviderGroup(providers), mode, locations, bool(forward), extra_required, sec.path)
