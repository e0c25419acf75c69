"""The HTTP/1.1 server adapter (agproxy/http/h1.py) on a real socket with handlers the
gateway's own never are: ones that return without finishing their response.

`H1TestServer` runs `H1Connection` in a background uvloop thread; clients are raw
sockets that parse what they get with httptools.
"""

from __future__ import annotations

import asyncio
import socket
import threading

import httptools
import pytest
import uvloop

from agproxy.http.h1 import H1Connection, Limits
from agproxy.http.messages import ConnInfo, Headers


async def handler(stream) -> None:
    path = stream.request.path
    if path == "/nothing":
        return                                   # neither a head nor end()
    if path == "/head-only":
        stream.send_head(200, Headers([("content-length", "10")]))
        return                                   # a head recorded, never written
    if path == "/partial":
        stream.send_head(200, Headers([("content-type", "text/plain")]))
        await stream.send_data(b"abc")           # chunked, then no end()
        return
    if path == "/raises":
        raise RuntimeError("handler bug")
    if path in ("/last-with-end", "/first-and-last-with-end"):
        # A chunked body whose last chunk goes with end() (the exchange does this when
        # its reader is at EOF): the chunk and the last-chunk leave in one write.
        stream.send_head(200, Headers([("content-type", "text/plain")]))
        if path == "/last-with-end":
            await stream.send_data(b"abc")
        await stream.end(None, b"defg")
        return
    if path == "/cancelled":
        # Answers, then is cancelled by something other than the connection (as a
        # deadline helper that failed to take its cancel back would).
        stream.send_head(200, Headers([("content-length", "2")]))
        await stream.send_data(b"ok")
        await stream.end()
        asyncio.current_task().cancel()
        await asyncio.sleep(0)
    stream.send_head(200, Headers([("content-length", "2")]))
    await stream.send_data(b"ok")
    await stream.end()


class _CountedTransport:
    """The real transport, with its writes counted (one write is one send to the socket)."""

    def __init__(self, transport, counts: list) -> None:
        self._t = transport
        self._counts = counts

    def write(self, data) -> None:
        self._counts.append(bytes(data))
        self._t.write(data)

    def __getattr__(self, name):
        return getattr(self._t, name)


class CountingH1(H1Connection):
    __slots__ = ("writes",)

    def connection_made(self, transport) -> None:
        self.writes: list[bytes] = []
        writes.append(self.writes)
        super().connection_made(_CountedTransport(transport, self.writes))


writes: list[list[bytes]] = []    # per connection, in accept order


class H1TestServer:
    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.conns: set = set()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)

            async def start():
                def factory():
                    return CountingH1(handler, ConnInfo("127.0.0.1", 0, 0, False), Limits(), tracker=self)
                self.server = await self.loop.create_server(factory, "127.0.0.1", 0)
                self.port = self.server.sockets[0].getsockname()[1]
            self.loop.run_until_complete(start())
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def add(self, conn) -> None:
        self.conns.add(conn)

    def discard(self, conn) -> None:
        self.conns.discard(conn)

    def stop(self) -> None:
        def close():
            for c in list(self.conns):
                c.close(abort=True)
            self.server.close()
            self.loop.stop()
        self.loop.call_soon_threadsafe(close)
        self.thread.join(10)


@pytest.fixture
def server():
    s = H1TestServer()
    yield s
    s.stop()


class Response:
    """What a strict client (httptools) parsed off the connection until it closed."""

    def __init__(self, data: bytes):
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""
        self.complete = False
        self.error = None
        parser = httptools.HttpResponseParser(self)
        self._parser = parser
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = str(exc)

    def on_header(self, name, value):
        self.headers[name.decode().lower()] = value.decode()

    def on_headers_complete(self):
        self.status = self._parser.get_status_code()

    def on_body(self, body):
        self.body += body

    def on_message_complete(self):
        self.complete = True


