"""OAuth 2.0 Protected Resource Metadata (RFC 9728) and the Bearer challenges of an MCP endpoint.

Theory of operation: a `ProtectedResource` knows the MCP endpoint's path, its
authorization servers, scopes and extra metadata keys. Per request:

- `resource_url(...)` is the canonical URL of the MCP endpoint as the client
  addressed it: the configured `resource` when set, else scheme and authority
  of the request. `X-Forwarded-Proto` / `X-Forwarded-Host` are believed only
  when the connection comes from a configured trusted proxy (an address or a
  network), and only their last value (the one that proxy set: a proxy that
  appends leaves the client's own values in front); otherwise a client could
  make the gateway advertise, and accept tokens for, a resource of its choice.
- `audience_url(...)` is the URL a token's `aud` must name. The `Host` header is
  client input too: a token minted for `http://other.example/mcp` would pass the
  audience check if sent with `Host: other.example`. So without a configured
  `resource`, a derived URL is used for the audience check only when its
  authority is known to be this gateway's: it came from a trusted proxy's
  X-Forwarded-Host, the route matches that exact host, or it is the address the
  connection was accepted on (`127.0.0.1:8080`); otherwise None (refused).
- `metadata_url(resource)` is where the metadata lives, in the path-inserted
  form RFC 9728 §3.1 defines (`/.well-known/oauth-protected-resource/<path>`);
  the root form `/.well-known/oauth-protected-resource` serves the same document.
- `document(resource)` is the metadata JSON: `resource`, `authorization_servers`,
  `bearer_methods_supported` (`["header"]`), `scopes_supported` when set, and
  the configured extra keys (which cannot override the ones above).
- `challenge(...)` is the `WWW-Authenticate` value: `Bearer
  resource_metadata="...", scope="..."` for a request without a token,
  `error="invalid_token"` for a bad one, `error="insufficient_scope"` (403)
  for a token without the scopes the route requires.

`audience_matches(claims, resource)` is the RFC 8707 check (the MCP
specification's "tokens must be meant for this server"): `aud`, a string or a
list, names this resource, compared after normalising case of scheme and host,
default ports and a trailing slash. `token_scopes(claims)` reads `scope` (a
space-separated string) or `scp` (a list or a string).
"""

from __future__ import annotations

import ipaddress
from typing import Any, Iterable
from urllib.parse import urlsplit

import orjson

