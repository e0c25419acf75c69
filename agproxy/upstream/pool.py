"""The connection pool: keep-alive HTTP/1.1 connections and multiplexed HTTP/2 ones.

Theory of operation: idle HTTP/1.1 connections wait per origin in a LIFO list (the
most recently used is the least likely to have been closed by the upstream); a
request takes one or connects. A connection taken from the pool is either handed
back by the connection itself (response complete, keep-alive on both sides) or
aborted: every failure between taking it and the response head aborts it, so no
exception leaks a socket.

Retries: a request is sent again at most once, and only when that cannot make the
upstream act twice. On HTTP/1.1, a reused connection that closes before any
response byte is ambiguous (the upstream may have closed it while idle, or read
the request and died): the request is sent again only if its method is
idempotent (RFC 9110 §9.2.2, as nginx, Envoy and Go's net/http do) and its body
is in memory, and always on a *fresh* connection: the other idle ones are likely
as stale as the one that failed, and a second stale one would turn a retry into a
502. On HTTP/2, only a stream the upstream says it never processed (REFUSED_STREAM,
or above a GOAWAY's last stream id) is sent again, whatever its method.

HTTP/2 origins share one connection per origin, opened on demand and replaced when
it goes away (upstream/h2.py). A sweeper closes connections idle longer than
`idle_timeout`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from agproxy.http.messages import BodyAborted, BodyReader, Headers
from agproxy.upstream.errors import UpstreamError
from agproxy.upstream.h1 import H1ClientConnection, UpstreamResponse
from agproxy.upstream.h2 import connect_h2
from agproxy.upstream.origin import Origin
from agproxy.upstream.per_loop import PerLoop

__all__ = ["Pool", "Origin", "UpstreamResponse", "UpstreamError", "get_pool", "set_pool"]


class Pool:
    def __init__(self, *, max_idle_per_origin: int = 1024, idle_timeout: float = 60.0,
                 metrics: Any = None):
        self.max_idle = max_idle_per_origin
        self.idle_timeout = idle_timeout
        self.metrics = metrics
        self._idle: dict[tuple, list[H1ClientConnection]] = {}
        self._h2: dict[tuple, Any] = {}
        self._h2_connecting: dict[tuple, asyncio.Task] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self.connections_opened = 0
        self._closed = False

    # -- public ------------------------------------------------------------------------
    async def request(self, origin: Origin, method: str, target: str, headers: Headers,
                      body: bytes | BodyReader | None = None, timeout: float | None = 60.0,
                      body_length: int | None = None) -> UpstreamResponse:
        """Send a request; returns once the response head arrived (body streams after).

        `body` is bytes (sent with the head), a BodyReader (streamed, chunked when
        `body_length` is None), or None. Raises UpstreamError (kind connect / timeout /
        reset / protocol).
        """
        if origin.http2:
            return await self._request_h2(origin, method, target, headers, body, timeout)
        streaming = isinstance(body, BodyReader)
        conn = self._take_idle(origin)
        reused = conn is not None
        if conn is None:
            conn = await self._connect(origin)
        first = True
        while True:
            try:
                return await self._exchange_h1(conn, method, target, headers, body, body_length,
                                               timeout, reused, streaming)
            except UpstreamError as exc:
                if not first or streaming or not may_resend(exc, method):
                    raise
            first = reused = False
            conn = await self._connect(origin)     # the one retry: on a fresh connection

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conns in self._idle.values():
            for c in conns:
                c.abort()
        self._idle.clear()
        for h2 in self._h2.values():
            try:
                h2.close()
            except Exception:
                pass
        self._h2.clear()
        for task in list(self._h2_connecting.values()):
            task.cancel()

    # -- HTTP/1.1 ------------------------------------------------------------------------
    def _exchange_h1(self, conn: H1ClientConnection, method, target, headers, body,
                     body_length, timeout, reused, streaming):
        """Send on conn; returns the awaitable of its response (once the head arrived).
        Every failure between here and the head aborts conn. (A plain function around
        one coroutine, `_head`, with UpstreamResponse.wait_head inline: two coroutines
        per request were one more than needed, callgrind.)"""
        try:
            resp = conn.send(method, target, headers, None if streaming else body,
                             streaming, body_length, reused)
        except (OSError, RuntimeError) as exc:
            conn.abort()
            # nothing was written: safe to send again whatever the method
            raise UpstreamError("reset", f"upstream write failed: {exc}", retryable=reused) from None
        except BaseException:
            conn.abort()     # e.g. a header value that is not latin-1: never leak the socket
            raise
        pump = None
        if streaming:
            pump = asyncio.get_running_loop().create_task(self._pump(conn, body, body_length))
        return self._head(conn, resp, pump, timeout)

    @staticmethod
    async def _head(conn: H1ClientConnection, resp: UpstreamResponse, pump, timeout) -> UpstreamResponse:
        fut = resp._head          # (UpstreamResponse.wait_head, inline: per request)
        try:
            if fut.done():
                fut.result()
            elif timeout:
                deadlines = conn.deadlines
                deadlines.add(fut, timeout)
                try:
                    await fut
                finally:
                    deadlines.discard(fut)
            else:
                await fut
        except BaseException:
            # UpstreamError from the connection (already closed or closing), a timeout,
            # a cancellation: in every case this connection is done.
            conn.abort()
            if pump is not None:
                pump.cancel()
            raise
        return resp

    async def _pump(self, conn: H1ClientConnection, body: BodyReader, length: int | None) -> None:
        """Copy a streamed request body; with a declared length, exactly that many bytes."""
        sent = 0
        try:
            while True:
                chunk = await body.read()
                if not chunk:
                    break
                if length is None:
                    await conn.write_body(chunk)
                    continue
                sent += len(chunk)
                if sent > length:
                    # More than the head announced: the rest would be parsed as another request.
                    raise BodyAborted("request body longer than its Content-Length")
                await conn.write_raw(chunk)
            if length is not None and sent != length:
                raise BodyAborted("request body shorter than its Content-Length")
            conn.end_body(chunked=length is None)
        except (BodyAborted, ConnectionError, OSError):
            conn.abort()   # the client went away mid-upload: the upstream must not see a complete request

    def _take_idle(self, origin: Origin) -> H1ClientConnection | None:
        conns = self._idle.get(origin.key)
        while conns:
            conn = conns.pop()
            # conn.usable without the property call (per request, callgrind); an idle
            # connection has no response in flight.
            t = conn.transport
            if not conn._closed and t is not None and not t.is_closing():
                return conn
        return None

    def _release(self, conn: H1ClientConnection) -> None:
        # (The connection hands itself back only while usable: H1ClientConnection._finish.)
        if self._closed:
            conn.abort()
            return
        conns = self._idle.setdefault(conn.origin.key, [])
        if len(conns) >= self.max_idle:
            conn.abort()
            return
        conn.last_used = time.monotonic()
        conns.append(conn)
        if self._sweeper is None:
            self._schedule_sweep()

    async def _connect(self, origin: Origin) -> H1ClientConnection:
        loop = asyncio.get_running_loop()
        start = time.monotonic()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: H1ClientConnection(origin, self._release), origin.host, origin.port,
                    ssl=origin.ssl_context(),
                    server_hostname=origin.server_name if origin.tls else None),
                origin.connect_timeout)
        except asyncio.TimeoutError:
            raise UpstreamError("connect", f"connect to {origin.authority} timed out") from None
        except OSError as exc:
            raise UpstreamError("connect", f"connect to {origin.authority} failed: {exc.strerror or exc}") from None
        self.connections_opened += 1
        if self.metrics is not None:
            self.metrics.upstream_connect(origin.authority, time.monotonic() - start)
        return conn

    def _schedule_sweep(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(max(1.0, self.idle_timeout / 2), self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        cutoff = time.monotonic() - self.idle_timeout
        remaining = 0
        for key, conns in list(self._idle.items()):
            keep = []
            for c in conns:
                if c.usable and c.last_used >= cutoff:
                    keep.append(c)
                else:
                    c.abort()
            if keep:
                self._idle[key] = keep
                remaining += len(keep)
            else:
                del self._idle[key]
        if remaining and not self._closed:
            self._schedule_sweep()

    # -- HTTP/2 ------------------------------------------------------------------------
    async def _request_h2(self, origin, method, target, headers, body, timeout) -> UpstreamResponse:
        replayable = not isinstance(body, BodyReader)
        for attempt in (0, 1):
            conn = await self._h2_connection(origin)
            try:
                return await conn.request(method, target, headers, body, timeout=timeout)
            except UpstreamError as exc:
                if not conn.usable:
                    self._h2.pop(origin.key, None)
                if attempt == 0 and replayable and may_resend(exc, method):
                    continue   # refused, or above the GOAWAY's last stream id: never processed
                raise
        raise AssertionError("unreachable")

    async def _h2_connection(self, origin):
        conn = self._h2.get(origin.key)
        if conn is not None and conn.usable:
            return conn
        pending = self._h2_connecting.get(origin.key)
        if pending is None:
            # The connect belongs to the pool, not to the first caller: a caller that
            # gives up (its deadline, its client gone) must not fail the others waiting.
            pending = asyncio.get_running_loop().create_task(self._open_h2(origin))
            pending.add_done_callback(_retrieve)
            self._h2_connecting[origin.key] = pending
        return await asyncio.shield(pending)

    async def _open_h2(self, origin):
        try:
            conn = await connect_h2(origin, self.metrics)
            self._h2[origin.key] = conn
            self.connections_opened += 1
            return conn
        finally:
            self._h2_connecting.pop(origin.key, None)


def _retrieve(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()     # retrieved: the waiters re-raise it, nobody else needs to


# RFC 9110 §9.2.2: the methods whose repetition has the effect of one request.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


def may_resend(exc: UpstreamError, method: str) -> bool:
    """Whether a failed request may be sent once more (its body being replayable)."""
    return exc.retryable and (not exc.maybe_processed or method in IDEMPOTENT_METHODS)


_pools: PerLoop[Pool] = PerLoop(Pool)


def get_pool() -> Pool:
    """The running event loop's pool (connections belong to one loop)."""
    return _pools.get()


def set_pool(pool: Pool) -> None:
    _pools.set(pool)
