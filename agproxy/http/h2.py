"""HTTP/2 server side: bytes → streams with http/h2_frames.py, responses → frames.

Theory of operation: `data_received` hands the bytes to `ServerCodec` (a lean,
hand-written RFC 9113 server connection, http/h2_frames.py), which calls back
`on_request`, `on_data`, `on_end`, ... below as frames complete; each request
becomes an `H2Stream` (RequestHead + BodyReader) whose handler runs in its own
task, exactly as in http/h1.py. Output is never written per frame: the codec
appends frames to one buffer and the connection writes that buffer once at the
end of `data_received`, or once per event-loop turn for what handler tasks
produce (`_schedule_flush` → `loop.call_soon`). A response head, its body and its
end therefore usually leave in one write, and a burst of requests on one
connection in one write for all of them. A small DATA chunk is held until the
next call or that flush, so that `end()` can put END_STREAM on it instead of
sending one more (empty) frame.

Flow control, both ways:
- request bodies: DATA is acknowledged (WINDOW_UPDATE, batched by the codec) as
  it is handed to the stream's BodyReader; when the reader is above
  its high-water mark it calls `pause()`, which withholds acknowledgement until
  `resume()` — the client then runs out of window and stops sending. A stream
  buffers at most high_water + one stream window. The connection window is
  larger than a stream window so one stalled stream does not stall the others,
  and whatever a stream withheld goes back to the connection window when the
  stream ends, read or not.
- responses: `send_data` cuts data to the client's window and frame size and
  awaits a WINDOW_UPDATE (or a SETTINGS change) when the window is empty, then
  awaits the transport's drain when the socket buffer is full.

Errors stay as small as the protocol allows. A RST_STREAM from the client fails
that stream's BodyReader and cancels its handler task; a malformed request
(missing pseudo-headers, uppercase or connection-specific header names, CR/LF/NUL
in a value, a lying content-length) gets a 400 (431 for oversize headers) or a
RST_STREAM on that stream only. Only what the codec reports as a connection
error (bad framing, HPACK corruption, flow-control violations) sends GOAWAY and
closes; a stream error resets that stream only. Whoever resets a stream, its
handler task is cancelled and its body fails with BodyAborted (`_kill`), so the
upstream request stops too: a reset frees the stream's slot only once nothing
works for it any more (MadeYouReset, CVE-2025-8671). Only the handler's own
`abort()` is not cancelled: it is the handler resetting.

SETTINGS_MAX_CONCURRENT_STREAMS is advertised from `limits` and enforced here
(a stream beyond it is refused with RST_STREAM REFUSED_STREAM, which clients
retry). Floods are budgeted per connection in http/h2_budget.py (limits and
reasons there): resets either way (the client's RST_STREAM, and the refusals,
400s and stream errors its frames make us send) beyond RAPID_RESET_MIN and
beyond the streams answered; PING, SETTINGS, PRIORITY and empty frames by rate;
CONTINUATION frames per header block; acknowledgements the peer does not read.
A spent budget ends the connection with GOAWAY ENHANCE_YOUR_CALM.
Header names with an underscore are dropped, refused (400) or kept as
`limits.headers_with_underscores` says (nginx drops them: CGI-style backends map
`x_user` and `x-user` to the same variable).

Deadlines, checked by the server's periodic sweep over its connections
(server/worker.py `sweep_connections`, the same one as HTTP/1.1's), never by a
timer per stream: `check_deadlines(now)` ends a connection whose header block
is not complete within `limits.header_timeout` (GOAWAY ENHANCE_YOUR_CALM), and
resets with CANCEL (its handler cancelled) a stream with no progress either
way (no DATA received or sent: a client keeping a zero window, an upstream that
says nothing) for `limits.stream_idle_timeout`; streams only set a flag when
they move (`_moved`), and the sweep notes when each last moved. The sweep also
shuts down a connection idle for `limits.idle_timeout`: idle means no stream
open since `last_activity`, which only streams update, never PING, SETTINGS,
WINDOW_UPDATE or PRIORITY (a keep-alive PING loop does not hold a connection
open forever). `shutdown()` sends GOAWAY with the last stream id, lets the
streams in flight finish, then closes.

The upstream client (upstream/h2.py) runs on the same codec in client mode
(`ClientCodec`); `BatchedOutput`, the header-block helpers and the limits below
are shared with it.

Costs and what remains of them: benchmarks/results/h2.md.
"""

from __future__ import annotations

import asyncio

