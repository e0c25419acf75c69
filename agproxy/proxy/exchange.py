"""One request's journey through the gateway, read top to bottom in `Gateway.handle`.

Theory of operation: the protocol adapters call `Gateway.handle(stream)` for every
request. It takes the current runtime snapshot once (a reload swaps
`gateway.runtime`; requests in flight keep theirs) and wraps the stream in an
`Exchange`, which carries what the gateway learns on the way (typed facts: the
verified identity, the exchanged token, the MCP and LLM calls, the upstream
attempts) and the CEL activation. Then, in this order:

1. match a route on the normalised path (an invalid path → 400, no route → 404,
   a body over `max_request_body` → 413);
2. request filters (proxy/contract.py): each may edit the request, learn facts,
   or answer locally; the body is buffered only before the first filter that
   declared a `body_limit`;
3. the backend returns a Response, or raises: `UpstreamError` becomes 502/504
   here and nowhere else. Nothing has reached the client yet, so a backend may
   look at an answer and try elsewhere first;
4. response filters (reverse order) may edit the head and return body hooks;
5. body hooks (proxy/body.py) are chained; if one may change bytes,
   `content-length` goes and the adapter re-frames;
6. commit: the head, the body (bytes in memory, or streamed chunk by chunk with
   backpressure), the trailers;
7. completion hooks (`ex.on_done`) run once, after the last byte, the abort or
   the local reply;
8. the trace span ends, one access-log line and one metrics sample.

A route without filters, hooks or completion hooks pays for none of it: the
request phase, the hook chain and the completion list are skipped by one test
each, and the streaming loop is the plain read → write loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from random import getrandbits
from typing import TYPE_CHECKING, Any, Callable

from agproxy import cel
from agproxy.http.messages import (NOTE_REQUEST_ID, BodyAborted, BodyMalformed, BodyReader, BodyTooLarge,
                                   ConnInfo, RequestHead, ServerStream)
from agproxy.http.path import PathError
from agproxy.proxy.body import HookChain, content_coding
from agproxy.proxy.contract import LocalReply, Response
from agproxy.proxy.facts import Attempt
from agproxy.telemetry.access_log import AccessLog, now_iso
from agproxy.upstream.errors import UpstreamError

if TYPE_CHECKING:
    from agproxy.mcp.call import McpRequest
    from agproxy.proxy.facts import LlmCall
    from agproxy.proxy.route import Route

log = logging.getLogger("agproxy.proxy")

_NOT_FOUND = LocalReply.error(404, "no_route", "no route matches this request")


def _declared_over(request: RequestHead, limit: int) -> bool:
    declared = request.headers.get("content-length")
    return declared is not None and declared.isdigit() and int(declared) > limit


def _too_large(limit: int) -> LocalReply:
    return LocalReply.error(413, "payload_too_large", f"the request body exceeds {limit} bytes")


def _malformed(exc: BodyMalformed) -> LocalReply:
    return LocalReply.error(400, "bad_request", f"malformed request body: {exc}")


class Exchange:
    """One request and what the gateway learns about it.

    Facts (typed slots; None until a policy sets them): `jwt_claims`, `jwt_token`,
    `jwt_provider` (the verified caller, set by authentication), `obo_token` (the
    token minted for the upstream), `mcp` / `llm` (proxy/facts.py), `ext_authz`
    (the external authorization service's allow, with its response changes:
    filters/ext_authz/decision.py), `attempts` (the upstream calls, in order). Filters and backends use the methods below,
    never `stream`.
    """

    __slots__ = ("stream", "request", "conn", "route", "request_id", "start", "jwt_claims",
                 "jwt_token", "jwt_provider", "obo_token", "mcp", "llm", "ext_authz", "_attempts", "body",
                 "response", "status", "bytes_out", "error", "log_extra", "span", "_activation",
                 "_cel_extra", "_done", "rate_limit")

    def __init__(self, stream: ServerStream):
        self.stream = stream
        request: RequestHead = stream.request
        self.request = request
        self.conn: ConnInfo = stream.conn
        self.route: "Route | None" = None
        self.start = time.monotonic()
        # (The parser noted whether the field came: no scan of the head when it did not.)
        rid = request.headers.get("x-request-id") if request.noted & NOTE_REQUEST_ID else None
        # Else 128 random bits from the process PRNG (reseeded in every forked worker):
        # unique enough for correlation, and no getrandom() syscall per request.
        self.request_id = rid if rid and len(rid) <= 128 and rid.isprintable() else \
            "%032x" % getrandbits(128)
        self.jwt_claims: dict | None = None
        self.jwt_token: str | None = None
        self.jwt_provider: str | None = None
        self.obo_token: str | None = None
        self.mcp: "McpRequest | None" = None
        self.llm: "LlmCall | None" = None
        self.ext_authz = None                   # an allowed ext_authz Decision with response changes
        self._attempts: tuple[tuple, ...] | None = None   # Attempt fields, as plain tuples
        self.body: bytes | None = None          # the buffered request body, once read
        self.response: Response | None = None   # what is being committed
        self.status = 0
        self.bytes_out = 0
        self.error: str | None = None
        self.rate_limit = None                  # filters/rate_limit: the answer's x-ratelimit-* headers
        self.log_extra: dict[str, Any] | None = None   # ex.log(): a module's access-log fields
        self.span = None                        # telemetry.tracing.Span when tracing is on
        self._activation = None
        self._cel_extra: dict[str, Callable[[], object]] | None = None
        self._done: list[Callable[["Exchange"], None]] | None = None

    # -- the request body -------------------------------------------------------------
    async def read_body(self, limit: int) -> bytes:
        """The whole request body, buffered once into `ex.body` (later readers get the
        same bytes); BodyTooLarge past `limit`."""
        body = self.body
        if body is None:
            body = self.body = await self.stream.body.read_all(limit)
        elif len(body) > limit:
            raise BodyTooLarge(f"request body exceeds {limit} bytes")
        return body

    async def peek_body(self, limit: int) -> tuple[bytes, bool]:
        """The first `limit` bytes of the request body without consuming them (the
        backend still gets the whole body, streamed), and whether that is all of it.
        Waits until `limit` bytes arrived or the body ended."""
        body = self.body
        if body is not None:
            return body[:limit], len(body) <= limit
        reader = self.stream.body
        if reader.at_eof:
            return b"", True
        data = await reader.peek(limit)
        return data, reader.complete and len(data) == reader.received - reader.consumed

    def body_size(self) -> int:
        """The request body's length as known now: `content-length`, the buffered
        body's length, 0 when the request has none, -1 when it is still arriving."""
        declared = self.request.headers.get("content-length")
        if declared is not None and declared.isdigit():
            return int(declared)
        if self.body is not None:
            return len(self.body)
        return 0 if self.stream.body.at_eof else -1

    def request_body(self) -> tuple[bytes | BodyReader | None, int | None]:
        """What to send upstream: the buffered bytes, the live stream, or nothing;
        and its length when known."""
        if self.body is not None:
            return self.body, len(self.body)
        body = self.stream.body
        if body.error is not None:
            raise body.error        # e.g. BodyTooLarge: the exchange answers 413
        if body.at_eof:
            return None, None
        if body.complete:
            # Everything already arrived with the head: send it in the same write.
            data = body.take_buffered()
            return data, len(data)
        length = self.request.headers.get("content-length")
        return body, int(length) if length and length.isdigit() else None

    # -- facts and hooks ----------------------------------------------------------------
    def add_attempt(self, backend: str, upstream: str, provider: str | None, start: float,
                    status: int, seconds: float, error: str | None = None) -> None:
        """Record an upstream call (proxy/facts.py Attempt: the fields, in order)."""
        rec = (backend, upstream, provider, start, status, seconds, error)
        # A tuple of records: one attempt is the common case, and a 1-tuple costs
        # less to make and free than a list.
        self._attempts = (rec,) if self._attempts is None else self._attempts + (rec,)

    @property
    def attempts(self) -> list[Attempt]:
        """The upstream calls so far, in order (the last one's answer is what is sent)."""
        return [Attempt(*rec) for rec in self._attempts] if self._attempts else []

    def on_done(self, hook: Callable[["Exchange"], None]) -> None:
        """Run `hook(ex)` once when the exchange is over (last byte sent, aborted, or
        answered locally), before accounting. Synchronous; exceptions are logged."""
        if self._done is None:
            self._done = [hook]
        else:
            self._done.append(hook)

    def log(self, key: str, value: Any) -> None:
        """An access-log field of a module's own (a fixed key; a bounded value)."""
        if self.log_extra is None:
            self.log_extra = {key: value}
        else:
            self.log_extra[key] = value

    def log_fields(self, fields: dict[str, Any]) -> None:
        """Several access-log fields at once (`log` for each; the dict is kept, not copied)."""
        if self.log_extra is None:
            self.log_extra = fields
        else:
            self.log_extra.update(fields)

    # -- CEL ------------------------------------------------------------------------
    @property
    def activation(self):
        """The lazily built CEL activation (`request`, `source`, `jwt`, ...)."""
        act = self._activation
        if act is None:
            providers: dict[str, Callable[[], object]] = {
                "request": self._cel_request,
                "source": self._cel_source,
                "jwt": self._cel_jwt,
                "llm": self._cel_llm,
            }
            extra = self._cel_extra
            if extra:
                providers.update(extra)
            act = self._activation = cel.Activation(providers)
        return act

    def add_cel_variable(self, name: str, provider: Callable[[], object]) -> None:
        """Filters that learn something CEL may use (mcp, llm, response) register it here."""
        if self._cel_extra is None:
            self._cel_extra = {}
        self._cel_extra[name] = provider
        if self._activation is not None:
            self._activation.set_provider(name, provider)

    def _cel_request(self) -> dict:
        r = self.request
        return {
            "method": r.method,
            "path": r.path,
            "host": r.host,
            "scheme": r.scheme,
            "headers": r.headers.as_dict(),
            "query": _parse_query(r.query),
            "protocol": r.protocol,
            "id": self.request_id,
        }

    def _cel_source(self) -> dict:
        c = self.conn
        return {"address": c.peer_host, "port": c.peer_port, "tls": c.tls}

    def _cel_jwt(self) -> dict:
        return self.jwt_claims or {}

    def _cel_llm(self) -> dict | None:
        llm = self.llm
        return llm.cel() if llm is not None else None


