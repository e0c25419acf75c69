"""Forward an exchange to an upstream and return its response.

Theory of operation: `upstream_request_headers` decides what the upstream sees
(hop-by-hop headers gone, X-Forwarded-* and the request id added, Host set to the
upstream's authority); `relay` sends through the pool, records the call as an
attempt on the exchange, drops the response's hop-by-hop headers and those its
Connection header names (`nominated_drop`), and returns the response head with its body
still streaming (proxy/contract.py Response; the exchange commits it, copying
chunks as they arrive with backpressure). A failure before the head raises
`UpstreamError` (the exchange answers 502/504); the caller may instead catch it
and try another upstream, as nothing has reached the client yet.
"""

from __future__ import annotations

import logging
import time

from agproxy.http.messages import HOP_BY_HOP, BodyReader, Headers
from agproxy.proxy.contract import Response
from agproxy.telemetry import tracing
from agproxy.upstream.errors import UpstreamError
from agproxy.upstream.origin import Origin
from agproxy.upstream.pool import get_pool

log = logging.getLogger("agproxy.proxy")

# Not forwarded upstream besides the hop-by-hop set: we frame bodies ourselves.
_DROP_REQUEST = HOP_BY_HOP | {"host", "content-length", "expect", "x-forwarded-host",
                              "x-forwarded-proto", "x-request-id"}
_DROP_RESPONSE = HOP_BY_HOP | {"content-length"}
_SPECIAL_REQUEST = _DROP_REQUEST | {"x-forwarded-for"}   # looked at, never copied as they are


_NOMINATING: dict[str, frozenset[str]] = {}


def nominated_drop(connection: str) -> frozenset[str]:
    """Response headers not relayed because the upstream's `Connection: <connection>`
    names them (RFC 9110 §7.6.1), beyond the hop-by-hop ones always dropped. Upstreams
    repeat one value (`keep-alive`, already hop-by-hop: nothing more) on every
    response: the set is kept per value (a bounded table), not rebuilt per response."""
    drop = _NOMINATING.get(connection)
    if drop is None:
        drop = frozenset(t.strip().lower() for t in connection.split(",")) - _DROP_RESPONSE
        if len(_NOMINATING) < 256:
            _NOMINATING[connection] = drop
    return drop


def upstream_request_headers(ex, authority: str, te_trailers: bool = False) -> Headers:
    req = ex.request
    # One pass over the request head (per request, measured): what is forwarded, the
    # X-Forwarded-For chain, the (first) Connection header. A second pass only if that
    # names headers the hop-by-hop set does not already drop.
    items = [("host", authority)]
    xff = conn_tokens = None
    for kv in req.headers.items:
        k = kv[0]
        if k in _SPECIAL_REQUEST:
            if k == "x-forwarded-for":
                xff = f"{xff}, {kv[1]}" if xff else kv[1]
            elif k == "connection":
                if conn_tokens is None:
                    conn_tokens = kv[1]
            elif k == "te" and te_trailers and "trailers" in kv[1].lower():
                items.append(("te", "trailers"))
            continue
        items.append(kv)
    if conn_tokens:
        nominated = {t.strip().lower() for t in conn_tokens.split(",")} - _DROP_REQUEST
        if nominated:
            items = [kv for kv in items if kv[0] not in nominated]
            if "x-forwarded-for" in nominated:
                xff = None        # the client's chain is hop-by-hop then
    peer = ex.conn.peer_host
    items.append(("x-forwarded-for", f"{xff}, {peer}" if xff else peer))
    items.append(("x-forwarded-proto", req.scheme))
    if req.authority:
        items.append(("x-forwarded-host", req.authority))
    items.append(("x-request-id", ex.request_id))
    return Headers(items)


def _attempt_span(ex, parent, origin: Origin, method: str, target: str, headers: Headers, backend: str):
    """The attempt's CLIENT span (telemetry/tracing.py), named to the upstream in
    `traceparent`; an MCP call's span says which method and tool (MCP conventions)."""
    attempts = ex._attempts
    span = tracing.http_client_span(parent, method, origin.scheme, origin.authority, target, backend,
                                    len(attempts) if attempts else 0)
    mcp = ex.mcp
    if mcp is not None and mcp.calls:
        tracing.add_mcp(span, mcp)
    else:   # only the status (or a failure, which clears it) changes its attributes now
        span.key = (origin.scheme, origin.authority, backend, method, len(attempts) if attempts else 0)
    # (A sampled request's headers carry no traceparent: Tracing.start_request.)
    headers.items.append(("traceparent", span._tp))
    return span


async def relay(ex, origin: Origin, method: str, target: str, headers: Headers,
                body: bytes | BodyReader | None, timeout: float | None,
                body_length: int | None = None, backend: str = "",
                provider: str | None = None) -> Response:
    # (backend and provider positional at the call sites: keyword arguments cost
    # ~200 instructions per call, callgrind.)
    span = ex.span
    if span is not None and span.attributes is not None:     # a sampled request: its CLIENT span
        span = _attempt_span(ex, span, origin, method, target, headers, backend)
    else:
        span = None
    start = time.monotonic()
    try:
        resp = await get_pool().request(origin, method, target, headers, body, timeout, body_length)
    except UpstreamError as exc:
        ex.add_attempt(backend, origin.authority, provider, start, 0, time.monotonic() - start, str(exc))
        if span is not None:
            span.fail(exc.kind, str(exc))
        raise
    except BaseException:
        if span is not None:
            span.fail("cancelled")
        raise
    ex.add_attempt(backend, origin.authority, provider, start, resp.status, time.monotonic() - start)
    if span is not None:
        tracing.end_http_client(span, resp.status)

    # One pass over the response head (per response, measured): what is relayed, the
    # length, the Connection tokens. A second pass only if those name more headers.
    out: list[tuple[str, str]] = []
    cl = connection = None
    for kv in resp.headers.items:
        k = kv[0]
        if k in _DROP_RESPONSE:
            if k == "content-length":
                if cl is None:
                    cl = kv[1]
            elif k == "connection":
                connection = kv[1] if connection is None else f"{connection},{kv[1]}"
            continue
        out.append(kv)       # (not a local bound method: list.append is specialised)
    if connection is not None:
        drop = nominated_drop(connection)
        if drop:
            out = [kv for kv in out if kv[0] not in drop]
    if cl is not None:
        out.append(("content-length", cl))
    return Response(resp.status, Headers(out), resp.body, resp)
