"""HTTP/2 client connection to an upstream: one multiplexed connection per origin.

Theory of operation: `connect_h2` opens TCP (+ TLS with ALPN h2, or h2c prior
knowledge for http:// origins), sends the preface and our SETTINGS, and returns
once the server's SETTINGS arrived (so its MAX_CONCURRENT_STREAMS is known
before the first request); all of that within `origin.connect_timeout`, else
UpstreamError("connect"). The pool shares the connection between requests.

The protocol engine is `ClientCodec` (http/h2_frames.py), the same hand-written
RFC 9113 codec as the server side, in client mode: frames in, callbacks out
(`on_headers`, `on_data`, `on_end`, `on_reset`, `on_window`, `on_settings`,
`on_goaway`, `on_stream_error` below), frames out appended to one buffer that
is written once per data_received / per event-loop turn (`BatchedOutput`). It
answers PING, ACKs SETTINGS, and closes the connection (GOAWAY) on what the
upstream can make us do without limit: acknowledgements piling up while it
reads nothing, header blocks over MAX_RESPONSE_HEAD × 4 or spread over too many
CONTINUATION frames, HPACK table sizes above ours, PUSH_PROMISE. It replaced the
h2 library here (with the private-API overrides that needed): see
benchmarks/results/h2.md for the cost per request.

`request()` waits for a stream slot (never more open streams than the server
allows; waiters are served in order, within the request's timeout), sends the
head — and a body already in memory, when the windows allow, in the same write
— and returns once the response head arrived (`timeout` → UpstreamTimeout, the
stream is cancelled; the deadline is the shared per-loop sweep of upstream/h1.py).
Interim 1xx heads are skipped. A streamed request body (BodyReader) is pumped
by a task that respects the server's flow-control windows and the socket's
write buffer; if the client goes away mid-upload the stream is reset, so the
upstream never sees a truncated body as complete.

Response bodies stream into a BodyReader whose pause/resume hooks withhold the
WINDOW_UPDATE for that stream (acknowledged as received otherwise), so a slow
client slows only its own stream on the shared connection. Trailers end up in
`body.trailers` (gRPC status). A response head is checked as a proxy needs it
before it reaches an HTTP/1.1 client: one `:status` (2xx-9xx final, 1xx
interim), no other pseudo-header, lowercase token names, no connection-specific
field, no CR/LF/NUL in values, at most MAX_RESPONSE_HEAD bytes (RFC 9113 §4.3
accounting); anything else resets that stream (PROTOCOL_ERROR) and is a 502.

Failure semantics: RST_STREAM before the head → UpstreamError("reset"),
retryable when the server says REFUSED_STREAM; after the head → the body fails
with BodyAborted. GOAWAY: the connection stops taking requests (`usable` is
false, the pool opens a new one); streams above the server's last stream id fail
as retryable, the others finish. A connection error (ours or the peer's) and
connection loss fail whatever is in flight (UpstreamError before a head,
BodyAborted after).
"""

from __future__ import annotations

import asyncio
import collections
import time

from agproxy.http import h2_frames as fr
from agproxy.http.flow import WriteFlowControl
from agproxy.http.h2 import (BatchedOutput, CONNECTION_SPECIFIC, MAX_CONN_WINDOW, MAX_STREAM_WINDOW,
                             field_ok, name_bytes, parse_length)
from agproxy.http.h2_frames import ClientCodec, ConnectionFailed, H2Error, error_name
from agproxy.http.messages import BodyAborted, BodyReader, Headers
from agproxy.upstream.errors import UpstreamError, UpstreamTimeout
from agproxy.upstream.origin import set_nodelay
from agproxy.upstream.h1 import UpstreamResponse, head_deadlines

__all__ = ["connect_h2", "H2ClientConnection", "H2Response"]