import logging
import re
import time
from typing import Callable

from agproxy.http import h2_budget
from agproxy.http import h2_frames as fr
from agproxy.http.flow import WriteFlowControl
from agproxy.http.h2_frames import H2Error, ServerCodec
from agproxy.http.messages import NOTED_FIELDS, BodyAborted, BodyReader, ConnInfo, Headers, RequestHead, ServerStream

__all__ = ["H2Connection", "H2Stream"]

log = logging.getLogger("agproxy.http")

_NO_ERROR = fr.NO_ERROR
_PROTOCOL_ERROR = fr.PROTOCOL_ERROR
_INTERNAL_ERROR = fr.INTERNAL_ERROR
_REFUSED_STREAM = fr.REFUSED_STREAM
_CANCEL = fr.CANCEL

# Headers that describe one hop and are illegal in HTTP/2 (RFC 9113 §8.2.2).
CONNECTION_SPECIFIC = frozenset({"connection", "keep-alive", "proxy-connection",
                                 "transfer-encoding", "upgrade"})
_CONNECTION_SPECIFIC_B = frozenset(n.encode() for n in CONNECTION_SPECIFIC)

# A field value may not carry CR, LF or NUL (it would be a header injection on an
# HTTP/1.1 upstream); names are lowercase tokens; :path/:authority have no spaces.
_BAD_VALUE = re.compile(rb"[\r\n\x00]").search
_BAD_NAME = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9a-z]").search
_BAD_TARGET = re.compile(rb"[\x00-\x20\x7f]").search
_BAD_METHOD = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9A-Za-z]").search

#: the stream-level receive window we grant (also bounds what a paused stream buffers)
MAX_STREAM_WINDOW = 1 << 20
#: ceiling of the connection-level receive window
MAX_CONN_WINDOW = 16 << 20
#: bytes queued in h2 before a flush is forced instead of waiting for the loop turn
FLUSH_THRESHOLD = 64 * 1024
#: resets tolerated before resets outnumbering answered streams end the connection
RAPID_RESET_MIN = h2_budget.RESET_MIN


class BatchedOutput:
    """What h2 queues leaves in one write: at the end of `data_received` (while
    `_in_receive`), once per event-loop turn (`call_soon`) for what tasks produce, or
    at once past FLUSH_THRESHOLD bytes. Shared by the server and client connections,
    which provide `loop`, `_flush_handle`, `_in_receive`, `_queued_bytes`, `_flush_now`."""

    __slots__ = ()

    def _schedule_flush(self) -> None:
        if self._flush_handle is None and not self._in_receive:
            self._flush_handle = self.loop.call_soon(self._flush_now)

    def _queued(self, n: int) -> None:
        self._queued_bytes += n
        if self._queued_bytes >= FLUSH_THRESHOLD:
            self._flush_now()
        else:
            self._schedule_flush()


def parse_length(value: str | bytes) -> int | None:
    """A content-length value, or None when it is not 1*DIGIT."""
    if not value.isdigit():
        return None
    return int(value)


# -- streams --------------------------------------------------------------------------------------

