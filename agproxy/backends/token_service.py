"""The gateway's own RFC 8693 token service endpoints (`[token_exchange]`).

Theory of operation
===================

identity/token_exchange.py holds the exchange itself (verify, apply policy,
mint); this module is its HTTP door, a backend the gateway serves itself on
routes it registers at load (ahead of the configured ones, on every listener or
on `listener`):

- `POST {endpoint}` (`/oauth2/token`): a form-encoded RFC 8693 request (at most
  64 KB), client authentication by HTTP Basic or `client_id`/`client_secret`
  form fields (not both). The answer is the RFC 8693 §2.2.1 JSON, or an RFC 6749
  §5.2 error `{"error", "error_description"}` with the status the exchange chose
  (400; 401 with `WWW-Authenticate: Basic` for `invalid_client`; 413 for an
  oversized form). Always `Cache-Control: no-store`. Descriptions never echo tokens.
- `GET|HEAD {issuer path}/.well-known/openid-configuration` and
  `/.well-known/oauth-authorization-server`: the discovery document relying
  parties (AgentCore's customJWTAuthorizer) read;
- `GET|HEAD {issuer path}/jwks.json`: the public signing keys.

Other methods get 405 with `Allow`. The discovery document is serialised once,
at load; the JWKS comes from the key set's own cached bytes.

`build_service` reads `[token_exchange]` (every problem by TOML path), builds the
library's `TokenExchangeService` (which `[route.obo]` uses in process through
`ctx.token_exchange`) and registers the routes.
"""

from __future__ import annotations

import base64
import logging
import time
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlsplit

import orjson

from agproxy.config.reader import Section, did_you_mean
from agproxy.http.messages import BodyTooLarge, Headers
from agproxy.identity.actor import ActorCredential, ClientRegistry, read_secret
from agproxy.identity.minting import KeyError_, KeySet, load_private_key, make_signing_key
from agproxy.identity.token_exchange import (GRANT_TYPE, RESERVED, ClaimPolicy, ExchangeError,
                                             ExchangeRequest, TokenExchangeService)
from agproxy.proxy.build import BuildContext
from agproxy.proxy.contract import Backend, Response
from agproxy.proxy.route import Match

log = logging.getLogger("agproxy.token_exchange")

MAX_FORM_BYTES = 64 * 1024
_NO_STORE = (("content-type", "application/json"), ("cache-control", "no-store"), ("pragma", "no-cache"))


def error_body(exc: ExchangeError) -> bytes:
    """The RFC 6749 §5.2 error document."""
    return orjson.dumps({"error": exc.error, "error_description": exc.description})


