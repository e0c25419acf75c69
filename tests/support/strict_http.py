"""A strict HTTP/1.1 server for test peers: llhttp (httptools) parsing, exact bytes recorded.

Theory of operation: one accept thread, one thread per connection (blocking
sockets, so a handler may sleep, stream or stall without stopping the others).
Each connection feeds what it receives to llhttp — with no leniency flag set, so
what Node's HTTP server refuses is refused here: duplicate or conflicting
Content-Length, Content-Length with Transfer-Encoding, bare LF, obs-fold,
invalid characters, bad chunk sizes — and a refused message gets `400` and the
connection is closed, as production servers do. The bytes that led to it are
kept in `rejected`.

Every accepted request is a `Request` with its exact raw bytes (`raw`), so a
test can assert on what was on the wire, not on what a forgiving parser made of
it. Message boundaries are known to the byte: heads, chunk-size lines and
trailers are fed to llhttp one byte at a time, body data (whose length the
parser has just validated) in one piece. Pipelined requests are answered one
after the other, in order.

`handler(request, conn)` answers through `conn`, the one way every test peer
writes a response: `respond` (fixed length), `start_chunked` / `send_chunk` /
`end_chunked` (a chunked or SSE stream), `send` (raw bytes, for malformed
answers), and the faults: `close` (FIN), `reset` (RST), `hang` (read on, never
answer). After the handler returns the connection reads the next request unless
either side asked to close. Request heads are also kept as soon as they are
parsed (`heads`), before their body. Every state change (a head, a request, a
rejection, a connection opened or closed) notifies `changed`, so tests wait on
conditions with `wait_until`.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import httptools

REASONS = {100: "Continue", 200: "OK", 201: "Created", 202: "Accepted", 204: "No Content",
           301: "Moved Permanently", 302: "Found", 304: "Not Modified", 400: "Bad Request",
           401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
           409: "Conflict", 413: "Content Too Large", 424: "Failed Dependency",
           429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
           503: "Service Unavailable", 504: "Gateway Timeout",
           529: "Overloaded"}


@dataclass
class Request:
    method: str
    target: str                        # the request target as received
    version: str                       # "1.1" / "1.0"
    headers: list[tuple[str, str]]     # lowercase names, latin-1 values, wire order
    body: bytes                        # the decoded body (chunked framing removed)
    raw: bytes                         # every byte of this message as received
    keep_alive: bool
    chunked: bool
    trailers: list[tuple[str, str]] = field(default_factory=list)
    connection: int = 0                # ordinal of the connection it arrived on
    raw_headers: list[tuple[str, str]] = field(default_factory=list)   # names as sent, not lowercased

    def header(self, name: str, default: str | None = None) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return default

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


@dataclass
class Rejected:
    raw: bytes
    error: str
    connection: int = 0


class RequestReader:
    """llhttp fed so that each message's end is known to the byte (see module doc).
    `add(bytes)`, then `next()` until None; pipelined bytes wait for the next call."""

    def __init__(self, connection: int, on_head: Callable[[Request], None] | None = None):
        self.connection = connection
        self.on_head = on_head
        self.parser = httptools.HttpRequestParser(self)
        self.buf = memoryview(b"")
        self.pos = 0
        self.raw = bytearray()         # bytes fed for the message in progress
        self.bulk = 0                  # body bytes that may be fed in one piece
        self._new_message()

    def _new_message(self) -> None:
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.raw_headers: list[tuple[str, str]] = []
        self.trailers: list[tuple[str, str]] = []
        self.body: list[bytes] = []
        self.head_done = False
        self.keep_alive = True
        self.chunked = False
        self.chunk_line_start = 0
        self.done = False

    @property
    def idle(self) -> bool:
        """Nothing of a next message received yet."""
        return not self.raw and self.pos >= len(self.buf)

    def add(self, data: bytes) -> None:
        rest = bytes(self.buf[self.pos:])
        self.buf = memoryview(rest + data)
        self.pos = 0

    def next(self) -> Request | None:
        """The next complete request from what was added, or None (more bytes needed).
        Raises httptools.HttpParserError (incl. HttpParserUpgrade) on a refused message."""
        buf = self.buf
        while self.pos < len(buf):
            n = min(self.bulk, len(buf) - self.pos) if self.bulk else 1
            piece = buf[self.pos:self.pos + n]
            self.pos += n
            self.raw += piece
            if self.bulk:
                self.bulk -= n
            self.parser.feed_data(piece)
            if self.done:
                p = self.parser
                req = Request(p.get_method().decode("latin-1"), self.url.decode("latin-1"),
                              p.get_http_version(), self.headers, b"".join(self.body), bytes(self.raw),
                              self.keep_alive, self.chunked, self.trailers, self.connection,
                              self.raw_headers)
                self.raw = bytearray()
                self._new_message()
                return req
        return None

    # -- llhttp callbacks ---------------------------------------------------------------
    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        pair = (name.decode("latin-1").lower(), value.decode("latin-1"))
        if self.head_done:
            self.trailers.append(pair)
        else:
            self.headers.append(pair)
            self.raw_headers.append((name.decode("latin-1"), pair[1]))

    def on_headers_complete(self) -> None:
        self.head_done = True
        self.keep_alive = self.parser.should_keep_alive()   # llhttp resets its flags at the end
        self.chunk_line_start = len(self.raw)
        te = [v for k, v in self.headers if k == "transfer-encoding"]
        self.chunked = bool(te) and te[-1].replace(" ", "").lower().endswith("chunked")
        if not self.chunked:
            cl = [v for k, v in self.headers if k == "content-length"]
            if cl:
                self.bulk = int(cl[0])     # llhttp has validated it (one value, digits)
        if self.on_head is not None:
            p = self.parser
            self.on_head(Request(p.get_method().decode("latin-1"), self.url.decode("latin-1"),
                                 p.get_http_version(), list(self.headers), b"", bytes(self.raw),
                                 self.keep_alive, self.chunked, [], self.connection,
                                 list(self.raw_headers)))

    def on_chunk_header(self) -> None:
        # Called once the chunk-size line (with its CRLF) is in: parse its size to feed
        # the chunk's data in one piece. llhttp has validated the line.
        line = bytes(self.raw[self.chunk_line_start:])
        self.bulk = int(line.split(b";", 1)[0].strip(), 16)

    def on_chunk_complete(self) -> None:
        self.chunk_line_start = len(self.raw)

    def on_body(self, data: bytes) -> None:
        self.body.append(bytes(data))

    def on_message_complete(self) -> None:
        self.done = True


_Reader = RequestReader     # the old private name, for tests written against it


def format_response(status: int, headers: list[tuple[str, str]] | None = None, body: bytes = b"", *,
                    head_only: bool = False, close: bool = False) -> bytes:
    """The bytes of a complete response with a Content-Length (none for 1xx/204/304)."""
    bodiless = status < 200 or status in (204, 304)
    head = _head(status, headers, None if bodiless else f"content-length: {len(body)}", close)
    return head if head_only or bodiless else head + body


def _head(status: int, headers: list[tuple[str, str]] | None, framing: str | None, close: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\n"]
    lines += [f"{k}: {v}\r\n" for k, v in headers or ()]
    if framing:
        lines.append(framing + "\r\n")
    if close:
        lines.append("connection: close\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


class Conn:
    """One accepted connection, as the handler sees it."""

    def __init__(self, server: "StrictHTTPServer", sock: socket.socket, index: int):
        self.server = server
        self.sock = sock
        self.index = index
        self.closed = False
        self.close_after = False       # set by a handler: close once it returns

    def send(self, data: bytes) -> bool:
        """Write bytes; False if the peer is gone."""
        if self.closed:
            return False
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def respond(self, status: int, headers: list[tuple[str, str]] | None = None, body: bytes = b"",
                *, head_only: bool = False) -> bool:
        """A complete response with a Content-Length (none for 1xx/204/304)."""
        return self.send(format_response(status, headers, body, head_only=head_only, close=self.close_after))

    def start_chunked(self, status: int = 200, headers: list[tuple[str, str]] | None = None) -> bool:
        """The head of a chunked response (an SSE stream: a text/event-stream content-type)."""
        return self.send(_head(status, headers, "transfer-encoding: chunked", self.close_after))

    def send_chunk(self, data: bytes) -> bool:
        """One chunk of a body begun by start_chunked (nothing for empty data: that would end it)."""
        return not data or self.send(b"%x\r\n%b\r\n" % (len(data), data))

    def end_chunked(self, trailers: list[tuple[str, str]] | None = None) -> bool:
        fields = "".join(f"{k}: {v}\r\n" for k, v in trailers or ())
        return self.send(b"0\r\n" + fields.encode("latin-1") + b"\r\n")

    def reset(self) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0), not a FIN."""
        if not self.closed:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            self.closed = True
            self.sock.close()

    def hang(self, seconds: float | None = None) -> None:
        """Never answer: read on (what arrives is kept, see in_progress) until the peer
        closes, `seconds` pass or the server stops; then close."""
        deadline = None if seconds is None else time.monotonic() + seconds
        reader = self.server._readers.get(self)
        try:
            while not self.closed and not self.server.stopping.is_set():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self.sock.settimeout(left)
                data = self.sock.recv(65536)
                if not data:
                    break
                if reader is not None:
                    reader.add(data)
                self.server._notify()
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()