def _parse_query(query: str) -> dict[str, str]:
    if not query:
        return {}
    from urllib.parse import parse_qsl
    out: dict[str, str] = {}
    for k, v in parse_qsl(query, keep_blank_values=True):
        out.setdefault(k, v)
    return out


class Gateway:
    def __init__(self, runtime, metrics, access_log: AccessLog):
        self.runtime = runtime
        self.metrics = metrics
        self.access_log = access_log

    async def handle(self, stream: ServerStream) -> None:
        ex = Exchange(stream)
        runtime = self.runtime
        if runtime.tracing is not None:
            ex.span = runtime.tracing.start_request(ex.request, ex.conn, ex.request_id)
        try:
            # 1. Match. The gateway-wide body limit is checked first (bytes may have
            #    arrived before this task ran: `received` counts them too).
            limit = runtime.gateway.max_request_body
            body = stream.body
            body.limit = limit
            route = ex.route = runtime.router.route(ex.request, ex.conn.listener)   # normalises the path
            # A body already complete is its declared length: no content-length lookup (a scan).
            if body.received > limit or (not body.complete and _declared_over(ex.request, limit)):
                return await self._commit(ex, _too_large(limit), ())
            if route is None:
                return await self._commit(ex, _NOT_FOUND, ())
            # 2. Request filters: each may edit the request, learn facts, or answer.
            resp = _request_phase(ex, route) if route.filters else None
            if resp is not None and not isinstance(resp, Response):
                resp = await resp       # a filter's awaitable (synchronous filters cost no coroutine)
            # 3. The backend's response; nothing has reached the client yet.
            if resp is None:
                if route.reads_response_body:
                    # Body hooks read the body as sent: ask for it unencoded (proxy/body.py).
                    ex.request.headers.set("accept-encoding", "identity")
                try:
                    resp = await route.backend.respond(ex)
                except UpstreamError as exc:
                    resp = _upstream_failed(ex, exc)
            # 4-6. Response filters and body hooks, then commit.
            await self._commit(ex, resp, route.response_filters)
        except asyncio.CancelledError as exc:
            ex.error = ex.error or str(exc) or "client went away"   # (the adapter may say why)
            if ex.status == 0:
                ex.status = 499
            raise
        except PathError as exc:
            ex.error = f"invalid path: {exc}"
            await self._commit(ex, LocalReply.error(400, "invalid_path", str(exc)), ())
        except BodyTooLarge:
            ex.error = "request body too large"
            if not stream.head_sent:
                await self._commit(ex, _too_large(stream.body.limit or 0), ())
            else:
                stream.abort()
        except BodyMalformed as exc:
            ex.error = f"malformed request body: {exc}"
            if not stream.head_sent:
                await self._commit(ex, _malformed(exc), ())
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
            if ex.response is not None:
                ex.response.discard()
            if not stream.head_sent:
                try:
                    await self._commit(ex, LocalReply.error(500, "internal_error",
                                                            "the gateway failed to handle this request"), ())
                except Exception:
                    stream.abort()
            else:
                stream.abort()
        finally:
            # 7. Completion hooks, then 8. accounting.
            if ex._done is not None:
                _run_done(ex)
            self._account(ex, runtime)
            # The activation's providers are bound methods of ex: drop the cycle so
            # the request is freed by reference counting, not by the cyclic GC.
            ex._activation = None

    async def _commit(self, ex: Exchange, resp: Response, filters: tuple) -> None:
        stream = ex.stream
        body = resp.body
        in_memory = type(body) is bytes
        if in_memory:
            if type(resp) is LocalReply:   # maybe a shared constant: commit a copy
                resp = Response(resp.status, resp.headers.copy(), body)
            resp.headers.set("content-length", str(len(body)))
        ex.response = resp
        # 4-5. Response filters (they may edit the head and return body hooks).
        chain = _response_phase(ex, resp, filters, in_memory) if filters else None
        if chain is not None:
            if type(chain) is LocalReply:      # hooks cannot read this response
                return await self._commit(ex, chain, ())
            if in_memory:
                body = (chain.feed(body) if body else b"") + chain.end()
                if chain.transforms:
                    resp.headers.set("content-length", str(len(body)))
                chain = None
        # 6. Commit.
        ex.status = resp.status
        stream.send_head(resp.status, resp.headers)
        if in_memory:
            if body and ex.request.method != "HEAD":
                ex.bytes_out += len(body)
                await stream.send_data(body)
            await stream.end()
            return
        # The adapters hold a head until the first body bytes (one write for both); a
        # response that says so (an MCP event stream) has its head sent now.
        if resp.flush_head:
            await stream.send_data(b"")
        if chain is not None:
            return await _stream_hooked(ex, resp, chain)
        # The relay loop: each chunk as it arrives, awaiting the client's drain, so a
        # slow client slows the upstream and no whole stream is ever buffered.
        reader = body
        try:
            while True:
                chunk = await reader.read()
                if not chunk:
                    break
                ex.bytes_out += len(chunk)
                if reader.at_eof:       # the last chunk: with the body's end, one write
                    await stream.end(reader.trailers, chunk)
                    return
                await stream.send_data(chunk)
        except BodyAborted as exc:
            ex.error = f"upstream broke mid-body: {exc}"
            stream.abort()       # never a truncated response that looks complete
            return
        except (ConnectionError, OSError) as exc:
            resp.discard()
            ex.error = f"client went away: {exc}"
            return
        except BaseException:
            # Cancelled (the client left or reset the stream, a stream deadline) or
            # failed: the upstream response is abandoned, so the upstream call must end
            # too (its connection must not wait for a reader, the generation behind a
            # stream must not go on).
            resp.discard()
            raise
        await stream.end(reader.trailers)

    def _account(self, ex: Exchange, runtime) -> None:
        elapsed = time.monotonic() - ex.start
        route = ex.route.name if ex.route is not None else ""
        status = ex.status or 0
        attempts = ex._attempts
        span = ex.span
        if span is not None:
            runtime.tracing.end_request(span, ex)
        m = self.metrics
        if m is not None:
            m.request(route, ex.request.method, status, elapsed)
            if attempts is not None:
                for a in attempts:     # Attempt fields: 0 backend, 5 seconds
                    m.upstream(a[0], a[5])
        al = self.access_log
        if al.enabled:
            req = ex.request
            last = attempts[-1] if attempts is not None else None   # 1 upstream, 5 seconds
            rec = {
                "time": now_iso(),
                "route": route,
                "method": req.method,
                "path": req.path,
                "status": status,
                # Milliseconds to the microsecond, inline. Not round(x, 3): that formats
                # the float through snprintf and cost ~3k instructions (callgrind).
                "duration_ms": int(elapsed * 1_000_000) / 1000,
                "bytes_in": ex.stream.body.received,
                "bytes_out": ex.bytes_out,
                "upstream": last[1] if last is not None else None,
                "request_id": ex.request_id,
                "protocol": req.protocol,
                "tls": ex.conn.tls,
                "client": ex.conn.peer_host,
            }
            if last is not None:
                rec["upstream_ms"] = int(last[5] * 1_000_000) / 1000
            if ex.error:
                rec["error"] = ex.error
            if ex.jwt_claims and "sub" in ex.jwt_claims:
                rec["user"] = ex.jwt_claims["sub"]
            if ex.route is not None:
                rec["backend"] = getattr(ex.route.backend, "name", "")
            if span is not None:
                rec["trace_id"] = span.trace_id
                rec["span_id"] = span.span_id
            if runtime.log_fields is not None:     # [telemetry].access_log_fields (CEL)
                runtime.log_fields.add_to(rec, ex.activation)
            extra = ex.log_extra
            if extra:
                # A module's field never hides a core one. (Added in place when no key
                # is shared, the usual case: the merged copy cost ~3k instructions.)
                if extra.keys().isdisjoint(rec.keys()):     # (two views: the smaller one is walked)
                    rec.update(extra)
                else:
                    rec = {**extra, **rec}
            al.write(rec)


