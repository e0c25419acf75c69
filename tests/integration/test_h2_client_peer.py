"""The upstream HTTP/2 client (agproxy/upstream/h2.py) against a strict, scripted peer.

The peer (tests/support/h2_peer.py) is the h2 library as a server with inbound
validation on — whatever agproxy sends must be valid RFC 9113 — plus raw frames
for what a broken or hostile upstream does: GOAWAY mid-flight, REFUSED_STREAM,
floods, oversized or malformed heads, a window that never opens. Each test
asserts what the proxy sees (status, headers, bytes, the error kind) and what
the upstream saw (resets and their codes, GOAWAY codes), and that the peer
found nothing to object to in agproxy's frames (`peer.errors == []`).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import subprocess

import h2.errors
import h2.events
import h2.settings
import pytest
import uvloop

from agproxy.http.messages import BodyAborted, BodyReader, Headers
from agproxy.upstream.errors import UpstreamError, UpstreamTimeout
from agproxy.upstream.h2 import MAX_RESPONSE_HEAD, connect_h2
from agproxy.upstream.origin import Origin
from agproxy.upstream.pool import Pool
from tests.support import h2_peer
from tests.support.h2_peer import H2Peer, frame, goaway

E = h2.errors.ErrorCodes
SC = h2.settings.SettingCodes


def origin(peer: H2Peer) -> Origin:
    return Origin.from_url(peer.url, http2=True, connect_timeout=5)


def run(coro):
    return uvloop.run(coro)


async def in_thread(fn, *args):
    return await asyncio.to_thread(fn, *args)


def serve_forever(conn) -> None:
    """Answer every request with 200 'ok' (x-conn: the connection's index) until EOF."""
    while True:
        sid, _, _ = conn.request(timeout=30)
        conn.respond(sid, 200, [("content-length", "2"), ("x-conn", str(conn.index))], b"ok")


async def get_ok(conn, path: str = "/next") -> tuple[int, bytes]:
    r = await conn.request("GET", path, Headers(), None, timeout=10)
    return r.status, await r.body.read_all(1 << 20)


# -- a valid exchange, as the strict peer sees it ---------------------------------------------

def test_request_is_valid_http2_and_trailers_reach_the_body():
    seen = {}

    def script(conn):
        sid, headers, body = conn.request()
        seen.update(headers=headers, body=body)
        conn.respond(sid, 200, [("content-type", "application/grpc")], b"\x00\x00\x00\x00\x02hi",
                     trailers=[("grpc-status", "0"), ("grpc-message", "fine")])
        conn.read_until_closed()

    with H2Peer(script) as peer:
        async def main():
            conn = await connect_h2(origin(peer))
            r = await conn.request("POST", "/pkg.Svc/Call?x=1", Headers([
                ("host", "svc.internal"), ("te", "trailers"), ("connection", "keep-alive"),
                ("keep-alive", "timeout=5"), ("content-type", "application/grpc"), ("x-b3", "1")]),
                b"\x00\x00\x00\x00\x01z", timeout=10)
            body = await r.body.read_all(1 << 20)
            conn.close()
            return r.status, r.headers.items, body, r.body.trailers.items
        status, headers, body, trailers = run(main())
        peer.wait(lambda: peer.done == 1)
    assert peer.errors == []
    assert (status, headers, body) == (200, [("content-type", "application/grpc")], b"\x00\x00\x00\x00\x02hi")
    assert trailers == [("grpc-status", "0"), ("grpc-message", "fine")]
    assert list(seen["headers"].items()) == [
        (b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"svc.internal"),
        (b":path", b"/pkg.Svc/Call?x=1"), (b"te", b"trailers"), (b"content-type", b"application/grpc"),
        (b"x-b3", b"1"), (b"content-length", b"6")]
    assert seen["body"] == b"\x00\x00\x00\x00\x01z"


def test_interim_heads_are_skipped():
    def script(conn):
        sid, _, _ = conn.request()
        conn.h2.send_headers(sid, [(b":status", b"100")])
        conn.h2.send_headers(sid, [(b":status", b"103"), (b"link", b"</a.css>; rel=preload")])
        conn.respond(sid, 200, [("content-length", "4"), ("x-final", "yes")], b"done")
        conn.read_until_closed()

    with H2Peer(script) as peer:
        async def main():
            conn = await connect_h2(origin(peer))
            r = await conn.request("GET", "/", Headers(), None, timeout=10)
            body = await r.body.read_all(1000)
            conn.close()
            return r.status, r.headers.items, body
        assert run(main()) == (200, [("content-length", "4"), ("x-final", "yes")], b"done")
    assert peer.errors == []


def test_ping_answered_and_settings_acknowledged():
    def script(conn):
        sid, _, _ = conn.request()
        conn.h2.ping(b"pingpong")
        conn.h2.update_settings({SC.MAX_FRAME_SIZE: 32768, SC.HEADER_TABLE_SIZE: 1024})
        conn.flush()
        ack = conn.expect(h2.events.PingAckReceived)
        conn.expect(h2.events.SettingsAcknowledged)
        conn.respond(sid, 200, [("x-ping", ack.ping_data.decode())], b"")
        while True:      # the client's encoder now uses a 1 KiB table: h2 checks it decodes
            sid, headers, _ = conn.request(timeout=30)
            conn.respond(sid, 200, [("x-path", headers[b":path"].decode())], b"")

    with H2Peer(script) as peer:
        async def main():
            conn = await connect_h2(origin(peer))
            r = await conn.request("GET", "/", Headers(), None, timeout=10)
            await r.body.read_all(100)
            paths = []
            for i in range(3):
                r2 = await conn.request("GET", f"/after/{i}", Headers([("x-big", "v" * 300)]), None, timeout=10)
                await r2.body.read_all(100)
                paths.append(r2.headers.get("x-path"))
            conn.close()
            return r.headers.get("x-ping"), paths
        assert run(main()) == ("pingpong", ["/after/0", "/after/1", "/after/2"])
    assert peer.errors == []


# -- GOAWAY, REFUSED_STREAM, slots -------------------------------------------------------------

def test_goaway_mid_flight_fails_only_streams_above_last_and_the_pool_retries():
    def script(conn):
        if conn.index == 0:
            a, ha, _ = conn.request()
            b, hb, _ = conn.request()
            first, second = sorted([(a, ha), (b, hb)])
            conn.raw(goaway(first[0]))           # the second stream will not be processed
            conn.respond(first[0], 200, [("x-conn", "0"), ("x-path", first[1][b":path"].decode())], b"")
            conn.read_until_closed()
        else:
            serve_forever(conn)

    with H2Peer(script) as peer:
        async def main():
            pool = Pool()
            o = origin(peer)
            rs = await asyncio.gather(pool.request(o, "GET", "/a", Headers(), None, timeout=10),
                                      pool.request(o, "GET", "/b", Headers(), None, timeout=10))
            out = [(r.status, r.headers.get("x-conn")) for r in rs]
            for r in rs:
                await r.body.read_all(100)
            await pool.close()
            return out, pool.connections_opened
        out, opened = run(main())
    assert sorted(out) == [(200, "0"), (200, "1")]     # one answered before GOAWAY, one retried
    assert opened == 2
    assert peer.errors == []


def test_refused_stream_is_retried_with_the_same_body():
    bodies = []

    def script(conn):
        sid, _, body = conn.request()
        bodies.append(body)
        conn.h2.reset_stream(sid, E.REFUSED_STREAM)
        conn.flush()
        sid, _, body = conn.request()
        bodies.append(body)
        conn.respond(sid, 201, [("content-length", "0")])
        conn.read_until_closed()

    with H2Peer(script) as peer:
        async def main():
            pool = Pool()
            r = await pool.request(origin(peer), "POST", "/", Headers(), b"payload", timeout=10)
            await r.body.read_all(10)
            await pool.close()
            return r.status, pool.connections_opened
        assert run(main()) == (201, 1)
    assert bodies == [b"payload", b"payload"]
    assert peer.errors == []


def test_refused_stream_with_a_streamed_body_is_not_replayed():
    def script(conn):
        sid, _, _ = conn.request()
        conn.h2.reset_stream(sid, E.REFUSED_STREAM)
        conn.flush()
        conn.read_until_closed()

    with H2Peer(script) as peer:
        async def main():
            pool = Pool()
            reader = BodyReader()
            reader.feed(b"once")
            reader.feed_eof()
            with pytest.raises(UpstreamError) as e:
                await pool.request(origin(peer), "POST", "/", Headers(), reader, timeout=10)
            await pool.close()
            return e.value.kind, e.value.retryable
        assert run(main()) == ("reset", True)
    assert peer.errors == []


def test_waiting_for_a_stream_slot_has_the_request_deadline():
    def script(conn):
        sid, _, _ = conn.request()
        conn.expect(h2.events.StreamReset, timeout=10)     # held until the client gives up on it
        sid2, headers, _ = conn.request()
        conn.respond(sid2, 200, [("x-path", headers[b":path"].decode())])
        conn.read_until_closed()

    with H2Peer(script, settings={SC.MAX_CONCURRENT_STREAMS: 1}) as peer:
        async def main():
            conn = await connect_h2(origin(peer))
            loop = asyncio.get_running_loop()
            held = loop.create_task(conn.request("GET", "/held", Headers(), None, timeout=10))
            await in_thread(peer.wait, lambda: any(c.events(h2.events.RequestReceived) for c in peer.conns))
            start = loop.time()
            with pytest.raises(UpstreamTimeout):
                await conn.request("GET", "/waits", Headers(), None, timeout=0.3)
            waited = loop.time() - start
            held.cancel()                                   # the proxy gives up: RST_STREAM CANCEL
            r = await conn.request("GET", "/third", Headers(), None, timeout=10)
            status, path = r.status, r.headers.get("x-path")
            conn.close()
            return waited, status, path
        waited, status, path = run(main())
    assert 0.29 <= waited < 2
    assert (status, path) == (200, "/third")          # "/waits" never reached the upstream
    assert peer.conns[0].events(h2.events.StreamReset)[0].error_code == E.CANCEL
    assert peer.errors == []                          # never more streams than allowed


# -- cancellation and deadlines ----------------------------------------------------------------

def test_response_abandoned_by_the_proxy_is_reset_with_cancel():
    def script(conn):
        sid, _, _ = conn.request()
        conn.h2.send_headers(sid, [(b":status", b"200")])
        conn.h2.send_data(sid, b"x" * 1000)
        conn.flush()
        reset = conn.expect(h2.events.StreamReset)
        assert reset.stream_id == sid and reset.error_code == E.CANCEL
        serve_forever(conn)

    with H2Peer(script) as peer:
        async def main():
            conn = await connect_h2(origin(peer))
            r = await conn.request("GET", "/", Headers(), None, timeout=10)
            assert await r.body.read() == b"x" * 1000
            r.abort()
            out = await get_ok(conn)
            conn.close()
            return out
        assert run(main()) == (200, b"ok")
    assert peer.errors == []


def test_upstream_that_never_opens_its_window_hits_the_request_timeout():
    def script(conn):
        ev = conn.expect(h2.events.RequestReceived)
        reset = conn.expect(h2.events.StreamReset, timeout=10)
        assert reset.stream_id == ev.stream_id and reset.error_code == E.CANCEL
        assert not conn.events(h2.events.DataReceived)      # not one byte beyond the window
        conn.read_until_closed()

    with H2Peer(script, settings={SC.INITIAL_WINDOW_SIZE: 0}) as peer:
        async def main():
            conn = await connect_h2(origin(peer))
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(UpstreamTimeout):
                await conn.request("POST", "/", Headers(), b"a body that never fits", timeout=0.4)
            waited = loop.time() - start
            await in_thread(peer.wait, lambda: any(c.events(h2.events.StreamReset) for c in peer.conns))
            conn.close()
            return waited
        waited = run(main())
        peer.wait(lambda: peer.done == 1)
    assert 0.39 <= waited < 2
    assert peer.errors == []


# -- malformed responses: that stream fails, the connection lives on -------------------------

def _head(*fields):
    # sent without END_STREAM: the stream stays open at the peer, which then sees our RST_STREAM
    return lambda conn, sid: conn.h2.send_headers(sid, list(fields))


MALFORMED = {
    "connection-specific field": _head((b":status", b"200"), (b"connection", b"close")),
    "uppercase name": _head((b":status", b"200"), (b"X-Upper", b"1")),
    "CR LF in a value": _head((b":status", b"200"), (b"x-split", b"a\r\nset-cookie: evil=1")),
    "request pseudo-header": _head((b":status", b"200"), (b":path", b"/")),
    "pseudo-header after a field": _head((b"x-a", b"1"), (b":status", b"200")),
    "no :status": _head((b"x-a", b"1")),
    "status 101": _head((b":status", b"101")),
    "status 20": _head((b":status", b"20")),
    "two content-lengths": _head((b":status", b"200"), (b"content-length", b"1"), (b"content-length", b"2")),
    "head over MAX_RESPONSE_HEAD": _head((b":status", b"200"), (b"x", b"y" * (MAX_RESPONSE_HEAD + 100))),
    "DATA before the head": lambda conn, sid: conn.raw(frame(h2_peer.DATA, 1, sid, b"body")),
    "endless interim heads": lambda conn, sid: [conn.h2.send_headers(sid, [(b":status", b"103")])
                                                for _ in range(50)],
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_response_head_resets_only_its_stream(case):
    def script(conn):
        sid, _, _ = conn.request()
        MALFORMED[case](conn, sid)
        conn.flush()
        reset = conn.expect(h2.events.StreamReset)
        assert reset.stream_id == sid and reset.error_code == E.PROTOCOL_ERROR
        serve_forever(conn)

    with H2Peer(script) as peer:
        async def main():
            conn = await connect_h2(origin(peer))
            with pytest.raises(UpstreamError) as e:
                await conn.request("GET", "/bad", Headers(), None, timeout=10)
            out = await get_ok(conn)
            conn.close()
            return e.value.kind, out
        assert run(main()) == ("protocol", (200, b"ok"))
    assert peer.errors == []


def test_body_longer_than_its_content_length_is_aborted():
    def script(conn):
        sid, _, _ = conn.request()
        conn.respond(sid, 200, [("content-length", "3")], b"four")
        serve_forever(conn)        # (the stream is closed at both ends: h2 ignores the RST)

    with H2Peer(script) as peer:
        async def main():
            conn = await connect_h2(origin(peer))
            r = await conn.request("GET", "/", Headers(), None, timeout=10)
            with pytest.raises(BodyAborted):
                await r.body.read_all(100)
            out = await get_ok(conn)
            conn.close()
            return out
        assert run(main()) == (200, b"ok")
    assert peer.errors == []


# -- connection errors: every stream fails, the upstream is told why ---------------------------

def _hpack_table_too_large(conn, sid):
    # a dynamic table size update to 8192: above the 4096 we allow (RFC 7541 §6.3)
    conn.raw(frame(h2_peer.HEADERS, 0x5, sid, b"\x3f\xe1\x3f\x88"))


def _continuation_flood(conn, sid):
    conn.raw(frame(h2_peer.HEADERS, 0, sid, b"\x88") + frame(h2_peer.CONTINUATION, 0, sid, b"") * 1000)


def _huge_header_block(conn, sid):
    # 21 x 16 KiB: past the 4 x MAX_RESPONSE_HEAD that HPACK may make us hold
    chunk = b"\x00" * 16384
    conn.raw(frame(h2_peer.HEADERS, 0, sid, chunk) + frame(h2_peer.CONTINUATION, 0, sid, chunk) * 20)


def _push_promise(conn, sid):
    conn.raw(frame(h2_peer.PUSH_PROMISE, 0x4, sid, struct.pack(">L", 2) + b"\x82\x84\x86"))


def _bad_window_update(conn, sid):
    conn.raw(frame(h2_peer.WINDOW_UPDATE, 0, 0, b"\x00\x00\x00\x01\x00"))


CONNECTION_ERRORS = {
    "HPACK table size above ours": (_hpack_table_too_large, E.COMPRESSION_ERROR),
    "CONTINUATION flood": (_continuation_flood, E.ENHANCE_YOUR_CALM),
    "header block over 256 KiB": (_huge_header_block, E.ENHANCE_YOUR_CALM),
    "PUSH_PROMISE with push disabled": (_push_promise, E.PROTOCOL_ERROR),
    "WINDOW_UPDATE of the wrong size": (_bad_window_update, E.FRAME_SIZE_ERROR),
}


@pytest.mark.parametrize("case", list(CONNECTION_ERRORS))
def test_connection_error_fails_every_open_stream_with_goaway(case):
    send, code = CONNECTION_ERRORS[case]
    goaways = []

    def script(conn):
        a, _, _ = conn.request()
        conn.request()
        send(conn, a)
        while True:
            ev = conn.expect(h2.events.ConnectionTerminated)
            goaways.append(ev.error_code)

    with H2Peer(script) as peer:
        async def main():
            conn = await connect_h2(origin(peer))
            out = await asyncio.gather(*[conn.request("GET", f"/{i}", Headers(), None, timeout=10)
                                         for i in range(2)], return_exceptions=True)
            return [(type(e).__name__, getattr(e, "kind", None)) for e in out], conn.usable
        out, usable = run(main())
        peer.wait(lambda: peer.done == 1)
    assert out == [("UpstreamError", "protocol")] * 2
    assert not usable
    assert goaways == [code]


def test_ping_flood_from_an_upstream_that_does_not_read_is_cut_off():
    """CVE-2019-9512 against the client: the acknowledgements owed while our writes are
    blocked are counted; past the budget, GOAWAY ENHANCE_YOUR_CALM and the connection is dropped."""
    sent = []

    def script(conn):
        conn.request()
        batch = frame(h2_peer.PING, 0, 0, b"12345678") * 2000
        total = 0
        conn.sock.settimeout(30)
        try:
            while total < 64 << 20:
                conn.sock.sendall(batch)
                total += len(batch)
        except (BrokenPipeError, ConnectionResetError):
            sent.append(total)
            return
        sent.append(None)

    with H2Peer(script, rcvbuf=4096) as peer:
        async def main():
            conn = await connect_h2(origin(peer))
            sock = conn.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            with pytest.raises(UpstreamError) as e:
                await conn.request("GET", "/", Headers(), None, timeout=30)
            return e.value.kind, str(e.value), conn.usable
        kind, message, usable = run(main())
        peer.wait(lambda: peer.done == 1, timeout=30)
    assert kind == "protocol" and "flood" in message and not usable
    assert sent and sent[0] is not None and sent[0] < 32 << 20


# -- through the gateway: what a client of the proxy sees ------------------------------------

def gateway_routes(url: str) -> str:
    return f'''
[[route]]
name = "all"
match = {{ path_prefix = "/" }}
backend = "up"
timeout = "1s"

[backend.up]
type = "http"
url = "{url}"
http2 = true
'''


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "20", "-w", "\n%{http_code}", *args],
                          capture_output=True)


