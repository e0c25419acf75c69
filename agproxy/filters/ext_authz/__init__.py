"""`[route.ext_authz]`: external authorization, as Envoy's ext_authz filter does it.

Theory of operation
===================

An authorization service decides on each request of the route, after the
gateway's own authentication, authorization and rate limits (the ext-auth stage):

- `protocol = "grpc"` (default): `envoy.service.auth.v3.Authorization/Check`
  over the gateway's pooled HTTP/2 client (upstream/grpc.py), with the
  CheckRequest Envoy sends (grpc_check.py), so OPA-Envoy, Authorino and servers
  written for Envoy work as they are;
- `protocol = "http"`: the request's method and path, with chosen headers and no
  body, to an HTTP server; 2xx allows, anything else is the answer (http_check.py).

Both give a `Decision` (decision.py): allowed with header / query changes, or
denied with the client's answer. The call goes through the remote-dependency
helper (upstream/remote.py): one deadline (`timeout`), `failure_mode` for when
the service is unreachable, too slow, failing (a gRPC error status, a 5xx) or
answering garbage. An optional cache (cache.py) keeps decisions per CEL key.
The filter itself (filter.py) applies the decision and counts every outcome.

This module reads the configuration; everything in it is checked at load.
"""

from __future__ import annotations

import os
from typing import Any

from agproxy.config.reader import Section
from agproxy.filters import check_header_name, compile_cel
from agproxy.filters.ext_authz.cache import DecisionCache
from agproxy.filters.ext_authz.filter import ExtAuthzFilter
from agproxy.filters.ext_authz.decision import Decision
from agproxy.filters.ext_authz.grpc_check import CHECK, Answer, check_request
from agproxy.filters.ext_authz.http_check import HttpCheck
from agproxy.proxy.registry import EXT_AUTH
from agproxy.telemetry import tracing
from agproxy.upstream.grpc import GrpcClient, parse_target
from agproxy.upstream.origin import Origin
from agproxy.upstream.remote import RemoteDependency, remote_settings

KEY = "ext_authz"
STAGE = EXT_AUTH

DEFAULT_TIMEOUT = "200ms"           # Envoy's default for the gRPC service
MAX_BODY_BYTES = 4 * 1024 * 1024    # gRPC servers refuse larger messages by default
_KEYS_GRPC_ONLY = ("include_body", "context_extensions", "metadata_context")
JWT_AUTHN = "envoy.filters.http.jwt_authn"   # Envoy's jwt_authn filter's metadata namespace
_KEYS_HTTP_ONLY = ("path_prefix", "allowed_upstream_headers", "allowed_client_headers")