class TokenServiceBackend(Backend):
    """Serves the token endpoint, the discovery documents and the JWKS."""

    kind = "token_exchange"

    def __init__(self, service: TokenExchangeService, endpoint: str = "/oauth2/token"):
        self.service = service
        self.name = "token_exchange"
        self.endpoint = endpoint
        issuer = service.issuer
        path = urlsplit(issuer).path.rstrip("/")
        self.discovery_path = f"{path}/.well-known/openid-configuration"
        self.as_metadata_path = f"{path}/.well-known/oauth-authorization-server"
        self.jwks_path = f"{path}/jwks.json"
        origin = issuer[: len(issuer) - len(path)] if path else issuer
        algs = service.keys.algorithms()
        self.discovery_doc = orjson.dumps({
            "issuer": issuer,
            "jwks_uri": issuer + "/jwks.json",
            "token_endpoint": origin + endpoint,
            "grant_types_supported": [GRANT_TYPE],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
            "response_types_supported": ["token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": algs,
            "token_endpoint_auth_signing_alg_values_supported": algs,
        })

    def paths(self) -> dict[str, str]:
        """Route-name suffix → path, for every path this backend answers."""
        return {"token": self.endpoint, "discovery": self.discovery_path,
                "as-metadata": self.as_metadata_path, "jwks": self.jwks_path}

    # -- per request -------------------------------------------------------------------
    async def respond(self, ex) -> Response:
        path = ex.request.path
        method = ex.request.method
        if path in (self.discovery_path, self.as_metadata_path, self.jwks_path):
            if method not in ("GET", "HEAD"):
                return Response(405, Headers([("allow", "GET, HEAD")]), b"")
            body = self.service.keys.jwks_bytes() if path == self.jwks_path else self.discovery_doc
            h = Headers([("content-type", "application/json"), ("cache-control", "public, max-age=300")])
            return Response(200, h, body)
        if method != "POST":
            return Response(405, Headers([("allow", "POST")]), b"")
        ctype = (ex.request.headers.get("content-type") or "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            err = ExchangeError("invalid_request", "the body must be application/x-www-form-urlencoded")
            return Response(400, Headers(list(_NO_STORE)), error_body(err))
        try:
            raw = await ex.read_body(MAX_FORM_BYTES)
        except BodyTooLarge:
            err = ExchangeError("invalid_request", "request too large")
            return Response(413, Headers(list(_NO_STORE)), error_body(err))
        try:
            form = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            err = ExchangeError("invalid_request", "the body is not UTF-8")
            return Response(400, Headers(list(_NO_STORE)), error_body(err))
        status, body = await self.handle_token_request(form, ex.request.headers.get("authorization"))
        h = Headers(list(_NO_STORE))
        if status == 401:
            h.add("www-authenticate", 'Basic realm="token_exchange"')
        return Response(status, h, body)

    async def handle_token_request(self, form: list[tuple[str, str]],
                                   authorization: str | None) -> tuple[int, bytes]:
        """A token endpoint request (already form-decoded) → (status, JSON body)."""
        try:
            req = self._parse_form(form, authorization)
            issued = await self.service.exchange(req)
        except ExchangeError as exc:
            return exc.status, error_body(exc)
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
        """The authenticated client id (HTTP Basic or form fields), None for no client."""
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
        return self.service.authenticate_client(cid, secret or "")

    def describe(self) -> dict:
        return {"type": self.kind, "endpoint": self.endpoint, "discovery": self.discovery_path,
                "jwks": self.jwks_path, **self.service.describe()}


# ---------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------

def build_service(sec: Section, ctx: BuildContext) -> TokenExchangeService | None:
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

    keyset = _signing_keys(sec, keys_raw, ctx)
    subject_providers = _providers(sec, "subject_issuers", subject_names, ctx)
    actor_providers = _providers(sec, "actor_issuers", actor_names, ctx)
    if isinstance(subject_names, list) and not subject_names:
        sec.error("subject_issuers", "at least one trusted subject issuer is required")
    clients = _clients(clients_raw, ctx)

    if keyset is None or not isinstance(issuer, str) or not isinstance(endpoint, str):
        return None
    service = TokenExchangeService(
        issuer=issuer, keys=keyset, ttl=ttl or 300.0, subject_providers=subject_providers,
        actor_providers=actor_providers, clients=clients, audiences=audiences,
        default_client_id=default_client or "agproxy",
        policy=ClaimPolicy(tuple(allowed_subject or ()), tuple(allowed_actor or ()), bool(enforce),
                           bool(require_actor)))
    backend = TokenServiceBackend(service, endpoint)
    for suffix, path in backend.paths().items():
        ctx.add_route(f"token_exchange.{suffix}", Match(path=path), backend, listener)
    return service


def _signing_keys(sec: Section, keys_raw: Any, ctx: BuildContext) -> KeySet | None:
    keys: list = []
    if not isinstance(keys_raw, list) or not keys_raw:
        if keys_raw is not None:
            sec.error("signing_keys", "expected a non-empty list of { file, kid }")
        return None
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
    if not keys:
        return None
    try:
        return KeySet(keys)
    except KeyError_ as exc:
        sec.error("signing_keys", str(exc))
        return None


def _providers(sec: Section, key: str, names: Any, ctx: BuildContext) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, n in enumerate(names or []):
        p = ctx.jwt_providers.get(n)
        if p is None and n in ctx.cfg.jwt_providers:
            continue   # the provider's own section is invalid; that problem is reported already
        if p is None:
            sec.problems.add(f"{sec.sub(key)}[{i}]", f"unknown [jwt_provider.{n}]" +
                             did_you_mean(n, ctx.jwt_providers))
        else:
            out[n] = p
    return out


def _clients(clients_raw: list[Section], ctx: BuildContext) -> ClientRegistry:
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
    return clients
