"""Protocol-neutral request/response heads, headers, and the downstream stream contract.

Theory of operation: the HTTP/1.1 and HTTP/2 adapters turn bytes into a
`RequestHead` plus a `BodyReader`, wrapped in a `ServerStream` that the proxy
layer answers through (`send_head` → `send_data`* → `end`, or `abort`). The proxy
never knows which protocol it is talking; the adapters never know what a route is.

Header names are lowercase `str`, values `str` (latin-1 decoded bytes, so any
octet round-trips). `Headers` is a thin list of pairs: order and repeats are kept
as received, which matters for proxies (Set-Cookie, Via, X-Forwarded-For).
A value the gateway computes as text (a claim, a CEL result, a config string) is
Unicode, not octets: `text_field_value` turns it into this representation (its
UTF-8 octets), at the one place each policy sets a value.
"""

from __future__ import annotations

import asyncio
from typing import Iterable, Iterator

# Hop-by-hop headers (RFC 9110 §7.6.1) plus the HTTP/2 forbidden ones.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
    "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade",
})


#: Request fields a layer above asks about on every request (tracing: W3C trace context;
#: the exchange: the client's request id). The parsers already test each field against a
#: set (http/h1.py on_header, http/h2.py _parse_request); these names are in it, so they
#: note them as they go and `RequestHead.noted` says which came (the bits ORed): the
#: layers above test a bit instead of scanning the head (a scan cost ~350 instructions
#: per field, callgrind; an unsampled request's tracing paid it).
NOTE_TRACEPARENT, NOTE_TRACESTATE, NOTE_REQUEST_ID = 1, 2, 4
NOTED_FIELDS: dict[str, int] = {"traceparent": NOTE_TRACEPARENT, "tracestate": NOTE_TRACESTATE,
                                "x-request-id": NOTE_REQUEST_ID}


def noted_fields(headers: "Headers") -> int:
    """What a parser would have noted in `headers` (a head it did not make)."""
    noted = 0
    for k, _ in headers.items:
        noted |= NOTED_FIELDS.get(k, 0)
    return noted


#: Wire name → lowercase str (field_name's bounded table; hot callers look here first).
FIELD_NAMES: dict[bytes, str] = {}


def field_name(raw: bytes) -> str:
    """A header name from the wire as the lowercase str Headers use. Names repeat
    on every request, so the decoded text is kept (a bounded table): one dict
    lookup instead of decode + lower per header (HTTP/1.1 parsers, both sides)."""
    name = FIELD_NAMES.get(raw)
    if name is None:
        name = raw.decode("latin-1").lower()
        if len(FIELD_NAMES) < 2048:
            FIELD_NAMES[raw] = name
    return name


def text_field_value(text: str) -> str:
    """A header value computed as text, as Headers hold it: its UTF-8 octets, one
    latin-1 character each (ASCII, the common case, is unchanged). So `user-日本`
    reaches an upstream as the bytes `user-\xe6\x97\xa5\xe6\x9c\xac`, over HTTP/1.1
    and HTTP/2 alike, and a client reads it back with `.encode("latin-1").decode()`."""
    return text if text.isascii() else text.encode("utf-8").decode("latin-1")


class Headers:
    """An ordered multimap of (lowercase name, value)."""

    __slots__ = ("items",)

    def __init__(self, items: Iterable[tuple[str, str]] | None = None):
        self.items: list[tuple[str, str]] = list(items) if items is not None else []

    def get(self, name: str, default: str | None = None) -> str | None:
        for k, v in self.items:
            if k == name:
                return v
        return default

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self.items if k == name]

    def __contains__(self, name: str) -> bool:
        for k, _ in self.items:
            if k == name:
                return True
        return False

    def add(self, name: str, value: str) -> None:
        self.items.append((name, value))

    def set(self, name: str, value: str) -> None:
        self.remove(name)
        self.items.append((name, value))

    def remove(self, name: str) -> None:
        items = self.items
        for k, _ in items:
            if k == name:
                self.items = [(k2, v2) for k2, v2 in items if k2 != name]
                return

    def remove_many(self, names: frozenset[str] | set[str]) -> None:
        self.items = [(k, v) for k, v in self.items if k not in names]

    def copy(self) -> "Headers":
        return Headers(self.items)

    def as_dict(self) -> dict[str, str]:
        """Names → values, repeated headers joined with ', ' (CEL's view)."""
        out = dict(self.items)        # (C speed; right unless a name repeats)
        if len(out) == len(self.items):
            return out
        out = {}
        for k, v in self.items:
            out[k] = f"{out[k]}, {v}" if k in out else v
        return out

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"Headers({self.items!r})"


