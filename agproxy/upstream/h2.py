"""HTTP/2 client connection to an upstream: one multiplexed connection per origin.

Theory of operation: `connect_h2` opens TCP (+ TLS with ALPN h2, or h2c prior
knowledge for http:// origins), sends the preface and our SETTINGS, and returns
once the server's SETTINGS arrived (so its MAX_CONCURRENT_STREAMS is known
before the first request); all of that within `origin.connect_timeout`, else
UpstreamError("connect"). The pool shares the connection between requests.

`request()` waits for a stream slot (never more open streams than the server
allows; waiters are served in order), sends the head — and a body already in
memory, when the windows allow, in the same write — and returns once the
response head arrived (`timeout` → UpstreamTimeout, the stream is cancelled).
A streamed request body (BodyReader) is pumped by a task that respects the
server's flow-control windows and the socket's write buffer; if the client
goes away mid-upload the stream is reset, so the upstream never sees a
truncated body as complete.

Response bodies stream into a BodyReader whose pause/resume hooks withhold the
WINDOW_UPDATE for that stream (acknowledged as received otherwise), so a slow
client slows only its own stream on the shared connection. Trailers end up in
`body.trailers` (gRPC status). Frames are written once per data_received / per
event-loop turn, as on the server side (http/h2.py, which also holds the h2 and
HPACK adjustments both sides share).

Failure semantics: RST_STREAM before the head → UpstreamError("reset"),
retryable when the server says REFUSED_STREAM; after the head → the body fails
with BodyAborted. GOAWAY: the connection stops taking requests (`usable` is
false, the pool opens a new one); streams above the server's last stream id fail
as retryable, the others finish. Connection loss fails whatever is in flight
(UpstreamError before a head, BodyAborted after).
"""

from __future__ import annotations

import asyncio
import collections
import time

import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from agproxy.http.h2 import (BatchedOutput, CONNECTION_SPECIFIC, MAX_CONN_WINDOW, MAX_STREAM_WINDOW,
                             GatewayH2, apply_settings, client_config, field_ok, name_bytes, parse_length)
from agproxy.http.flow import WriteFlowControl
from agproxy.http.messages import BodyAborted, BodyReader, Headers
from agproxy.upstream.errors import UpstreamError, UpstreamTimeout
from agproxy.upstream.origin import set_nodelay
from agproxy.upstream.h1 import UpstreamResponse

__all__ = ["connect_h2", "H2ClientConnection", "H2Response"]

_NO_ERROR = h2.errors.ErrorCodes.NO_ERROR
_CANCEL = h2.errors.ErrorCodes.CANCEL
_PROTOCOL_ERROR = h2.errors.ErrorCodes.PROTOCOL_ERROR
_REFUSED_STREAM = h2.errors.ErrorCodes.REFUSED_STREAM
_SC = h2.settings.SettingCodes

_ResponseReceived = h2.events.ResponseReceived
_DataReceived = h2.events.DataReceived
_StreamEnded = h2.events.StreamEnded
_StreamReset = h2.events.StreamReset
_WindowUpdated = h2.events.WindowUpdated
_TrailersReceived = h2.events.TrailersReceived
_RemoteSettingsChanged = h2.events.RemoteSettingsChanged
_ConnectionTerminated = h2.events.ConnectionTerminated

#: response bytes buffered per stream before its window is withheld
BODY_HIGH_WATER = 256 * 1024
#: the last stream id we open before retiring the connection (ids are 31-bit, odd)
_MAX_STREAM_ID = 2**31 - 1 - 1000


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

    __slots__ = ("_stream",)

    def __init__(self, stream: "_ClientStream"):
        super().__init__(stream.conn, stream.body)
        self._stream = stream
        self.http_version = "2"

    def abort(self) -> None:
        self._stream.cancel(_CANCEL)