def exchange(port: int, path: str, close: bool = False) -> tuple[Response, bool]:
    """Send one request (keep-alive unless `close`); read until the server closes (or 10 s pass)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        extra = "Connection: close\r\n" if close else ""
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
        data, closed = b"", False
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            data += chunk
    return Response(data), closed


def test_handler_returning_before_any_response_gets_500_and_close(server):
    for path in ("/nothing", "/head-only", "/raises"):
        resp, closed = exchange(server.port, path)
        assert closed, path
        assert resp.complete and resp.status == 500, (path, resp.status, resp.body)
        assert resp.headers["connection"] == "close"
        assert b"internal_error" in resp.body


def test_handler_returning_mid_response_closes_the_connection(server):
    resp, closed = exchange(server.port, "/partial")
    assert closed
    assert resp.status == 200 and resp.body == b"abc"
    assert not resp.complete        # the client sees a broken response, never a complete-looking one


def test_other_connections_are_unaffected(server):
    exchange(server.port, "/nothing")
    resp, closed = exchange(server.port, "/fine", close=True)
    assert resp.complete and resp.status == 200 and resp.body == b"ok"


def _keep_alive_requests(port: int, paths: list[str], pipelined: bool) -> list["_Parsed"]:
    """Requests on one keep-alive connection, sent at once or each after the answer
    before it; the complete responses parsed (httptools)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        requests = [f"GET {p} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for p in paths]
        if pipelined:
            s.sendall(b"".join(requests))
        buf = b""
        for i, req in enumerate(requests):
            if not pipelined:
                s.sendall(req)
            while len(_responses(buf)) <= i:
                chunk = s.recv(65536)
                assert chunk, f"connection closed before answer {i + 1} of {len(paths)}"
                buf += chunk
        return _responses(buf)


class _Parsed:
    def __init__(self) -> None:
        self.status = 0
        self.body = b""
        self.complete = False


def _responses(data: bytes) -> list[_Parsed]:
    out: list[_Parsed] = []

    class Sink:
        def on_message_begin(self):
            out.append(_Parsed())

        def on_headers_complete(self):
            out[-1].status = parser.get_status_code()

        def on_body(self, body):
            out[-1].body += body

        def on_message_complete(self):
            out[-1].complete = True

    parser = httptools.HttpResponseParser(Sink())
    parser.feed_data(data)
    return [r for r in out if r.complete]


@pytest.mark.parametrize("pipelined", [False, True], ids=["sequential", "pipelined"])
def test_requests_on_one_connection_are_each_answered_in_order(server, pipelined):
    paths = ["/a", "/b", "/cancelled", "/c", "/d"]
    got = _keep_alive_requests(server.port, paths, pipelined)
    assert [(r.status, r.body, r.complete) for r in got] == [(200, b"ok", True)] * len(paths)


def test_a_handler_cancelled_after_answering_leaves_the_connection_serving(server):
    got = _keep_alive_requests(server.port, ["/cancelled", "/after"], pipelined=False)
    assert [(r.status, r.body) for r in got] == [(200, b"ok"), (200, b"ok")]


@pytest.mark.parametrize("path", ["/last-with-end", "/first-and-last-with-end"])
def test_a_last_chunk_given_to_end_leaves_with_the_last_chunk_in_one_write(server, path):
    writes.clear()
    got = _keep_alive_requests(server.port, [path, "/after"], pipelined=False)
    expected = b"abcdefg" if path == "/last-with-end" else b"defg"
    assert [(r.status, r.body) for r in got] == [(200, expected), (200, b"ok")]
    (conn_writes,) = writes
    first = conn_writes[:-1]            # the last write is the answer to /after
    assert first[-1].endswith(b"4\r\ndefg\r\n0\r\n\r\n")
    assert len(first) == (2 if path == "/last-with-end" else 1)


def test_end_with_data_on_a_head_request_sends_no_body(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"HEAD /first-and-last-with-end HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
        buf = b""
        while b"\r\n\r\nok" not in buf:
            chunk = s.recv(65536)
            assert chunk
            buf += chunk
    assert b"defg" not in buf
    assert buf.count(b"HTTP/1.1 200") == 2
