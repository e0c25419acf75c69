"""HTTP/1.1 client connection (httptools' llhttp parser), one request at a time.

Theory of operation: `send()` writes a request head (and the body when it is
already in memory) in one write and returns an `UpstreamResponse` whose head is
awaited with `wait_head()`; parser callbacks fill it in and feed its `BodyReader`,
which pauses the socket when the proxy is slower than the upstream. When a
response is complete and both sides allow keep-alive, the connection goes back to
the pool (`on_idle`). The request target is written byte for byte as given:
nothing here decodes or normalises a path (AgentCore's SigV4 depends on that).

What an upstream cannot make it do: the head always carries exactly one framing
header, chosen here from how the body is sent (callers pass headers without
framing), so a body is never parsed as a second request; a response head is capped
(MAX_RESPONSE_HEAD_BYTES, MAX_RESPONSE_HEADERS → UpstreamError, 502); bytes with no
request in flight (a stray response on an idle connection, or a second response
after the one asked for) close the connection instead of being parsed into the
next request's response.

httptools instead of h11: measured on this machine, an h11 relay did a quarter of
what the same relay did with httptools; this is the hot path.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

import httptools

from agproxy.http.flow import WriteFlowControl
from agproxy.http.messages import FIELD_NAMES, BodyAborted, BodyReader, Headers, field_name
from agproxy.upstream.errors import UpstreamError, UpstreamTimeout
from agproxy.upstream.origin import set_nodelay
from agproxy.upstream.per_loop import PerLoop


class UpstreamResponse:
    """A response from an upstream; `body.read()` streams it, `body.trailers` after EOF."""

    __slots__ = ("status", "headers", "body", "_head", "_conn")

    def __init__(self, conn, body: BodyReader):
        self.status = 0
        self.headers = Headers()
        self.body = body
        self._head: asyncio.Future = asyncio.get_running_loop().create_future()
        self._conn = conn

    async def wait_head(self, timeout: float | None) -> None:
        fut = self._head
        if fut.done():
            return fut.result()
        if not timeout:
            return await fut
        deadlines = self._conn.deadlines      # the connection's loop's (no per-loop lookup)
        deadlines.add(fut, timeout)
        try:
            await fut
        finally:
            deadlines.discard(fut)

    def abort(self) -> None:
        """Give up on this response: the connection cannot be reused."""
        if self._conn.response is self:
            self._conn.abort()


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(UpstreamTimeout())


class HeadDeadlines:
    """Response-head timeouts of one event loop, checked by one periodic sweep.

    Every upstream response waits here, HTTP/1.1 and HTTP/2 alike. A timer per
    request (call_later, then cancel) cost ~5k instructions of the ~245k a relayed
    HTTP/1.1 request costs (callgrind); a dict entry costs a few hundred. The sweep runs every `resolution` seconds while anything waits, so a
    timeout fires at most that much late.
    """

    __slots__ = ("waiting", "resolution", "_timer")

    def __init__(self, resolution: float = 0.05):
        self.waiting: dict[asyncio.Future, float] = {}
        self.resolution = resolution
        self._timer: asyncio.TimerHandle | None = None

    def add(self, fut: asyncio.Future, timeout: float) -> None:
        self.waiting[fut] = time.monotonic() + timeout
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.resolution, self._sweep)

    def _sweep(self) -> None:
        now = time.monotonic()
        waiting = self.waiting
        for fut in [f for f, deadline in waiting.items() if deadline <= now]:
            del waiting[fut]
            _expire(fut)
        self._timer = (asyncio.get_running_loop().call_later(self.resolution, self._sweep)
                       if waiting else None)

    def discard(self, fut: asyncio.Future) -> None:
        self.waiting.pop(fut, None)


_deadlines: PerLoop[HeadDeadlines] = PerLoop(HeadDeadlines)
head_deadlines = _deadlines.get    # the running loop's HeadDeadlines


# Response head limits (as Envoy's defaults: ~64 KB, 100 headers; both answer 502 past them).
MAX_RESPONSE_HEAD_BYTES = 65536
MAX_RESPONSE_HEADERS = 100
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _check_head(headers: list[tuple[str, str]]) -> None:
    if len(headers) > MAX_RESPONSE_HEADERS:
        raise UpstreamError("protocol", "upstream response has too many header fields")
    if sum(len(k) + len(v) + 4 for k, v in headers) > MAX_RESPONSE_HEAD_BYTES:
        raise UpstreamError("protocol", "upstream response head too large")


class _Stray(Exception):
    """Response bytes with no request in flight."""


class H1ClientConnection(WriteFlowControl, asyncio.Protocol):
    write_lost_message = "upstream connection lost"

    __slots__ = ("origin", "transport", "parser", "on_idle", "response", "_headers", "_reused",
                 "_got_bytes", "_keep_alive", "_request_done", "_closed", "write_paused",
                 "_drain_waiters", "_head_only", "_parser_dirty", "last_used", "_name", "_close_delimited",
                 "_in_head", "_head_reads", "deadlines")

    def __init__(self, origin, on_idle: Callable[["H1ClientConnection"], None]):
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.on_idle = on_idle
        self.response: UpstreamResponse | None = None
        self._headers: list[tuple[str, str]] = []
        self._name = b""
        self._reused = False
        self._got_bytes = False
        self._keep_alive = True
        self._request_done = True
        self._closed = False
        self.write_paused = False
        self._drain_waiters: list[asyncio.Future] = []
        self._head_only = False
        self._parser_dirty = False
        self._close_delimited = False
        self._in_head = False          # waiting for the final response head
        self._head_reads = 0           # bytes of the reads that carried this head
        self.last_used = 0.0
        self.deadlines = head_deadlines()   # this loop's (UpstreamResponse.wait_head)

    # -- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        set_nodelay(transport)

    def data_received(self, data: bytes) -> None:
        if self.response is None:
            # Nothing asked: a stray response (or garbage). Parsing it would hand its
            # head and body to the next request on this connection.
            self.abort()
            return
        self._got_bytes = True
        if self._in_head:
            self._head_reads += len(data)     # this read holds (part of) the head
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, UpstreamError):
                self._fail(cause)
            elif not isinstance(cause, _Stray):
                self._fail(UpstreamError("protocol", f"invalid response from upstream: {exc}"))
            self.abort()
            return
        if self._in_head and self._head_reads > MAX_RESPONSE_HEAD_BYTES:
            # Still no complete head: stop before httptools buffers a 20 MB field whole.
            self._fail(UpstreamError("protocol", "upstream response head too large"))
            self.abort()

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        self._closed = True
        resp = self.response
        if resp is not None:
            if not resp._head.done():
                # Nothing of a response came: the request may never have been read (an
                # idle connection the upstream closed), or may have been processed.
                resp._head.set_exception(UpstreamError(
                    "reset", "upstream closed the connection before responding",
                    retryable=self._reused and not self._got_bytes, maybe_processed=True))
            elif not resp.body.complete:
                if self._close_delimited:
                    resp.body.feed_eof()   # the close is the end of this body
                else:
                    resp.body.fail(BodyAborted("upstream closed the connection mid-body"))
        self._fail_drains()

    def _write_closed(self) -> bool:
        return self._closed

    # -- httptools callbacks ------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.response is None:
            raise _Stray()    # a second response after the one we asked for: stop here

    def on_header(self, name: bytes, value: bytes) -> None:
        # field_name() inlined (its table first): one Python call less per header (callgrind).
        self._headers.append((FIELD_NAMES.get(name) or field_name(name), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        resp = self.response
        if resp is None:
            return
        # The head is no larger than the reads it came in: only when those pass the
        # cap are the fields measured (one comparison per response instead of
        # accounting in on_header).
        if self._head_reads > MAX_RESPONSE_HEAD_BYTES or len(self._headers) > MAX_RESPONSE_HEADERS:
            _check_head(self._headers)
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._headers = []   # interim response: wait for the final one (its bytes count)
            return
        self._in_head = False
        resp.status = status
        resp.headers = Headers(self._headers)
        self._headers = []
        keep_alive = self._keep_alive = self.parser.should_keep_alive()
        # llhttp never keeps alive a response delimited by the close: only then are
        # the framing headers looked for (two scans per response otherwise, callgrind).
        h = resp.headers
        self._close_delimited = not keep_alive and "content-length" not in h and "transfer-encoding" not in h
        if not resp._head.done():
            resp._head.set_result(None)
        if self._head_only or status in (204, 304):
            # llhttp would wait for a body the HEAD response never sends.
            self._parser_dirty = self._head_only
            self._finish(resp)

    def on_body(self, data: bytes) -> None:
        resp = self.response
        if resp is not None:
            resp.body.feed(data)

    def on_message_complete(self) -> None:
        resp = self.response
        if resp is not None and resp.status >= 200 and not resp.body.complete:
            self._finish(resp)

    def _finish(self, resp: UpstreamResponse) -> None:
        resp.body.feed_eof()
        self.response = None
        if self._paused_reading_by_body(resp):
            self.transport.resume_reading()
        if self._keep_alive and self._request_done and not self._closed and not self.transport.is_closing():
            self.on_idle(self)     # (usable: the pool does not check again)
        else:
            self.abort()

    @staticmethod
    def _paused_reading_by_body(resp: UpstreamResponse) -> bool:
        return resp.body._paused

    def _fail(self, exc: BaseException) -> None:
        resp = self.response
        if resp is None:
            return
        if not resp._head.done():
            resp._head.set_exception(exc)
        else:
            resp.body.fail(BodyAborted(str(exc)))

    # -- requests ---------------------------------------------------------------------
    @property
    def usable(self) -> bool:
        return not self._closed and self.response is None and self.transport is not None \
            and not self.transport.is_closing()

    def send(self, method: str, target: str, headers: Headers, body: bytes | None = None,
             stream: bool = False, length: int | None = None, reused: bool = False) -> UpstreamResponse:
        """Write the request head, with exactly one framing header, and an in-memory body.

        `headers` carry no framing of their own (content-length, transfer-encoding):
        the callers build them without (backends/relay.py drops them, policies may not
        set them); the one framing header is written here. `stream`: the body follows
        through write_body / write_raw + end_body, framed with `content-length: length`
        when the length is known, chunked otherwise. Without a body, POST/PUT/PATCH
        say `content-length: 0` (RFC 9110 §8.6).
        """
        if self._parser_dirty:
            self.parser = httptools.HttpResponseParser(self)
            self._parser_dirty = False
        transport = self.transport
        lines = []
        for k, v in headers.items:
            lines.append(f"{k}: {v}\r\n")
        fields = "".join(lines)
        if stream:
            framing = "transfer-encoding: chunked\r\n" if length is None else f"content-length: {length}\r\n"
        elif body:
            framing = f"content-length: {len(body)}\r\n"
        else:
            framing = "content-length: 0\r\n" if method in _BODY_METHODS else ""
        # encoded before any state changes: a value outside latin-1 raises here
        head = f"{method} {target} HTTP/1.1\r\n{fields}{framing}\r\n".encode("latin-1")
        self._reused = reused
        self._got_bytes = False
        self._head_only = method == "HEAD"
        self._keep_alive = True
        self._request_done = not stream
        self._in_head = True
        self._head_reads = 0
        reader = BodyReader(transport.pause_reading, transport.resume_reading)
        resp = self.response = UpstreamResponse(self, reader)
        transport.write(head + body if body and not stream else head)
        return resp

    async def write_body(self, data: bytes) -> None:
        """One chunk of a streaming (chunked) request body."""
        if self._closed:
            raise ConnectionResetError("upstream connection lost")
        if data:
            self.transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        await self.drain()

    async def write_raw(self, data: bytes) -> None:
        """Bytes of a streaming body whose Content-Length the head declared."""
        if self._closed:
            raise ConnectionResetError("upstream connection lost")
        self.transport.write(data)
        await self.drain()

    def end_body(self, chunked: bool = True) -> None:
        if chunked and not self._closed:
            self.transport.write(b"0\r\n\r\n")
        self._request_done = True
        if self.response is None and self._keep_alive and not self._closed and not self.transport.is_closing():
            self.on_idle(self)

    def abort(self) -> None:
        self._closed = True
        if self.transport is not None:
            self.transport.abort()