class _ClientStream:
    __slots__ = ("conn", "stream_id", "body", "response", "head_only", "local_ended", "remote_ended",
                 "closed", "pump", "_paused", "_unacked", "_waiter", "_expected", "_received",
                 "_trailers", "_status")

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
        self._paused = False
        self._unacked = 0
        self._waiter: asyncio.Future | None = None
        self._expected: int | None = None
        self._received = 0
        self._trailers: Headers | None = None
        self._status = 0

    # flow control of the response body
    def _pause(self) -> None:
        self._paused = True

    def _resume(self) -> None:
        self._paused = False
        n = self._unacked
        if n and not self.closed:
            self._unacked = 0
            conn = self.conn
            try:
                conn.h2.acknowledge_received_data(n, self.stream_id)
            except h2.exceptions.H2Error:
                return
            conn._schedule_flush()

    def return_window(self) -> None:
        """DATA withheld while paused still counts against the connection window: hand it
        back once the stream is over (the stream's own window no longer matters)."""
        n = self._unacked
        conn = self.conn
        if n and conn.transport is not None and not conn._closed:
            self._unacked = 0
            try:
                conn.h2.acknowledge_received_data(n, self.stream_id)
            except h2.exceptions.H2Error:
                pass
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

    def cancel(self, code) -> None:
        """Give up on the stream (timeout, the client went away): RST_STREAM."""
        if self.closed:
            return
        conn = self.conn
        if conn.transport is not None and not conn._closed:
            try:
                conn.h2.reset_stream(self.stream_id, code)
            except h2.exceptions.H2Error:
                pass
            conn._schedule_flush()
        self.fail(ConnectionResetError("stream cancelled"))


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