Handler = Callable[[Request, Conn], None]


class StrictHTTPServer:
    def __init__(self, handler: Handler, *, host: str = "127.0.0.1", port: int = 0,
                 tls: dict | None = None, name: str = "strict-http"):
        self.handler = handler
        self.name = name
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen(512)
        self.host = host
        self.port = self.listener.getsockname()[1]
        self.scheme = "http"
        self._ssl: ssl.SSLContext | None = None
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(tls["cert"], tls["key"])
            self._ssl = ctx
            self.scheme = "https"
        self.heads: list[Request] = []         # each request's head, as soon as it is parsed
        self.received: list[Request] = []
        self.rejected: list[Rejected] = []
        self.incomplete: list[Rejected] = []   # a connection closed mid-request
        self.connections = 0
        self.open_connections = 0
        self.changed = threading.Condition()
        self._conns: set[Conn] = set()
        self._readers: dict[Conn, RequestReader] = {}
        self.stopping = threading.Event()      # set by stop(): handlers that wait end early
        self._thread = threading.Thread(target=self._accept_loop, name=name, daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def start(self) -> "StrictHTTPServer":
        if self._thread.ident is None:      # once: a peer may start in __init__ and in `with`
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread (for CLI use), until stop()."""
        self._accept_loop()

    def stop(self) -> None:
        self.stopping.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        with self.changed:
            conns = list(self._conns)
        for c in conns:
            c.close()
        if self._thread.is_alive():
            self._thread.join(5)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Block until predicate() holds (re-checked on every recorded change)."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.name}: condition not met within {timeout}s")
                self.changed.wait(left)

    def _on_head(self, head: Request) -> None:
        with self.changed:
            self.heads.append(head)
            self.changed.notify_all()

    def _notify(self) -> None:
        with self.changed:
            self.changed.notify_all()

    # -- connections -------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self.changed:
                self.connections += 1
                self.open_connections += 1
                index = self.connections
                self.changed.notify_all()
            threading.Thread(target=self._serve, args=(sock, index), name=f"{self.name}-{index}",
                             daemon=True).start()

    def _serve(self, sock: socket.socket, index: int) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = None
        try:
            if self._ssl is not None:
                try:
                    sock = self._ssl.wrap_socket(sock, server_side=True)
                except (OSError, ssl.SSLError):
                    sock.close()
                    return
            conn = Conn(self, sock, index)
            with self.changed:
                self._conns.add(conn)
            self._loop(conn)
        finally:
            if conn is not None:
                conn.close()
                with self.changed:
                    self._conns.discard(conn)
            with self.changed:
                self.open_connections -= 1
                self.changed.notify_all()

    def in_progress(self) -> list[bytes]:
        """What open connections have received of requests not complete yet."""
        with self.changed:
            readers = list(self._readers.values())
        return [bytes(r.raw) + bytes(r.buf[r.pos:]) for r in readers]

    def _loop(self, conn: Conn) -> None:
        reader = RequestReader(conn.index, self._on_head)
        with self.changed:
            self._readers[conn] = reader
        try:
            self._read_requests(conn, reader)
        finally:
            with self.changed:
                self._readers.pop(conn, None)

    def _read_requests(self, conn: Conn, reader: RequestReader) -> None:
        while not conn.closed:
            try:
                req = reader.next()
            except httptools.HttpParserUpgrade:
                self._reject(conn, reader, "upgrade / CONNECT not supported")
                return
            except httptools.HttpParserError as exc:
                self._reject(conn, reader, f"{type(exc).__name__}: {exc}")
                return
            if req is None:
                try:
                    data = conn.sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    if not reader.idle:
                        with self.changed:
                            self.incomplete.append(Rejected(bytes(reader.raw), "closed mid-request",
                                                            conn.index))
                            self.changed.notify_all()
                    return
                reader.add(data)
                self._notify()
                continue
            problem = semantic_problem(req)
            if problem:
                reader.raw = bytearray(req.raw)
                self._reject(conn, reader, problem)
                return
            with self.changed:
                self.received.append(req)
                self.changed.notify_all()
            conn.close_after = not req.keep_alive
            try:
                self.handler(req, conn)
            except Exception as exc:   # a bug in a test handler: visible, never a hang
                conn.close_after = True
                conn.respond(500, [("content-type", "text/plain")], f"handler error: {exc!r}".encode())
            if conn.close_after:
                return

    def _reject(self, conn: Conn, reader: RequestReader, why: str) -> None:
        with self.changed:
            self.rejected.append(Rejected(bytes(reader.raw) + bytes(reader.buf[reader.pos:]), why,
                                          conn.index))
            self.changed.notify_all()
        conn.close_after = True
        conn.respond(400, [("content-type", "text/plain")], why.encode("latin-1", "replace"))


class StrictPeer:
    """The common face of a test peer built on a StrictHTTPServer in `self.server`:
    port, url, cond (notified on every change), start/stop, `with`."""

    server: StrictHTTPServer

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def cond(self) -> threading.Condition:
        return self.server.changed

    def start(self):
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def semantic_problem(req: Request) -> str | None:
    """What llhttp accepts but RFC 9112 still refuses (§3.2: exactly one Host)."""
    hosts = req.header_all("host")
    if req.version == "1.1" and len(hosts) != 1:
        return f"{len(hosts)} Host headers"
    return None


class StrictResponseReader:
    """Parse responses from a socket with llhttp: the client side of strict tests.

    `read(sock, deadline)` returns the next complete response (status, headers,
    body) or raises on a framing error / EOF before the end. `head_only` for HEAD.
    """

    def __init__(self):
        self.parser = httptools.HttpResponseParser(self)
        self.pending: list[tuple[int, list[tuple[str, str]], bytes]] = []
        self._headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []
        self.eof = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_body(self, data: bytes) -> None:
        self._body.append(bytes(data))

    def on_message_complete(self) -> None:
        self.pending.append((self.parser.get_status_code(), self._headers, b"".join(self._body)))
        self._headers, self._body = [], []

    def read(self, sock: socket.socket, timeout: float = 10.0) -> tuple[int, list[tuple[str, str]], bytes]:
        deadline = time.monotonic() + timeout
        while not self.pending:
            if self.eof:
                raise ConnectionError("connection closed before a complete response")
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = sock.recv(65536)
            except socket.timeout:
                raise TimeoutError("no complete response before the deadline") from None
            if not data:
                self.eof = True
                try:
                    self.parser.feed_data(b"")   # a close-delimited body ends here
                except httptools.HttpParserError:
                    pass
                continue
            self.parser.feed_data(data)
        return self.pending.pop(0)