class H2Stream(ServerStream):
    """One request/response exchange on an HTTP/2 connection."""

    __slots__ = ("proto", "conn", "request", "body", "stream_id", "head_sent", "_head", "done",
                 "task", "_paused", "_unacked", "_waiter", "_error", "_no_body", "_expected",
                 "_received", "_trailers", "_remote_ended", "_held", "_moved", "_idle_since")

    def __init__(self, proto: "H2Connection", stream_id: int, request: RequestHead,
                 expected_length: int | None):
        self.proto = proto
        self.conn = proto.info
        self.stream_id = stream_id
        self.request = request
        self.body = BodyReader(self._pause, self._resume, proto.limits.body_high_water)
        self.head_sent = False
        self._head: tuple[int, Headers] | None = None
        self.done = False
        self.task: asyncio.Task | None = None
        self._paused = False
        self._unacked = 0
        self._waiter: asyncio.Future | None = None
        self._error: BaseException | None = None
        self._no_body = request.method == "HEAD"
        self._expected = expected_length
        self._received = 0
        self._trailers: Headers | None = None
        self._remote_ended = False
        self._held: bytes | None = None
        self._moved = True              # progress since the connection's last sweep
        self._idle_since = 0.0

    # -- flow control of the request body -------------------------------------------------
    def _pause(self) -> None:
        self._paused = True

    def _resume(self) -> None:
        self._paused = False
        n = self._unacked
        if n and not self.done:
            self._unacked = 0
            proto = self.proto
            proto.h2.ack(n, self.stream_id)
            proto._schedule_flush()

    # -- ServerStream -----------------------------------------------------------------------
    def send_head(self, status: int, headers: Headers) -> None:
        if self.head_sent or self._head is not None:
            raise RuntimeError("response head already sent")
        if status in (204, 304) or status < 200:
            self._no_body = True
        self._head = (status, headers)

    def _write_head(self, end_stream: bool) -> None:
        status, headers = self._head  # type: ignore[misc]
        self._head = None
        self.head_sent = True
        self.proto.h2.send_headers(self.stream_id, response_block(status, headers), end_stream=end_stream)

    async def send_data(self, data: bytes) -> None:
        if self.done:
            raise ConnectionResetError("response already finished" if self._error is None else str(self._error))
        proto = self.proto
        self._moved = True
        try:
            if self._head is not None:
                self._write_head(False)
                proto._schedule_flush()
            if not data or self._no_body:
                return
            if self._held is not None and not self._release_held(False):
                await self._send_chunks(self._take_held())
            h2c = proto.h2
            n = len(data)
            if n <= h2c.max_outbound_frame_size and \
                    n + proto._held_bytes <= h2c.send_window(self.stream_id):
                # Hold the chunk until the next call or the flush at the end of this loop
                # turn: if end() comes first, it leaves in one frame with END_STREAM.
                self._held = data
                proto._held_bytes += n
                proto._held.append(self)
                proto._queued(n)
            else:
                await self._send_chunks(data)
        except H2Error as exc:
            self._reset(_INTERNAL_ERROR)
            raise ConnectionResetError(f"stream closed: {exc}") from None
        if proto.write_paused:
            await proto.drain()

    async def _send_chunks(self, data: bytes) -> None:
        """Frames within the client's windows, awaiting WINDOW_UPDATE when they are empty."""
        proto = self.proto
        h2c = proto.h2
        sid = self.stream_id
        total = len(data)
        pos = 0
        view = None
        while pos < total:
            if self.done:
                raise ConnectionResetError(str(self._error) if self._error else "stream closed")
            # Chunks held by other streams have a claim on the connection window.
            window = h2c.send_window(sid) - proto._held_bytes
            if window <= 0:
                proto._flush_now()
                if h2c.send_window(sid) - proto._held_bytes <= 0:
                    await self._wait_window()
                continue
            size = total - pos
            if size > window:
                size = window
            mfs = h2c.max_outbound_frame_size
            if size > mfs:
                size = mfs
            if pos == 0 and size == total:
                h2c.send_data(sid, data)
            else:
                if view is None:
                    view = memoryview(data)
                h2c.send_data(sid, view[pos:pos + size])
            pos += size
            self._moved = True
            proto._queued(size)

    def _release_held(self, end_stream: bool) -> bool:
        """Hand the held chunk to h2; False if the stream's window shrank meanwhile (SETTINGS)."""
        data = self._held
        h2c = self.proto.h2
        if len(data) > h2c.send_window(self.stream_id):
            return False
        self._take_held()
        h2c.send_data(self.stream_id, data, end_stream=end_stream)
        return True

    def _take_held(self) -> bytes:
        data = self._held
        self._held = None
        self.proto._held_bytes -= len(data)
        return data

    async def _wait_window(self) -> None:
        fut = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await fut
        finally:
            self._waiter = None

    def _wake(self, exc: BaseException | None = None) -> None:
        w = self._waiter
        if w is not None and not w.done():
            if exc is None:
                w.set_result(None)
            else:
                w.set_exception(exc)

    async def end(self, trailers: Headers | None = None, data: bytes = b"") -> None:
        if data:
            await self.send_data(data)    # held, then sent with END_STREAM below
        if self.done:
            return
        proto = self.proto
        h2c = proto.h2
        sid = self.stream_id
        try:
            if self._head is not None:
                self._write_head(not trailers)
                if trailers:
                    h2c.send_headers(sid, trailer_block(trailers), end_stream=True)
            else:
                if self._held is not None:
                    if not trailers and self._release_held(True):
                        self._finish()
                        return
                    if self._held is not None:
                        await self._send_chunks(self._take_held())
                if self.done:
                    return
                if trailers:
                    h2c.send_headers(sid, trailer_block(trailers), end_stream=True)
                else:
                    h2c.end_stream(sid)
        except H2Error as exc:
            self._reset(_INTERNAL_ERROR)
            raise ConnectionResetError(f"stream closed: {exc}") from None
        self._finish()

    def abort(self) -> None:
        if self.done:
            return
        self._reset(_INTERNAL_ERROR)

    # -- internal ----------------------------------------------------------------------------
    def _drop_held(self) -> None:
        if self._held is not None:
            self._take_held()

    def _return_window(self) -> None:
        """DATA withheld while paused still counts against the connection window: hand
        it back now that the stream is over (the stream's own window no longer matters)."""
        n = self._unacked
        if n:
            self._unacked = 0
            proto = self.proto
            if proto.transport is not None:
                try:
                    proto.h2.ack(n, self.stream_id)
                except H2Error:
                    pass

    def _finish(self) -> None:
        """The response is complete: release the stream."""
        self.done = True
        proto = self.proto
        proto.h2.budget.answered += 1
        if not self._remote_ended:
            # The client is still sending a body nobody will read: tell it to stop
            # (RFC 9113 §8.1); its window is handed back by h2 as the DATA arrives.
            self.body.fail(BodyAborted("response finished before the request body"))
            try:
                proto.h2.reset_stream(self.stream_id, _NO_ERROR)
            except H2Error:
                pass
        self._return_window()
        proto._stream_closed(self)

    def _kill(self, code) -> None:
        """Reset by the connection (a stream error, a deadline): the handler is cancelled,
        so whatever it has in flight upstream is abandoned too."""
        self._reset(code)
        t = self.task
        if t is not None and not t.done():
            t.cancel()

    def _reset(self, code) -> None:
        """Reset by us (abort, malformed body, handler failure)."""
        self.done = True
        self._drop_held()
        proto = self.proto
        self._error = ConnectionResetError("stream reset")
        self.body.fail(BodyAborted("stream reset"))
        try:
            proto.h2.reset_stream(self.stream_id, code)
        except H2Error:
            pass
        self._return_window()
        self._wake(self._error)
        proto._stream_closed(self)

    def _remote_reset(self, exc: BaseException) -> None:
        """Reset by the client, or the connection went away."""
        self.done = True
        self._drop_held()
        self._error = exc
        self._return_window()
        self.body.fail(BodyAborted(str(exc)))
        self._wake(ConnectionResetError(str(exc)))
        t = self.task
        if t is not None and not t.done():
            t.cancel()

    def _task_done(self, task: asyncio.Task) -> None:
        # The body reader's pause/resume are this stream's bound methods: a cycle the
        # cyclic GC would otherwise have to find (callgrind: ~12% of an HTTP/2 request).
        body = self.body
        body.pause = body.resume = None
        self.task = None
        # A handler that returns (or raises) without finishing its response must not
        # leave the client waiting forever.
        if not self.done and self.proto.transport is not None:
            self._reset(_INTERNAL_ERROR)
            self.proto._schedule_flush()
        if not task.cancelled():
            exc = task.exception()
            if exc is not None and not isinstance(exc, (BodyAborted, ConnectionError)):
                log.error("HTTP/2 handler failed on stream %d", self.stream_id, exc_info=exc)