class H2ClientConnection(BatchedOutput, WriteFlowControl, asyncio.Protocol):
    """One HTTP/2 connection to an upstream origin, shared by concurrent requests."""

    write_lost_message = "upstream connection lost"

    def __init__(self, origin):
        self.origin = origin
        self.loop = asyncio.get_event_loop()
        self.transport: asyncio.Transport | None = None
        self.h2 = GatewayH2(client_config())
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
        apply_settings(self.h2, client=True, max_concurrent_streams=None,
                       stream_window=MAX_STREAM_WINDOW, conn_window=MAX_CONN_WINDOW, max_header_list=None)
        self._flush_now()

    def data_received(self, data: bytes) -> None:
        h = self.h2
        self._in_receive = True
        try:
            try:
                events = h.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                err = UpstreamError("protocol", f"HTTP/2 protocol error from {self.origin.authority}: {exc}")
                self._set_ready_error(err)
                self._fail_all(err)
                self._flush_now()
                self.abort()
                return
            streams = self.streams
            for ev in events:
                t = type(ev)
                if t is _DataReceived:
                    s = streams.get(ev.stream_id)
                    if s is None:
                        h.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                        continue
                    self._on_data(s, ev)
                elif t is _ResponseReceived:
                    s = streams.get(ev.stream_id)
                    if s is not None:
                        self._on_response(s, ev.headers)
                elif t is _StreamEnded:
                    s = streams.get(ev.stream_id)
                    if s is not None:
                        self._on_end(s)
                elif t is _WindowUpdated:
                    if ev.stream_id:
                        s = streams.get(ev.stream_id)
                        if s is not None:
                            s._wake()
                    else:
                        self._wake_all()
                elif t is _TrailersReceived:
                    s = streams.get(ev.stream_id)
                    if s is not None:
                        items = []
                        for n, v in ev.headers:
                            if n[:1] == b":" or not field_ok(n, v):
                                # a field that would be a header injection downstream
                                s.cancel(_PROTOCOL_ERROR)
                                break
                            items.append((n.decode("latin-1"), v.decode("latin-1")))
                        else:
                            s._trailers = Headers(items)
                elif t is _StreamReset:
                    s = streams.get(ev.stream_id)
                    if s is not None:
                        code = ev.error_code
                        msg = f"upstream reset the stream ({_code(code)})"
                        if s.response is not None and s.response._head.done():
                            s.fail(BodyAborted(msg))
                        else:
                            s.fail(BodyAborted(msg), UpstreamError(
                                "reset", msg, retryable=code == _REFUSED_STREAM))
                elif t is _RemoteSettingsChanged:
                    changed = ev.changed_settings
                    if _SC.INITIAL_WINDOW_SIZE in changed:
                        self._wake_all()
                    if _SC.MAX_CONCURRENT_STREAMS in changed:
                        self._grant_slots()
                    if not self.ready.done():
                        self.ready.set_result(None)
                elif t is _ConnectionTerminated:
                    self._on_goaway(ev)
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

    # -- events -----------------------------------------------------------------------------
    def _on_response(self, s: _ClientStream, block) -> None:
        status = 0
        items = []
        for n, v in block:
            if n[:1] == b":":
                if n == b":status":
                    try:
                        status = int(v)
                    except ValueError:
                        status = 0
                continue
            if not field_ok(n, v):
                # Uppercase or odd names, CR/LF/NUL in values: malformed in HTTP/2, and a
                # response-splitting vector for an HTTP/1.1 client downstream.
                status = 0
                break
            name = n.decode("latin-1")
            value = v.decode("latin-1")
            if name == "content-length":
                s._expected = parse_length(value)
            items.append((name, value))
        resp = s.response
        if status < 200 or status > 999 or resp is None:
            if resp is not None and not resp._head.done():
                resp._head.set_exception(UpstreamError("protocol", "malformed response head from upstream"))
            s.cancel(_PROTOCOL_ERROR)
            return
        if s.head_only or status in (204, 304):
            s._expected = None
        resp.status = status
        resp.headers = Headers(items)
        s._status = status
        if not resp._head.done():
            resp._head.set_result(None)

    def _on_data(self, s: _ClientStream, ev) -> None:
        data = ev.data
        s._received += len(data)
        if s._expected is not None and s._received > s._expected:
            self.h2.acknowledge_received_data(ev.flow_controlled_length, s.stream_id)
            s.cancel(_PROTOCOL_ERROR)
            return
        s.body.feed(data)
        if s._paused:
            s._unacked += ev.flow_controlled_length
        else:
            self.h2.acknowledge_received_data(ev.flow_controlled_length, s.stream_id)

    def _on_end(self, s: _ClientStream) -> None:
        s.remote_ended = True
        resp = s.response
        if resp is None or not resp._head.done():
            s.fail(BodyAborted("stream ended without a response"),
                   UpstreamError("protocol", "upstream ended the stream without a response"))
            return
        if s._expected is not None and s._received != s._expected:
            s.cancel(_PROTOCOL_ERROR)
            return
        s.body.feed_eof(s._trailers)
        if not s.local_ended:
            # Answered before the request body was complete: stop sending it.
            p = s.pump
            if p is not None and not p.done():
                p.cancel()
            try:
                self.h2.reset_stream(s.stream_id, _NO_ERROR)
            except h2.exceptions.H2Error:
                pass
            s.local_ended = True
        self._maybe_done(s)

    def _on_goaway(self, ev) -> None:
        self._goaway = True
        last = ev.last_stream_id
        err = UpstreamError("reset", f"upstream {self.origin.authority} is going away (GOAWAY)",
                            retryable=True)
        for s in list(self.streams.values()):
            if s.stream_id > last:
                s.fail(BodyAborted(str(err)), err)
        self._fail_waiters(err)
        if not self.streams:
            self.close()

    # -- streams ----------------------------------------------------------------------------
    @property
    def usable(self) -> bool:
        return (not self._closed and not self._goaway and self.transport is not None
                and not self.transport.is_closing()
                and self.h2.highest_outbound_stream_id < _MAX_STREAM_ID)

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
        sid = h.get_next_available_stream_id()
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
        except h2.exceptions.H2Error as exc:
            s.fail(BodyAborted(str(exc)))
            raise UpstreamError("protocol", f"could not send the request: {exc}") from None
        self._schedule_flush()
        remaining = None
        if timeout:
            remaining = max(0.001, timeout - (time.monotonic() - start))
        try:
            await resp.wait_head(remaining)
        except UpstreamTimeout:
            s.cancel(_CANCEL)
            raise
        except UpstreamError:
            s.cancel(_CANCEL)
            raise
        except asyncio.CancelledError:
            s.cancel(_CANCEL)
            raise
        return resp

    # -- request bodies ---------------------------------------------------------------------
    def _send_now(self, s: _ClientStream, data: bytes) -> bool:
        """Send a whole in-memory body if the windows allow it (the common case)."""
        h = self.h2
        n = len(data)
        if n > h.local_flow_control_window(s.stream_id):
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
            window = h.local_flow_control_window(sid)
            if window <= 0:
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
        except (ConnectionError, OSError, h2.exceptions.H2Error):
            s.cancel(_CANCEL)

    async def _pump(self, s: _ClientStream, reader: BodyReader) -> None:
        try:
            while True:
                chunk = await reader.read()
                if not chunk:
                    break
                await self._send(s, chunk)
            self._end_request(s, reader.trailers)
        except (BodyAborted, ConnectionError, OSError, h2.exceptions.H2Error):
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
            try:
                self.h2.close_connection(_NO_ERROR)
            except h2.exceptions.H2Error:
                pass
            self._flush_now()
            t.close()

    def abort(self) -> None:
        self._closed = True
        if self.transport is not None:
            self.transport.abort()


def _code(code) -> str:
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return str(code)