def build(sec: Section, ctx: Any) -> ExtAuthzFilter | None:
    problems = sec.problems
    before = len(problems.items)     # (problems are the whole config's: count only ours)
    protocol = sec.str("protocol", "grpc", choices=("grpc", "http"))
    address = sec.str("address")
    settings = remote_settings(sec, default_timeout=DEFAULT_TIMEOUT)
    status_on_error = sec.int("status_on_error", 403, min=200, max=599)
    include = _names(sec, "include_headers")
    ca = sec.str("tls_ca_file", None)
    insecure = sec.bool("tls_insecure_skip_verify", False)
    body_sec = sec.section("include_body")
    context = sec.str_map("context_extensions", None)
    prefix = sec.str("path_prefix", "")
    upstream_headers = _names(sec, "allowed_upstream_headers", allow_reserved=False)
    client_headers = _names(sec, "allowed_client_headers")
    cache_sec = sec.section("cache")
    meta_sec = sec.section("metadata_context")
    sec.done()
    ok = len(problems.items) == before

    wrong = _KEYS_HTTP_ONLY if protocol == "grpc" else _KEYS_GRPC_ONLY
    for key in wrong:
        if sec.has(key):
            sec.error(key, f"only for protocol = {'http' if protocol == 'grpc' else 'grpc'!r}")
            ok = False
    if prefix and not prefix.startswith("/"):
        sec.error("path_prefix", "must start with /")
        ok = False
    if ca is not None:
        ca = ctx.path(ca)
        if not os.path.isfile(ca):
            sec.error("tls_ca_file", f"file not found: {ca}")
            ok = False

    max_bytes = None
    allow_partial = raw_body = False
    if body_sec is not None:
        max_bytes = body_sec.int("max_bytes", min=1, max=MAX_BODY_BYTES)
        allow_partial = body_sec.bool("allow_partial", False)
        raw_body = body_sec.bool("raw_body", False)
        body_sec.done()
        ok = ok and isinstance(max_bytes, int)

    jwt_meta = None
    if meta_sec is not None:
        namespace = meta_sec.str("namespace", JWT_AUTHN)
        payload_key = meta_sec.str("jwt_payload")
        meta_sec.done()
        if isinstance(namespace, str) and not namespace:
            meta_sec.error("namespace", "must not be empty")
        elif isinstance(payload_key, str) and not payload_key:
            meta_sec.error("jwt_payload", "must not be empty")
        elif isinstance(namespace, str) and isinstance(payload_key, str):
            jwt_meta = (namespace, payload_key)
        ok = ok and jwt_meta is not None

    cache = cache_key = None
    if cache_sec is not None:
        source = cache_sec.raw("key")
        ttl = cache_sec.duration("ttl", "10s")
        max_entries = cache_sec.int("max_entries", 10000, min=1, max=1_000_000)
        cache_sec.done()
        cache_key = compile_cel(problems, cache_sec.sub("key"), source) if source is not None else None
        if ttl is not None and ttl <= 0:
            cache_sec.error("ttl", "must be more than 0")
            ttl = None
        if cache_key is None or ttl is None or not isinstance(max_entries, int):
            ok = False
        else:
            cache = DecisionCache(ttl, max_entries)

    if not isinstance(address, str) or not ok:
        return None
    tls = address.startswith("https://")
    describe: dict[str, Any] = {"protocol": protocol, "timeout_seconds": settings.timeout,
                                "failure_mode": settings.failure_mode, "status_on_error": status_on_error}
    if cache is not None:
        describe["cache"] = {"key": cache_key.source, "ttl_seconds": cache.ttl, "max_entries": cache.max_entries}

    if protocol == "grpc":
        target = address.split("://", 1)[1] if address.startswith(("http://", "https://")) else address
        if sec.convert("address", target, parse_target) is None:
            return None
        client = GrpcClient(target, tls=tls, ca_file=ca, insecure=bool(insecure))
        method = client.unary(CHECK, Answer)
        timeout = settings.timeout
        context = dict(context) if context else None

        async def call(ex: Any, body: bytes | None, partial: bool, span: Any):
            payload = check_request(ex, include, body, partial, raw_body, context, jwt_meta)
            # (No request-id metadata: the id is in the CheckRequest, twice; a header that
            # changes per call costs an HPACK literal on every call. The trace context is
            # metadata only when tracing is on.)
            answer = await method(payload, timeout=timeout, metadata=tracing.context_headers(ex.span, span),
                                  local_deadline=False)
            if type(answer) is not Decision:
                raise answer                # BadAnswer / ErrorAnswer
            return answer

        def span(ex: Any):
            return tracing.rpc_span(ex.span, "envoy.service.auth.v3.Authorization", "Check", target)

        describe.update({"address": address, "include_headers": sorted(include) if include is not None else None,
                         "include_body": None if max_bytes is None else
                         {"max_bytes": max_bytes, "allow_partial": allow_partial, "raw_body": raw_body},
                         "context_extensions": context,
                         "metadata_context": None if jwt_meta is None else
                         {"namespace": jwt_meta[0], "jwt_payload": jwt_meta[1]}})
    else:
        url = address if "://" in address else f"http://{address}"
        origin = sec.convert("address", url, lambda u: Origin.from_url(u, ca_file=ca, insecure=bool(insecure)))
        if origin is None:
            return None
        call_http = HttpCheck(origin, origin.base_path + prefix, include or frozenset(),
                              tuple(sorted(upstream_headers or ())), client_headers)

        def call(ex: Any, body: bytes | None, partial: bool, span: Any):
            return call_http(ex, span)    # (the coroutine itself: no frame around it)

        span = call_http.span

        describe.update(call_http.describe())

    dep = RemoteDependency("ext_authz", settings, target=address)
    return ExtAuthzFilter(_route_name(sec, ctx), sec.path, call, dep,
                          max_bytes=max_bytes, allow_partial=allow_partial, status_on_error=status_on_error,
                          cache=cache, cache_key=cache_key, metrics=getattr(ctx, "metrics", None),
                          describe=describe, span=span, sets_request_headers=frozenset(upstream_headers or ())
                          if protocol == "http" else frozenset())


def _names(sec: Section, key: str, allow_reserved: bool = True) -> frozenset[str] | None:
    names = sec.str_list(key, None)
    if names is None:
        return None
    out = set()
    for i, name in enumerate(names):
        lname = check_header_name(sec.problems, f"{sec.sub(key)}[{i}]", name, allow_reserved=allow_reserved)
        if lname is not None:
            out.add(lname)
    return frozenset(out)


def _route_name(sec: Section, ctx: Any) -> str:
    """The name of the route this section is under (`route[2].ext_authz` → its name)."""
    prefix = sec.path.rsplit(".", 1)[0]
    for rcfg in getattr(getattr(ctx, "cfg", None), "routes", ()):
        if rcfg.path == prefix:
            return rcfg.name
    return prefix