class ConnInfo:
    """What the gateway knows about the client connection."""

    __slots__ = ("peer_host", "peer_port", "local_port", "tls", "alpn", "sni", "listener", "local_host")

    def __init__(self, peer_host: str, peer_port: int, local_port: int, tls: bool,
                 alpn: str | None = None, sni: str | None = None, listener: str = "",
                 local_host: str = ""):
        self.peer_host = peer_host
        self.peer_port = peer_port
        self.local_port = local_port
        self.local_host = local_host    # the address the client connected to ("" if unknown)
        self.tls = tls
        self.alpn = alpn
        self.sni = sni
        self.listener = listener


class RequestHead:
    __slots__ = ("method", "target", "headers", "scheme", "authority", "protocol", "path", "query", "noted")

    def __init__(self, method: str, target: str, headers: Headers, scheme: str,
                 authority: str, protocol: str, noted: int = -1):
        self.method = method
        self.target = target          # path + query as received; routing normalises the path (http/path.py)
        self.headers = headers
        self.scheme = scheme
        self.authority = authority    # Host / :authority
        self.protocol = protocol      # "HTTP/1.1", "HTTP/1.0", "HTTP/2"
        # Split once: read several times per request, and a property call each time
        # cost more than the split (callgrind). Change them with set_target only.
        self.path, _, self.query = target.partition("?")
        # NOTED_FIELDS bits from the parser that read the head; -1: not noted (a head
        # made otherwise; truthy, so that `if head.noted:` is the one test on the hot
        # path), use `note()`. Not kept up to date when the headers change.
        self.noted = noted

    def note(self) -> int:
        """The NOTED_FIELDS bits: the parser's, or found by a scan (and kept)."""
        noted = self.noted
        if noted < 0:
            noted = self.noted = noted_fields(self.headers)
        return noted

    def set_target(self, target: str) -> None:
        self.target = target
        self.path, _, self.query = target.partition("?")

    @property
    def host(self) -> str:
        """The authority without port (lowercase)."""
        a = self.authority
        if a.startswith("["):
            return a[: a.find("]") + 1].lower()
        return a.rsplit(":", 1)[0].lower() if ":" in a else a.lower()


class ResponseHead:
    __slots__ = ("status", "headers")

    def __init__(self, status: int, headers: Headers):
        self.status = status
        self.headers = headers


class BodyAborted(Exception):
    """The peer went away (or reset the stream) before the body was complete."""


class BodyTooLarge(BodyAborted):
    """The body passed its limit: what arrived is discarded, the exchange ends in 413."""


class BodyMalformed(BodyAborted):
    """The body's framing was invalid (a bad chunk): the exchange ends in 400 and the
    upstream request is aborted, so the upstream never sees a complete request."""


