"""`[route.mcp_auth]`: MCP authorization for a route (RFC 9728 metadata, 401 challenge, JWT).

Theory of operation
===================

An MCP client that meets a protected server learns where to get a token from
the server itself: a 401 whose `WWW-Authenticate: Bearer resource_metadata="..."`
points at the OAuth 2.0 Protected Resource Metadata (RFC 9728), which names the
authorization servers and scopes. This filter is that server side, in front of
any backend:

- At load it registers the metadata document on the gateway's own routes
  (backends/mcp/metadata.py): `/.well-known/oauth-protected-resource<path>`
  (the path-inserted form) and `/.well-known/oauth-protected-resource`, where
  `<path>` is the route's `match.path` / `match.path_prefix` (or the path of
  `resource` when set). The document is answered without a token.
- Per request, the token is verified by the JWT machinery (filters/jwt.py:
  `issuer`, `audiences`, `jwks`, `algorithms`, `clock_skew`,
  `required_claims`, `providers`, always in strict mode). No token → 401
  `Bearer resource_metadata="...", scope="..."`; an invalid one → 401 with
  `error="invalid_token"`; both bodies are the gateway's JSON error.
- Audience (RFC 8707, "never accept a token minted for another server"): with
  `audiences` configured the verifier checks them; without, `aud` must name
  this resource's canonical URL: `resource`, or the URL as the client addressed
  it when that authority is known to be the gateway's (agproxy/mcp/resource.py:
  `trusted_proxies`, the route's exact `match.host`, the listening address);
  any other Host is refused, so a client cannot pick the audience accepted.
- `required_scopes`: all must be in the token's `scope` / `scp`, else 403
  `Bearer error="insufficient_scope", scope="<required>"`.
- The validated credential is removed before the backend (`forward = false`,
  the default: token passthrough is what the MCP specification forbids).
- Sessions (`bind_sessions`, on by default): the `Mcp-Session-Id` the server
  hands out is sealed to the caller's `iss` + `sub` on its way to the client and
  checked and unsealed on the way back (agproxy/mcp/session.py), so a session id
  is useless to anyone else: 404 "Session not found", never their session.

On success the exchange carries the verified claims (`jwt` in CEL), so
`[route.mcp_authorization]`, `[route.authorization]`, `[route.transform]` and
`[route.claims_to_headers]` compose on the same route. An `mcp` backend may carry
the same table (`[backend.X.mcp_auth]`, the older form); a route-level one wins.
"""

from __future__ import annotations

from typing import Any

import os

import orjson

from agproxy.config.reader import Section
from agproxy.mcp.session import SessionSeal, identity_of, process_key
from agproxy.mcp.resource import ProtectedResource, TrustedProxies, audience_matches, token_scopes
from agproxy.proxy.contract import Filter, FilterResult, LocalReply, Provides
from agproxy.proxy.registry import AUTHENTICATION

KEY = "mcp_auth"
STAGE = AUTHENTICATION + 1

SESSION = "mcp-session-id"
_NOT_FOUND = orjson.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "Session not found"}})

JWT_KEYS = ("issuer", "audiences", "jwks", "algorithms", "clock_skew", "required_claims", "providers",
            "cache_size", "location", "forward")


