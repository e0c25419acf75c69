"""The per-request entry point: route, run the filter chain, call the backend, account.

Theory of operation: `Gateway.handle(stream)` is what the protocol adapters call
for every request. It reads the current runtime snapshot once (a reload swaps
`gateway.runtime`; requests in flight keep the snapshot they started with),
matches a route, runs the request phase of the route's filters (synchronous
unless a filter returns an awaitable), buffers the body once if a filter asked,
and lets the backend answer. Whatever happens, one access-log line and one
metrics sample are recorded at the end.
"""

from __future__ import annotations

import asyncio
import logging
import time

from agproxy.http.messages import BodyAborted, BodyMalformed, BodyTooLarge, ServerStream
from agproxy.http.path import PathError
from agproxy.proxy.exchange import Exchange
from agproxy.proxy.filter import LocalReply
from agproxy.telemetry.access_log import AccessLog, now_iso

log = logging.getLogger("agproxy.proxy")

_NOT_FOUND = LocalReply.error(404, "no_route", "no route matches this request")


def _ms(seconds: float) -> float:
    # Milliseconds to the microsecond. Not round(x, 3): that formats the float
    # through snprintf and cost ~3k instructions per request (callgrind).
    return int(seconds * 1_000_000) / 1000


def _too_large(limit: int) -> LocalReply:
    return LocalReply.error(413, "payload_too_large", f"the request body exceeds {limit} bytes")


def _malformed(exc: BodyMalformed) -> LocalReply:
    return LocalReply.error(400, "bad_request", f"malformed request body: {exc}")


class Gateway:
    def __init__(self, runtime, metrics, access_log: AccessLog):
        self.runtime = runtime
        self.metrics = metrics
        self.access_log = access_log

    async def handle(self, stream: ServerStream) -> None:
        ex = Exchange(stream)
        runtime = self.runtime
        span = None
        if runtime.tracing is not None:
            span = runtime.tracing.start_request(ex.request, ex.conn)
        try:
            limit = runtime.gateway.max_request_body
            stream.body.limit = limit
            declared = ex.request.headers.get("content-length")
            route = runtime.router.route(ex.request, ex.conn.listener)   # normalises the path first
            # (Bytes may have arrived before this task ran: `received` counts them too.)
            if stream.body.received > limit or (
                    declared is not None and declared.isdigit() and int(declared) > limit):
                ex.route = route
                await self._reply(ex, _too_large(limit))
            elif route is None:
                await self._reply(ex, _NOT_FOUND)
            else:
                ex.route = route
                ex.response_filters = route.response_filters
                reply = None
                if route.filters:
                    reply = await self._request_phase(ex, route)
                if reply is not None:
                    await self._reply(ex, reply)
                else:
                    await route.backend.handle(ex)
        except asyncio.CancelledError as exc:
            ex.error = ex.error or str(exc) or "client went away"   # (the adapter may say why)
            if ex.status == 0:
                ex.status = 499
            raise
        except PathError as exc:
            ex.error = f"invalid path: {exc}"
            await self._reply(ex, LocalReply.error(400, "invalid_path", str(exc)))
        except BodyTooLarge:
            ex.error = "request body too large"
            if not stream.head_sent:
                await self._reply(ex, _too_large(stream.body.limit or 0))
            else:
                stream.abort()
        except BodyMalformed as exc:
            ex.error = f"malformed request body: {exc}"
            if not stream.head_sent:
                await self._reply(ex, _malformed(exc))
            else:
                stream.abort()
        except BodyAborted as exc:
            ex.error = f"request body aborted: {exc}"
            if ex.status == 0:
                ex.status = 499
            stream.abort()
        except (ConnectionError, OSError) as exc:
            ex.error = f"client went away: {exc}"
            if ex.status == 0:
                ex.status = 499
        except Exception as exc:
            log.exception("request %s failed", ex.request_id)
            ex.error = f"internal error: {type(exc).__name__}"
            if not stream.head_sent:
                try:
                    await self._reply(ex, LocalReply.error(500, "internal_error", "the gateway failed to handle this request"))
                except Exception:
                    stream.abort()
            else:
                stream.abort()
        finally:
            self._account(ex, runtime, span)
            # The activation's providers are bound methods of ex: drop the cycle so
            # the request is freed by reference counting, not by the cyclic GC.
            ex._activation = None

    async def _request_phase(self, ex: Exchange, route) -> LocalReply | None:
        if route.body_limit is not None and ex.body is None:
            try:
                ex.body = await ex.stream.body.read_all(route.body_limit)
            except BodyTooLarge as exc:
                return LocalReply.error(413, "payload_too_large", str(exc))
        for f in route.filters:
            result = f.on_request(ex)
            if result is None:
                continue
            if not isinstance(result, LocalReply):
                result = await result
                if result is None:
                    continue
            return result
        return None

    async def _reply(self, ex: Exchange, reply: LocalReply) -> None:
        await ex.reply(reply.status, reply.headers.copy(), reply.body)

    def _account(self, ex: Exchange, runtime, span) -> None:
        elapsed = time.monotonic() - ex.start
        route = ex.route.name if ex.route is not None else ""
        status = ex.status or 0
        if span is not None:
            runtime.tracing.end_request(span, ex)
        m = self.metrics
        if m is not None:
            m.request(route, ex.request.method, status, elapsed)
            if ex.upstream_time is not None and ex.route is not None:
                m.upstream(getattr(ex.route.backend, "name", ""), ex.upstream_time)
        al = self.access_log
        if al.enabled:
            req = ex.request
            rec = {
                "time": now_iso(),
                "route": route,
                "method": req.method,
                "path": req.path,
                "status": status,
                "duration_ms": _ms(elapsed),
                "bytes_in": ex.stream.body.received,
                "bytes_out": ex.bytes_out,
                "upstream": ex.upstream,
                "request_id": ex.request_id,
                "protocol": req.protocol,
                "tls": ex.conn.tls,
                "client": ex.conn.peer_host,
            }
            if ex.upstream_time is not None:
                rec["upstream_ms"] = _ms(ex.upstream_time)
            if ex.error:
                rec["error"] = ex.error
            if ex.jwt_claims and "sub" in ex.jwt_claims:
                rec["user"] = ex.jwt_claims["sub"]
            if ex.route is not None:
                rec["backend"] = getattr(ex.route.backend, "name", "")
            if span is not None:
                rec["trace_id"] = span.trace_id
                rec["span_id"] = span.span_id
            if runtime.log_fields is not None:
                runtime.log_fields.add_to(rec, ex.activation)
            al.write(rec)
