"""gRPC unary calls over the gateway's pooled HTTP/2 client.

Theory of operation: a `GrpcClient` names one target (`host:port`, h2c or TLS)
and hands out `UnaryMethod`s (`client.unary("/pkg.Service/Method", ResponseType)`),
each with its static request head prepared once. A call frames the serialised
request as one length-prefixed message (flag byte 0, 4-byte big-endian length),
sends it as a POST on the event loop's pool (`upstream/pool.py`, one multiplexed
HTTP/2 connection per target, opened on demand and replaced when it goes away),
with `grpc-timeout` and the caller's metadata, and reads the answer:

- HTTP status 200 and `content-type: application/grpc...`, else the call fails
  with the status gRPC's HTTP mapping gives (404 → UNIMPLEMENTED, 503 →
  UNAVAILABLE, ...) or UNKNOWN for a non-gRPC content type;
- exactly one uncompressed message (at most `max_message_bytes`), then trailers
  with `grpc-status` and a percent-encoded `grpc-message`; a trailers-only
  answer (the status in the response head, no body) is an error status too;
- the status is OK → the parsed response; otherwise `GrpcError(code, message)`.

Every failure is a `GrpcError` carrying the gRPC status code, plus `failure`,
the vocabulary of `upstream/remote.py` (what kind of dependency failure it is,
for failure_mode and metrics): "timeout" (DEADLINE_EXCEEDED), "unreachable"
(UNAVAILABLE: connect refused or timed out, the connection or stream was lost,
a proxy in front answered 502/503/504), "error" (the server answered a non-OK
status, or a proxy 429) and "garbage" (not gRPC: another
protocol on the port, a wrong content type, broken framing, an unparsable
message).

The local deadline covers the whole call (connect, head, body): a timer cancels
the call (`upstream/deadline.py`; the stream is reset, the shared connect goes on
for the others); `local_deadline=False` leaves it to a caller that has one.

Why not grpcio's asyncio API (grpc.aio), measured per unary Check call on uvloop
(benchmarks/results/grpc.md): grpc.aio executes fewer user-space instructions
(242k vs 293k at one call in flight, callgrind) but costs about twice the CPU
(user + system, all threads: ~215-330 µs vs ~90-165 µs; 16 in flight ~135-170 vs
~60-85 µs), because its core's threads hand each completion to the event loop
through the kernel (4-7 context switches per call against 0.2-1.6). It would
also put the gRPC core's threads into every forked worker, beside a second
connection pool and TLS configuration.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import math
import re
import struct
from typing import Any, Generic, Iterable, TypeVar
from urllib.parse import unquote

from agproxy.http.messages import BodyAborted, BodyTooLarge, Headers
from agproxy.upstream.deadline import within
from agproxy.upstream.errors import UpstreamError
from agproxy.upstream.origin import Origin
from agproxy.upstream.pool import get_pool

__all__ = ["GrpcClient", "GrpcError", "Status", "UnaryMethod", "encode_timeout", "parse_target"]

M = TypeVar("M")

#: the default cap on a response message, as in the gRPC libraries
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class Status(enum.IntEnum):
    """gRPC status codes (grpc/doc/statuscodes.md)."""
    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


_STATUS_BY_VALUE = {s.value: s for s in Status}

# grpc/doc/http-grpc-status-mapping.md: an answer that is not HTTP 200.
_HTTP_TO_GRPC = {400: Status.INTERNAL, 401: Status.UNAUTHENTICATED, 403: Status.PERMISSION_DENIED,
                 404: Status.UNIMPLEMENTED, 429: Status.UNAVAILABLE, 502: Status.UNAVAILABLE,
                 503: Status.UNAVAILABLE, 504: Status.UNAVAILABLE}
_HTTP_FAILURE = {429: "error", 502: "unreachable", 503: "unreachable", 504: "unreachable"}


class GrpcError(Exception):
    """A failed call: `code` (Status), `message`, and `failure` (timeout, unreachable,
    error, garbage: see upstream/remote.py). `trailers` holds what the server sent
    with an error status (its metadata), else None."""

    def __init__(self, code: Status, message: str, failure: str, trailers: Headers | None = None):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.failure = failure
        self.trailers = trailers


def _garbage(message: str, code: Status = Status.INTERNAL) -> GrpcError:
    return GrpcError(code, message, "garbage")


_UNIT_NS = (("H", 3_600_000_000_000), ("M", 60_000_000_000), ("S", 1_000_000_000), ("m", 1_000_000),
            ("u", 1_000), ("n", 1))
_TIMEOUTS: dict[float, str] = {}


def encode_timeout(seconds: float) -> str:
    """The `grpc-timeout` value: at most 8 digits and a unit, the coarsest unit that
    says it exactly ("20m", "2S"), else rounded up in the finest unit that fits, so
    the server never gives up before we do. Repeated values are looked up."""
    text = _TIMEOUTS.get(seconds)
    if text is not None:
        return text
    ns = max(1, math.ceil(round(seconds * 1e9, 3)))
    for unit, size in _UNIT_NS:
        if ns % size == 0 and ns // size < 100_000_000:
            text = f"{ns // size}{unit}"
            break
    else:
        for unit, size in reversed(_UNIT_NS):
            n = -(-ns // size)
            if n < 100_000_000:
                text = f"{n}{unit}"
                break
        else:
            text = "99999999H"
    if len(_TIMEOUTS) < 256:
        _TIMEOUTS[seconds] = text
    return text


def parse_target(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` → (host, port); ValueError with the reason."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"an IPv6 address needs brackets: [{host}]:{port}")
    n = int(port)
    if not 0 < n < 65536:
        raise ValueError(f"port out of range in {address!r}")
    return host, n


_NAME = re.compile(r"[0-9a-z_.\-]+\Z")
_RESERVED = frozenset({"content-type", "te", "host", "user-agent", "connection", "content-length"})
_CHECKED_NAMES: set[str] = set()      # names already found valid (bounded: names are code's)


def _check_metadata_name(name: str) -> None:
    if name in _CHECKED_NAMES:
        return
    if not _NAME.match(name) or name.startswith("grpc-") or name in _RESERVED:
        raise ValueError(f"invalid or reserved gRPC metadata name {name!r}")
    if len(_CHECKED_NAMES) < 256:
        _CHECKED_NAMES.add(name)


class GrpcClient:
    """Calls to one gRPC target over the running loop's connection pool."""

    __slots__ = ("origin", "authority", "max_message_bytes")

    def __init__(self, address: str, *, tls: bool = False, ca_file: str | None = None,
                 insecure: bool = False, server_name: str | None = None,
                 connect_timeout: float = 5.0, max_message_bytes: int = MAX_MESSAGE_BYTES):
        host, port = parse_target(address)
        self.origin = Origin("https" if tls else "http", host, port, ca_file=ca_file, insecure=insecure,
                             http2=True, connect_timeout=connect_timeout, server_name=server_name)
        self.authority = self.origin.authority
        self.max_message_bytes = max_message_bytes

    def unary(self, path: str, response_type: type[M]) -> "UnaryMethod[M]":
        """A method of this target, e.g. `/envoy.service.auth.v3.Authorization/Check`."""
        return UnaryMethod(self, path, response_type)