# -- header blocks ---------------------------------------------------------------------------------

_STATUS: dict[int, tuple[bytes, bytes]] = {}
_NAME_BYTES: dict[str, bytes] = {}


def _status_field(status: int) -> tuple[bytes, bytes]:
    f = _STATUS.get(status)
    if f is None:
        f = _STATUS[status] = (b":status", str(status).encode())
    return f


def name_bytes(name: str) -> bytes:
    """A header name for the wire: lowercase bytes (cached: names repeat)."""
    b = _NAME_BYTES.get(name)
    if b is None:
        b = name.lower().encode("latin-1")
        if len(_NAME_BYTES) < 4096:
            _NAME_BYTES[name] = b
    return b


def response_block(status: int, headers: Headers) -> list:
    out = [_status_field(status)]
    names = _NAME_BYTES
    for k, v in headers.items:
        if k in CONNECTION_SPECIFIC:
            continue
        # name_bytes() inlined (its table first): one Python call less per field, measured hot
        out.append((names.get(k) or name_bytes(k), v.encode("latin-1")))
    return out


def trailer_block(trailers: Headers) -> list:
    return [(name_bytes(k), v.encode("latin-1")) for k, v in trailers.items if k not in CONNECTION_SPECIFIC]


# Names seen so far → decoded str. Bounded; only names that validate and carry no
# underscore are ever cached, so a hit needs no further check and the table's
# content is under the gateway's control.
_NAMES: dict[bytes, str] = {}
_NAMES_MAX = 4096


