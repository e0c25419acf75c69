"""Requests leave no reference cycles behind.

A per-request cycle is freed only by the cyclic GC, which then walks every object
in flight again and again: on HTTP/2 that once cost ~10% of a request. The worker
runs the collector rarely (server/worker.py GC_THRESHOLDS), which is only sound if
requests are freed by reference counting. Here the real gateway pipeline (a
config, a route with a CEL rule reading a request header, the static backend)
serves HTTP/1.1 and HTTP/2 clients over loopback sockets, and the collector must
find nothing that grows with the number of requests, and nothing of the gateway's
own at all once the connection is closed.

Each measured run ends only after the server has seen its connection close
(`connection_lost`): a closed connection that was a reference cycle is then always
garbage, never sometimes (a run used to count it or not by who won that race, and
the test failed one full-suite run in two).
"""

import asyncio
import gc
import socket
import threading

import h2.config
import h2.connection
import h2.events
import pytest

from agproxy.http.h1 import H1Connection, Limits
from agproxy.http.h2 import H2Connection
from agproxy.http.messages import ConnInfo
from agproxy.proxy.build import load_runtime
from agproxy.proxy.exchange import Gateway
from agproxy.telemetry.access_log import AccessLog

CONFIG = """
[[listener]]
name = "main"
bind = "127.0.0.1:0"

[[route]]
name = "hello"
match = { path_prefix = "/" }
backend = "hello"

[route.authorization]
rules = ['request.headers["x-tenant"] == "t1"', 'request.method == "GET"']

[route.transform.request]
set = { "x-seen" = 'request.path' }

[backend.hello]
type = "static"
body = "hello"
"""


class _Tracker:
    """The server's connection registry (the adapters call add/discard): lets the client
    thread wait until the server has torn its side of a connection down."""

    def __init__(self):
        self.conns: set = set()
        self.cond = threading.Condition()

    def add(self, conn) -> None:
        with self.cond:
            self.conns.add(conn)

    def discard(self, conn) -> None:
        with self.cond:
            self.conns.discard(conn)
            self.cond.notify_all()

    def wait_closed(self, timeout: float = 10.0) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: not self.conns, timeout), "the server kept the connection"

    def loop_turn(self) -> None:
        async def nothing():
            return None
        asyncio.run_coroutine_threadsafe(nothing(), self.loop).result(10)


def _garbage_after(serve_requests, tracker: _Tracker) -> tuple[int, list[str]]:
    """Objects the collector finds after the requests; the gateway's own among them."""
    gc.collect()
    # Uncollectable leftovers of earlier tests (an event loop never closed and what it
    # held) would be found again by every collection: kept reachable, so not counted.
    stale = gc.garbage[:]
    del gc.garbage[:]
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        serve_requests()
        tracker.wait_closed()
        tracker.loop_turn()       # connection_lost has returned: the transport let go
        gc.collect()
        ours = sorted({type(o).__qualname__ for o in gc.garbage
                       if type(o).__module__.startswith("agproxy")})
        return len(gc.garbage), ours
    finally:
        gc.set_debug(0)
        gc.garbage[:] = stale
        gc.enable()


def _h1_requests(port: int, n: int) -> None:
    request = b"GET /x HTTP/1.1\r\nhost: a\r\nx-tenant: t1\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port)) as s:
        for _ in range(n):
            s.sendall(request)
            got = b""
            while not got.endswith(b"hello"):
                chunk = s.recv(65536)
                assert chunk, got
                got += chunk
            assert got.startswith(b"HTTP/1.1 200"), got


def _h2_requests(port: int, n: int) -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(conn.data_to_send())
        for _ in range(n // 10):
            ids = []
            for _ in range(10):
                sid = conn.get_next_available_stream_id()
                conn.send_headers(sid, [(":method", "GET"), (":path", "/x"), (":scheme", "http"),
                                        (":authority", "a"), ("x-tenant", "t1")], end_stream=True)
                ids.append(sid)
            s.sendall(conn.data_to_send())
            ended = set()
            while len(ended) < len(ids):
                data = s.recv(65536)
                assert data
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived):
                        assert dict(ev.headers)[b":status"] == b"200"
                    elif isinstance(ev, h2.events.StreamEnded):
                        ended.add(ev.stream_id)
                    elif isinstance(ev, h2.events.DataReceived):
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                s.sendall(conn.data_to_send())


@pytest.mark.parametrize("protocol", ["h1", "h2"])
def test_requests_leave_no_cycles(tmp_path, protocol):
    conf = tmp_path / "gw.toml"
    conf.write_text(CONFIG)
    results = {}
    tracker = _Tracker()

    async def main():
        loop = asyncio.get_running_loop()
        tracker.loop = loop
        runtime = load_runtime(str(conf))
        gateway = Gateway(runtime, None, AccessLog("off"))
        limits = Limits()
        info = ConnInfo("127.0.0.1", 1, 2, False, listener="main")

        def protocol_factory():
            if protocol == "h2":
                return H2Connection(gateway.handle, info, limits, tracker=tracker)
            return H1Connection(gateway.handle, info, limits, tracker=tracker)

        server = await loop.create_server(protocol_factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        drive = _h2_requests if protocol == "h2" else _h1_requests
        try:
            await loop.run_in_executor(None, drive, port, 20)          # warm up
            for n in (50, 200):
                results[n] = await loop.run_in_executor(
                    None, lambda: _garbage_after(lambda: drive(port, n), tracker))
        finally:
            server.close()

    asyncio.run(main())
    (small, ours_small), (large, ours_large) = results[50], results[200]
    # The gateway's objects never need the collector: not per request, not per connection.
    assert ours_small == [] and ours_large == [], results
    # A per-request cycle leaves a dozen objects per request; the client library's
    # (h2, in the test thread) do not scale with requests.
    assert large - small < 20, results
