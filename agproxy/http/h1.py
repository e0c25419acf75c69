"""HTTP/1.1 server side: bytes → requests with httptools (llhttp), responses → bytes.

Theory of operation: `data_received` only parses; parser callbacks build a
`H1Stream` per request and hand it to the proxy (`handler(stream)` in a task).
Requests are answered strictly in order: a pipelined request waits in a bounded
queue until the one before it has been answered (reading pauses when the queue is
full). Body bytes go to the stream's `BodyReader`, which pauses the socket above
its high-water mark. The response head is held until the first body chunk or the
end so small answers leave in one write; bodies without a length are chunked.

Framing attacks are refused before the proxy sees them: Content-Length together
with Transfer-Encoding, conflicting Content-Lengths, and oversize header blocks
(431) all end in an error response and `Connection: close` — other connections
are untouched. A connection whose first bytes are the HTTP/2 preface switches to
the HTTP/2 adapter (h2c prior knowledge on the plaintext side of a port).

httptools rather than h11: this is the hot path, and h11 measured at a quarter of
httptools' speed for a relay on this machine.
"""

from __future__ import annotations

import asyncio
import collections
import time
from http import HTTPStatus
from typing import Callable

import httptools

from agproxy.http.flow import WriteFlowControl
from agproxy.http.messages import (BodyAborted, BodyReader, ConnInfo, Headers, RequestHead, ServerStream,
                                   field_name)

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_PIPELINE = 16
_REASONS = {s.value: s.phrase for s in HTTPStatus}


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
                 "_no_body", "keep_alive", "done", "_expect_continue", "task")

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
        self.task: asyncio.Task | None = None

    def _send_continue(self) -> None:
        if not self.head_sent and self._head is None and self.proto.current is self:
            self.proto.write(b"HTTP/1.1 100 Continue\r\n\r\n")

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
            if k == "content-length":
                has_length = True
            elif k in ("connection", "transfer-encoding", "keep-alive"):
                continue
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
            if proto.write_paused:
                await proto.drain()

    async def end(self, trailers: Headers | None = None) -> None:
        if self.done:
            return
        tail = b""
        if self._chunked:
            if trailers:
                t = "".join(f"{k}: {v}\r\n" for k, v in trailers.items)
                tail = b"0\r\n" + t.encode("latin-1") + b"\r\n"
            else:
                tail = b"0\r\n\r\n"
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
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._header_bytes = 0
        self._cl_count = 0
        self._te = False
        self._reading_stream: H1Stream | None = None
        self.last_activity = time.monotonic()

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
        if self._first:
            if data[:24] == H2_PREFACE[: len(data[:24])] and self.on_h2 is not None:
                if len(data) < 24:
                    self._pending_preface = getattr(self, "_pending_preface", b"") + data
                    data = self._pending_preface
                    if len(data) < 24:
                        return
                self._first = False
                if self.tracker is not None:
                    self.tracker.discard(self)
                self.on_h2(self.transport, data)
                return
            self._first = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(BadRequest(501, "protocol upgrade is not supported"))
        except BadRequest as exc:
            self._reject(exc)
        except httptools.HttpParserError as exc:
            # httptools wraps what our callbacks raise; the cause carries our verdict.
            cause = exc.__cause__ or exc.__context__
            self._reject(cause if isinstance(cause, BadRequest) else BadRequest(400, _parser_message(exc)))

    def connection_lost(self, exc) -> None:
        self.closing = True
        if self.tracker is not None:
            self.tracker.discard(self)
        err = BodyAborted("client connection lost")
        for s in ([self.current] if self.current else []) + list(self.pipeline):
            s.body.fail(err)
            if s.task is not None and not s.done:
                s.task.cancel()
        self.pipeline.clear()
        self._fail_drains()
        self.transport = None

    # -- httptools callbacks ------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._cl_count = 0
        self._te = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)
        if self._header_bytes > self.limits.max_header_bytes:
            raise BadRequest(431 if len(self._url) < self.limits.max_header_bytes else 414,
                             "request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self.limits.max_header_bytes or len(self._headers) >= self.limits.max_headers:
            raise BadRequest(431, "request header fields too large")
        n = field_name(name)
        if n == "content-length":
            self._cl_count += 1
            if self._cl_count > 1:
                raise BadRequest(400, "duplicate Content-Length")
        elif n == "transfer-encoding":
            self._te = True
        self._headers.append((n, value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        if self._te and self._cl_count:
            raise BadRequest(400, "both Content-Length and Transfer-Encoding")
        p = self.parser
        version = p.get_http_version()
        headers = Headers(self._headers)
        host = headers.get("host")
        if host is None:
            if version == "1.1":
                raise BadRequest(400, "missing Host header")
            host = ""
        url = self._url.decode("latin-1")
        if not url.startswith("/"):
            if url == "*" and p.get_method() == b"OPTIONS":
                pass
            elif url.startswith(("http://", "https://")):
                # absolute-form: the authority in the URL wins (RFC 9112 §3.2.2)
                rest = url.split("://", 1)[1]
                slash = rest.find("/")
                host, url = (rest[:slash], rest[slash:]) if slash >= 0 else (rest, "/")
            else:
                raise BadRequest(400, "invalid request target")
        req = RequestHead(p.get_method().decode("ascii"), url, headers, self.scheme, host,
                          "HTTP/1.1" if version == "1.1" else "HTTP/1.0")
        expect = headers.get("expect")
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
        stream.task = asyncio.get_running_loop().create_task(self.handler(stream))

    def stream_finished(self, stream: H1Stream) -> None:
        if stream is not self.current:
            return
        self.current = None
        self.last_activity = time.monotonic()
        if not stream.keep_alive or self.closing:
            self.close()
            return
        if self.pipeline:
            nxt = self.pipeline.popleft()
            if len(self.pipeline) == MAX_PIPELINE - 1:
                self.resume_reading()
            self._start(nxt)

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
        """Answer a malformed request and close; requests already answered are unaffected."""
        self.closing = True
        self.parser = None  # type: ignore[assignment]
        body = ('{"error":"bad_request","message":"%s"}\n' % str(exc).replace('"', "'")).encode()
        reason = _REASONS.get(exc.status, "Bad Request")
        payload = (f"HTTP/1.1 {exc.status} {reason}\r\ncontent-type: application/json\r\n"
                   f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body
        if self.current is None:
            self.write(payload)
            self.close()
        else:
            # A response is in flight: let it finish, then close without answering the bad one.
            self.pipeline.clear()
            self.current.keep_alive = False
            self.pause_reading()


def _parser_message(exc: Exception) -> str:
    text = str(exc) or "malformed request"
    return text.replace("\r", " ").replace("\n", " ")[:200]