def _field_name(name: bytes) -> str | None:
    """A valid request field name as str, or None (invalid). Underscores are the
    caller's business (`_new_name`)."""
    n = _NAMES.get(name)
    if n is not None:
        return n
    if not name or _BAD_NAME(name) or name in _CONNECTION_SPECIFIC_B:
        return None
    n = name.decode("ascii")
    if len(_NAMES) < _NAMES_MAX and b"_" not in name:
        _NAMES[name] = n
    return n


def _new_name(name: bytes, underscores: str) -> str | None:
    """A name not in _NAMES: its str, or None to drop it (an underscore with "drop");
    raises _Malformed if invalid, or for an underscore with "reject"."""
    n = _field_name(name)
    if n is None:
        raise _Malformed(400, "invalid header name")
    if "_" in n and underscores != "allow":
        # x_user would reach a CGI/WSGI backend as HTTP_X_USER, next to the verified x-user.
        if underscores == "reject":
            raise _Malformed(400, "header name with an underscore")
        return None
    return n


def field_ok(name: bytes, value: bytes) -> bool:
    """A regular field HTTP/2 allows and HTTP/1.1 can carry safely (no CR/LF/NUL)."""
    return bool(name) and not _BAD_NAME(name) and not _BAD_VALUE(value)


class _Malformed(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


_METHODS = {m.encode(): m for m in ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")}
_SCHEMES = {b"http": "http", b"https": "https"}


def _join_cookies(items: list) -> list:
    # RFC 9113 §8.2.3: crumbs are joined with "; " before reaching an HTTP/1.1 world.
    joined = "; ".join(v for k, v in items if k == "cookie")
    out = []
    first = True
    for k, v in items:
        if k == "cookie":
            if first:
                out.append(("cookie", joined))
                first = False
            continue
        out.append((k, v))
    return out


def _headers_to_list(block, limits, trailers: bool = False) -> tuple[list, dict]:
    """Regular fields → [(str, str)] and pseudo-headers → {bytes: bytes}; raises _Malformed."""
    pseudo: dict[bytes, bytes] = {}
    items: list[tuple[str, str]] = []
    size = 0
    regular = False
    cookies = 0
    for name, value in block:
        size += len(name) + len(value) + 32
        if name[:1] == b":":
            if regular or trailers or name in pseudo:
                raise _Malformed(400, "misplaced or repeated pseudo-header")
            pseudo[name] = value
            continue
        regular = True
        n = _NAMES.get(name)
        if n is None:
            n = _new_name(name, limits.headers_with_underscores)
            if n is None:
                continue
        if _BAD_VALUE(value):
            raise _Malformed(400, "invalid header value")
        if n == "te" and value != b"trailers":
            raise _Malformed(400, "te other than 'trailers'")
        if n == "cookie":
            cookies += 1
        items.append((n, value.decode("latin-1")))
    if len(items) > limits.max_headers or size > limits.max_header_bytes:
        raise _Malformed(431, "request header fields too large")
    if cookies > 1:
        items = _join_cookies(items)
    return items, pseudo


# Fields _parse_request looks at: its own, and NOTED_FIELDS for the layers above.
_CHECKED = frozenset({"content-length", "te", "cookie", "host", *NOTED_FIELDS})


def _parse_request(block, limits) -> tuple:
    """One pass over a request header block → (method, path, scheme, authority, fields,
    content-length or None, NOTED_FIELDS bits); raises _Malformed (RFC 9113 §8.1.1, §8.3.1)."""
    method = path = scheme = authority = None
    items: list[tuple[str, str]] = []
    size = 0
    regular = False
    cookies = 0
    host = None
    length = None
    noted = 0
    for name, value in block:
        size += len(name) + len(value) + 32
        if name[:1] == b":":
            if regular:
                raise _Malformed(400, "pseudo-header after a regular field")
            if name == b":method" and method is None:
                method = value
            elif name == b":path" and path is None:
                path = value
            elif name == b":scheme" and scheme is None:
                scheme = value
            elif name == b":authority" and authority is None:
                authority = value
            else:
                raise _Malformed(400, "unknown or repeated pseudo-header")
            continue
        regular = True
        n = _NAMES.get(name)
        if n is None:
            n = _new_name(name, limits.headers_with_underscores)
            if n is None:
                continue
        if _BAD_VALUE(value):
            raise _Malformed(400, "invalid header value")
        v = value.decode("latin-1")
        if n in _CHECKED:        # one set test per field, not four compares (measured hot)
            if n == "content-length":
                if not value.isdigit() or (length is not None and int(value) != length):
                    raise _Malformed(400, "invalid content-length")
                length = int(value)
            elif n == "te":
                if value != b"trailers":
                    raise _Malformed(400, "te other than 'trailers'")
            elif n == "cookie":
                cookies += 1
            elif n == "host":
                if host is None:
                    host = v
            else:
                noted |= NOTED_FIELDS[n]
        items.append((n, v))
    if len(items) > limits.max_headers or size > limits.max_header_bytes:
        raise _Malformed(431, "request header fields too large")
    if method is None:
        raise _Malformed(400, "missing :method")
    m = _METHODS.get(method)
    if m is None:
        if method == b"CONNECT":
            raise _Malformed(501, "CONNECT is not supported")
        if not method or _BAD_METHOD(method):
            raise _Malformed(400, "invalid :method")
        m = method.decode("ascii")
    if not path or scheme is None:
        raise _Malformed(400, "missing :path or :scheme")
    if _BAD_TARGET(path) or not (path[:1] == b"/" or (path == b"*" and m == "OPTIONS")):
        raise _Malformed(400, "invalid :path")
    sch = _SCHEMES.get(scheme)
    if sch is None:
        raise _Malformed(400, "invalid :scheme")
    if authority is not None:
        if _BAD_TARGET(authority):
            raise _Malformed(400, "invalid :authority")
        auth = authority.decode("latin-1")
    else:
        auth = host or ""
    if cookies > 1:
        items = _join_cookies(items)
    return m, path.decode("latin-1"), sch, auth, items, length, noted


# -- the connection --------------------------------------------------------------------------------

class H2Connection(BatchedOutput, WriteFlowControl, asyncio.Protocol):
    """One client connection speaking HTTP/2 (TLS ALPN h2, or h2c prior knowledge)."""

    __slots__ = ("handler", "info", "limits", "tracker", "transport", "loop", "streams", "closing",
                 "write_paused", "_drain_waiters", "_flush_handle", "_queued_bytes", "_held",
                 "_held_bytes", "_held_stuck", "_in_receive", "_peer_goaway", "_last_stream_id",
                 "last_activity",
                 "max_streams", "stream_window", "conn_window", "h2")

    write_lost_message = "client went away"

    def __init__(self, handler: Callable, info: ConnInfo, limits, tracker=None):
        self.handler = handler
        self.info = info
        self.limits = limits
        self.tracker = tracker
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_event_loop()
        self.streams: dict[int, H2Stream] = {}
        self.closing = False            # GOAWAY sent (shutdown) or connection closed
        self.write_paused = False
        self._drain_waiters: list[asyncio.Future] = []
        self._flush_handle: asyncio.Handle | None = None
        self._queued_bytes = 0
        self._held: list[H2Stream] = []     # streams holding back their last DATA chunk
        self._held_bytes = 0
        self._held_stuck = False
        self._in_receive = False
        self._peer_goaway = False
        self._last_stream_id: int | None = None
        self.last_activity = time.monotonic()      # when the last stream closed (or the start)
        self.max_streams = max(1, limits.max_concurrent_streams)
        self.stream_window = min(MAX_STREAM_WINDOW, max(65535, limits.body_high_water))
        self.conn_window = min(MAX_CONN_WINDOW, max(self.stream_window * 4,
                                                    self.stream_window * self.max_streams))
        header_timeout = limits.header_timeout
        # SETTINGS_MAX_CONCURRENT_STREAMS is advertised by the codec, enforced in on_request.
        self.h2 = ServerCodec(self, max_concurrent_streams=self.max_streams,
                              stream_window=self.stream_window, conn_window=self.conn_window,
                              max_header_list=limits.max_header_bytes,
                              header_timeout=header_timeout if header_timeout and header_timeout > 0 else None)
        # HPACK must decode whatever arrives to keep its table in step; the limit that
        # answers 431 is checked per request, this one only bounds memory.
        self.h2.decoder.max_header_list_size = max(4 * limits.max_header_bytes, 256 * 1024)

    # -- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.tracker is not None:
            self.tracker.add(self)
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
        # Not activity by itself: only streams keep a connection from idling out.
        self._in_receive = True
        h = self.h2
        try:
            h.receive(data)
        except fr.ConnectionFailed as exc:
            # The codec has queued a GOAWAY with the error code: send it and close.
            self._in_receive = False
            self._failed(str(exc))
            return
        finally:
            self._in_receive = False
        self._flush_now()

    def _failed(self, reason: str) -> None:
        """After a connection error (GOAWAY queued by the codec): streams fail, close."""
        log.debug("HTTP/2 connection from %s:%s closed: %s", self.info.peer_host, self.info.peer_port, reason)
        self._fail_streams(BodyAborted(f"HTTP/2 connection error: {reason}"))
        self.h2.stop()
        self._flush_now()
        self.closing = True          # no second (NO_ERROR) GOAWAY from close()
        # A peer that reads nothing would keep a graceful close waiting forever.
        self.close(abort=self.write_paused)

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        self.closing = True
        if self.tracker is not None:
            self.tracker.discard(self)
        self._fail_streams(BodyAborted("client connection lost"))
        self._fail_drains()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._held = []
        self.transport = None
        # The codec calls back into this object: without the link back, a closed
        # connection is freed by reference counting, not by the cyclic GC.
        self.h2.stop()
        self.h2.app = None

    # -- codec callbacks (h2_frames.ServerCodec) -----------------------------------------------
    def on_request(self, sid: int, block: list, ended: bool) -> None:
        h = self.h2
        if self.closing or (self._last_stream_id is not None and sid > self._last_stream_id):
            h.reset_stream(sid, _REFUSED_STREAM)
            return
        if len(self.streams) >= self.max_streams:
            h.reset_stream(sid, _REFUSED_STREAM)
            h.budget.reset()
            return
        try:
            method, path, scheme, auth, items, expected, noted = _parse_request(block, self.limits)
        except _Malformed as exc:
            self._reject(sid, exc.status, str(exc), ended=ended)
            h.budget.reset()
            return
        req = RequestHead(method, path, Headers(items), scheme, auth, "HTTP/2", noted)
        stream = H2Stream(self, sid, req, expected)
        self.streams[sid] = stream
        task = stream.task = self.loop.create_task(self.handler(stream))
        task.add_done_callback(stream._task_done)
        if ended:
            self.on_end(sid)

    def on_data(self, sid: int, data: bytes, flow: int) -> None:
        s = self.streams.get(sid)
        if s is None:
            self.h2.ack(flow, sid)
            return
        s._moved = True
        s._received += len(data)
        if s._expected is not None and s._received > s._expected:
            self.h2.ack(flow, sid)
            s._kill(_PROTOCOL_ERROR)
            self.h2.budget.reset()
            return
        s.body.feed(data)
        if s._paused:
            s._unacked += flow
        else:
            self.h2.ack(flow, sid)

    def on_end(self, sid: int) -> None:
        s = self.streams.get(sid)
        if s is None:
            return
        s._remote_ended = True
        if s._expected is not None and s._received != s._expected:
            s._kill(_PROTOCOL_ERROR)
            self.h2.budget.reset()
            return
        s.body.feed_eof(s._trailers)

    def on_trailers(self, sid: int, block: list) -> None:
        s = self.streams.get(sid)
        if s is None:
            return
        try:
            items, _ = _headers_to_list(block, self.limits, trailers=True)
        except _Malformed:
            s._kill(_PROTOCOL_ERROR)
            self.h2.budget.reset()
            return
        s._trailers = Headers(items)

    def on_reset(self, sid: int, code: int) -> None:
        # The codec counts the reset in the connection's flood budget after this.
        s = self.streams.pop(sid, None)
        if s is None:
            return
        s._remote_reset(BodyAborted(f"stream reset by client ({_code(code)})"))
        self.last_activity = time.monotonic()
        self._maybe_idle()

    def on_stream_error(self, sid: int, code: int) -> None:
        # A stream error the codec found (WINDOW_UPDATE 0, a flow-control overrun, ...);
        # the codec has counted the reset it makes us send.
        s = self.streams.get(sid)
        if s is not None:
            s._kill(code)

    def on_window(self, sid: int) -> None:
        if sid:
            s = self.streams.get(sid)
            if s is not None and s._waiter is not None:
                s._wake()
        else:
            self._wake_all()

    def on_goaway(self, code: int) -> None:
        self._peer_goaway = True
        if code != _NO_ERROR:
            self._fail_streams(BodyAborted(f"client sent GOAWAY ({_code(code)})"))
            self.h2.stop()
            self._in_receive = False
            self._flush_now()
            self.close()
            return
        self._maybe_idle()

    def _reject(self, sid: int, status: int, message: str, ended: bool) -> None:
        """Answer a malformed request on its own stream; nothing reaches the proxy."""
        body = ('{"error":"bad_request","message":"%s"}\n' % message.replace('"', "'")).encode()
        h = self.h2
        try:
            h.send_headers(sid, [_status_field(status), (b"content-type", b"application/json"),
                                 (b"content-length", str(len(body)).encode())])
            if len(body) > h.send_window(sid):
                h.reset_stream(sid, _PROTOCOL_ERROR)
                return
            h.send_data(sid, body, end_stream=True)
            if not ended:
                h.reset_stream(sid, _NO_ERROR)
        except H2Error:
            h.reset_stream(sid, _PROTOCOL_ERROR)

    def _wake_all(self) -> None:
        for s in self.streams.values():
            if s._waiter is not None:
                s._wake()

    def _fail_streams(self, exc: BaseException) -> None:
        streams = list(self.streams.values())
        self.streams.clear()
        for s in streams:
            s._remote_reset(exc)

    def _stream_closed(self, s: H2Stream) -> None:
        if self.streams.get(s.stream_id) is s:
            del self.streams[s.stream_id]
        self.last_activity = time.monotonic()
        self._schedule_flush()
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        if self.streams:
            return
        if self._last_stream_id is not None or self._peer_goaway:
            # Draining (or the client said goodbye): the last stream is done.
            self._flush_now()
            self.close()

    # -- output -------------------------------------------------------------------------------
    def _flush_now(self) -> None:
        h = self._flush_handle
        if h is not None:
            self._flush_handle = None
            h.cancel()
        self._queued_bytes = 0
        if self._held:
            held = self._held
            self._held = []
            for s in held:
                if s._held is not None:
                    try:
                        if not s._release_held(False):
                            # Its window shrank (SETTINGS) below the chunk: retried at the next
                            # flush; senders waiting on the connection window are woken then.
                            self._held.append(s)
                    except H2Error:
                        s._kill(_INTERNAL_ERROR)
            if self._held_stuck and len(self._held) < len(held):
                self._wake_all()
            self._held_stuck = bool(self._held)
        data = self.h2.data_to_send()
        if data:
            t = self.transport
            if t is not None and not t.is_closing():
                t.write(data)

    # -- lifecycle (the server's connection API, as in http/h1.py) -----------------------------
    @property
    def idle(self) -> bool:
        return not self.streams

    def check_deadlines(self, now: float) -> None:
        """Called by the server's periodic sweep: the header block deadline, and the
        no-progress deadline of each open stream. A timeout of 0 is no limit."""
        if self.transport is None:
            return
        h = self.h2
        if h.header_block_expired(now):
            h.budget.count("header_timeout")
            h.close_connection(fr.ENHANCE_YOUR_CALM)
            self._failed("header block not complete within header_timeout")
            return
        limit = self.limits.stream_idle_timeout
        if not self.streams or not limit or limit <= 0:
            return
        for s in list(self.streams.values()):
            if s._moved:
                s._moved = False
                s._idle_since = now
            elif now - s._idle_since >= limit and not s.done:
                # Nothing moved either way (a zero window, a silent upstream): free the
                # stream and what it holds upstream.
                log.info("resetting HTTP/2 stream %d from %s: no progress for %.1fs", s.stream_id,
                         self.info.peer_host, now - s._idle_since)
                s._kill(_CANCEL)
        self._flush_now()

    def shutdown(self) -> None:
        """Drain: GOAWAY with the last stream id, finish the streams in flight, then close."""
        if self._last_stream_id is not None or self.transport is None:
            return
        h = self.h2
        self._last_stream_id = h.highest_inbound_stream_id
        h.close_connection(_NO_ERROR, last_stream_id=self._last_stream_id)
        self._flush_now()
        if self.idle:
            self.close()

    def close(self, abort: bool = False) -> None:
        """Close now: GOAWAY (if not sent yet), then the transport; streams in flight fail."""
        t = self.transport
        if t is None or t.is_closing():
            self.closing = True
            return
        if not self.closing and self._last_stream_id is None:
            self._last_stream_id = self.h2.highest_inbound_stream_id
            self.h2.close_connection(_NO_ERROR, last_stream_id=self._last_stream_id)
        self.closing = True
        self._flush_now()
        if abort:
            t.abort()
        else:
            t.close()


_code = fr.error_name
