"""`[route.obo]`: exchange the caller's token for an on-behalf-of token, in process.

Theory of operation: the subject is the caller's validated token (`ex.jwt_token`,
set by `[route.jwt]`), or else the bearer token of the request (the token service
then validates it against its subject issuers either way). The actor is the
route's workload credential (actor.py: a rotated token file, or client
credentials). The filter asks the gateway's own token service
(`[token_exchange]`, token_exchange.py) for a token with the route's audience and
claim policy — a function call, not a network hop — and caches it per
(subject token, actor credential, audience) until `refresh_before` ahead of its
expiry. A rotated actor token file gives a new cache key, so new tokens name the
new credential. Concurrent misses for one key share a single exchange.

On a cache hit the filter is synchronous (no task, no await): a dict lookup and a
header rewrite. It stores the token in `ex.obo_token` (for
`[route.forward_token] token = "obo"` and AgentCore's bearer mode) and replaces the
request's `Authorization` with `Bearer <obo token>` so a plain HTTP backend
receives it too.

Failures: no subject token → 401; subject token refused (invalid, expired,
untrusted issuer) → 401 `invalid_token`; the exchange refused by policy (actor not
trusted, may_act, target, scope) → 403 with the RFC 8693 error code. Responses
never include tokens.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from agproxy.config.reader import Section
from agproxy.identity.actor import ActorError, ActorSource, build_actor_source
from agproxy.identity.token_exchange import ClaimPolicy, ExchangeError, ExchangeRequest, Issued
from agproxy.proxy.contract import Filter, LocalReply, Provides
from agproxy.proxy.registry import TOKEN
from agproxy.telemetry import tracing

KEY = "obo"
STAGE = TOKEN

log = logging.getLogger("agproxy.obo")


def _challenge(error: str, description: str) -> list[tuple[str, str]]:
    return [("www-authenticate", f'Bearer error="{error}", error_description="{description}"')]


class OboFilter(Filter):
    name = "obo"
    provides = frozenset({Provides.OBO_TOKEN})

    def __init__(self, service: Any, actor: ActorSource, audience: str, policy: ClaimPolicy,
                 scope: str | None, refresh_before: float, cache_size: int):
        self.service = service
        self.actor = actor
        self.audience = audience
        self.policy = policy
        self.scope = scope
        self.refresh_before = refresh_before
        self.cache_size = cache_size
        self._cache: dict[tuple[str, str], tuple[str, float]] = {}   # (subject, actor) → (token, use-until)
        self._inflight: dict[tuple[str, str], asyncio.Future] = {}
        self.hits = 0
        self.misses = 0

    # -- per request ---------------------------------------------------------------------
    def on_request(self, ex):
        subject = ex.jwt_token
        if subject is None:
            authz = ex.request.headers.get("authorization")
            if authz and authz[:7].lower() == "bearer ":
                subject = authz[7:].strip()
        if not subject:
            return LocalReply.error(401, "unauthorized", "a bearer token is required",
                                    [("www-authenticate", "Bearer")])
        try:
            actor = self.actor.current()
        except ActorError as exc:
            log.error("route obo: actor credential unavailable: %s", exc.reason)
            return LocalReply.error(503, "actor_unavailable", "the gateway's workload identity is unavailable")
        key = (subject, actor.cache_key)
        hit = self._cache.get(key)
        if hit is not None and hit[1] > time.time():
            self.hits += 1
            self._apply(ex, hit[0])
            return None
        return self._miss(ex, key, subject, actor)

    async def _miss(self, ex, key, subject: str, actor) -> LocalReply | None:
        self.misses += 1
        task = self._inflight.get(key)
        span = tracing.client_span(ex.span, "token_exchange", {
            "agproxy.token_exchange.audience": self.audience,
            "agproxy.token_exchange.joined": task is not None}, kind=tracing.INTERNAL) \
            if ex.span is not None else None
        try:
            reply = await self._wait(ex, key, subject, actor, task)
        except BaseException:
            if span is not None:
                span.fail("cancelled")
            raise
        if span is not None:
            if reply is None:
                span.end()
            else:
                span.fail(str(reply.status), "the token exchange refused or failed")
        return reply

    async def _wait(self, ex, key, subject: str, actor, task) -> LocalReply | None:
        if task is None:
            # A task of its own: a client that goes away does not cancel the exchange
            # that other requests for the same key are waiting on.
            task = asyncio.get_running_loop().create_task(self._exchange(key, subject, actor))
            task.add_done_callback(_retrieve)
            self._inflight[key] = task
        try:
            issued = await asyncio.shield(task)
        except ExchangeError as exc:
            return self._refusal(exc)
        except Exception as exc:   # a bug or an unexpected failure: fail closed
            log.error("route obo: token exchange failed: %s: %s", type(exc).__name__, exc)
            return LocalReply.error(503, "token_exchange_failed", "the token exchange failed")
        self._apply(ex, issued.token)
        return None

    async def _exchange(self, key, subject: str, actor) -> Issued:
        try:
            issued = await self.service.exchange(
                ExchangeRequest(subject_token=subject, actor=actor, audiences=[self.audience],
                                scope=self.scope), self.policy)
            self._store(key, issued)
            return issued
        finally:
            self._inflight.pop(key, None)

    def _store(self, key, issued: Issued) -> None:
        now = time.time()
        lifetime = issued.expires_at - now
        margin = min(self.refresh_before, lifetime / 4)
        until = issued.expires_at - margin
        if until <= now:
            return
        cache = self._cache
        if len(cache) >= self.cache_size:
            for k in [k for k, v in cache.items() if v[1] <= now]:
                del cache[k]
            if len(cache) >= self.cache_size:
                for k in list(cache)[: max(1, self.cache_size // 10)]:
                    del cache[k]
        cache[key] = (issued.token, until)

    @staticmethod
    def _apply(ex, token: str) -> None:
        ex.obo_token = token
        ex.request.headers.set("authorization", "Bearer " + token)

    @staticmethod
    def _refusal(exc: ExchangeError) -> LocalReply:
        if exc.error == "invalid_request" and exc.description.startswith(("subject token", "malformed")):
            return LocalReply.error(401, "invalid_token", exc.description,
                                    _challenge("invalid_token", exc.description))
        if exc.error == "invalid_request" and "expired" in exc.description:
            return LocalReply.error(401, "invalid_token", exc.description,
                                    _challenge("invalid_token", exc.description))
        log.warning("route obo: exchange refused: %s: %s", exc.error, exc.description)
        return LocalReply.json(403, {"error": exc.error, "message": "token exchange refused: " + exc.description})

    def describe(self) -> dict:
        return {
            "type": self.name,
            "audience": self.audience,
            "actor": self.actor.describe(),
            "allowed_subject_claims": list(self.policy.allowed_subject_claims),
            "allowed_actor_claims": list(self.policy.allowed_actor_claims),
            "enforce_may_act": self.policy.enforce_may_act,
            "scope": self.scope,
            "refresh_before_seconds": self.refresh_before,
            "cache": {"entries": len(self._cache), "hits": self.hits, "misses": self.misses},
        }


def _retrieve(task: asyncio.Task) -> None:
    """Mark the outcome as seen even if every waiter went away."""
    if not task.cancelled():
        task.exception()


def build(sec: Section, ctx: Any) -> OboFilter | None:
    asec = sec.section("actor", required=True)
    audience = sec.str("audience")
    allowed_subject = sec.str_list("allowed_subject_claims", [])
    allowed_actor = sec.str_list("allowed_actor_claims", [])
    enforce = sec.bool("enforce_may_act", False)
    scope = sec.str("scope", None)
    refresh_before = sec.duration("refresh_before", "30s")
    cache_size = sec.int("cache_size", 10000, min=0, max=10_000_000)
    sec.done()
    actor = build_actor_source(asec, ctx) if asec is not None else None
    service = ctx.token_exchange
    if service is None:
        if ctx.cfg.token_exchange is None:
            sec.error(None, "needs a [token_exchange] section (the gateway's token service)")
        return None
    from agproxy.identity.token_exchange import RESERVED
    for name in allowed_subject or ():
        if name in RESERVED:
            sec.error("allowed_subject_claims", f"{name!r} is set by the token service and cannot be copied")
    if actor is not None and actor.kind == "client" and actor.client_id not in service.clients:
        asec.error("client_id", f"client {actor.client_id!r} is not registered in [[token_exchange.clients]]")
        return None
    if actor is not None and actor.kind != "client" and not service.actor_providers:
        sec.error("actor", "[token_exchange].actor_issuers must name the provider that verifies this actor token")
    if actor is None or not isinstance(audience, str):
        return None
    if service.fixed_audiences is not None and audience not in service.fixed_audiences:
        sec.error("audience", f"{audience!r} is not in [token_exchange].audiences: "
                              "the token service would refuse every exchange (invalid_target)")
        return None
    service.register_audience(audience)
    policy = ClaimPolicy(tuple(allowed_subject or ()), tuple(allowed_actor or ()), bool(enforce), True)
    return OboFilter(service, actor, audience, policy, scope, refresh_before or 30.0, cache_size)