def _request_phase(ex: Exchange, route: "Route"):
    """Run the route's request filters; the first answer stops the chain. Synchronous
    filters cost no task and no coroutine: the result is None (go on), a Response (the
    answer), or, from the first filter that returned an awaitable (or when the body
    must be read), a coroutine finishing the phase, which the caller awaits. (Awaiting
    a coroutine per request on a route whose filters are all synchronous, a local rate
    limit, cost ~400 instructions more than this: benchmarks/results/ratelimit.md.)"""
    for f in route.head_filters:
        result = f.on_request(ex)
        if result is not None:
            if isinstance(result, Response):
                return result
            return _request_phase_async(ex, route, result, route.head_filters.index(f) + 1)
    if route.body_filters:
        return _request_phase_async(ex, route, None, len(route.head_filters))
    return None


async def _request_phase_async(ex: Exchange, route: "Route", pending, start: int) -> Response | None:
    """The rest of the request phase once something must be awaited: `pending` (a head
    filter's awaitable, or None), the head filters from `start`, then the body filters."""
    if pending is not None:
        result = await pending
        if result is not None:
            return result
    for f in route.head_filters[start:]:
        result = f.on_request(ex)
        if result is None:
            continue
        if not isinstance(result, Response):
            result = await result
            if result is None:
                continue
        return result
    filters = route.body_filters
    if filters:
        limit = route.body_limit
        declared = ex.request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return _too_large(limit)
        try:
            await ex.read_body(limit)
        except BodyTooLarge as exc:
            return LocalReply.error(413, "payload_too_large", str(exc))
        for f in filters:
            result = f.on_request(ex)
            if result is None:
                continue
            if not isinstance(result, Response):
                result = await result
                if result is None:
                    continue
            return result
    return None


