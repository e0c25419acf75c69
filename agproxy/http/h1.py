"""HTTP/1.1 server side: bytes → requests with httptools (llhttp), responses → bytes.

Theory of operation: `data_received` only parses; parser callbacks build a
`H1Stream` per request and hand it to the proxy: `handler(stream)`, awaited by
the connection's one serving task, which waits for the next request once a
handler returns (requests on a connection are answered one at a time anyway; a
task per request cost ~7k instructions, callgrind: Task, its registration in
asyncio's weak set of tasks, the wrapper coroutine). Requests are answered
strictly in order: a pipelined request waits in a bounded queue until the one
before it has been answered (reading pauses when the queue is full). Body bytes go to the stream's `BodyReader`, which pauses the socket above
its high-water mark. The response head is held until the first body chunk or the
end so small answers leave in one write; bodies without a length are chunked.

Framing attacks are refused before the proxy sees them: Content-Length together
with Transfer-Encoding, conflicting Content-Lengths, a Transfer-Encoding other than
a lone `chunked` (400; 501 for a coding before it), a missing, repeated or invalid
Host, and oversize header blocks (431) all end in an error response and
`Connection: close` — other connections are untouched, and requests pipelined
before the bad one are answered first. A framing error found in a body whose head
was already handed to the proxy fails that body with `BodyMalformed`: the exchange
answers 400 and aborts the upstream request. Header names with `_` are dropped,
refused or kept (`headers_with_underscores`): CGI-style backends read `x_user` as
`x-user`. A connection whose first bytes are the HTTP/2 preface (or a prefix of it,
until it diverges) switches to the HTTP/2 adapter (h2c prior knowledge).

Head size: `max_header_bytes` counts the target and each field (name + value + 4).
The fields are not summed per header: a head is no larger than the reads it came
in, so only a head whose reads (plus one byte per field) pass the limit is measured,
once it is complete. httptools keeps a field's bytes until the field ends, so a head
still arriving once the reads after its first one pass twice the limit is refused
(431) without waiting for its end.

Deadlines cost no timer per request: the server's periodic sweep calls
`check_deadlines(now)`. The request head must arrive within `header_timeout` of its
first byte (of the connection's start for the first request): 408. A request in
flight with no progress either way (bytes read, bytes written, the write buffer
draining) for `stream_idle_timeout` aborts the connection; the handler's task is
cancelled, which aborts its upstream request. A client that half-closes after its
requests gets their answers, then the close. A handler that returns without
finishing its response gets a 500 (nothing sent yet) or the connection aborted.

httptools rather than h11: this is the hot path, and h11 measured at a quarter of
httptools' speed for a relay on this machine.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import time
from http import HTTPStatus
from typing import Callable

import httptools

from agproxy.http.flow import WriteFlowControl
from agproxy.http.messages import (NOTED_FIELDS, BodyAborted, BodyMalformed, BodyReader, ConnInfo, Headers,
                                   RequestHead, ServerStream, field_name)

log = logging.getLogger("agproxy.http")

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_PIPELINE = 16
_REASONS = {s.value: s.phrase for s in HTTPStatus}
_ERROR_CODES = {400: "bad_request", 408: "request_timeout", 414: "uri_too_long",
                431: "request_header_fields_too_large", 500: "internal_error", 501: "not_implemented"}

# RFC 9112 §3.2 / RFC 3986 §3.2.2: uri-host [ ":" port ], no userinfo. IP-literal (with
# IPvFuture), or a reg-name of unreserved, pct-encoded and sub-delims characters.
_AUTHORITY = re.compile(
    r"(?:\[(?:[0-9A-Fa-f:.]+|v[0-9A-Fa-f]+\.[A-Za-z0-9\-._~!$&'()*+,;=:]+)\]"
    r"|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*)(?::[0-9]*)?")
_VALID_AUTHORITIES: set[str] = set()
# Names on_header notes: its own framing fields, and NOTED_FIELDS for the layers above.
_FRAMING = frozenset({"content-length", "transfer-encoding", "host", "expect", *NOTED_FIELDS})
# Response fields send_head frames itself: content-length kept, the others dropped.
_FRAMING_OUT = frozenset({"content-length", "connection", "transfer-encoding", "keep-alive"})


#: Header names seen without an underscore, raw → lowercase str. One dict lookup per
#: header finds the name and proves it has no underscore: a `b"_" in name` test cost
#: ~2,400 instructions per header (bytes-in-bytes goes through the buffer protocol),
#: +8k per request on the policy route (callgrind).
_PLAIN_NAMES: dict[bytes, str] = {}


def _new_name(raw: bytes, underscores: str) -> str | None:
    """A name not in _PLAIN_NAMES: its str, or None when `underscores` drops it."""
    name = field_name(raw)
    if "_" in name:
        if underscores == "drop":
            return None
        if underscores == "reject":
            raise BadRequest(400, "header names with underscores are not accepted")
    elif len(_PLAIN_NAMES) < 2048:
        _PLAIN_NAMES[raw] = name
    return name


def valid_authority(value: str) -> bool:
    """Host / absolute-form authority syntax. Hosts repeat on every request: the valid
    ones are remembered (a bounded set), so the regex runs once per distinct host."""
    if value in _VALID_AUTHORITIES:
        return True
    if _AUTHORITY.fullmatch(value) is None or value.startswith(":"):   # (a port, no host)
        return False
    if len(_VALID_AUTHORITIES) < 1024:
        _VALID_AUTHORITIES.add(value)
    return True


class Limits:
    """Per-connection limits and deadlines of the server adapters (from [gateway])."""

    __slots__ = ("max_header_bytes", "max_headers", "idle_timeout", "max_concurrent_streams",
                 "body_high_water", "header_timeout", "stream_idle_timeout",
                 "headers_with_underscores")

    def __init__(self, max_header_bytes: int = 65536, max_headers: int = 100,
                 idle_timeout: float = 60.0, max_concurrent_streams: int = 100,
                 body_high_water: int = 256 * 1024, header_timeout: float = 10.0,
                 stream_idle_timeout: float = 300.0, headers_with_underscores: str = "drop"):
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.idle_timeout = idle_timeout
        self.max_concurrent_streams = max_concurrent_streams
        self.body_high_water = body_high_water
        self.header_timeout = header_timeout
        self.stream_idle_timeout = stream_idle_timeout
        self.headers_with_underscores = headers_with_underscores


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class H1Stream(ServerStream):
    __slots__ = ("conn", "request", "body", "proto", "head_sent", "_head", "_chunked",
                 "_no_body", "keep_alive", "done", "_expect_continue")

    def __init__(self, proto: "H1Connection", request: RequestHead, keep_alive: bool, expect: bool):
        self.proto = proto
        self.conn = proto.info
        self.request = request
        self.keep_alive = keep_alive
        self._expect_continue = expect
        self.body = BodyReader(proto.pause_reading, proto.resume_reading, proto.limits.body_high_water,
                               self._send_continue if expect else None)
        self.head_sent = False
        self._head: bytes | None = None
        self._chunked = False
        self._no_body = request.method == "HEAD"
        self.done = False

    def _send_continue(self) -> None:
        if not self.head_sent and self._head is None and self.proto.current is self:
            self.proto.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def unfinished(self) -> None:
        """The handler's task ended without end() or abort() (a bug above this layer):
        a 500 if nothing reached the client yet, else the connection is aborted, so the
        connection never stays busy and the client never takes a cut body for whole."""
        proto = self.proto
        if proto.transport is None or proto.transport.is_closing():
            self.done = True
            return
        log.warning("handler for %s %s returned without finishing its response",
                    self.request.method, self.request.path)
        if self.head_sent:
            self.abort()
            return
        self._head = None
        self.done = True
        self.keep_alive = False
        proto.write(error_response(500, "the gateway failed to handle this request"))
        proto.stream_finished(self)

    def send_head(self, status: int, headers: Headers) -> None:
        if self.head_sent or self._head is not None:
            raise RuntimeError("response head already sent")
        req = self.request
        if not self.body.complete:
            # The client is still sending a body we may never read: close after answering.
            self.keep_alive = False
        if self.proto.closing:
            self.keep_alive = False
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"]
        has_length = False
        for k, v in headers.items:
            if k in _FRAMING_OUT:      # one set test per field (measured hot)
                if k != "content-length":
                    continue
                has_length = True
            lines.append(f"{k}: {v}\r\n")
        if status < 200 or status in (204, 304):
            self._no_body = True
        elif not has_length and not self._no_body:
            if req.protocol == "HTTP/1.1":
                self._chunked = True
                lines.append("transfer-encoding: chunked\r\n")
            else:
                self.keep_alive = False   # HTTP/1.0: the close delimits the body
        if not self.keep_alive:
            lines.append("connection: close\r\n")
        elif req.protocol == "HTTP/1.0":
            lines.append("connection: keep-alive\r\n")
        lines.append("\r\n")
        self._head = "".join(lines).encode("latin-1")

    async def send_data(self, data: bytes) -> None:
        if self.done:
            raise ConnectionResetError("response already finished")
        head = self._head
        if self._no_body:
            data = b""
        elif self._chunked and data:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        if head is not None:
            self._head = None
            self.head_sent = True
            data = head + data
        if data:
            proto = self.proto
            if proto.transport is None or proto.transport.is_closing():
                raise ConnectionResetError("client went away")
            proto.transport.write(data)
            proto.progress = True
            if proto.write_paused:
                await proto.drain()

    async def end(self, trailers: Headers | None = None, data: bytes = b"") -> None:
        if self.done:
            if data:
                raise ConnectionResetError("response already finished")
            return
        tail = b""
        if self._chunked:
            if trailers:
                t = "".join(f"{k}: {v}\r\n" for k, v in trailers.items)
                tail = b"0\r\n" + t.encode("latin-1") + b"\r\n"
            else:
                tail = b"0\r\n\r\n"
            if data and not self._no_body:
                tail = b"%x\r\n%b\r\n%b" % (len(data), data, tail)
        elif data and not self._no_body:
            tail = data
        if data and (self.proto.transport is None or self.proto.transport.is_closing()):
            raise ConnectionResetError("client went away")
        head = self._head
        if head is not None:
            self._head = None
            self.head_sent = True
            tail = head + tail
        self.done = True
        proto = self.proto
        if tail and proto.transport is not None and not proto.transport.is_closing():
            proto.transport.write(tail)
        proto.stream_finished(self)

    def abort(self) -> None:
        if self.done:
            return
        self.done = True
        self.keep_alive = False
        self.proto.close(abort=True)


class H1Connection(WriteFlowControl, asyncio.Protocol):
    """One client connection speaking HTTP/1.1 (or switching to HTTP/2)."""

    # Slots, not a __dict__: at 30 attributes CPython 3.11 stops sharing instance-dict
    # keys and attribute reads on this hot object slow down (slots: -2k instructions
    # per relayed request, callgrind).
    __slots__ = ("handler", "info", "limits", "on_h2", "tracker", "transport", "parser", "scheme",
                 "current", "pipeline", "closing", "write_paused", "_drain_waiters", "_read_paused_by",
                 "_first", "_preface", "_url", "_headers", "_header_bytes", "_cl_count", "_te", "_host", "_expect",
                 "_noted", "_underscores", "_reading_stream", "_reject_payload", "_abort_reason", "last_activity",
                 "head_start", "progress", "_quiet_since", "_in_head", "_read_len", "_head_first",
                 "_head_reads", "_task", "_wake", "_next", "__weakref__")

    write_lost_message = "client went away"

    def __init__(self, handler: Callable, info: ConnInfo, limits: Limits,
                 on_h2: Callable | None = None, tracker=None):
        self.handler = handler
        self.info = info
        self.limits = limits
        self.on_h2 = on_h2            # (transport, first_bytes) -> None: hand over to HTTP/2
        self.tracker = tracker        # the server's connection registry (idle sweep, drain)
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.scheme = "https" if info.tls else "http"
        self.current: H1Stream | None = None
        self.pipeline: collections.deque[H1Stream] = collections.deque()
        self.closing = False
        self.write_paused = False
        self._drain_waiters: list[asyncio.Future] = []
        self._read_paused_by = 0
        self._first = True
        self._preface = b""               # a prefix of the HTTP/2 preface, held until it diverges
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._header_bytes = 0
        self._cl_count = 0
        self._te: str | None = None
        self._host: str | None = None
        self._expect: str | None = None
        self._noted = 0                   # NOTED_FIELDS bits of the head being read
        self._underscores = limits.headers_with_underscores
        self._reading_stream: H1Stream | None = None
        self._reject_payload: bytes | None = None   # answered once the requests before it are
        self._abort_reason: str | None = None   # why we aborted (the handler's cancel message)
        self.last_activity = time.monotonic()
        self.head_start = self.last_activity   # first byte of the head being read; 0: none
        self.progress = True                    # set on I/O, cleared by the sweep
        self._quiet_since = self.last_activity
        self._in_head = False       # between on_message_begin and on_headers_complete
        self._read_len = 0          # the read being parsed
        self._head_first = 0        # the read the head began in (an upper bound of its part)
        self._head_reads = 0        # the reads after it, while the head is incomplete
        self._task: asyncio.Task | None = None        # the serving task (_serve), once a request came
        self._wake: asyncio.Future | None = None      # what it awaits between requests
        self._next: H1Stream | None = None            # started while it was still in a handler

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.info.alpn == "h2" and self.on_h2 is not None:
            self._first = False
            self.on_h2(transport, b"")
            return
        if self.tracker is not None:
            self.tracker.add(self)

    def data_received(self, data: bytes) -> None:
        if self.parser is None:
            return   # rejected: nothing more is read from this connection
        self.last_activity = time.monotonic()
        self.progress = True
        if self._first:
            data = self._sniff(data)
            if not data:
                return
        n = self._read_len = len(data)
        if self._in_head:
            self._head_reads += n
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            last = self.pipeline[-1] if self.pipeline else self.current
            if last is not None and self._reading_stream is None:
                # The upgrade request itself went to the proxy: it is answered as a plain
                # request (Upgrade is hop-by-hop), then the connection closes.
                self.parser = None  # type: ignore[assignment]
                last.keep_alive = False
                self.pause_reading()
            else:
                self._reject(BadRequest(501, "protocol upgrade is not supported"))
        except BadRequest as exc:
            self._reject(exc)
        except httptools.HttpParserError as exc:
            # httptools wraps what our callbacks raise; the cause carries our verdict.
            cause = exc.__cause__ or exc.__context__
            self._reject(cause if isinstance(cause, BadRequest) else BadRequest(400, _parser_message(exc)))
        else:
            if self._in_head and self._head_reads > 2 * self.limits.max_header_bytes:
                self._reject(BadRequest(431, "request header fields too large"))

    def _sniff(self, data: bytes) -> bytes:
        """The first reads: HTTP/2 preface (→ the HTTP/2 adapter, b"" returned) or not
        (everything held so far returned, for the HTTP/1.1 parser). A prefix of the
        preface is held until it completes or diverges, however the reads split it."""
        if self.on_h2 is None:
            self._first = False
            return data
        if self._preface:
            data = self._preface + data
        n = min(len(data), 24)
        if data[:n] != H2_PREFACE[:n]:
            self._first = False
            self._preface = b""
            return data
        if n < 24:
            self._preface = data
            return b""
        self._first = False
        self._preface = b""
        if self.tracker is not None:
            self.tracker.discard(self)
        self.on_h2(self.transport, data)
        return b""

    def eof_received(self) -> bool | None:
        """The client half-closed (shutdown(SHUT_WR)): answer the requests it completed,
        then close, as nginx does. A request cut short is failed; TLS (uvloop's SSL
        transport cannot stay half-open) and a connection with nothing to answer close."""
        s = self._reading_stream
        if s is not None:
            self._reading_stream = None
            s.keep_alive = False
            s.body.fail(BodyAborted("client closed before the request body was complete"))
        last = self.pipeline[-1] if self.pipeline else self.current
        if last is None or self.info.tls:
            return None
        last.keep_alive = False
        return True

    def connection_lost(self, exc) -> None:
        self.closing = True
        if self.tracker is not None:
            self.tracker.discard(self)
        reason = self._abort_reason
        err = BodyAborted(reason or "client connection lost")
        current = self.current
        for s in ([current] if current else []) + list(self.pipeline):
            s.body.fail(err)
        task = self._task
        if task is not None:
            self._task = None       # (it refers back to us)
            # Waiting for a request, or in the handler of one not finished: cancel it. A
            # handler still running after its response ends on its own, then the task.
            if self._wake is not None or (current is not None and not current.done):
                task.cancel(reason)
        self.pipeline.clear()
        self._fail_drains()
        self.transport = None
        self.parser = None      # it refers back to us: a closed connection is no cycle

    def resume_writing(self) -> None:
        self.progress = True   # the client is reading again
        super().resume_writing()

    # -- httptools callbacks ------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._in_head = True
        self._head_first = self._read_len
        self._head_reads = 0
        self._cl_count = 0
        self._te = None
        self._host = None
        self._expect = None
        self._noted = 0
        if not self.head_start:   # (the first request's deadline runs from the connection's start)
            self.head_start = self.last_activity

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)
        if self._header_bytes > self.limits.max_header_bytes:
            raise BadRequest(431 if len(self._url) < self.limits.max_header_bytes else 414,
                             "request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        # Per header, measured hot: the size is checked per head (on_headers_complete).
        if len(self._headers) >= self.limits.max_headers:
            raise BadRequest(431, "request header fields too large")
        n = _PLAIN_NAMES.get(name)
        if n is None:
            n = _new_name(name, self._underscores)
            if n is None:
                self._header_bytes += len(name) + len(value) + 4   # dropped, still counted
                return
        v = value.decode("latin-1")
        if n in _FRAMING:
            if n == "content-length":
                self._cl_count += 1
                if self._cl_count > 1:
                    raise BadRequest(400, "duplicate Content-Length")
            elif n == "transfer-encoding":
                self._te = v if self._te is None else f"{self._te}, {v}"
            elif n == "host":
                if self._host is not None:
                    raise BadRequest(400, "more than one Host header")
                self._host = v
            elif n == "expect":
                if self._expect is None:
                    self._expect = v
            else:
                self._noted |= NOTED_FIELDS[n]
        self._headers.append((n, v))

    def _check_head_size(self) -> None:
        size = self._header_bytes     # the target, and fields dropped for their name
        for k, v in self._headers:
            size += len(k) + len(v) + 4
        if size > self.limits.max_header_bytes:
            raise BadRequest(431, "request header fields too large")

    def on_headers_complete(self) -> None:
        self.head_start = 0.0
        self._in_head = False
        # Each field counts at most one byte more than it takes on the wire.
        if self._head_first + self._head_reads + len(self._headers) > self.limits.max_header_bytes:
            self._check_head_size()
        p = self.parser
        version = p.get_http_version()
        if self._te is not None:
            if self._cl_count:
                raise BadRequest(400, "both Content-Length and Transfer-Encoding")
            if self._te != "chunked" or version != "1.1":
                _check_transfer_encoding(self._te, version)
        host = self._host
        if host is None:
            if version == "1.1":
                raise BadRequest(400, "missing Host header")
            host = ""
        elif host not in _VALID_AUTHORITIES and not valid_authority(host):
            raise BadRequest(400, "invalid Host header")
        headers = Headers(self._headers)
        url = self._url.decode("latin-1")
        if not url.startswith("/"):
            if url == "*" and p.get_method() == b"OPTIONS":
                pass
            else:
                # absolute-form: the URL's authority replaces Host, which is still
                # required and checked (RFC 9112 §3.2, §3.2.2)
                host, url = _absolute_form(url)
                if self._host is None:
                    headers.items.append(("host", host))
                else:
                    headers.items = [("host", host) if k == "host" else (k, v) for k, v in headers.items]
        req = RequestHead(p.get_method().decode("ascii"), url, headers, self.scheme, host,
                          "HTTP/1.1" if version == "1.1" else "HTTP/1.0", self._noted)
        expect = self._expect      # (noted by on_header: no scan of the fields)
        expect_continue = expect is not None and expect.lower() == "100-continue" and version == "1.1"
        stream = H1Stream(self, req, p.should_keep_alive(), expect_continue)
        self._reading_stream = stream
        self._headers = []
        if self.current is None:
            self._start(stream)
        else:
            self.pipeline.append(stream)
            if len(self.pipeline) >= MAX_PIPELINE:
                self.pause_reading()

    def on_body(self, data: bytes) -> None:
        s = self._reading_stream
        if s is not None:
            s.body.feed(data)

    def on_message_complete(self) -> None:
        s = self._reading_stream
        if s is not None:
            self._reading_stream = None
            s.body.feed_eof()

    # -- streams ------------------------------------------------------------------------
    def _start(self, stream: H1Stream) -> None:
        self.current = stream
        self.progress = True
        wake = self._wake
        if wake is not None:                # the serving task waits: this is its next request
            self._wake = None
            wake.set_result(stream)
        elif self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._serve(stream))
        else:                               # it is still in the handler of the one before
            self._next = stream

    async def _serve(self, stream: H1Stream) -> None:
        """The connection's serving task: each request's handler in turn."""
        while True:
            try:
                await self.handler(stream)
            except asyncio.CancelledError:
                if self.transport is None:
                    raise           # the connection is gone (connection_lost cancelled us)
                # A cancel meant for this request alone (when it had a task of its own,
                # that task ended): it is over, the connection goes on.
                asyncio.current_task().uncancel()
            except Exception:   # (the proxy's handler catches its own; this is a last resort)
                log.exception("request handler failed")
            finally:
                if not stream.done:
                    stream.unfinished()
            nxt = self._next
            if nxt is not None:
                self._next = None
                stream = nxt
                continue
            if self.transport is None:      # connection lost: nothing more comes
                return
            wake = self._wake = asyncio.get_running_loop().create_future()
            stream = await wake

    def stream_finished(self, stream: H1Stream) -> None:
        if stream is not self.current:
            return
        self.current = None
        now = self.last_activity = time.monotonic()
        if not stream.keep_alive or self.closing:
            self.close()
            return
        if self.pipeline:
            nxt = self.pipeline.popleft()
            if len(self.pipeline) == MAX_PIPELINE - 1:
                self.resume_reading()
            self._start(nxt)
        elif self._reject_payload is not None:
            self.closing = True
            self.write(self._reject_payload)
            self.close()
        elif self.head_start:
            self.head_start = now   # a head that waited for this answer: its deadline starts now

    def check_deadlines(self, now: float) -> None:
        """Called by the server's periodic sweep: the head deadline while no request is in
        flight, the no-progress deadline while one is. A timeout of 0 is no limit."""
        limits = self.limits
        if self.current is None:
            start = self.head_start
            if start and limits.header_timeout and now - start >= limits.header_timeout \
                    and self.parser is not None and not self.closing:
                self._reject(BadRequest(408, "the request head did not arrive in time"))
        elif self.progress:
            self.progress = False
            self._quiet_since = now
        elif limits.stream_idle_timeout and now - self._quiet_since >= limits.stream_idle_timeout:
            log.info("closing a connection from %s: no progress for %.1fs", self.info.peer_host,
                     now - self._quiet_since)
            self._abort_reason = "stream idle timeout"
            self.close(abort=True)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def pause_reading(self) -> None:
        self._read_paused_by += 1
        if self._read_paused_by == 1 and self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._read_paused_by > 0:
            self._read_paused_by -= 1
            if self._read_paused_by == 0 and self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    @property
    def idle(self) -> bool:
        return self.current is None and not self.pipeline

    def close(self, abort: bool = False) -> None:
        self.closing = True
        t = self.transport
        if t is not None and not t.is_closing():
            if abort:
                t.abort()
            else:
                t.close()

    def shutdown(self) -> None:
        """Drain: finish the request in flight, then close; idle connections close now."""
        self.closing = True
        if self.idle:
            self.close()

    def _reject(self, exc: BadRequest) -> None:
        """Answer a malformed request and close; the requests before it are answered first."""
        self.parser = None  # type: ignore[assignment]
        s = self._reading_stream
        if s is not None:
            # Its head already went to the proxy (which may be forwarding the body): fail
            # the body, so the exchange answers 400 and aborts the upstream request.
            self._reading_stream = None
            s.keep_alive = False
            s.body.fail(BodyMalformed(str(exc)))
            return
        payload = error_response(exc.status, str(exc))
        if self.current is None:
            self.closing = True
            self.write(payload)
            self.close()
        else:
            self._reject_payload = payload
            self.pause_reading()


def error_response(status: int, message: str) -> bytes:
    """A complete JSON error response that closes the connection."""
    body = ('{"error":"%s","message":"%s"}\n' % (_ERROR_CODES.get(status, "bad_request"),
                                                  message.replace('"', "'"))).encode()
    return (f"HTTP/1.1 {status} {_REASONS.get(status, 'Bad Request')}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


def _check_transfer_encoding(value: str, version: str) -> None:
    """Only a lone `chunked` frames a request body (RFC 9112 §6.1, §6.3): chunked not
    last → 400; another coding before it → 501 (not implemented: the body would reach
    the upstream decoded from chunked only); HTTP/1.0 has no Transfer-Encoding."""
    if version != "1.1":
        raise BadRequest(400, "Transfer-Encoding in an HTTP/1.0 request")
    codings = [c.strip().lower() for c in value.split(",") if c.strip()]
    if not codings or codings[-1] != "chunked" or "chunked" in codings[:-1]:
        raise BadRequest(400, "Transfer-Encoding must be chunked, once and last")
    if len(codings) > 1:
        raise BadRequest(501, "transfer codings other than chunked are not implemented")


def _absolute_form(url: str) -> tuple[str, str]:
    """`http://authority/path?query` → (authority, "/path?query"); an empty path is "/"."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        raise BadRequest(400, "invalid request target")
    end = len(rest)
    for c in "/?#":
        i = rest.find(c)
        if 0 <= i < end:
            end = i
    authority, tail = rest[:end], rest[end:]
    if not authority or not valid_authority(authority):
        raise BadRequest(400, "invalid authority in the request target")
    return authority, tail if tail.startswith("/") else "/" + tail


def _parser_message(exc: Exception) -> str:
    text = str(exc) or "malformed request"
    return text.replace("\r", " ").replace("\n", " ")[:200]
