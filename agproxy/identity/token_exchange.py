"""The RFC 8693 token exchange: verify subject and actor, apply policy, mint.

Theory of operation
===================

The gateway mints on-behalf-of (OBO) tokens: `sub` is the user of a validated
subject token, `act.sub` the workload acting for them, signed with the gateway's
own keys (minting.py) and published, so a relying party (AgentCore's
customJWTAuthorizer, any OIDC-aware service) verifies them with ordinary OIDC
discovery.

This module is the library: one `TokenExchangeService` per config snapshot, no
HTTP and no proxy types. Two doors lead in, both outside identity/:

- in process, from `[route.obo]` (filters/obo.py): `await service.exchange(req,
  policy)` with the caller's token as subject and the route's actor credential.
  No network hop; the filter caches the result.
- over HTTP, for external callers: the token endpoint, the discovery document
  and the JWKS that the gateway serves itself (backends/token_service.py, which
  also reads `[token_exchange]`). It parses the form and client authentication
  and calls `authenticate_client` and `exchange` here.

An exchange, step by step (`exchange`):

1. the subject token is verified by the `subject_issuers` provider whose issuer
   matches its `iss` (an untrusted issuer is refused without trying keys);
2. the actor is established: an actor token is verified by an `actor_issuers`
   provider and must look like a workload identity (Kubernetes SA token, SPIFFE
   JWT-SVID: see actor.py); or the authenticated OAuth client is the actor;
   verified actor tokens are cached until their `exp`;
3. policy: the audience/resource must be one the service issues for
   (`audiences`, or those of the routes' `[route.obo]` sections); with
   `enforce_may_act` the subject's `may_act` must name the actor; the requested
   scope must be within the subject's scope (`scope`, else `scp`; a subject
   with neither grants none);
4. the OBO token is assembled from an allowlist: `iss`, `sub`, `aud`,
   `client_id`, `iat`, `nbf`, `exp` (≤ the subject's and the actor's expiry),
   `jti`, `scope` (if any), the `allowed_subject_claims` copied from the subject
   token, and `act` = { `sub`, the `allowed_actor_claims`, the subject's
   previous `act` nested }. Nothing else of either token is copied.

Refusals raise `ExchangeError` with an RFC 8693 §2.2.2 / RFC 6749 §5.2 code and
the status the HTTP door answers with (400 unless noted): `invalid_request`
(malformed request, subject or actor token invalid or expired, untrusted subject
issuer), `unsupported_grant_type`, `invalid_client` (401: bad client
credentials), `unauthorized_client` (the actor's issuer is not trusted for actor
tokens, or the actor token is not a workload identity), `invalid_grant` (the
subject's `may_act` does not allow this actor), `invalid_target` (audience or
resource not served), `invalid_scope`. Descriptions never echo tokens.
"""

from __future__ import annotations

import base64
import inspect
import os
import time
from dataclasses import dataclass, field
from typing import Any

from agproxy.identity.actor import ActorCredential, ActorError, ClientRegistry, check_actor_shape
from agproxy.identity.minting import KeySet

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
TT_ACCESS = "urn:ietf:params:oauth:token-type:access_token"
TT_JWT = "urn:ietf:params:oauth:token-type:jwt"
TT_ID = "urn:ietf:params:oauth:token-type:id_token"
SUBJECT_TYPES = frozenset({TT_ACCESS, TT_JWT, TT_ID})
ACTOR_TYPES = frozenset({TT_ACCESS, TT_JWT, TT_ID})
ISSUED_TYPES = frozenset({TT_ACCESS, TT_JWT})
# Never copied from a subject token, whatever allowed_subject_claims says: the OBO
# token sets these itself.
RESERVED = frozenset({"iss", "sub", "aud", "exp", "iat", "nbf", "jti", "act", "may_act", "client_id",
                      "scope", "azp", "cnf"})


class ExchangeError(Exception):
    """An RFC 8693 / OAuth error: `error` code, safe `description`, the status to answer with."""

    def __init__(self, error: str, description: str, status: int = 400):
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status


@dataclass
class ExchangeRequest:
    subject_token: str
    subject_token_type: str = TT_ACCESS
    actor: ActorCredential | None = None
    actor_token_type: str | None = None
    audiences: list[str] = field(default_factory=list)
    resources: list[str] = field(default_factory=list)
    scope: str | None = None
    requested_token_type: str | None = None
    client_id: str | None = None     # the authenticated OAuth client (HTTP door), if any

    def __repr__(self) -> str:  # never the tokens
        return f"ExchangeRequest(audiences={self.audiences!r}, client_id={self.client_id!r})"


@dataclass(frozen=True)
class ClaimPolicy:
    """What may be copied into an OBO token, and the may_act rule."""

    allowed_subject_claims: tuple[str, ...] = ()
    allowed_actor_claims: tuple[str, ...] = ()
    enforce_may_act: bool = False
    require_actor: bool = True


