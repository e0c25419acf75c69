"""Shared pieces for the HTTP/2 tests (no tests of its own).

`H2TestServer` runs agproxy's `H2Connection` on a real listening socket
(127.0.0.1, ephemeral port) in a background uvloop thread, with a handler that
echoes, streams, sends trailers, waits on gates or resets, and records what
happened (started / cancelled handlers, body failures) under an asyncio
Condition so tests wait for *events*, never for time. `RawH2Client` is a
blocking client on the raw `h2` library for what curl and httpx cannot do
(resets, windows, invalid requests, many streams at once).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import socket
import ssl as ssl_mod
import threading
import time
from urllib.parse import parse_qs

import h2.config
import h2.connection
import h2.events
import h2.settings
import uvloop
from h2.connection import ConnectionInputs, ConnectionState, H2ConnectionStateMachine

from agproxy.http.h1 import Limits
from agproxy.http.h2 import H2Connection
from agproxy.http.messages import BodyAborted, ConnInfo, Headers
from agproxy.server.worker import sweep_connections, sweep_interval

def _keep_open_transitions() -> dict:
    """h2's state machine with GOAWAY (either way) leaving the connection open: stock h2
    refuses every frame after one, and a graceful shutdown lets the streams in flight finish."""
    t = dict(H2ConnectionStateMachine._transitions)
    for state in (ConnectionState.CLIENT_OPEN, ConnectionState.SERVER_OPEN):
        t[(state, ConnectionInputs.SEND_GOAWAY)] = (None, state)
        t[(state, ConnectionInputs.RECV_GOAWAY)] = (None, state)
    return t


_TRANSITIONS = _keep_open_transitions()

PATTERN = bytes(range(256)) * 64      # 16 KiB of a recognisable pattern


def pattern(n: int) -> bytes:
    reps = n // len(PATTERN) + 1
    return (PATTERN * reps)[:n]


class H2TestServer:
    def __init__(self, limits: Limits | None = None, ssl: ssl_mod.SSLContext | None = None, handler=None):
        self.limits = limits or Limits()
        self.ssl = ssl
        self.route = handler or self.default_route
        self.loop = uvloop.new_event_loop()
        self.conns: set = set()
        self.port = 0
        self.connections = 0
        self.started: list[str] = []
        self.finished: list[str] = []
        self.cancelled: list[str] = []
        self.body_errors: list[str] = []
        self.active = 0
        self.max_active = 0
        self.streams: dict[str, object] = {}
        self._gates: dict[str, asyncio.Event] = {}
        self._waiters: list = []
        self._polling = False
        self._server = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> "H2TestServer":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("test server did not start")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self._ready.set()
        self.loop.run_forever()
        # An event loop left open is never freed (uvloop's Loop is uncollectable), and
        # with it every connection it held: close it once its last callbacks have run.
        self.loop.close()

    async def _start(self) -> None:
        tracker = self

        def factory():
            self.connections += 1
            return H2Connection(self._handle, ConnInfo("127.0.0.1", 0, 0, self.ssl is not None,
                                                       alpn="h2"), self.limits, tracker=tracker)
        self._server = await self.loop.create_server(factory, "127.0.0.1", 0, ssl=self.ssl)
        self.port = self._server.sockets[0].getsockname()[1]
        self._sweep()

    def _sweep(self) -> None:
        # The worker's periodic pass over its connections (idle close, deadlines).
        sweep_connections(self.conns, self.limits.idle_timeout, time.monotonic())
        self.loop.call_later(sweep_interval(self.limits), self._sweep)

    def stop(self) -> None:
        def _close():
            for c in list(self.conns):
                c.close(abort=True)
            self._server.close()
            self.loop.call_soon(self.loop.stop)     # after the connection_lost callbacks
        self.loop.call_soon_threadsafe(_close)
        self._thread.join(10)

    def __enter__(self) -> "H2TestServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl else 'http'}://127.0.0.1:{self.port}"

    # tracker API used by H2Connection
    def add(self, conn) -> None:
        self.conns.add(conn)

    def discard(self, conn) -> None:
        self.conns.discard(conn)
        self._notify()

    # -- thread-safe controls -------------------------------------------------------------
    def call(self, fn, *args):
        """Run fn(*args) (a function or coroutine function) on the server loop; its result."""
        async def run():
            r = fn(*args)
            if asyncio.iscoroutine(r):
                r = await r
            return r
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(15)

    def release(self, name: str) -> None:
        self.call(lambda: self._gate(name).set())

    def shutdown_connections(self) -> None:
        self.call(lambda: [c.shutdown() for c in list(self.conns)])

    def wait_until(self, predicate, timeout: float = 10.0) -> None:
        """Block until predicate() (evaluated on the server loop) holds; fail after timeout.

        Re-evaluated whenever the server records something (a handler starts, ends,
        is cancelled; a connection closes) and on every loop turn of a short poll, for
        state that changes without a record (a stream starting to wait for window).
        """
        async def waiter():
            fut = self.loop.create_future()
            self._waiters.append((predicate, fut))
            self._notify()
            await asyncio.wait_for(fut, timeout)
        self.call(waiter)

    def _notify(self) -> None:
        still = []
        for predicate, fut in self._waiters:
            if fut.done():
                continue
            if predicate():
                fut.set_result(None)
            else:
                still.append((predicate, fut))
        self._waiters = still
        if still and not self._polling:
            self._polling = True
            self.loop.call_later(0.01, self._poll)

    def _poll(self) -> None:
        self._polling = False
        self._notify()

    def _gate(self, name: str) -> asyncio.Event:
        g = self._gates.get(name)
        if g is None:
            g = self._gates[name] = asyncio.Event()
        return g

    # -- the handler ----------------------------------------------------------------------
    async def _handle(self, stream) -> None:
        path = stream.request.path
        self.started.append(path)
        self.streams[path] = stream
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self._notify()
        try:
            await self.route(self, stream)
            self.finished.append(path)
        except asyncio.CancelledError:
            self.cancelled.append(path)
            raise
        except (BodyAborted, ConnectionError) as exc:
            self.body_errors.append(f"{path}: {type(exc).__name__}")
        finally:
            self.active -= 1
            self._notify()

    @staticmethod
    async def default_route(server: "H2TestServer", stream) -> None:
        req = stream.request
        path = req.path
        q = {k: v[0] for k, v in parse_qs(req.query).items()}
        if path == "/echo" or path.startswith("/echo/"):
            body = await stream.body.read_all(64 << 20)
            trailers = stream.body.trailers
            doc = {"method": req.method, "target": req.target, "authority": req.authority,
                   "scheme": req.scheme, "protocol": req.protocol, "headers": req.headers.items,
                   "body_len": len(body), "body_sha256": hashlib.sha256(body).hexdigest(),
                   "body": body[:1000].decode("latin-1"),
                   "trailers": trailers.items if trailers else None}
            out = json.dumps(doc).encode()
            stream.send_head(200, Headers([("content-type", "application/json"),
                                           ("content-length", str(len(out)))]))
            await stream.send_data(out)
            await stream.end()
        elif path == "/bytes":
            n = int(q.get("n", "1000"))
            chunk = int(q.get("chunk", "16384"))
            data = pattern(n)
            stream.send_head(200, Headers([("content-type", "application/octet-stream")]))
            sent = 0
            server.streams[f"sent:{req.target}"] = 0
            for pos in range(0, n, chunk):
                await stream.send_data(data[pos:pos + chunk])
                sent += len(data[pos:pos + chunk])
                server.streams[f"sent:{req.target}"] = sent
            await stream.end()
        elif path == "/trailers":
            stream.send_head(200, Headers([("content-type", "application/grpc")]))
            await stream.send_data(b"\x00\x00\x00\x00\x05hello")
            await stream.end(Headers([("grpc-status", "0"), ("grpc-message", "ok")]))
        elif path == "/trailers-only":
            stream.send_head(200, Headers([("content-type", "application/grpc")]))
            await stream.end(Headers([("grpc-status", "5"), ("grpc-message", "not found")]))
        elif path.startswith("/gate/"):
            await server._gate(path[len("/gate/"):]).wait()
            stream.send_head(200, Headers([("content-type", "text/plain")]))
            await stream.send_data(b"released " + path.encode())
            await stream.end()
        elif path.startswith("/hold-body/"):
            # Do not read the request body until the gate opens: flow control must hold the client.
            await server._gate(path[len("/hold-body/"):]).wait()
            body = await stream.body.read_all(64 << 20)
            stream.send_head(200, Headers([("content-type", "text/plain")]))
            await stream.send_data(b"%d %s" % (len(body), hashlib.sha256(body).hexdigest().encode()))
            await stream.end()
        elif path.startswith("/answer-unread/"):
            # Answer without ever reading the request body (once the gate opens).
            await server._gate(path[len("/answer-unread/"):]).wait()
            stream.send_head(200, Headers([("content-length", "2")]))
            await stream.send_data(b"ok")
            await stream.end()
        elif path == "/read-forever":
            while await stream.body.read():
                pass
            stream.send_head(200, Headers())
            await stream.end()
        elif path == "/reset":
            stream.send_head(200, Headers([("content-type", "text/plain")]))
            await stream.send_data(b"partial")
            stream.abort()
        elif path == "/reset-now":
            stream.abort()
        elif path == "/die":
            stream.send_head(200, Headers([("content-length", "100000")]))
            await stream.send_data(b"x" * 1000)
            stream.proto._flush_now()
            stream.proto.transport.abort()
        elif path == "/hop":
            stream.send_head(200, Headers([("connection", "close"), ("transfer-encoding", "chunked"),
                                           ("keep-alive", "timeout=5"), ("upgrade", "h2c"),
                                           ("proxy-connection", "x"), ("x-kept", "yes")]))
            await stream.send_data(b"ok")
            await stream.end()
        elif path == "/bad-header":
            # h2 frames carry any octets; an HTTP/1.1 client downstream must never see these.
            stream.send_head(200, Headers([("x-split", "a\r\nset-cookie: evil=1")]))
            await stream.end()
        elif path == "/bad-trailer":
            stream.send_head(200, Headers())
            await stream.send_data(b"body")
            await stream.end(Headers([("grpc-status", "0\r\nx: y")]))
        elif path == "/head-only":
            stream.send_head(204, Headers())
            await stream.end()
        elif path == "/forget":
            return   # a buggy handler that never answers
        else:
            stream.send_head(404, Headers([("content-length", "0")]))
            await stream.end()


class RawH2Client:
    """A blocking HTTP/2 client on the raw h2 library (test side)."""

    def __init__(self, port: int, *, validate: bool = True, settings: dict | None = None,
                 connect: bool = True, auto_ack: bool = True):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        cfg = h2.config.H2Configuration(client_side=True, header_encoding="utf-8",
                                        validate_outbound_headers=validate,
                                        normalize_outbound_headers=validate,
                                        validate_inbound_headers=True)
        self.h2 = h2.connection.H2Connection(cfg)
        # Stock h2 refuses every frame after a GOAWAY; graceful shutdown needs the streams
        # in flight to finish (the test side only: agproxy's own client is ClientCodec).
        self.h2.state_machine._transitions = _TRANSITIONS
        self.auto_ack = auto_ack
        self.responses: dict[int, dict] = collections.defaultdict(
            lambda: {"headers": None, "data": bytearray(), "trailers": None, "ended": False, "reset": None})
        self.goaway = None
        self.closed = False
        self.remote_settings_seen = False
        if settings:
            self.h2.local_settings = h2.settings.Settings(client=True, initial_values=settings)
        if connect:
            self.h2.initiate_connection()
            self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(self, method: str, path: str, headers=(), body: bytes | None = None,
                end: bool = True, authority: str = "localhost") -> int:
        sid = self.h2.get_next_available_stream_id()
        hdrs = [(":method", method), (":scheme", "http"), (":authority", authority), (":path", path)]
        hdrs += list(headers)
        self.h2.send_headers(sid, hdrs, end_stream=end and not body)
        if body:
            self.send_body(sid, body, end=end)
        self.flush()
        return sid

    def send_body(self, sid: int, body: bytes, end: bool = True) -> None:
        """Send as much as the windows allow, reading (window updates) when blocked."""
        pos = 0
        while pos < len(body):
            window = self.h2.local_flow_control_window(sid)
            if window <= 0:
                self.flush()
                self.read_once()
                if self.responses[sid]["reset"] is not None:
                    return
                continue
            n = min(window, len(body) - pos, self.h2.max_outbound_frame_size)
            self.h2.send_data(sid, body[pos:pos + n])
            pos += n
        if end:
            self.h2.end_stream(sid)
        self.flush()

    def read_once(self) -> list:
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise AssertionError("timed out waiting for the server") from None
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            return []
        events = self.h2.receive_data(data)
        for ev in events:
            sid = getattr(ev, "stream_id", None)
            if isinstance(ev, h2.events.ResponseReceived):
                self.responses[sid]["headers"] = ev.headers
            elif isinstance(ev, h2.events.DataReceived):
                self.responses[sid]["data"] += ev.data
                if self.auto_ack:
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, sid)
            elif isinstance(ev, h2.events.TrailersReceived):
                self.responses[sid]["trailers"] = ev.headers
            elif isinstance(ev, h2.events.StreamEnded):
                self.responses[sid]["ended"] = True
            elif isinstance(ev, h2.events.StreamReset):
                self.responses[sid]["reset"] = ev.error_code
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = ev
            elif isinstance(ev, h2.events.RemoteSettingsChanged):
                self.remote_settings_seen = True
        self.flush()
        return events

    def send_until_blocked(self, sid: int, body: bytes) -> int:
        """Send body bytes until the stream's window is empty (taking in WINDOW_UPDATEs as
        they come, without waiting for more); the number of bytes sent."""
        sent = 0
        while sent < len(body):
            window = self.h2.local_flow_control_window(sid)
            if window == 0:
                break
            n = min(window, self.h2.max_outbound_frame_size, len(body) - sent)
            self.h2.send_data(sid, body[sent:sent + n])
            sent += n
            self.flush()
            self.sock.setblocking(False)
            try:
                data = self.sock.recv(65536)
                if data:
                    self.h2.receive_data(data)
                    self.flush()
            except BlockingIOError:
                pass
            finally:
                self.sock.setblocking(True)
                self.sock.settimeout(10)
        return sent

    def read_until(self, predicate) -> None:
        while not predicate():
            if self.closed:
                raise AssertionError("connection closed before the condition held")
            self.read_once()

    def done(self, sid: int) -> bool:
        r = self.responses[sid]
        return r["ended"] or r["reset"] is not None

    def status(self, sid: int) -> int | None:
        h = self.responses[sid]["headers"]
        return int(dict(h)[":status"]) if h else None

    def response(self, sid: int) -> dict:
        self.read_until(lambda: self.done(sid))
        return self.responses[sid]

    def read_until_closed(self) -> None:
        while not self.closed:
            self.read_once()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
