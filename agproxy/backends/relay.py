"""Forward an exchange to an upstream and stream the answer back.

Theory of operation: `upstream_request_headers` decides what the upstream sees
(hop-by-hop headers gone, X-Forwarded-* and the request id added, Host set to the
upstream's authority); `relay` sends through the pool, drops the response's
hop-by-hop headers and those its Connection header names (`nominated_drop`),
passes the response head through the route's response filters (ex.send_head), then copies body chunks as
they arrive, awaiting the client's drain so a slow client slows the upstream
(never buffers a whole stream). Failures map to what a client can act on: refused
or reset before a response → 502, no head within the route timeout → 504, broken
mid-body → the client's stream is aborted (never a hang, never a truncated
response that looks complete).
"""

from __future__ import annotations

import logging
import time

from agproxy.http.messages import HOP_BY_HOP, BodyAborted, BodyMalformed, BodyReader, BodyTooLarge, Headers
from agproxy.upstream.errors import UpstreamError
from agproxy.upstream.origin import Origin
from agproxy.upstream.pool import get_pool

log = logging.getLogger("agproxy.proxy")

# Not forwarded upstream besides the hop-by-hop set: we frame bodies ourselves.
_DROP_REQUEST = HOP_BY_HOP | {"host", "content-length", "expect", "x-forwarded-host",
                              "x-forwarded-proto", "x-request-id"}
_DROP_RESPONSE = HOP_BY_HOP | {"content-length"}


_NOMINATING: dict[str, frozenset[str]] = {}


def nominated_drop(connection: str) -> frozenset[str]:
    """Response headers not relayed when the upstream sent `Connection: <connection>`:
    the hop-by-hop ones and those it names (RFC 9110 §7.6.1). Upstreams repeat one
    value (`keep-alive`) on every response: the set is kept per value (a bounded
    table), not rebuilt per response."""
    drop = _NOMINATING.get(connection)
    if drop is None:
        drop = _DROP_RESPONSE | {t.strip().lower() for t in connection.split(",")}
        if len(_NOMINATING) < 256:
            _NOMINATING[connection] = drop
    return drop


def upstream_request_headers(ex, authority: str, *, te_trailers: bool = False) -> Headers:
    req = ex.request
    src = req.headers.items
    drop = _DROP_REQUEST
    conn_tokens = req.headers.get("connection")
    if conn_tokens:
        drop = drop | {t.strip().lower() for t in conn_tokens.split(",")}
    items = [("host", authority)]
    xff = None
    for k, v in src:
        if k in drop:
            if k == "te" and te_trailers and "trailers" in v.lower():
                items.append(("te", "trailers"))
            continue
        if k == "x-forwarded-for":
            xff = f"{xff}, {v}" if xff else v
            continue
        items.append((k, v))
    peer = ex.conn.peer_host
    items.append(("x-forwarded-for", f"{xff}, {peer}" if xff else peer))
    items.append(("x-forwarded-proto", req.scheme))
    if req.authority:
        items.append(("x-forwarded-host", req.authority))
    items.append(("x-request-id", ex.request_id))
    return Headers(items)


def request_body(ex) -> tuple[bytes | BodyReader | None, int | None]:
    """What to send as the upstream body: buffered bytes, the live stream, or nothing."""
    if ex.body is not None:
        return ex.body, len(ex.body)
    body = ex.stream.body
    if body.error is not None:
        raise body.error        # e.g. BodyTooLarge: the handler answers 413
    if body.at_eof:
        return None, None
    if body.complete:
        # Everything already arrived with the head: send it in the same write.
        data = body.take_buffered()
        return data, len(data)
    length = ex.request.headers.get("content-length")
    return body, int(length) if length and length.isdigit() else None


async def relay(ex, origin: Origin, method: str, target: str, headers: Headers,
                body: bytes | BodyReader | None, timeout: float | None,
                body_length: int | None = None) -> None:
    ex.upstream = origin.authority
    start = time.monotonic()
    try:
        resp = await get_pool().request(origin, method, target, headers, body, timeout=timeout,
                                        body_length=body_length)
    except UpstreamError as exc:
        ex.upstream_time = time.monotonic() - start
        ex.error = str(exc)
        body_error = ex.stream.body.error
        if type(body_error) is BodyTooLarge:
            await _local(ex, 413, "payload_too_large", str(body_error))
        elif type(body_error) is BodyMalformed:   # the upstream request was aborted for it
            ex.error = f"malformed request body: {body_error}"
            await _local(ex, 400, "bad_request", f"malformed request body: {body_error}")
        elif exc.kind == "timeout":
            await _local(ex, 504, "upstream_timeout", "the upstream did not answer in time")
        else:
            await _local(ex, 502, "upstream_unavailable", "the upstream could not be reached")
        return
    ex.upstream_time = time.monotonic() - start

    items = resp.headers.items
    cl = connection = None
    for k, v in items:      # one pass for both (this runs per response)
        if k == "content-length":
            if cl is None:
                cl = v
        elif k == "connection":
            connection = v if connection is None else f"{connection},{v}"
    drop = _DROP_RESPONSE if connection is None else nominated_drop(connection)
    out = Headers([(k, v) for k, v in items if k not in drop])
    if cl is not None:
        out.items.append(("content-length", cl))
    ex.send_head(resp.status, out)
    reader = resp.body
    try:
        while True:
            chunk = await reader.read()
            if not chunk:
                break
            await ex.send_data(chunk)
    except BodyAborted as exc:
        ex.error = f"upstream broke mid-body: {exc}"
        ex.stream.abort()
        return
    except (ConnectionError, OSError) as exc:   # the client went away
        resp.abort()
        ex.error = f"client went away: {exc}"
        return
    except BaseException:
        # Cancelled (the client's stream was reset, a stream deadline) or failed: the
        # upstream response is abandoned, so its connection must not wait for a reader.
        resp.abort()
        raise
    await ex.end(reader.trailers)


async def _local(ex, status: int, error: str, message: str) -> None:
    from agproxy.proxy.filter import LocalReply
    r = LocalReply.error(status, error, message)
    if ex.stream.head_sent:
        ex.stream.abort()
        return
    await ex.reply(r.status, r.headers, r.body)