def test_gateway_answers_504_when_the_upstream_never_opens_its_window(start_gateway):
    def script(conn):
        conn.expect(h2.events.RequestReceived)
        reset = conn.expect(h2.events.StreamReset, timeout=10)
        assert reset.error_code == E.CANCEL
        conn.read_until_closed(timeout=30)

    with H2Peer(script, settings={SC.INITIAL_WINDOW_SIZE: 0}) as peer:
        gw = start_gateway(gateway_routes(peer.url))
        r = curl("--data-binary", "x" * 1000, gw.url("/upload"))
        body, status = r.stdout.rsplit(b"\n", 1)
        assert status == b"504", r.stdout + r.stderr + gw.logs().encode()
        assert json.loads(body)["error"] == "upstream_timeout"
        peer.wait(lambda: any(c.events(h2.events.StreamReset) for c in peer.conns))
        gw.stop()
        peer.wait(lambda: peer.done == len(peer.conns))
    assert peer.errors == []


def test_gateway_retries_a_refused_stream_and_survives_a_malformed_head(start_gateway):
    def script(conn):
        sid, headers, body = conn.request(timeout=30)
        assert (headers[b":path"], body) == (b"/refused", b"data")
        conn.h2.reset_stream(sid, E.REFUSED_STREAM)
        conn.flush()
        sid, headers, body = conn.request(timeout=30)
        assert (headers[b":path"], body) == (b"/refused", b"data")
        conn.respond(sid, 200, [("content-length", "7")], b"retried")
        sid, _, _ = conn.request(timeout=30)
        conn.h2.send_headers(sid, [(b":status", b"200"), (b"x-split", b"a\r\nset-cookie: evil=1")])
        conn.flush()
        conn.expect(h2.events.StreamReset)
        serve_forever(conn)

    with H2Peer(script) as peer:
        gw = start_gateway(gateway_routes(peer.url))
        r1 = curl("--data-binary", "data", gw.url("/refused"))
        r2 = curl("-i", gw.url("/split"))
        r3 = curl(gw.url("/after"))
        gw.stop()
        peer.wait(lambda: peer.done == len(peer.conns))
    assert r1.stdout == b"retried\n200", r1.stderr
    assert r2.stdout.endswith(b"\n502") and b"evil" not in r2.stdout
    assert r3.stdout == b"ok\n200"
    assert len(peer.conns) == 1 and peer.errors == []