class BodyReader:
    """An inbound body: the adapter feeds it, the proxy reads it.

    Flow control: when more than `high_water` bytes wait unread, the adapter's
    `pause()` is called (stop reading the socket / stop granting HTTP/2 window);
    `resume()` once the reader has drained below `low_water`. `on_first_read`
    lets HTTP/1.1 send `100 Continue` only when someone actually wants the body.
    """

    __slots__ = ("_chunks", "_size", "complete", "error", "_waiter", "pause", "resume",
                 "_paused", "high_water", "low_water", "on_first_read", "received",
                 "trailers", "consumed", "limit")

    def __init__(self, pause=None, resume=None, high_water: int = 256 * 1024, on_first_read=None):
        self._chunks: list[bytes] = []
        self._size = 0
        self.complete = False       # the whole body has arrived (it may not all be read yet)
        self.error: BaseException | None = None   # why it failed (BodyAborted, BodyTooLarge, ...)
        self._waiter: asyncio.Future | None = None
        self.pause = pause
        self.resume = resume
        self._paused = False
        self.high_water = high_water
        self.low_water = high_water // 4
        self.on_first_read = on_first_read
        self.received = 0
        self.trailers: Headers | None = None
        self.consumed = 0
        self.limit: int | None = None   # bytes; more fails the body with BodyTooLarge

    # -- adapter side -------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        self.received += len(data)
        if self.limit is not None and self.received > self.limit:
            if self.error is None:
                self.error = BodyTooLarge(f"request body exceeds {self.limit} bytes")
                self._chunks = []
                self._size = 0
                self._wake()
            return
        self._chunks.append(data)
        self._size += len(data)
        if self._size > self.high_water and not self._paused and self.pause is not None:
            self._paused = True
            self.pause()
        self._wake()

    def feed_eof(self, trailers: Headers | None = None) -> None:
        self.complete = True
        self.trailers = trailers
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if not self.complete:
            self.error = exc
            self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    @property
    def at_eof(self) -> bool:
        return self.complete and not self._chunks

    # -- proxy side -----------------------------------------------------------------
    async def read(self) -> bytes:
        """The next chunk; b'' at the end. Raises BodyAborted if the peer went away,
        BodyTooLarge past `limit`."""
        if self.on_first_read is not None:
            cb, self.on_first_read = self.on_first_read, None
            cb()
        if self.error is not None and type(self.error) is BodyTooLarge:
            raise self.error
        while not self._chunks:
            if self.error is not None:
                raise self.error
            if self.complete:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self.take_buffered()

    def take_buffered(self) -> bytes:
        """Everything received and not yet read, at once (no waiting, no 100-continue)."""
        data = b"".join(self._chunks)
        self._chunks = []
        self._size = 0
        self.consumed += len(data)
        if self._paused and self.resume is not None:
            self._paused = False
            self.resume()
        return data

    async def peek(self, n: int) -> bytes:
        """Up to the first `n` unread bytes, once that many arrived or the body ended,
        without consuming them: the next reader gets them again (ext_authz with a
        partial body looks at the start of a body the backend then streams). While it
        waits, the adapter is not paused below `n` buffered bytes."""
        if self.on_first_read is not None:
            cb, self.on_first_read = self.on_first_read, None
            cb()
        saved = self.high_water
        if n > saved:
            self.high_water = n
            if self._paused and self.resume is not None:
                self._paused = False
                self.resume()
        try:
            while self._size < n and not self.complete:
                if self.error is not None:
                    raise self.error
                self._waiter = asyncio.get_running_loop().create_future()
                await self._waiter
            if self.error is not None and type(self.error) is BodyTooLarge:
                raise self.error
        finally:
            self.high_water = saved
            if self._size > saved and not self._paused and self.pause is not None:
                self._paused = True
                self.pause()
        if len(self._chunks) > 1:
            self._chunks = [b"".join(self._chunks)]
        return self._chunks[0][:n] if self._chunks else b""

    async def read_all(self, limit: int) -> bytes:
        parts = []
        total = 0
        while True:
            chunk = await self.read()
            if not chunk:
                return b"".join(parts)
            total += len(chunk)
            if total > limit:
                raise BodyTooLarge(f"request body exceeds {limit} bytes")
            parts.append(chunk)


class ServerStream:
    """One request/response exchange with the client (implemented per protocol).

    `send_head` only records the head; the first `send_data` or `end` writes it, so
    a small response leaves in one write. `end(trailers, data)` sends a last chunk
    together with the end of the body (HTTP/1.1: the chunk and the last-chunk in one
    write; HTTP/2: one DATA frame with END_STREAM). `send_data` waits while the client is
    not reading (backpressure). `abort` resets the stream (HTTP/2) or closes the
    connection (HTTP/1.1): the client must see a broken response, never a hang.
    """

    request: RequestHead
    body: BodyReader
    conn: ConnInfo
    head_sent: bool

    def send_head(self, status: int, headers: Headers) -> None:
        raise NotImplementedError

    async def send_data(self, data: bytes) -> None:
        raise NotImplementedError

    async def end(self, trailers: Headers | None = None, data: bytes = b"") -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError
