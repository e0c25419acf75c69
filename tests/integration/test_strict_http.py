"""The test peers' one HTTP/1.1 server (tests/support/strict_http.py), checked over real
sockets: what each way of answering puts on the wire, byte for byte (fixed length,
chunked/SSE, reset, hang), heads seen before their bodies, refusals that the
recording peers built on it report as errors, and the in-loop ScriptedUpstream on
the same reader."""

from __future__ import annotations

import asyncio
import socket

import pytest

from tests.support.authz_peers import HANG, HttpAuthServer
from tests.support.inproc import ScriptedUpstream
from tests.support.recorder import RecordingUpstream
from tests.support.strict_http import Conn, Request, StrictHTTPServer


def read_all(s: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server writes until it closes (a deadline, never a hang)."""
    s.settimeout(timeout)
    out = b""
    while True:
        data = s.recv(65536)
        if not data:
            return out
        out += data


@pytest.fixture
def serve():
    servers = []

    def start(handler) -> StrictHTTPServer:
        srv = StrictHTTPServer(handler).start()
        servers.append(srv)
        return srv
    yield start
    for srv in servers:
        srv.stop()


def test_chunked_stream_bytes_are_exact(serve):
    def handler(req: Request, conn: Conn) -> None:
        conn.start_chunked(200, [("content-type", "text/event-stream")])
        conn.send_chunk(b"data: 1\n\n")
        conn.send_chunk(b"")                       # nothing: an empty chunk would end the body
        conn.send_chunk(b"data: two\n\n")
        conn.end_chunked([("x-trailer", "t")])
    srv = serve(handler)
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(b"GET /sse HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        got = read_all(s)
    assert got == (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
                   b"connection: close\r\n\r\n"
                   b"9\r\ndata: 1\n\n\r\nb\r\ndata: two\n\n\r\n0\r\nx-trailer: t\r\n\r\n")


def test_reset_is_a_tcp_rst_not_a_fin(serve):
    srv = serve(lambda req, conn: conn.reset())
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            read_all(s)


def test_hang_answers_nothing_keeps_what_arrives_and_ends_when_the_peer_goes(serve):
    srv = serve(lambda req, conn: conn.hang())
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(b"GET /hold HTTP/1.1\r\nHost: h\r\n\r\n")
        srv.wait_until(lambda: len(srv.received) == 1)
        s.sendall(b"GET /next HT")
        srv.wait_until(lambda: srv.in_progress() == [b"GET /next HT"])
        s.shutdown(socket.SHUT_WR)
        assert read_all(s) == b""                  # closed, never answered
    srv.wait_until(lambda: srv.open_connections == 0)


def test_hang_with_a_deadline_closes_without_answering(serve):
    srv = serve(lambda req, conn: conn.hang(0.2))
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        assert read_all(s) == b""


def test_head_is_recorded_before_its_body_with_names_as_sent(serve):
    srv = serve(lambda req, conn: conn.respond(200, [], req.body))
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(b"POST /p HTTP/1.1\r\nHost: h\r\nX-Mixed-Case: v\r\nContent-Length: 10\r\n\r\nhello")
        srv.wait_until(lambda: len(srv.heads) == 1)
        head = srv.heads[0]
        assert (head.method, head.target, head.body, srv.received) == ("POST", "/p", b"", [])
        assert head.raw_headers == [("Host", "h"), ("X-Mixed-Case", "v"), ("Content-Length", "10")]
        assert head.headers[1] == ("x-mixed-case", "v")
        s.sendall(b"world")
        srv.wait_until(lambda: len(srv.received) == 1)
        s.settimeout(10)
        assert s.recv(65536) == b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhelloworld"
    assert srv.received[0].raw.endswith(b"\r\n\r\nhelloworld")


@pytest.mark.parametrize("bad", [
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"GET / HTTP/1.1\nHost: a\n\n",
], ids=["two-hosts", "two-lengths", "bare-lf"])
def test_recording_peers_refuse_what_llhttp_refuses_and_say_so(bad):
    up = RecordingUpstream()
    try:
        with socket.create_connection(("127.0.0.1", up.port)) as s:
            s.sendall(bad)
            got = read_all(s)
        assert got.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"connection: close\r\n" in got
        assert up.seen == [] and len(up.errors) == 1
    finally:
        up.close()


def test_auth_server_hang_and_garbage_answers():
    silent = HttpAuthServer(lambda req: HANG)
    garbage = HttpAuthServer(lambda req: b"SSH-2.0-OpenSSH_9.6\r\n")
    try:
        with socket.create_connection(("127.0.0.1", garbage.port)) as s:
            s.sendall(b"GET /g HTTP/1.1\r\nHost: h\r\n\r\n")
            assert read_all(s) == b"SSH-2.0-OpenSSH_9.6\r\n"
        s = socket.create_connection(("127.0.0.1", silent.port))
        s.sendall(b"GET /s HTTP/1.1\r\nHost: h\r\n\r\n")
        assert [r["target"] for r in silent.wait_for(1)] == ["/s"]
        silent.stop()                               # a hanging answer ends with the server
        assert read_all(s) == b""
        s.close()
    finally:
        silent.stop()
        garbage.stop()


def test_scripted_upstream_keeps_pipelined_requests_apart_and_refuses_two_hosts():
    async def script(req, writer):
        body = f"{req.target} {req.headers}".encode()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body))

    async def main():
        up = await ScriptedUpstream(script).start()
        try:
            r, w = await asyncio.open_connection("127.0.0.1", up.port)
            w.write(b"GET /a HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n")
            one = b"/a [('host', 'h'), ('x-a', '1')]"
            two = b"/b [('host', 'h')]"
            want = (b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(one), one)
                    + b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(two), two))
            assert await asyncio.wait_for(r.readexactly(len(want)), 10) == want
            w.write(b"GET /c HTTP/1.1\r\nHost: h\r\nHost: i\r\n\r\n")
            assert await asyncio.wait_for(r.read(), 10) == (
                b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            assert [q.target for q in up.requests] == ["/a", "/b"] and up.rejected == ["ValueError: 2 Host headers"]
            w.close()
        finally:
            await up.close()

    asyncio.run(main())