WELL_KNOWN = "/.well-known/oauth-protected-resource"
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def normalize_url(url: str) -> str:
    """Scheme and host lowercased, the default port and a trailing slash dropped."""
    try:
        p = urlsplit(url)
    except ValueError:
        return url
    scheme = p.scheme.lower()
    host = (p.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    try:
        port = p.port
    except ValueError:
        return url
    netloc = host if port is None or str(port) == _DEFAULT_PORTS.get(scheme) else f"{host}:{port}"
    path = p.path.rstrip("/")
    return f"{scheme}://{netloc}{path}" + (f"?{p.query}" if p.query else "")


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


class TrustedProxies:
    """Peer addresses whose X-Forwarded-* headers are believed."""

    def __init__(self, entries: Iterable[str] = ()):
        self.networks = [ipaddress.ip_network(e, strict=False) for e in entries]

    def trusts(self, peer: str | None) -> bool:
        if not self.networks or not peer:
            return False
        try:
            addr = ipaddress.ip_address(peer.split("%")[0])
        except ValueError:
            return False
        return any(addr in n for n in self.networks)


class ProtectedResource:
    def __init__(self, path: str, authorization_servers: list[str], *, resource: str | None = None,
                 scopes_supported: list[str] | None = None, extra: dict | None = None,
                 trusted_proxies: TrustedProxies | None = None, required_scopes: list[str] | None = None):
        self.path = path                    # the MCP endpoint's path ("/mcp")
        self.resource = resource            # configured canonical URL, or derived per request
        self.authorization_servers = authorization_servers
        self.scopes_supported = scopes_supported
        self.required_scopes = required_scopes or []
        self.extra = extra or {}
        self.trusted = trusted_proxies or TrustedProxies()
        self._fixed_doc = self._document(resource) if resource else None

    @property
    def metadata_paths(self) -> tuple[str, str]:
        """The path-inserted form and the root form."""
        path = urlsplit(self.resource).path.rstrip("/") if self.resource else self.path.rstrip("/")
        return (WELL_KNOWN + path if path else WELL_KNOWN), WELL_KNOWN

    def origin(self, scheme: str, authority: str, peer: str | None, headers: Any) -> str:
        if self.trusted.trusts(peer):
            p = _last(headers, "x-forwarded-proto").lower()
            if p in ("http", "https"):
                scheme = p
            h = _last(headers, "x-forwarded-host")
            if _valid_host(h):
                authority = h
        return f"{scheme}://{authority.lower()}"

    def resource_url(self, scheme: str, authority: str, peer: str | None, headers: Any) -> str:
        if self.resource:
            return self.resource
        return self.origin(scheme, authority, peer, headers) + self.path.rstrip("/")

    def audience_url(self, scheme: str, authority: str, conn: Any, headers: Any,
                     host_bound: bool = False) -> str | None:
        """The URL tokens must name, or None when it would come from an unverified Host."""
        if self.resource:
            return self.resource
        peer = conn.peer_host
        if self.trusted.trusts(peer) and _valid_host(_last(headers, "x-forwarded-host")):
            return self.resource_url(scheme, authority, peer, headers)
        if not host_bound and not _is_local_address(scheme, authority, conn):
            return None
        return self.resource_url(scheme, authority, peer, headers)

    def metadata_url(self, resource: str) -> str:
        p = urlsplit(resource)
        origin = f"{p.scheme}://{p.netloc}"
        return origin + WELL_KNOWN + p.path.rstrip("/")

    def document(self, resource: str) -> bytes:
        if self._fixed_doc is not None:
            return self._fixed_doc
        return self._document(resource)

    def _document(self, resource: str) -> bytes:
        doc: dict[str, Any] = dict(self.extra)
        doc.update({"resource": resource, "authorization_servers": self.authorization_servers,
                    "bearer_methods_supported": ["header"]})
        if self.scopes_supported:
            doc["scopes_supported"] = self.scopes_supported
        return orjson.dumps(doc)

    def challenge(self, resource: str, error: str | None = None, description: str | None = None,
                  scope: list[str] | None = None) -> str:
        parts = []
        if error:
            parts.append(f'error="{error}"')
        if description:
            parts.append(f'error_description="{_quote(description)}"')
        parts.append(f'resource_metadata="{_quote(self.metadata_url(resource))}"')
        scopes = scope if scope is not None else (self.required_scopes or self.scopes_supported)
        if scopes:
            parts.append(f'scope="{_quote(" ".join(scopes))}"')
        return "Bearer " + ", ".join(parts)


def _last(headers: Any, name: str) -> str:
    """The value the trusted proxy set: the last of a list (one that appends, as Envoy's
    append_x_forwarded_host does, leaves the client's own values in front of it)."""
    values = headers.get_all(name)
    return values[-1].rsplit(",", 1)[-1].strip() if values else ""


def _valid_host(h: str) -> bool:
    return bool(h) and all(c.isalnum() or c in ".-:[]" for c in h)


def _is_local_address(scheme: str, authority: str, conn: Any) -> bool:
    """`authority` names the address and port the connection was accepted on."""
    local = getattr(conn, "local_host", "") or ""
    if not local:
        return False
    try:
        p = urlsplit(f"//{authority}")
        host, port = (p.hostname or ""), p.port
    except ValueError:
        return False
    if port is None:
        port = int(_DEFAULT_PORTS.get(scheme, "0"))
    return host == local.split("%")[0].lower() and port == conn.local_port


def audience_matches(claims: Any, resource: str) -> bool:
    aud = claims.get("aud") if hasattr(claims, "get") else None
    values = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    want = normalize_url(resource)
    return any(isinstance(a, str) and normalize_url(a) == want for a in values)


def token_scopes(claims: Any) -> set[str]:
    out: set[str] = set()
    scope = claims.get("scope")
    if isinstance(scope, str):
        out.update(scope.split())
    scp = claims.get("scp")
    if isinstance(scp, str):
        out.update(scp.split())
    elif isinstance(scp, list):
        out.update(s for s in scp if isinstance(s, str))
    return out
