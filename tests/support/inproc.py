"""The real gateway pipeline in the test's own event loop, with strict peers.

For tests that plug a policy or backend of their own into a route (the exchange's
contracts: body hooks, completion hooks, body phases, retrying backends), the
gateway cannot be the binary: `InProcessGateway` builds the runtime from a real
config through the real loader, lets the test add filters to a route or swap its
backend, and serves it with the real `Gateway`, `H1Connection` and `H2Connection`
on 127.0.0.1 sockets. Everything runs in one asyncio loop, so a peer can wait on
what the gateway did (an `asyncio` condition with a deadline), never on time.

Peers are strict: `ScriptedUpstream` parses each request with the test peers' one
llhttp reader (strict_http.RequestReader: exact message boundaries, pipelined bytes
kept, one Host; a refused request gets 400 and is listed in `rejected`) and
answers with the exact bytes its script writes; `h1_request` parses the response
with httptools (framing errors raise) and records the raw bytes and framing;
`h2_request` speaks the `h2` library and records every DATA frame.
"""

from __future__ import annotations

import asyncio
import os
from typing import Awaitable, Callable

import h2.config
import h2.connection
import h2.events
import httptools

from agproxy.http.h1 import H1Connection, Limits
from agproxy.http.h2 import H2Connection
from agproxy.http.messages import ConnInfo
from agproxy.proxy.build import load_runtime
from agproxy.proxy.exchange import Gateway
from agproxy.proxy.route import Route
from agproxy.telemetry.access_log import AccessLog
from agproxy.telemetry.metrics import Metrics
from tests.support.strict_http import RequestReader, semantic_problem

DEADLINE = 10.0


class Progress:
    """A counter a synchronous hook advances and a coroutine waits on (with a deadline)."""

    def __init__(self) -> None:
        self.value = 0
        self._waiters: list[tuple[int, asyncio.Future]] = []

    def advance(self, n: int) -> None:
        self.value += n
        still = []
        for target, fut in self._waiters:
            if self.value >= target:
                if not fut.done():
                    fut.set_result(None)
            else:
                still.append((target, fut))
        self._waiters = still

    async def wait(self, target: int, timeout: float = DEADLINE) -> None:
        if self.value >= target:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((target, fut))
        await asyncio.wait_for(fut, timeout)


# -- the upstream ------------------------------------------------------------------------------

class UpstreamRequest:
    def __init__(self) -> None:
        self.method = ""
        self.target = ""
        self.headers: list[tuple[str, str]] = []
        self.body = b""
        self.raw = b""                 # every byte of the message as received

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


Script = Callable[[UpstreamRequest, asyncio.StreamWriter], Awaitable[None]]


class ScriptedUpstream:
    """An HTTP/1.1 server whose answer to each request is a script writing raw bytes."""

    def __init__(self, script: Script):
        self.script = script
        self.requests: list[UpstreamRequest] = []
        self.rejected: list[str] = []  # requests refused (framing, Host): answered 400, closed
        self.closed = Progress()     # connections the gateway closed (EOF or reset)
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> "ScriptedUpstream":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = RequestReader(0)
        try:
            while True:
                try:
                    req = await _read_request(reader, parser)
                except (httptools.HttpParserError, ValueError) as exc:
                    self.rejected.append(f"{type(exc).__name__}: {exc}")
                    writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    return
                if req is None:
                    self.closed.advance(1)
                    return
                self.requests.append(req)
                await self.script(req, writer)
                if writer.is_closing():
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            self.closed.advance(1)
        except asyncio.CancelledError:
            pass    # the test's loop is ending
        finally:
            writer.close()


async def _read_request(stream: asyncio.StreamReader, reader: RequestReader) -> UpstreamRequest | None:
    """The next request on the connection (None at a clean EOF); refused framing or
    Host raise httptools.HttpParserError / ValueError with the reason."""
    while True:
        got = reader.next()
        if got is not None:
            break
        data = await stream.read(65536)
        if not data:
            if not reader.idle:
                raise ConnectionError("request cut short")
            return None
        reader.add(data)
    problem = semantic_problem(got)
    if problem:
        raise ValueError(problem)
    req = UpstreamRequest()
    req.method, req.target, req.headers, req.body, req.raw = got.method, got.target, got.headers, got.body, got.raw
    return req


# -- the gateway -------------------------------------------------------------------------------