def _response_phase(ex: Exchange, resp: Response, filters: tuple, in_memory: bool) -> HookChain | LocalReply | None:
    """Run the response filters; chain the body hooks they return (None: no hook).
    A LocalReply instead when hooks would have to read an encoded body."""
    hooks = None
    for f in filters:
        hook = f.on_response(ex, resp)
        if hook is not None:
            if hooks is None:
                hooks = [hook]
            else:
                hooks.append(hook)
    if hooks is None:
        return None
    coding = content_coding(resp.headers)
    if coding is not None:
        resp.discard()
        ex.error = f"upstream sent content-encoding {coding[:32]!r} to a body hook"
        return LocalReply.error(502, "upstream_encoding",
                                "the upstream answered with a content coding the route cannot read")
    chain = HookChain(hooks)
    if chain.transforms and not in_memory:
        resp.headers.remove("content-length")   # the adapter re-frames
    return chain


async def _stream_hooked(ex: Exchange, resp: Response, chain: HookChain) -> None:
    """The relay loop of Gateway._commit, through body hooks."""
    stream = ex.stream
    reader = resp.body
    send = stream.send_data
    try:
        while True:
            chunk = await reader.read()
            if not chunk:
                break
            data = chain.feed(chunk)
            if reader.at_eof:           # the last chunk: with the body's end, one write
                data += chain.end()
                ex.bytes_out += len(data)
                await stream.end(reader.trailers, data)
                return
            if data:
                ex.bytes_out += len(data)
                await send(data)
        data = chain.end()
        if data:
            ex.bytes_out += len(data)
            await send(data)
    except BodyAborted as exc:
        ex.error = f"upstream broke mid-body: {exc}"
        stream.abort()
        return
    except (ConnectionError, OSError) as exc:
        resp.discard()
        ex.error = f"client went away: {exc}"
        return
    except asyncio.CancelledError:
        resp.discard()
        raise
    except Exception as exc:
        # A hook failed (an SSE event over its bound, a bug): what it would have sent
        # cannot be trusted, and the client must not take the cut for the end.
        log.warning("request %s: body hook failed: %s: %s", ex.request_id, type(exc).__name__, exc)
        ex.error = f"body hook failed: {type(exc).__name__}"
        resp.discard()
        stream.abort()
        return
    await stream.end(reader.trailers)


def _upstream_failed(ex: Exchange, exc: UpstreamError) -> LocalReply:
    """The one place an upstream failure becomes a status."""
    ex.error = str(exc)
    failed = ex.stream.body.error
    if type(failed) is BodyTooLarge:   # the upload broke the call, not the upstream
        return LocalReply.error(413, "payload_too_large", str(failed))
    if type(failed) is BodyMalformed:  # the upstream request was aborted for it
        ex.error = f"malformed request body: {failed}"
        return _malformed(failed)
    if exc.kind == "timeout":
        return LocalReply.error(504, "upstream_timeout", "the upstream did not answer in time")
    return LocalReply.error(502, "upstream_unavailable", "the upstream could not be reached")


def _run_done(ex: Exchange) -> None:
    hooks, ex._done = ex._done, None
    for hook in hooks:
        try:
            hook(ex)
        except Exception:
            log.exception("request %s: completion hook failed", ex.request_id)