class McpAuthFilter(Filter):
    name = "mcp_auth"
    provides = frozenset({Provides.CALLER_TOKEN})

    def __init__(self, jwt: Any, resource: ProtectedResource, check_audience: bool, path: str,
                 host_bound: bool = False, seal: SessionSeal | None = None, session_key_env: str | None = None):
        self.jwt = jwt                  # a filters.jwt.JwtFilter, strict
        self.resource = resource
        self.check_audience = check_audience
        self.path = path
        self.host_bound = host_bound    # the route matches one exact host: Host is not free
        self.seal = seal                # binds Mcp-Session-Id to the caller (None: bind_sessions = false)
        self.session_key_env = session_key_env

    def _resource_url(self, ex: Any) -> str:
        r = ex.request
        return self.resource.resource_url(r.scheme, r.authority or r.host, ex.conn.peer_host, r.headers)

    def on_request(self, ex: Any) -> FilterResult:
        result = self.jwt.on_request(ex)
        if result is None:
            return self._after(ex)
        if isinstance(result, LocalReply):
            return self._challenge(ex, result)
        return self._later(ex, result)

    async def _later(self, ex: Any, pending: Any) -> LocalReply | None:
        result = await pending
        if result is None:
            return self._after(ex)
        return self._challenge(ex, result)

    def _challenge(self, ex: Any, reply: LocalReply) -> LocalReply:
        url = self._resource_url(ex)
        err = ex.error or ""
        if err == "jwt: missing token":
            value = self.resource.challenge(url)
            return LocalReply.error(401, "unauthorized", "a bearer token is required",
                                    [("www-authenticate", value)])
        reason = err[5:] if err.startswith("jwt: ") else "invalid token"
        value = self.resource.challenge(url, "invalid_token", reason.replace('"', "'"))
        return LocalReply.error(401, "invalid_token", reason, [("www-authenticate", value)])

    def _after(self, ex: Any) -> LocalReply | None:
        claims = ex.jwt_claims or {}
        url = None
        if self.check_audience:
            r = ex.request
            want = self.resource.audience_url(r.scheme, r.authority or r.host, ex.conn, r.headers,
                                              self.host_bound)
            url = self._resource_url(ex)
            if want is None or not audience_matches(claims, want):
                ex.error = "mcp_auth: the token's audience is not this MCP server"
                value = self.resource.challenge(url, "invalid_token", "the token was not issued for this resource")
                return LocalReply.error(401, "invalid_token", "the token was not issued for this resource",
                                        [("www-authenticate", value)])
        required = self.resource.required_scopes
        if required:
            have = token_scopes(claims)
            missing = [s for s in required if s not in have]
            if missing:
                url = url or self._resource_url(ex)
                ex.error = f"mcp_auth: missing scopes {' '.join(missing)}"
                value = self.resource.challenge(url, "insufficient_scope", "the token lacks required scopes",
                                                required)
                return LocalReply.error(403, "insufficient_scope", "the token lacks required scopes",
                                        [("www-authenticate", value)])
        if self.seal is not None:
            return self.open_session(ex)
        return None

    # -- session binding ---------------------------------------------------------------
    def open_session(self, ex: Any) -> LocalReply | None:
        """Check and unseal the request's Mcp-Session-Id (404 when it is not the caller's)."""
        headers = ex.request.headers
        values = headers.get_all(SESSION)
        if not values:
            return None
        sid = self.seal.open(identity_of(ex.jwt_claims), values[0]) if len(values) == 1 else None
        if sid is None:
            ex.error = "mcp_auth: the Mcp-Session-Id is not one this caller was given"
            return LocalReply(404, _NOT_FOUND, [("content-type", "application/json")])
        headers.set(SESSION, sid)
        return None

    def seal_session(self, ex: Any, resp: Any) -> None:
        """Seal the Mcp-Session-Id of an answer to the caller's identity."""
        items = resp.headers.items
        for i, (k, v) in enumerate(items):
            if k == SESSION:
                items[i] = (k, self.seal.seal(identity_of(ex.jwt_claims), v))

    def on_response(self, ex: Any, resp: Any) -> None:
        if self.seal is None or ex.jwt_claims is None:
            return None
        m = ex.mcp
        if m is not None and m.session is None and m.method != "initialize":
            return None         # a sessionless call: no session id to hand out (one scan less)
        self.seal_session(ex, resp)
        return None

    def describe(self) -> dict:
        r = self.resource
        return {"type": self.name, "jwt": self.jwt.describe(), "resource": r.resource,
                "authorization_servers": r.authorization_servers, "scopes_supported": r.scopes_supported,
                "required_scopes": r.required_scopes, "metadata_paths": list(r.metadata_paths),
                "bind_sessions": self.seal is not None, "session_key_env": self.session_key_env}