class UnaryMethod(Generic[M]):
    """One unary method; `await method(request, timeout=0.2)` → the response message."""

    __slots__ = ("client", "path", "response_type", "_static")

    def __init__(self, client: GrpcClient, path: str, response_type: type[M]):
        if not path.startswith("/") or path.count("/") != 2:
            raise ValueError(f"a gRPC method path is /package.Service/Method, got {path!r}")
        self.client = client
        self.path = path
        self.response_type = response_type
        self._static = [("content-type", "application/grpc"), ("te", "trailers"),
                        ("user-agent", "agproxy-grpc")]

    async def __call__(self, request: Any, *, timeout: float,
                       metadata: Iterable[tuple[str, str | bytes]] = (), local_deadline: bool = True) -> M:
        """Send `request` (a protobuf message, or its serialised bytes); the parsed
        response, or GrpcError. `timeout` bounds the whole call, here (connect, head,
        body) and, as `grpc-timeout`, on the server. `local_deadline=False` leaves
        the local bound to a caller that already has one (RemoteDependency.call):
        one timer per call instead of two."""
        payload = request if isinstance(request, (bytes, bytearray)) else request.SerializeToString()
        items = self._static + [("grpc-timeout", encode_timeout(timeout))]
        if metadata:
            items += _metadata(metadata)
        body = struct.pack(">BI", 0, len(payload)) + payload
        if not local_deadline:
            data, trailers = await self._exchange(Headers(items), body)
            return self._parse(data, trailers)
        try:
            data, trailers = await within(timeout, self._exchange(Headers(items), body))
        except TimeoutError:
            raise GrpcError(Status.DEADLINE_EXCEEDED, f"no answer from {self.client.authority} "
                            f"within {timeout:g}s", "timeout") from None
        return self._parse(data, trailers)

    async def _exchange(self, headers: Headers, body: bytes) -> tuple[bytes, Headers]:
        client = self.client
        try:
            resp = await get_pool().request(client.origin, "POST", self.path, headers, body, timeout=None)
        except UpstreamError as exc:
            raise _transport_error(exc, client.authority) from None
        status = resp.status
        ctype = resp.headers.get("content-type") or ""
        if status != 200:
            resp.abort()
            code = _HTTP_TO_GRPC.get(status, Status.UNKNOWN)
            # a proxy in front of the service: 502/503/504 it is not there, 429 it refuses
            failure = _HTTP_FAILURE.get(status, "garbage")
            raise GrpcError(code, f"HTTP {status} from {client.authority} (not a gRPC answer)", failure)
        if not ctype.startswith("application/grpc"):
            if "grpc-status" in resp.headers:
                ctype = "application/grpc"      # trailers-only answers may omit it
            else:
                resp.abort()
                raise _garbage(f"{client.authority} answered content-type {ctype[:60]!r}, not gRPC",
                               Status.UNKNOWN)
        reader = resp.body
        limit = client.max_message_bytes + 5
        try:
            if reader.complete:                 # the usual case: head, message and trailers together
                data = reader.take_buffered()
            else:
                data = await reader.read_all(limit)
        except BodyAborted as exc:
            resp.abort()
            if isinstance(exc, BodyTooLarge):
                raise _garbage(f"response from {client.authority} larger than {limit} bytes",
                               Status.RESOURCE_EXHAUSTED) from None
            raise GrpcError(Status.UNAVAILABLE, f"{client.authority}: {exc}", "unreachable") from None
        except asyncio.CancelledError:
            resp.abort()
            raise
        if len(data) > limit:
            raise _garbage(f"response from {client.authority} larger than {limit} bytes",
                           Status.RESOURCE_EXHAUSTED)
        trailers = reader.trailers
        if trailers is None or "grpc-status" not in trailers:
            trailers = resp.headers    # trailers-only: the status came in the head
        return data, trailers

    def _parse(self, data: bytes, trailers: Headers) -> M:
        authority = self.client.authority
        raw_status = trailers.get("grpc-status")
        if raw_status is None:
            raise _garbage(f"{authority} ended the call without grpc-status")
        code = (_STATUS_BY_VALUE.get(int(raw_status))
                if raw_status.isascii() and raw_status.isdigit() else None)
        if code is None:
            raise _garbage(f"{authority} sent an invalid grpc-status {raw_status[:20]!r}", Status.UNKNOWN)
        if code is not Status.OK:
            message = trailers.get("grpc-message") or ""
            if "%" in message:
                message = unquote(message, errors="replace")
            raise GrpcError(code, message, "error", trailers)
        if len(data) < 5:
            raise _garbage(f"{authority} answered OK without a response message")
        flag = data[0]
        length = int.from_bytes(data[1:5], "big")
        if flag != 0:
            raise _garbage(f"{authority} sent a compressed message (we accept identity only)"
                           if flag == 1 else f"{authority} sent an invalid message flag {flag}")
        if length != len(data) - 5:
            raise _garbage(f"{authority} sent {len(data) - 5} message bytes where the prefix says {length}"
                           if length > len(data) - 5 else f"{authority} sent more than one message")
        try:
            return self.response_type.FromString(data[5:])       # type: ignore[attr-defined]
        except Exception as exc:   # protobuf's DecodeError, whatever the backend
            raise _garbage(f"{authority} sent a message that is not a "
                           f"{getattr(self.response_type, '__name__', 'response')}: {exc}") from None


def _transport_error(exc: UpstreamError, authority: str) -> GrpcError:
    if exc.kind == "timeout":
        return GrpcError(Status.DEADLINE_EXCEEDED, str(exc), "timeout")
    if exc.kind == "protocol":
        return GrpcError(Status.UNAVAILABLE, f"{authority} does not speak HTTP/2 gRPC: {exc}", "garbage")
    return GrpcError(Status.UNAVAILABLE, str(exc), "unreachable")


def _metadata(pairs: Iterable[tuple[str, str | bytes]]) -> list[tuple[str, str]]:
    out = []
    for name, value in pairs:
        _check_metadata_name(name)
        if name.endswith("-bin"):
            raw = value if isinstance(value, (bytes, bytearray)) else value.encode()
            value = base64.b64encode(raw).rstrip(b"=").decode("ascii")
        elif isinstance(value, (bytes, bytearray)) or not value.isprintable() or not value.isascii():
            raise ValueError(f"gRPC metadata {name!r}: a text value is printable ASCII "
                             f"(binary values go in a name ending in -bin)")
        out.append((name, value))
    return out