@dataclass
class Issued:
    token: str
    token_type: str          # issued_token_type
    expires_at: float        # wall clock
    scope: str | None
    claims: dict

    def __repr__(self) -> str:
        return f"Issued(expires_at={self.expires_at}, scope={self.scope!r})"


async def _verify_with(provider: Any, token: str) -> dict:
    """Call a JWT provider's verify (sync or async; claims or (claims, deadline))."""
    result = provider.verify(token)
    if inspect.isawaitable(result):
        result = await result
    if isinstance(result, tuple):
        result = result[0]
    return result


def _provider_issuer(provider: Any) -> str | None:
    for attr in ("issuer",):
        v = getattr(provider, attr, None)
        if isinstance(v, str):
            return v
    v = getattr(getattr(provider, "verifier", None), "issuer", None)
    return v if isinstance(v, str) else None


def _peek(token: str) -> dict:
    from agproxy.identity.jwt_verify import JwtError, peek_claims
    try:
        return peek_claims(token)
    except JwtError:
        raise ExchangeError("invalid_request", "malformed token") from None


def _jwt_error_type():
    from agproxy.identity.jwt_verify import JwtError
    return JwtError


class TokenExchangeService:
    """Verify subject and actor, apply policy, mint. Shared by [route.obo] and the HTTP door."""

    def __init__(self, *, issuer: str, keys: KeySet, ttl: float,
                 subject_providers: dict[str, Any], actor_providers: dict[str, Any],
                 clients: ClientRegistry | None = None, audiences: list[str] | None = None,
                 default_client_id: str = "agproxy", policy: ClaimPolicy | None = None,
                 max_actor_cache: int = 1024):
        self.issuer = issuer.rstrip("/")
        self.keys = keys
        self.ttl = ttl
        self.subject_providers = subject_providers
        self.actor_providers = actor_providers
        self.clients = clients or ClientRegistry()
        self.fixed_audiences = set(audiences) if audiences is not None else None
        self.route_audiences: set[str] = set()
        self.default_client_id = default_client_id
        self.policy = policy or ClaimPolicy()
        self._actor_cache: dict[str, tuple[dict, float]] = {}
        self.max_actor_cache = max_actor_cache
        self.issued = 0
        self.refused: dict[str, int] = {}

    # -- audiences ---------------------------------------------------------------------
    def register_audience(self, audience: str) -> None:
        self.route_audiences.add(audience)

    def audience_allowed(self, aud: str) -> bool:
        allowed = self.fixed_audiences if self.fixed_audiences is not None else self.route_audiences
        return aud in allowed

    # -- verification ------------------------------------------------------------------
    async def verify_subject(self, token: str) -> dict:
        return await self._verify(token, self.subject_providers, "subject", "invalid_request")

    async def _verify(self, token: str, providers: dict[str, Any], what: str, untrusted_error: str) -> dict:
        JwtError = _jwt_error_type()
        iss = _peek(token).get("iss")
        candidates = [p for p in providers.values() if _provider_issuer(p) in (iss, None)]
        if not candidates:
            raise ExchangeError(untrusted_error, f"{what} token issuer is not trusted")
        reason = "invalid token"
        for p in candidates:
            try:
                return await _verify_with(p, token)
            except JwtError as exc:
                reason = exc.reason
        raise ExchangeError("invalid_request", f"{what} token rejected: {reason}")

    async def verify_actor(self, actor: ActorCredential) -> tuple[str, dict]:
        """(actor id, verified claims) — claims are {} for an OAuth client."""
        if actor.token is None:
            if not actor.client_id or actor.client_secret is None:
                raise ExchangeError("invalid_client", "client authentication failed", 401)
            return self.authenticate_client(actor.client_id, actor.client_secret), {}
        now = time.time()
        hit = self._actor_cache.get(actor.token)
        if hit is not None and hit[1] > now:
            claims = hit[0]
        else:
            claims = await self._verify(actor.token, self.actor_providers, "actor", "unauthorized_client")
            try:
                kind = check_actor_shape(claims)
            except ActorError as exc:
                raise ExchangeError("unauthorized_client", f"actor token rejected: {exc.reason}") from None
            if actor.kind in ("kubernetes", "spiffe") and kind != actor.kind:
                raise ExchangeError("unauthorized_client", f"actor token is not a {actor.kind} identity")
            exp = claims.get("exp")
            deadline = float(exp) if isinstance(exp, (int, float)) else now + 60
            if len(self._actor_cache) >= self.max_actor_cache:
                self._actor_cache = {k: v for k, v in self._actor_cache.items() if v[1] > now}
                if len(self._actor_cache) >= self.max_actor_cache:
                    self._actor_cache.clear()
            self._actor_cache[actor.token] = (claims, deadline)
        return claims["sub"], claims

    # -- the exchange ------------------------------------------------------------------
    async def exchange(self, req: ExchangeRequest, policy: ClaimPolicy | None = None) -> Issued:
        try:
            return await self._exchange(req, policy or self.policy)
        except ExchangeError as exc:
            self.refused[exc.error] = self.refused.get(exc.error, 0) + 1
            raise

    async def _exchange(self, req: ExchangeRequest, policy: ClaimPolicy) -> Issued:
        if req.subject_token_type not in SUBJECT_TYPES:
            raise ExchangeError("invalid_request", "unsupported subject_token_type")
        if req.requested_token_type not in (None, *ISSUED_TYPES):
            raise ExchangeError("invalid_request", "unsupported requested_token_type")
        targets = list(dict.fromkeys(req.audiences + req.resources))
        if not targets:
            raise ExchangeError("invalid_target", "an audience or resource is required")
        for t in targets:
            if not self.audience_allowed(t):
                raise ExchangeError("invalid_target", "the token service does not issue tokens for this target")

        subject = await self.verify_subject(req.subject_token)
        sub = subject.get("sub")
        if not isinstance(sub, str) or not sub:
            raise ExchangeError("invalid_request", "subject token has no subject")

        actor_id: str | None = None
        actor_claims: dict = {}
        if req.actor is not None:
            if req.actor.token is not None and req.actor_token_type not in (None, *ACTOR_TYPES):
                raise ExchangeError("invalid_request", "unsupported actor_token_type")
            actor_id, actor_claims = await self.verify_actor(req.actor)
        elif req.client_id is not None:
            actor_id = req.client_id
        if actor_id is None and policy.require_actor:
            raise ExchangeError("invalid_request", "an actor_token (or client authentication) is required")

        if policy.enforce_may_act:
            may_act = subject.get("may_act")
            if not isinstance(may_act, dict) or actor_id is None or may_act.get("sub") != actor_id:
                raise ExchangeError("invalid_grant", "the subject token's may_act does not allow this actor")
            if "iss" in may_act and actor_claims and may_act["iss"] != actor_claims.get("iss"):
                raise ExchangeError("invalid_grant", "the subject token's may_act does not allow this actor")

        scope = self._scope(req.scope, subject.get("scope", subject.get("scp")))   # scp: Entra ID
        now = int(time.time())
        exp = now + int(self.ttl)
        for e in (subject.get("exp"), actor_claims.get("exp")):
            if isinstance(e, (int, float)):
                exp = min(exp, int(e))
        if exp <= now:
            raise ExchangeError("invalid_request", "subject or actor token expired")

        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": sub,
            "aud": targets[0] if len(targets) == 1 else targets,
            "client_id": req.client_id or self.default_client_id,
            "iat": now,
            "nbf": now,
            "exp": exp,
            "jti": base64.urlsafe_b64encode(os.urandom(18)).decode(),
        }
        if scope:
            claims["scope"] = scope
        for name in policy.allowed_subject_claims:
            if name in subject and name not in RESERVED:
                claims[name] = subject[name]
        if actor_id is not None:
            act: dict[str, Any] = {"sub": actor_id}
            for name in policy.allowed_actor_claims:
                if name in actor_claims and name not in ("sub", "act"):
                    act[name] = actor_claims[name]
            prior = subject.get("act")
            if isinstance(prior, dict):
                act["act"] = prior
            claims["act"] = act
        token = self.keys.sign(claims)
        self.issued += 1
        return Issued(token, req.requested_token_type or TT_ACCESS, float(exp), scope, claims)

    @staticmethod
    def _scope(requested: str | None, subject_scope: Any) -> str | None:
        have: list[str] = []
        if isinstance(subject_scope, str):
            have = subject_scope.split()
        elif isinstance(subject_scope, list):
            have = [s for s in subject_scope if isinstance(s, str)]
        if requested is None or not requested.strip():
            return " ".join(have) if have else None
        want = requested.split()
        # A subject without scope grants none (fail closed: never an escalation).
        if not set(want) <= set(have):
            raise ExchangeError("invalid_scope", "the requested scope exceeds the subject token's scope")
        return " ".join(dict.fromkeys(want))

    # -- clients -----------------------------------------------------------------------
    def authenticate_client(self, client_id: str, secret: str) -> str:
        """The client id when its secret is right; else `invalid_client` (401)."""
        if not self.clients.authenticate(client_id, secret):
            raise ExchangeError("invalid_client", "client authentication failed", 401)
        return client_id

    def describe(self) -> dict:
        return {
            "issuer": self.issuer,
            "signing_keys": self.keys.describe(),
            "token_ttl_seconds": self.ttl,
            "subject_issuers": sorted(self.subject_providers),
            "actor_issuers": sorted(self.actor_providers),
            "clients": self.clients.ids(),
            "audiences": sorted(self.fixed_audiences if self.fixed_audiences is not None
                                else self.route_audiences),
            "issued": self.issued,
            "refused": dict(self.refused),
        }