def build(sec: Section, ctx: Any, *, route_path: str | None = None, listener: str | None = None,
          host: str | None = None) -> McpAuthFilter | None:
    """The route-level section, or (with route_path given) an mcp backend's older form."""
    from agproxy.filters import jwt as jwt_filter
    problems = sec.problems
    before = len(problems.items)
    jwt_data = {k: sec.data[k] for k in JWT_KEYS if k in sec.data}
    for k in JWT_KEYS:
        sec.raw(k, None)
    if "mode" in sec.data:
        sec.raw("mode")
        sec.error("mode", "mcp_auth is always strict (an MCP client is told where to get a token)")
    resource = sec.str("resource", None)
    servers = sec.str_list("authorization_servers", None)
    required = sec.str_list("required_scopes", [])
    trusted = sec.str_list("trusted_proxies", [])
    bind_sessions = sec.bool("bind_sessions", True)
    key_env = sec.str("session_key_env", None)
    meta = sec.section("resource_metadata")
    scopes = None
    extra: dict = {}
    if meta is not None:
        scopes = meta.str_list("scopes_supported", None)
        for k in meta.keys():
            if k == "scopes_supported":
                continue
            if k in ("resource", "authorization_servers", "bearer_methods_supported"):
                meta.raw(k)
                meta.error(k, "set by the gateway (use the mcp_auth key of that name)")
            else:
                extra[k] = meta.raw(k)
        meta.done()
    sec.done()
    jsec = Section(sec.path, {**jwt_data, "mode": "strict"}, problems)
    jwt = jwt_filter.build(jsec, ctx)
    proxies = sec.convert("trusted_proxies", trusted or [], TrustedProxies)
    if isinstance(resource, str):
        from urllib.parse import urlsplit
        p = urlsplit(resource)
        if p.scheme not in ("http", "https") or not p.netloc or p.fragment:
            sec.error("resource", "must be an absolute http(s) URL without a fragment")
    path = route_path
    if path is None:
        path = _route_path(sec, ctx)
    if path is None and not isinstance(resource, str):
        sec.error("resource", "required when the route matches neither path nor path_prefix")
    seal = None
    if bind_sessions:
        key = process_key()
        if isinstance(key_env, str):
            secret = os.environ.get(key_env, "")
            if len(secret) < 16:
                sec.error("session_key_env", f"environment variable {key_env} must hold a secret of at least "
                                             "16 characters (shared by the replicas that serve these sessions)")
            key = secret.encode()
        seal = SessionSeal(key)
    if jwt is None or len(problems.items) > before:
        return None
    issuers = [p.issuer for p in jwt.group.providers if p.issuer]
    pr = ProtectedResource(path or "", servers if servers else issuers, resource=resource,
                           scopes_supported=scopes, extra=extra, trusted_proxies=proxies,
                           required_scopes=required or [])
    route_host = host if route_path is not None else _route_host(sec, ctx)
    f = McpAuthFilter(jwt, pr, check_audience=not any(p.verifier.audiences for p in jwt.group.providers),
                      path=sec.path, host_bound=bool(route_host) and not str(route_host).startswith("*."),
                      seal=seal, session_key_env=key_env if isinstance(key_env, str) else None)
    _register_metadata(ctx, f, sec.path, listener=listener if route_path is not None else _route_listener(sec, ctx),
                       host=route_host)
    return f


def _route_of(sec: Section, ctx: Any) -> Any:
    for r in getattr(getattr(ctx, "cfg", None), "routes", []) or []:
        if r.policies.get(KEY) is sec or (getattr(r.policies.get(KEY), "path", None) == sec.path):
            return r
    return None


def _route_path(sec: Section, ctx: Any) -> str | None:
    r = _route_of(sec, ctx)
    if r is None:
        return None
    return r.match.get("path") or r.match.get("path_prefix")


def _route_listener(sec: Section, ctx: Any) -> str | None:
    r = _route_of(sec, ctx)
    return r.listener if r is not None else None


def _route_host(sec: Section, ctx: Any) -> str | None:
    r = _route_of(sec, ctx)
    return r.match.get("host") if r is not None else None


def _register_metadata(ctx: Any, f: McpAuthFilter, where: str, listener: str | None, host: str | None) -> None:
    add = getattr(ctx, "add_route", None)
    if add is None:
        return
    from agproxy.backends.mcp.metadata import MetadataBackend
    from agproxy.proxy.route import Match
    backend = MetadataBackend(f)
    inserted, root = f.resource.metadata_paths
    add(f"mcp_auth.metadata:{where}", Match(path=inserted, host=host), backend, listener)
    if root != inserted:
        add(f"mcp_auth.metadata-root:{where}", Match(path=root, host=host), backend, listener)