_NO_ERROR = fr.NO_ERROR
_CANCEL = fr.CANCEL
_PROTOCOL_ERROR = fr.PROTOCOL_ERROR
_REFUSED_STREAM = fr.REFUSED_STREAM

#: response bytes buffered per stream before its window is withheld
BODY_HIGH_WATER = 256 * 1024
#: a response head (or trailers) larger than this resets its stream (RFC 9113 §4.3 sizes)
MAX_RESPONSE_HEAD = 64 * 1024
#: interim (1xx) heads accepted before the final one
MAX_INTERIM_HEADS = 16
#: the last stream id we open before retiring the connection (ids are 31-bit, odd)
_MAX_STREAM_ID = 2**31 - 1 - 1000
_CONNECTION_SPECIFIC_B = frozenset(n.encode() for n in CONNECTION_SPECIFIC)


async def connect_h2(origin, metrics=None) -> "H2ClientConnection":
    """A ready connection (server SETTINGS received); UpstreamError("connect") otherwise."""
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    deadline = start + origin.connect_timeout
    conn: H2ClientConnection | None = None
    try:
        _, conn = await asyncio.wait_for(
            loop.create_connection(
                lambda: H2ClientConnection(origin), origin.host, origin.port,
                ssl=origin.ssl_context(),
                server_hostname=origin.server_name if origin.tls else None),
            origin.connect_timeout)
        await asyncio.wait_for(asyncio.shield(conn.ready), max(0.001, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        if conn is not None:
            conn.close()
        raise UpstreamError("connect", f"HTTP/2 connect to {origin.authority} timed out") from None
    except OSError as exc:
        if conn is not None:
            conn.close()
        raise UpstreamError("connect", f"connect to {origin.authority} failed: {exc.strerror or exc}") from None
    except UpstreamError:
        if conn is not None:
            conn.close()
        raise
    if metrics is not None:
        metrics.upstream_connect(origin.authority, time.monotonic() - start)
    return conn


class H2Response(UpstreamResponse):
    """UpstreamResponse of one HTTP/2 stream; `abort()` resets only that stream."""

    __slots__ = ("_stream", "http_version")

    def __init__(self, stream: "_ClientStream"):
        super().__init__(stream.conn, stream.body)
        self._stream = stream
        self.http_version = "2"

    def abort(self) -> None:
        self._stream.cancel(_CANCEL)


class _ClientStream:
    __slots__ = ("conn", "stream_id", "body", "response", "head_only", "local_ended", "remote_ended",
                 "closed", "pump", "head_done", "_paused", "_unacked", "_waiter", "_expected",
                 "_received", "_trailers", "_interim")

    def __init__(self, conn: "H2ClientConnection", stream_id: int, head_only: bool):
        self.conn = conn
        self.stream_id = stream_id
        self.head_only = head_only
        self.body = BodyReader(self._pause, self._resume, BODY_HIGH_WATER)
        self.response: H2Response | None = None
        self.local_ended = False
        self.remote_ended = False
        self.closed = False
        self.pump: asyncio.Task | None = None
        self.head_done = False          # the final (non-1xx) head arrived
        self._paused = False
        self._unacked = 0
        self._waiter: asyncio.Future | None = None
        self._expected: int | None = None
        self._received = 0
        self._trailers: Headers | None = None
        self._interim = 0

    # flow control of the response body
    def _pause(self) -> None:
        self._paused = True

    def _resume(self) -> None:
        self._paused = False
        n = self._unacked
        if n and not self.closed:
            self._unacked = 0
            conn = self.conn
            conn.h2.ack(n, self.stream_id)
            conn._schedule_flush()

    def return_window(self) -> None:
        """DATA withheld while paused still counts against the connection window: hand it
        back once the stream is over (the stream's own window no longer matters)."""
        n = self._unacked
        conn = self.conn
        if n and conn.transport is not None and not conn._closed:
            self._unacked = 0
            conn.h2.ack(n, self.stream_id)
            conn._schedule_flush()

    def _wake(self, exc: BaseException | None = None) -> None:
        w = self._waiter
        if w is not None and not w.done():
            if exc is None:
                w.set_result(None)
            else:
                w.set_exception(exc)

    def fail(self, exc: BaseException, head_exc: BaseException | None = None) -> None:
        """The stream is over without a complete response."""
        if self.closed:
            return
        self.closed = True
        self.return_window()
        resp = self.response
        if resp is not None and not resp._head.done():
            resp._head.set_exception(head_exc or UpstreamError("reset", str(exc)))
        self.body.fail(BodyAborted(str(exc)))
        self._wake(ConnectionResetError(str(exc)))
        p = self.pump
        if p is not None and not p.done() and p is not _current_task():
            p.cancel()
        self.conn._release(self)

    def cancel(self, code: int, head_exc: BaseException | None = None) -> None:
        """Give up on the stream (timeout, the client went away, a malformed response):
        RST_STREAM with `code`."""
        if self.closed:
            return
        conn = self.conn
        if conn.transport is not None and not conn._closed:
            conn.h2.reset_stream(self.stream_id, code)
            conn._schedule_flush()
        self.fail(ConnectionResetError("stream cancelled"), head_exc)


def _current_task():
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


def request_block(method: str, target: str, headers: Headers, scheme: str, default_authority: str) -> list:
    """Pseudo-headers first, then the fields HTTP/2 allows (Host → :authority)."""
    authority = None
    fields = []
    for k, v in headers.items:
        if k == "host":
            if authority is None:
                authority = v
            continue
        if k in CONNECTION_SPECIFIC:
            continue
        if k == "te":
            if "trailers" in v.lower():
                fields.append((b"te", b"trailers"))
            continue
        fields.append((name_bytes(k), v.encode("latin-1")))
    out = [(b":method", method.encode("ascii")), (b":scheme", scheme.encode("ascii")),
           (b":authority", (authority or default_authority).encode("latin-1")),
           (b":path", (target or "/").encode("latin-1"))]
    out += fields
    return out


class _Malformed(Exception):
    """A response head or trailers a proxy must not pass on."""


# Names seen so far → decoded str. Bounded; only names that validate are cached.
_NAMES: dict[bytes, str] = {}


def _name(n: bytes, v: bytes) -> str:
    """The field's name as str; raises _Malformed (see the module docstring)."""
    name = _NAMES.get(n)
    if name is None:
        if not field_ok(n, v) or n in _CONNECTION_SPECIFIC_B:
            raise _Malformed(f"invalid response field {n[:64]!r}")
        name = n.decode("latin-1")
        if len(_NAMES) < 4096:
            _NAMES[n] = name
    elif b"\r" in v or b"\n" in v or b"\x00" in v:
        raise _Malformed("invalid response field value")
    return name


def _response_head(block) -> tuple[int, list, int | None]:
    """(status, fields, content-length or None) of a response header block."""
    status = 0
    items = []
    size = 0
    length = None
    for n, v in block:
        size += len(n) + len(v) + 32
        if n[:1] == b":":
            if n != b":status" or status or items:
                raise _Malformed("misplaced, repeated or unknown pseudo-header")
            if len(v) != 3 or not v.isdigit():
                raise _Malformed("invalid :status")
            status = int(v)
            continue
        name = _name(n, v)
        value = v.decode("latin-1")
        if name == "content-length":
            cl = parse_length(value)
            if cl is None or (length is not None and cl != length):
                raise _Malformed("invalid content-length")
            length = cl
        items.append((name, value))
    if not 100 <= status <= 999:
        raise _Malformed("missing or invalid :status")
    if size > MAX_RESPONSE_HEAD:
        raise _Malformed(f"response head over {MAX_RESPONSE_HEAD} bytes")
    return status, items, length


def _trailer_fields(block) -> list:
    items = []
    size = 0
    for n, v in block:
        size += len(n) + len(v) + 32
        if n[:1] == b":":
            raise _Malformed("pseudo-header in trailers")
        items.append((_name(n, v), v.decode("latin-1")))
    if size > MAX_RESPONSE_HEAD:
        raise _Malformed(f"trailers over {MAX_RESPONSE_HEAD} bytes")
    return items


class H2ClientConnection(BatchedOutput, WriteFlowControl, asyncio.Protocol):
    """One HTTP/2 connection to an upstream origin, shared by concurrent requests."""

    write_lost_message = "upstream connection lost"

    def __init__(self, origin):
        self.origin = origin
        self.loop = asyncio.get_event_loop()
        self.deadlines = head_deadlines()     # this loop's (UpstreamResponse.wait_head)
        self.transport: asyncio.Transport | None = None
        self.h2 = ClientCodec(self, stream_window=MAX_STREAM_WINDOW, conn_window=MAX_CONN_WINDOW,
                              max_header_list=MAX_RESPONSE_HEAD)
        # HPACK must decode whatever arrives to keep its table in step: this bounds memory
        # (beyond it, a connection error); MAX_RESPONSE_HEAD is checked per stream.
        self.h2.decoder.max_header_list_size = 4 * MAX_RESPONSE_HEAD
        self.streams: dict[int, _ClientStream] = {}
        self.ready: asyncio.Future = self.loop.create_future()
        self._active = 0                      # streams counted against the server's limit
        self._slot_waiters: collections.deque[asyncio.Future] = collections.deque()
        self._goaway = False
        self._closed = False
        self.write_paused = False
        self._drain_waiters: list[asyncio.Future] = []
        self._flush_handle: asyncio.Handle | None = None
        self._queued_bytes = 0
        self._in_receive = False
        self.last_used = time.monotonic()

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        set_nodelay(transport)
        if self.origin.tls:
            sslobj = transport.get_extra_info("ssl_object")
            alpn = sslobj.selected_alpn_protocol() if sslobj is not None else None
            if alpn != "h2":
                self._set_ready_error(UpstreamError(
                    "connect", f"{self.origin.authority} did not negotiate HTTP/2 (ALPN {alpn!r})"))
                self._closed = True
                transport.close()
                return
        self.h2.initiate()
        self._flush_now()

    def pause_writing(self) -> None:
        super().pause_writing()
        self.h2.output_blocked = True

    def resume_writing(self) -> None:
        self.h2.output_blocked = False
        self.h2.acks_while_blocked = 0
        super().resume_writing()

    def data_received(self, data: bytes) -> None:
        self._in_receive = True
        try:
            self.h2.receive(data)
        except ConnectionFailed as exc:
            # The codec queued GOAWAY with the error code: send it, fail everything, close.
            self._in_receive = False
            err = UpstreamError("protocol", f"HTTP/2 protocol error from {self.origin.authority}: {exc}")
            self._set_ready_error(err)
            self._fail_all(err)
            self._flush_now()
            self._closed = True
            t = self.transport
            if t is not None:
                # An upstream that reads nothing would keep a graceful close waiting.
                t.abort() if self.write_paused else t.close()
            return
        finally:
            self._in_receive = False
        self._flush_now()

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        self._closed = True
        self._set_ready_error(UpstreamError(
            "connect", f"{self.origin.authority} closed the connection during HTTP/2 setup"))
        self._fail_all(UpstreamError("reset", f"upstream {self.origin.authority} closed the connection"))
        self._fail_drains()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self.transport = None

    # -- codec callbacks (h2_frames.ClientCodec) -------------------------------------------------
    def on_settings(self) -> None:
        if self._slot_waiters:
            self._grant_slots()
        if not self.ready.done():
            self.ready.set_result(None)

    def on_headers(self, sid: int, block: list, ended: bool) -> None:
        s = self.streams.get(sid)
        if s is None:
            return
        if s.head_done:
            if not ended:
                s.cancel(_PROTOCOL_ERROR)     # a second head, or trailers without END_STREAM
                return
            try:
                s._trailers = Headers(_trailer_fields(block))
            except _Malformed as exc:
                # a field that would be a header injection downstream
                s.cancel(_PROTOCOL_ERROR, UpstreamError("protocol", str(exc)))
            return
        resp = s.response
        try:
            status, items, length = _response_head(block)
            if status < 200:
                if status == 101 or ended:
                    raise _Malformed(f"interim response {status} not allowed here")
                s._interim += 1
                if s._interim > MAX_INTERIM_HEADS:
                    raise _Malformed("too many interim responses")
                return
        except _Malformed as exc:
            s.cancel(_PROTOCOL_ERROR, UpstreamError("protocol", f"malformed response head from upstream: {exc}"))
            return
        s.head_done = True
        s._expected = 0 if s.head_only or status in (204, 304) else length
        resp.status = status
        resp.headers = Headers(items)
        if not resp._head.done():
            resp._head.set_result(None)

    def on_data(self, sid: int, data: bytes, flow: int) -> None:
        h = self.h2
        s = self.streams.get(sid)
        if s is None:
            h.ack(flow, sid)
            return
        if not s.head_done:
            h.ack(flow, sid)
            s.cancel(_PROTOCOL_ERROR, UpstreamError("protocol", "upstream sent DATA before a response head"))
            return
        s._received += len(data)
        if s._expected is not None and s._received > s._expected:
            h.ack(flow, sid)
            s.cancel(_PROTOCOL_ERROR)
            return
        if data:
            s.body.feed(data)
        if s._paused:
            s._unacked += flow
        else:
            h.ack(flow, sid)

    def on_end(self, sid: int) -> None:
        s = self.streams.get(sid)
        if s is None:
            return
        s.remote_ended = True
        if not s.head_done:
            s.cancel(_PROTOCOL_ERROR, UpstreamError("protocol", "upstream ended the stream without a response"))
            return
        if s._expected is not None and s._received != s._expected:
            s.cancel(_PROTOCOL_ERROR)    # shorter than its content-length
            return
        s.body.feed_eof(s._trailers)
        if not s.local_ended:
            # Answered before the request body was complete: stop sending it (RFC 9113 §8.1).
            p = s.pump
            if p is not None and not p.done():
                p.cancel()
            self.h2.reset_stream(sid, _NO_ERROR)
            s.local_ended = True
        self._maybe_done(s)

    def on_reset(self, sid: int, code: int) -> None:
        s = self.streams.get(sid)
        if s is None:
            return
        msg = f"upstream reset the stream ({error_name(code)})"
        s.fail(BodyAborted(msg), UpstreamError("reset", msg, retryable=code == _REFUSED_STREAM))

    def on_stream_error(self, sid: int, code: int) -> None:
        s = self.streams.get(sid)
        if s is not None:
            s.cancel(code, UpstreamError("protocol", f"HTTP/2 stream error ({error_name(code)})"))

    def on_window(self, sid: int) -> None:
        if sid:
            s = self.streams.get(sid)
            if s is not None and s._waiter is not None:
                s._wake()
        else:
            self._wake_all()

    def on_goaway(self, code: int, last_stream_id: int) -> None:
        self._goaway = True
        err = UpstreamError("reset", f"upstream {self.origin.authority} is going away (GOAWAY "
                                     f"{error_name(code)})", retryable=True)
        for s in list(self.streams.values()):
            if s.stream_id > last_stream_id:
                self.h2.streams.pop(s.stream_id, None)    # never processed: closed, no RST (§6.8)
                s.fail(BodyAborted(str(err)), err)
        self._fail_waiters(err)
        if not self.streams:
            self.close()

    # -- streams ----------------------------------------------------------------------------
    @property
    def usable(self) -> bool:
        return (not self._closed and not self._goaway and self.transport is not None
                and not self.transport.is_closing()
                and self.h2.next_stream_id < _MAX_STREAM_ID)

    @property
    def idle(self) -> bool:
        return not self.streams

    def _limit(self) -> int:
        return self.h2.remote_settings.max_concurrent_streams

    async def _acquire_slot(self, timeout: float | None) -> None:
        if self._active < self._limit() and not self._slot_waiters:
            self._active += 1
            return
        fut = self.loop.create_future()
        self._slot_waiters.append(fut)
        try:
            if timeout:
                await asyncio.wait_for(fut, timeout)
            else:
                await fut
        except asyncio.TimeoutError:
            raise UpstreamTimeout(f"no free HTTP/2 stream on {self.origin.authority} in time") from None
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._active -= 1     # granted just as we gave up: hand it on
                self._grant_slots()
            else:
                try:
                    self._slot_waiters.remove(fut)
                except ValueError:
                    pass
            raise

    def _grant_slots(self) -> None:
        waiters = self._slot_waiters
        limit = self._limit()
        while waiters and self._active < limit:
            fut = waiters.popleft()
            if not fut.done():
                self._active += 1
                fut.set_result(None)

    def _fail_waiters(self, exc: BaseException) -> None:
        while self._slot_waiters:
            fut = self._slot_waiters.popleft()
            if not fut.done():
                fut.set_exception(exc)

    def _release(self, s: _ClientStream) -> None:
        if self.streams.pop(s.stream_id, None) is not None:
            self._active -= 1
            self.last_used = time.monotonic()
            if self._slot_waiters:
                self._grant_slots()
            if self._goaway and not self.streams:
                self.close()

    def _maybe_done(self, s: _ClientStream) -> None:
        if s.local_ended and s.remote_ended and not s.closed:
            s.closed = True
            s.return_window()
            self._release(s)

    async def request(self, method: str, target: str, headers: Headers,
                      body: bytes | BodyReader | None = None, *, timeout: float | None = None) -> H2Response:
        """Send a request; returns once the response head arrived (the body streams after)."""
        if not self.usable:
            raise UpstreamError("reset", f"HTTP/2 connection to {self.origin.authority} is closing",
                                retryable=True)
        start = time.monotonic() if timeout else 0.0
        await self._acquire_slot(timeout)
        if not self.usable:
            self._active -= 1
            self._grant_slots()
            raise UpstreamError("reset", f"HTTP/2 connection to {self.origin.authority} is closing",
                                retryable=True)
        h = self.h2
        sid = h.open_stream()
        s = _ClientStream(self, sid, method == "HEAD")
        resp = s.response = H2Response(s)
        self.streams[sid] = s
        block = request_block(method, target, headers, self.origin.scheme, self.origin.authority)
        try:
            if body is None or (not isinstance(body, BodyReader) and not body):
                h.send_headers(sid, block, end_stream=True)
                s.local_ended = True
            elif isinstance(body, BodyReader):
                h.send_headers(sid, block)
                s.pump = self.loop.create_task(self._pump(s, body))
            else:
                if not any(k == b"content-length" for k, _ in block):
                    block.append((b"content-length", str(len(body)).encode()))
                h.send_headers(sid, block)
                if not self._send_now(s, body):
                    s.pump = self.loop.create_task(self._send_bytes(s, body))
        except H2Error as exc:
            h.streams.pop(sid, None)    # nothing of it reached the wire
            s.fail(BodyAborted(str(exc)))
            raise UpstreamError("protocol", f"could not send the request: {exc}") from None
        self._schedule_flush()
        remaining = None
        if timeout:
            remaining = max(0.001, timeout - (time.monotonic() - start))
        try:
            await resp.wait_head(remaining)
        except (UpstreamError, asyncio.CancelledError):
            s.cancel(_CANCEL)
            raise
        return resp

    # -- request bodies ---------------------------------------------------------------------
    def _send_now(self, s: _ClientStream, data: bytes) -> bool:
        """Send a whole in-memory body if the windows allow it (the common case)."""
        h = self.h2
        n = len(data)
        if n > h.send_window(s.stream_id):
            return False
        mfs = h.max_outbound_frame_size
        if n <= mfs:
            h.send_data(s.stream_id, data, end_stream=True)
        else:
            view = memoryview(data)
            for pos in range(0, n, mfs):
                h.send_data(s.stream_id, view[pos:pos + mfs], end_stream=pos + mfs >= n)
        s.local_ended = True
        return True

    async def _send(self, s: _ClientStream, data: bytes) -> None:
        h = self.h2
        sid = s.stream_id
        total = len(data)
        pos = 0
        view = memoryview(data) if total > 0 else None
        while pos < total:
            if s.closed or self._closed:
                raise ConnectionResetError("stream closed")
            window = h.send_window(sid)
            if window <= 0:
                # No deadline of its own: before the head, the request's timeout cancels
                # the stream (and so this wait); after it, the response's end does.
                self._flush_now()
                s._waiter = self.loop.create_future()
                try:
                    await s._waiter
                finally:
                    s._waiter = None
                continue
            size = min(total - pos, window, h.max_outbound_frame_size)
            h.send_data(sid, view[pos:pos + size])
            pos += size
            self._queued(size)
        if self.write_paused:
            await self.drain()

    async def _send_bytes(self, s: _ClientStream, data: bytes) -> None:
        try:
            await self._send(s, data)
            self._end_request(s, None)
        except (ConnectionError, OSError, H2Error):
            s.cancel(_CANCEL)

    async def _pump(self, s: _ClientStream, reader: BodyReader) -> None:
        try:
            while True:
                chunk = await reader.read()
                if not chunk:
                    break
                await self._send(s, chunk)
            self._end_request(s, reader.trailers)
        except (BodyAborted, ConnectionError, OSError, H2Error):
            # The client went away mid-upload: the upstream must not see a complete request.
            s.cancel(_CANCEL)

    def _end_request(self, s: _ClientStream, trailers: Headers | None) -> None:
        if s.closed or s.local_ended:
            return
        h = self.h2
        if trailers:
            h.send_headers(s.stream_id, [(name_bytes(k), v.encode("latin-1")) for k, v in trailers.items
                                         if k not in CONNECTION_SPECIFIC], end_stream=True)
        else:
            h.end_stream(s.stream_id)
        s.local_ended = True
        self._schedule_flush()
        self._maybe_done(s)

    # -- output -----------------------------------------------------------------------------
    def _flush_now(self) -> None:
        fh = self._flush_handle
        if fh is not None:
            self._flush_handle = None
            fh.cancel()
        self._queued_bytes = 0
        data = self.h2.data_to_send()
        if data:
            t = self.transport
            if t is not None and not t.is_closing():
                t.write(data)

    def _wake_all(self) -> None:
        for s in self.streams.values():
            if s._waiter is not None:
                s._wake()

    def _set_ready_error(self, exc: BaseException) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)
            self.ready.exception()   # retrieved: connect_h2 may already have given up

    def _fail_all(self, exc: UpstreamError) -> None:
        for s in list(self.streams.values()):
            s.fail(BodyAborted(str(exc)), exc)
        self._fail_waiters(UpstreamError("reset", str(exc), retryable=True))

    # -- closing ----------------------------------------------------------------------------
    def close(self) -> None:
        """GOAWAY and close; whatever is still in flight fails."""
        if self._closed:
            return
        self._closed = True
        t = self.transport
        if t is not None and not t.is_closing():
            self.h2.close_connection(_NO_ERROR)
            self.h2.stop()
            self._flush_now()
            t.close()

    def abort(self) -> None:
        self._closed = True
        if self.transport is not None:
            self.transport.abort()