class InProcessGateway:
    def __init__(self, config: str, tmp_path, **subst: object):
        self.tmp = tmp_path
        self.access_log_path = os.path.join(str(tmp_path), "access.log")
        text = config
        for k, v in subst.items():
            text = text.replace("{" + k + "}", str(v))
        if "[[listener]]" not in text:
            text = '[[listener]]\nname = "main"\nbind = "127.0.0.1:0"\n\n' + text
        path = os.path.join(str(tmp_path), "gw.toml")
        with open(path, "w") as f:
            f.write(text)
        self.runtime = load_runtime(path)
        self.metrics = Metrics()
        self.access_log = AccessLog(self.access_log_path)
        self.gateway = Gateway(self.runtime, self.metrics, self.access_log)
        self.port = 0
        self._servers: list[asyncio.AbstractServer] = []

    def route(self, name: str) -> Route:
        return next(r for r in self.runtime.router.routes if r.name == name)

    def replace_route(self, name: str, *, add_filters: list | None = None, backend=None) -> Route:
        """Rebuild a route with more filters (appended, i.e. after its own) or another backend."""
        router = self.runtime.router
        old = next(r for r in router.routes if r.name == name)
        if backend is not None:
            backend.name = backend.name or "test-backend"
        new = Route(old.name, old.index, old.listener, old.match, backend or old.backend, old.timeout,
                    list(old.filters) + list(add_filters or []))
        router.replace(old, new)
        return new

    async def start(self) -> "InProcessGateway":
        loop = asyncio.get_running_loop()
        info = ConnInfo("127.0.0.1", 40000, 8080, False, listener="main")
        limits = Limits()

        def protocol():
            def to_h2(transport, data: bytes) -> None:
                proto = H2Connection(self.gateway.handle, info, limits)
                transport.set_protocol(proto)
                proto.connection_made(transport)
                if data:
                    proto.data_received(data)
            return H1Connection(self.gateway.handle, info, limits, to_h2)

        server = await loop.create_server(protocol, "127.0.0.1", 0)
        self._servers.append(server)
        self.port = server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        for s in self._servers:
            s.close()
        self.access_log.close()

    def access_records(self) -> list[dict]:
        import json
        self.access_log.flush()
        with open(self.access_log_path) as f:
            return [json.loads(line) for line in f if line.strip()]


# -- clients -----------------------------------------------------------------------------------

class H1Response:
    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.body = b""
        self.raw = b""
        self.complete = False

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


async def h1_request(port: int, method: str, target: str, headers: list[tuple[str, str]] | None = None,
                     body: bytes = b"", *, send_body: bool = True, timeout: float = DEADLINE) -> H1Response:
    """One request on a fresh connection; the response parsed strictly by httptools.
    `complete` is False when the connection ended before the response did."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    resp = H1Response()
    parts: list[bytes] = []

    class P:
        def on_header(self, name: bytes, value: bytes) -> None:
            resp.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

        def on_body(self, data: bytes) -> None:
            parts.append(data)

        def on_message_complete(self) -> None:
            resp.complete = True

    parser = httptools.HttpResponseParser(P())
    head = [f"{method} {target} HTTP/1.1", "host: gw.test"]
    for k, v in headers or []:
        head.append(f"{k}: {v}")
    if body and not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in headers or []):
        head.append(f"content-length: {len(body)}")
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (body if send_body else b""))
    raw = []

    async def read() -> None:
        while not resp.complete:
            data = await reader.read(1 << 20)
            if not data:
                return
            raw.append(data)
            parser.feed_data(data)

    try:
        await asyncio.wait_for(read(), timeout)
    finally:
        writer.close()
    resp.status = parser.get_status_code()
    resp.body = b"".join(parts)
    resp.raw = b"".join(raw)
    return resp


class H2Response:
    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.frames: list[bytes] = []
        self.trailers: list[tuple[str, str]] = []
        self.reset = False

    @property
    def body(self) -> bytes:
        return b"".join(self.frames)

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


async def h2_request(port: int, method: str, path: str, headers: list[tuple[str, str]] | None = None,
                     body: bytes = b"", *, timeout: float = DEADLINE) -> H2Response:
    """One request over h2c prior knowledge with the `h2` library."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    hdrs = [(":method", method), (":path", path), (":scheme", "http"), (":authority", "gw.test")]
    hdrs += list(headers or [])
    conn.send_headers(sid, hdrs, end_stream=not body)
    if body:
        conn.send_data(sid, body, end_stream=True)
    writer.write(conn.data_to_send())
    resp = H2Response()

    async def read() -> None:
        while True:
            data = await reader.read(1 << 20)
            if not data:
                raise ConnectionError("connection closed before the stream ended")
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    for k, v in ev.headers:
                        k, v = k.decode(), v.decode("latin-1")
                        if k == ":status":
                            resp.status = int(v)
                        else:
                            resp.headers.append((k, v))
                elif isinstance(ev, h2.events.DataReceived):
                    resp.frames.append(ev.data)
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.TrailersReceived):
                    resp.trailers = [(k.decode(), v.decode("latin-1")) for k, v in ev.headers]
                elif isinstance(ev, h2.events.StreamReset):
                    resp.reset = True
                    return
                elif isinstance(ev, h2.events.StreamEnded):
                    return
            writer.write(conn.data_to_send())

    try:
        await asyncio.wait_for(read(), timeout)
    finally:
        writer.close()
    return resp
