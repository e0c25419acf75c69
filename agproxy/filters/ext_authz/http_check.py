"""HTTP mode: the request's method and path to an HTTP authorization server.

Theory of operation (Envoy's `http_service`, as servers such as oauth2-proxy's
`/oauth2/auth` or a small webhook expect): the check is the client's method and
target (the normalised path and its query), under the optional `path_prefix`,
sent through the gateway's connection pool with no body. It carries the client's
`Host`, `authorization` and the headers named in `include_headers` (each as it
arrived, repeats kept), and the request id.

The answer: a 2xx allows, and the headers named in `allowed_upstream_headers`
are set on the upstream request from it (those it lacks are removed from the
request, so a client cannot pass its own for the server's). A 5xx is a failure of the service
(failure_mode decides; as a 502/503/504 from a proxy in front of it would be).
Anything else is the client's answer: its status, its body (at most
`MAX_DENIAL_BODY` bytes, else the answer is garbage) and its headers (only
`allowed_client_headers` when set, else all of them but the hop-by-hop and
framing ones, which the gateway sets itself).
"""

from __future__ import annotations

from typing import Any

from agproxy.filters.ext_authz.decision import SET, BadAnswer, Decision, check_value
from agproxy.http.messages import HOP_BY_HOP, BodyTooLarge, Headers
from agproxy.proxy.contract import LocalReply
from agproxy.telemetry import tracing
from agproxy.upstream.origin import Origin
from agproxy.upstream.pool import get_pool

MAX_DENIAL_BODY = 64 * 1024
_NOT_TO_CLIENT = HOP_BY_HOP | {"content-length", "host"}     # the gateway frames, names the host
ALWAYS_SENT = frozenset({"authorization"})
_TRACE_CONTEXT = frozenset({"traceparent", "tracestate"})


class ServerError(Exception):
    """A 5xx from the authorization server: the service failed, it did not decide."""

    failure = "error"


class HttpCheck:
    __slots__ = ("origin", "prefix", "include", "upstream_headers", "upstream_set", "client_headers")

    def __init__(self, origin: Origin, prefix: str, include: frozenset[str],
                 upstream_headers: tuple[str, ...], client_headers: frozenset[str] | None):
        self.origin = origin
        self.prefix = prefix.rstrip("/")
        self.include = (include | ALWAYS_SENT) - _NOT_TO_CLIENT    # never framing or Host: ours
        self.upstream_headers = upstream_headers
        self.upstream_set = frozenset(upstream_headers)
        self.client_headers = client_headers

    def request_headers(self, ex: Any, span: Any = None) -> Headers:
        req = ex.request
        include = self.include
        items = [("host", req.authority)]
        items += [(k, v) for k, v in req.headers.items if k in include]
        items.append(("x-request-id", ex.request_id))
        if ex.span is not None:      # tracing on: the check is a child of the request's trace
            items = [it for it in items if it[0] not in _TRACE_CONTEXT]
            items += tracing.context_headers(ex.span, span)
        return Headers(items)

    def span(self, ex: Any) -> Any:
        """The check's CLIENT span when the request is sampled, else None."""
        parent = ex.span
        if parent is None or parent.attributes is None:
            return None
        req = ex.request
        target = self.prefix + req.target if self.prefix else req.target
        return tracing.http_client_span(parent, req.method, self.origin.scheme, self.origin.authority, target,
                                        name=f"{req.method} ext_authz" if req.method in tracing.KNOWN_METHODS else "HTTP ext_authz")

    async def __call__(self, ex: Any, span: Any = None) -> Decision:
        req = ex.request
        target = self.prefix + req.target if self.prefix else req.target
        resp = await get_pool().request(self.origin, req.method, target, self.request_headers(ex, span),
                                        None, timeout=None)
        status = resp.status
        if span is not None:
            span.attributes["http.response.status_code"] = status
        if status >= 500:
            resp.abort()
            raise ServerError(f"HTTP {status} from the authorization server")
        try:
            body = await resp.body.read_all(MAX_DENIAL_BODY)
        except BodyTooLarge:
            resp.abort()
            if 200 <= status < 300:
                body = b""
            else:
                raise BadAnswer(f"a denial body larger than {MAX_DENIAL_BODY} bytes") from None
        if 200 <= status < 300:
            if not self.upstream_headers:
                return _ALLOW
            got = resp.headers
            mutations = tuple((name, check_value(name, value), SET)
                              for name in self.upstream_headers
                              if (value := got.get(name)) is not None)
            # A listed header the answer lacks is removed: the client's own never passes
            # for the server's.
            absent = self.upstream_set - {m[0] for m in mutations}
            return Decision(True, request_mutations=mutations, remove=absent)
        allowed = self.client_headers
        headers = Headers([(k, check_value(k, v)) for k, v in resp.headers.items
                           if (k in allowed if allowed is not None else k not in _NOT_TO_CLIENT)])
        return Decision(False, reply=LocalReply(status, body, headers))

    def describe(self) -> dict:
        return {"url": f"{self.origin.scheme}://{self.origin.authority}{self.prefix}",
                "include_headers": sorted(self.include),
                "allowed_upstream_headers": list(self.upstream_headers),
                "allowed_client_headers": sorted(self.client_headers) if self.client_headers is not None
                else None}


_ALLOW = Decision(True)
