"""The built-in RFC 8693 token service (`[token_exchange]`).

Theory of operation
===================

The gateway mints on-behalf-of (OBO) tokens: `sub` is the user of a validated
subject token, `act.sub` the workload acting for them, signed with the gateway's
own keys (minting.py) and published, so a relying party (AgentCore's
customJWTAuthorizer, any OIDC-aware service) verifies them with ordinary OIDC
discovery.

One `TokenExchangeService` per config snapshot does the work; two doors lead in:

- in process, from `[route.obo]` (filters/obo.py): `await service.exchange(req,
  policy)` with the caller's token as subject and the route's actor credential.
  No network hop; the filter caches the result.
- over HTTP, for external callers: `POST {endpoint}` (form-encoded RFC 8693
  request, client authentication by HTTP Basic or `client_id`/`client_secret`
  form fields), plus `GET {issuer path}/.well-known/openid-configuration` (also
  `/.well-known/oauth-authorization-server`) and `GET {issuer path}/jwks.json`.
  These are routes the service registers itself (ctx.add_route).

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
   scope must be within the subject's scope;
4. the OBO token is assembled from an allowlist: `iss`, `sub`, `aud`,
   `client_id`, `iat`, `nbf`, `exp` (≤ the subject's and the actor's expiry),
   `jti`, `scope` (if any), the `allowed_subject_claims` copied from the subject
   token, and `act` = { `sub`, the `allowed_actor_claims`, the subject's
   previous `act` nested }. Nothing else of either token is copied.

Errors (RFC 8693 §2.2.2, RFC 6749 §5.2), all HTTP 400 unless noted:
`invalid_request` (malformed request, subject or actor token invalid or expired,
untrusted subject issuer), `unsupported_grant_type`, `invalid_client` (401: bad
client credentials), `unauthorized_client` (the actor's issuer is not trusted for
actor tokens, or the actor token is not a workload identity), `invalid_grant`
(the subject's `may_act` does not allow this actor), `invalid_target` (audience
or resource not served), `invalid_scope`. Descriptions never echo tokens.
"""

from __future__ import annotations

import base64
import inspect
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlsplit

import orjson

from agproxy.config.reader import Section
from agproxy.identity.actor import (ActorCredential, ActorError, ClientRegistry, check_actor_shape,
                                    read_secret)
from agproxy.identity.minting import KeyError_, KeySet, load_private_key, make_signing_key

log = logging.getLogger("agproxy.token_exchange")

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
MAX_FORM_BYTES = 64 * 1024


class ExchangeError(Exception):
    """An RFC 8693 / OAuth error: `error` code, safe `description`, HTTP status."""

    def __init__(self, error: str, description: str, status: int = 400):
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status

    def body(self) -> bytes:
        return orjson.dumps({"error": self.error, "error_description": self.description})


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
                 default_client_id: str = "agproxy", endpoint: str = "/oauth2/token",
                 policy: ClaimPolicy | None = None, max_actor_cache: int = 1024):
        self.issuer = issuer.rstrip("/")
        self.keys = keys
        self.ttl = ttl
        self.subject_providers = subject_providers
        self.actor_providers = actor_providers
        self.clients = clients or ClientRegistry()
        self.fixed_audiences = set(audiences) if audiences is not None else None
        self.route_audiences: set[str] = set()
        self.default_client_id = default_client_id
        self.endpoint = endpoint
        self.policy = policy or ClaimPolicy()
        self._actor_cache: dict[str, tuple[dict, float]] = {}
        self.max_actor_cache = max_actor_cache
        self.issued = 0
        self.refused: dict[str, int] = {}
        path = urlsplit(self.issuer).path.rstrip("/")
        self.discovery_path = f"{path}/.well-known/openid-configuration"
        self.as_metadata_path = f"{path}/.well-known/oauth-authorization-server"
        self.jwks_path = f"{path}/jwks.json"
        origin = self.issuer[: len(self.issuer) - len(path)] if path else self.issuer
        self.discovery_doc = orjson.dumps({
            "issuer": self.issuer,
            "jwks_uri": self.issuer + "/jwks.json",
            "token_endpoint": origin + endpoint,
            "grant_types_supported": [GRANT_TYPE],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
            "response_types_supported": ["token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": keys.algorithms(),
            "token_endpoint_auth_signing_alg_values_supported": keys.algorithms(),
        })

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
            if not actor.client_id or actor.client_secret is None or \
                    not self.clients.authenticate(actor.client_id, actor.client_secret):
                raise ExchangeError("invalid_client", "client authentication failed", 401)
            return actor.client_id, {}
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

        scope = self._scope(req.scope, subject.get("scope"))
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
        have = None
        if isinstance(subject_scope, str):
            have = subject_scope.split()
        elif isinstance(subject_scope, list):
            have = [s for s in subject_scope if isinstance(s, str)]
        if requested is None or not requested.strip():
            return " ".join(have) if have else None
        want = requested.split()
        if have is not None and not set(want) <= set(have):
            raise ExchangeError("invalid_scope", "the requested scope exceeds the subject token's scope")
        return " ".join(dict.fromkeys(want))

    # -- the HTTP door -----------------------------------------------------------------
    async def handle_token_request(self, form: list[tuple[str, str]], authorization: str | None) -> tuple[int, bytes]:
        """A token endpoint request (already form-decoded) → (status, JSON body)."""
        try:
            req = self._parse_form(form, authorization)
            issued = await self.exchange(req)
        except ExchangeError as exc:
            return exc.status, exc.body()
        body: dict[str, Any] = {
            "access_token": issued.token,
            "issued_token_type": issued.token_type,
            "token_type": "Bearer",
            "expires_in": max(0, int(issued.expires_at - time.time())),
        }
        if issued.scope and issued.scope != req.scope:
            body["scope"] = issued.scope
        return 200, orjson.dumps(body)

    def _parse_form(self, form: list[tuple[str, str]], authorization: str | None) -> ExchangeRequest:
        single: dict[str, str] = {}
        multi: dict[str, list[str]] = {"audience": [], "resource": []}
        for k, v in form:
            if k in multi:
                multi[k].append(v)
            elif k in single:
                raise ExchangeError("invalid_request", f"parameter {k} given more than once")
            else:
                single[k] = v
        if single.get("grant_type") != GRANT_TYPE:
            if "grant_type" not in single:
                raise ExchangeError("invalid_request", "grant_type is required")
            raise ExchangeError("unsupported_grant_type", "only token exchange is supported")
        client_id = self._client_auth(single, authorization)
        subject_token = single.get("subject_token")
        subject_type = single.get("subject_token_type")
        if not subject_token or not subject_type:
            raise ExchangeError("invalid_request", "subject_token and subject_token_type are required")
        actor_token = single.get("actor_token")
        actor_type = single.get("actor_token_type")
        if bool(actor_token) != bool(actor_type):
            raise ExchangeError("invalid_request", "actor_token and actor_token_type go together")
        for r in multi["resource"]:
            if "://" not in r or "#" in r:
                raise ExchangeError("invalid_target", "resource must be an absolute URI without fragment")
        return ExchangeRequest(
            subject_token=subject_token, subject_token_type=subject_type,
            actor=ActorCredential("jwt", token=actor_token) if actor_token else None,
            actor_token_type=actor_type, audiences=multi["audience"], resources=multi["resource"],
            scope=single.get("scope"), requested_token_type=single.get("requested_token_type"),
            client_id=client_id)

    def _client_auth(self, single: dict[str, str], authorization: str | None) -> str | None:
        cid = secret = None
        if authorization and authorization[:6].lower() == "basic ":
            try:
                raw = base64.b64decode(authorization[6:].strip(), validate=True).decode()
                u, _, p = raw.partition(":")
                cid, secret = unquote_plus(u), unquote_plus(p)
            except (ValueError, UnicodeDecodeError):
                raise ExchangeError("invalid_client", "malformed client authentication", 401) from None
            if "client_secret" in single:
                raise ExchangeError("invalid_request", "use one client authentication method")
        elif "client_secret" in single:
            cid, secret = single.get("client_id"), single["client_secret"]
        elif "client_id" in single:
            raise ExchangeError("invalid_client", "client authentication failed", 401)
        if cid is None:
            return None
        if not self.clients.authenticate(cid, secret or ""):
            raise ExchangeError("invalid_client", "client authentication failed", 401)
        return cid

    def describe(self) -> dict:
        return {
            "issuer": self.issuer,
            "endpoint": self.endpoint,
            "discovery": self.discovery_path,
            "jwks": self.jwks_path,
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


# ---------------------------------------------------------------------------------
# The routes the service serves itself
# ---------------------------------------------------------------------------------

def _backend_base():
    from agproxy.proxy.build import Backend
    return Backend


class TokenServiceBackend(_backend_base()):
    """Serves the token endpoint, the discovery document and the JWKS."""

    kind = "token_exchange"

    def __init__(self, service: TokenExchangeService):
        self.service = service
        self.name = "token_exchange"

    async def handle(self, ex) -> None:
        from agproxy.http.messages import BodyTooLarge, Headers
        s = self.service
        path = ex.request.path
        method = ex.request.method
        if path in (s.discovery_path, s.as_metadata_path, s.jwks_path):
            if method not in ("GET", "HEAD"):
                return await ex.reply(405, Headers([("allow", "GET, HEAD")]), b"")
            body = s.keys.jwks_bytes() if path == s.jwks_path else s.discovery_doc
            h = Headers([("content-type", "application/json"), ("cache-control", "public, max-age=300")])
            return await ex.reply(200, h, body)
        if method != "POST":
            return await ex.reply(405, Headers([("allow", "POST")]), b"")
        ctype = (ex.request.headers.get("content-type") or "").split(";")[0].strip().lower()
        no_store = [("content-type", "application/json"), ("cache-control", "no-store"), ("pragma", "no-cache")]
        if ctype != "application/x-www-form-urlencoded":
            err = ExchangeError("invalid_request", "the body must be application/x-www-form-urlencoded")
            return await ex.reply(400, Headers(no_store), err.body())
        try:
            raw = ex.body if ex.body is not None else await ex.stream.body.read_all(MAX_FORM_BYTES)
        except BodyTooLarge:
            err = ExchangeError("invalid_request", "request too large")
            return await ex.reply(413, Headers(no_store), err.body())
        try:
            form = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            err = ExchangeError("invalid_request", "the body is not UTF-8")
            return await ex.reply(400, Headers(no_store), err.body())
        status, body = await s.handle_token_request(form, ex.request.headers.get("authorization"))
        h = Headers(no_store)
        if status == 401:
            h.add("www-authenticate", 'Basic realm="token_exchange"')
        await ex.reply(status, h, body)

    def describe(self) -> dict:
        return {"type": self.kind, **self.service.describe()}


# ---------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------

def build(sec: Section, ctx: Any) -> TokenExchangeService | None:
    """[token_exchange] → the service; registers its routes on ctx."""
    issuer = sec.str("issuer")
    endpoint = sec.str("endpoint", "/oauth2/token")
    ttl = sec.duration("token_ttl", "5m")
    subject_names = sec.str_list("subject_issuers")
    actor_names = sec.str_list("actor_issuers", [])
    audiences = sec.str_list("audiences", None)
    default_client = sec.str("client_id", "agproxy")
    listener = sec.str("listener", None)
    names = [l.name for l in ctx.cfg.listeners]
    if listener is not None and names and listener not in names:
        from agproxy.config.reader import did_you_mean
        sec.error("listener", f"unknown listener {listener!r}" + did_you_mean(listener, names))
    allowed_subject = sec.str_list("allowed_subject_claims", [])
    for name in allowed_subject or ():
        if name in RESERVED:
            sec.error("allowed_subject_claims", f"{name!r} is set by the token service and cannot be copied")
    allowed_actor = sec.str_list("allowed_actor_claims", [])
    enforce = sec.bool("enforce_may_act", False)
    require_actor = sec.bool("require_actor", True)
    keys_raw = sec.raw("signing_keys")
    clients_raw = sec.sections("clients")
    sec.done()

    if isinstance(issuer, str):
        parts = urlsplit(issuer)
        if parts.scheme not in ("https", "http") or not parts.netloc or parts.query or parts.fragment:
            sec.error("issuer", "must be an http(s) URL without query or fragment")
        elif parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            log.warning("token_exchange.issuer %s is not https: relying parties (AgentCore) require https", issuer)
    if isinstance(endpoint, str) and not endpoint.startswith("/"):
        sec.error("endpoint", "must be a path starting with '/'")
    if isinstance(ttl, float) and not (1 <= ttl <= 24 * 3600):
        sec.error("token_ttl", "must be between 1s and 24h")

    keys: list = []
    if not isinstance(keys_raw, list) or not keys_raw:
        if keys_raw is not None:
            sec.error("signing_keys", "expected a non-empty list of { file, kid }")
    else:
        for i, item in enumerate(keys_raw):
            ksec = Section(f"{sec.sub('signing_keys')}[{i}]", item, sec.problems)
            f = ksec.str("file")
            kid = ksec.str("kid")
            alg = ksec.str("alg", None)
            ksec.done()
            if not isinstance(f, str) or not isinstance(kid, str):
                continue
            try:
                keys.append(make_signing_key(load_private_key(ctx.path(f)), kid, alg))
            except KeyError_ as exc:
                ksec.error("file", str(exc))
    keyset = None
    if keys:
        try:
            keyset = KeySet(keys)
        except KeyError_ as exc:
            sec.error("signing_keys", str(exc))

    def providers(key: str, names: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for i, n in enumerate(names or []):
            p = ctx.jwt_providers.get(n)
            if p is None and n in ctx.cfg.jwt_providers:
                continue   # the provider's own section is invalid; that problem is reported already
            if p is None:
                from agproxy.config.reader import did_you_mean
                sec.problems.add(f"{sec.sub(key)}[{i}]", f"unknown [jwt_provider.{n}]" +
                                 did_you_mean(n, ctx.jwt_providers))
            else:
                out[n] = p
        return out

    subject_providers = providers("subject_issuers", subject_names)
    actor_providers = providers("actor_issuers", actor_names)
    if isinstance(subject_names, list) and not subject_names:
        sec.error("subject_issuers", "at least one trusted subject issuer is required")

    clients = ClientRegistry()
    for csec in clients_raw:
        cid = csec.str("client_id")
        env = csec.str("client_secret_env", None)
        file = csec.str("client_secret_file", None)
        csec.done()
        if bool(env) == bool(file):
            csec.error("client_secret_env", "one of client_secret_env or client_secret_file is required")
            continue
        secret = read_secret(csec, env, file, ctx)
        if isinstance(cid, str) and secret is not None:
            if cid in clients:
                csec.error("client_id", f"duplicate client {cid!r}")
            clients.add(cid, secret)

    if keyset is None or not isinstance(issuer, str) or not isinstance(endpoint, str):
        return None
    service = TokenExchangeService(
        issuer=issuer, keys=keyset, ttl=ttl or 300.0, subject_providers=subject_providers,
        actor_providers=actor_providers, clients=clients, audiences=audiences,
        default_client_id=default_client or "agproxy", endpoint=endpoint,
        policy=ClaimPolicy(tuple(allowed_subject or ()), tuple(allowed_actor or ()), bool(enforce),
                           bool(require_actor)))
    from agproxy.proxy.route import Match
    backend = TokenServiceBackend(service)
    for suffix, path in (("token", endpoint), ("discovery", service.discovery_path),
                         ("as-metadata", service.as_metadata_path), ("jwks", service.jwks_path)):
        ctx.add_route(f"token_exchange.{suffix}", Match(path=path), backend)
    if listener is not None:
        for r in ctx.extra_routes[-4:]:
            r.listener = listener
    return service
