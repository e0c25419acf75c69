"""HTTP/2 upstream client (agproxy/upstream/h2.py) against a real HTTP/2 server on 127.0.0.1.

The server is agproxy's own H2Connection in a background thread (test_h2_helpers),
plus a few bare sockets for the failure modes it cannot produce (silence, HTTP/1.1).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import ssl
import threading

import pytest
import uvloop

from agproxy.http.h1 import Limits
from agproxy.http.messages import BodyAborted, BodyReader, Headers
from agproxy.upstream.errors import UpstreamError, UpstreamTimeout
from agproxy.upstream.h2 import connect_h2
from agproxy.upstream.origin import Origin
from tests.integration.test_h2_helpers import H2TestServer, pattern


@pytest.fixture
def server():
    with H2TestServer() as s:
        yield s


def origin_for(srv: H2TestServer, **kw) -> Origin:
    return Origin.from_url(srv.url, http2=True, **kw)


def run(coro):
    return uvloop.run(coro)


async def until(predicate, timeout: float = 10.0) -> None:
    """Wait for a condition driven by network events (polled each loop tick, bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


def test_many_concurrent_requests_on_one_connection(server):
    async def main():
        conn = await connect_h2(origin_for(server))
        async def one(i):
            r = await conn.request("POST", f"/echo/{i}?q=1", Headers([("host", "upstream.test"), ("x-i", str(i))]),
                                   b"b" * i, timeout=10)
            doc = json.loads(await r.body.read_all(1 << 20))
            return r.status, r.http_version, doc
        out = await asyncio.gather(*[one(i) for i in range(50)])
        assert conn.usable and not conn.streams
        conn.close()
        return out
    out = run(main())
    for i, (status, version, doc) in enumerate(out):
        assert status == 200 and version == "2"
        assert doc["target"] == f"/echo/{i}?q=1" and doc["body_len"] == i
        assert doc["authority"] == "upstream.test"          # Host → :authority
        assert ["x-i", str(i)] in doc["headers"]
        assert not any(k == "host" for k, _ in doc["headers"])
    assert server.connections == 1


def test_response_trailers_and_te(server):
    async def main():
        conn = await connect_h2(origin_for(server))
        r = await conn.request("POST", "/trailers", Headers([("te", "trailers"), ("content-type", "application/grpc")]),
                               b"\x00\x00\x00\x00\x00", timeout=10)
        body = await r.body.read_all(1 << 20)
        r2 = await conn.request("POST", "/trailers-only", Headers([("te", "trailers")]), None, timeout=10)
        body2 = await r2.body.read_all(1 << 20)
        conn.close()
        return r, body, r2, body2
    r, body, r2, body2 = run(main())
    assert r.status == 200 and body == b"\x00\x00\x00\x00\x05hello"
    assert r.body.trailers.get("grpc-status") == "0" and r.body.trailers.get("grpc-message") == "ok"
    assert body2 == b"" and r2.body.trailers.get("grpc-status") == "5"


def test_streamed_request_body_and_large_bodies_both_ways(server):
    big = pattern(3 * 1024 * 1024 + 3)

    async def main():
        conn = await connect_h2(origin_for(server))
        reader = BodyReader()

        async def produce():
            for pos in range(0, len(big), 100_000):
                reader.feed(big[pos:pos + 100_000])
                await asyncio.sleep(0)
            reader.feed_eof(Headers([("x-upload-trailer", "done")]))
        producer = asyncio.get_running_loop().create_task(produce())
        r = await conn.request("PUT", "/echo", Headers(), reader, timeout=10)
        doc = json.loads(await r.body.read_all(1 << 20))
        await producer
        r2 = await conn.request("POST", "/echo", Headers(), big, timeout=10)     # bytes beyond the window
        doc2 = json.loads(await r2.body.read_all(1 << 20))
        n = 5 * 1024 * 1024 + 1
        r3 = await conn.request("GET", f"/bytes?n={n}&chunk=65536", Headers(), None, timeout=10)
        data = await r3.body.read_all(64 << 20)
        conn.close()
        return doc, doc2, data, n
    doc, doc2, data, n = run(main())
    digest = hashlib.sha256(big).hexdigest()
    assert doc["body_len"] == len(big) and doc["body_sha256"] == digest
    assert doc["trailers"] == [["x-upload-trailer", "done"]]
    assert doc2["body_len"] == len(big) and doc2["body_sha256"] == digest
    assert data == pattern(n)


def test_slow_reader_withholds_window_and_server_waits(server):
    from agproxy.http.h2 import MAX_STREAM_WINDOW
    from agproxy.upstream.h2 import BODY_HIGH_WATER
    n = 16 * 1024 * 1024
    target = f"/bytes?n={n}&chunk=65536"

    async def main():
        conn = await connect_h2(origin_for(server))
        r = await conn.request("GET", target, Headers(), None, timeout=10)
        # Nobody reads the body: the server's send_data must end up waiting for window.
        await asyncio.to_thread(server.wait_until, lambda: server.streams.get("/bytes") is not None
                                and server.streams["/bytes"]._waiter is not None)
        sent = await asyncio.to_thread(server.call, lambda: server.streams[f"sent:{target}"])
        data = await r.body.read_all(64 << 20)
        conn.close()
        return sent, data
    sent, data = run(main())
    # bounded by one stream window plus what the reader took in before pausing
    assert sent <= MAX_STREAM_WINDOW + BODY_HIGH_WATER + 2 * 65536
    assert data == pattern(n)


def test_window_withheld_by_a_finished_unread_response_is_returned(server, monkeypatch):
    import agproxy.upstream.h2 as up
    monkeypatch.setattr(up, "MAX_STREAM_WINDOW", 256 * 1024)
    monkeypatch.setattr(up, "MAX_CONN_WINDOW", 1024 * 1024)
    monkeypatch.setattr(up, "BODY_HIGH_WATER", 64 * 1024)
    n = 250 * 1024           # within one stream window: it completes while paused

    async def main():
        conn = await connect_h2(origin_for(server))
        for i in range(12):  # 12 x ~180 KiB withheld would exhaust a 1 MiB connection window
            r = await conn.request("GET", f"/bytes?n={n}&chunk=65536", Headers(), None, timeout=10)
            await until(lambda: r.body.complete)
            assert await r.body.read_all(1 << 20) == pattern(n)
        conn.close()
    run(main())


def test_honours_max_concurrent_streams():
    with H2TestServer(limits=Limits(max_concurrent_streams=2)) as srv:
        async def main():
            conn = await connect_h2(origin_for(srv))
            assert conn.h2.remote_settings.max_concurrent_streams == 2
            tasks = [asyncio.get_running_loop().create_task(
                conn.request("GET", f"/gate/c{i}", Headers(), None, timeout=10)) for i in range(6)]
            await asyncio.to_thread(srv.wait_until, lambda: len(srv.started) == 2)
            assert conn._active == 2 and len(conn._slot_waiters) == 4
            for i in range(6):
                await asyncio.to_thread(srv.release, f"c{i}")
            out = []
            for t in tasks:
                r = await t
                out.append((r.status, await r.body.read_all(1000)))
            conn.close()
            return out
        out = run(main())
        assert all(status == 200 for status, _ in out)
        assert srv.max_active == 2 and len(srv.started) == 6     # none refused, never above the limit


def test_goaway_stops_new_requests_and_lets_in_flight_finish(server):
    async def main():
        conn = await connect_h2(origin_for(server))
        t = asyncio.get_running_loop().create_task(conn.request("GET", "/gate/ga", Headers(), None, timeout=10))
        await asyncio.to_thread(server.wait_until, lambda: "/gate/ga" in server.started)
        await asyncio.to_thread(server.shutdown_connections)
        await until(lambda: not conn.usable)      # the GOAWAY is on its way
        with pytest.raises(UpstreamError) as e:
            await conn.request("GET", "/echo", Headers(), None, timeout=10)
        assert e.value.retryable
        await asyncio.to_thread(server.release, "ga")
        r = await t
        body = await r.body.read_all(1000)
        return r.status, body
    status, body = run(main())
    assert status == 200 and body == b"released /gate/ga"


def test_head_timeout_cancels_only_that_stream(server):
    async def main():
        conn = await connect_h2(origin_for(server))
        with pytest.raises(UpstreamTimeout):
            await conn.request("GET", "/gate/late", Headers(), None, timeout=0.2)
        await asyncio.to_thread(server.wait_until, lambda: "/gate/late" in server.cancelled)
        r = await conn.request("GET", "/echo", Headers(), None, timeout=10)
        ok = r.status
        await r.body.read_all(1 << 20)
        usable = conn.usable
        conn.close()
        return ok, usable
    assert run(main()) == (200, True)


def test_stream_reset_before_and_after_the_head(server):
    async def main():
        conn = await connect_h2(origin_for(server))
        with pytest.raises(UpstreamError) as e:
            await conn.request("GET", "/reset-now", Headers(), None, timeout=10)
        assert e.value.kind == "reset"
        r = await conn.request("GET", "/reset", Headers(), None, timeout=10)
        with pytest.raises(BodyAborted):
            await r.body.read_all(1 << 20)
        r = await conn.request("GET", "/echo", Headers(), None, timeout=10)
        status = r.status
        conn.close()
        return status
    assert run(main()) == 200


def test_response_fields_that_would_split_an_http1_response_are_refused(server):
    async def main():
        conn = await connect_h2(origin_for(server))
        with pytest.raises(UpstreamError) as e:
            await conn.request("GET", "/bad-header", Headers(), None, timeout=10)
        assert e.value.kind == "protocol"
        r = await conn.request("GET", "/bad-trailer", Headers(), None, timeout=10)
        with pytest.raises(BodyAborted):
            await r.body.read_all(1000)
        r = await conn.request("GET", "/echo", Headers(), None, timeout=10)    # the connection is fine
        status = r.status
        conn.close()
        return status
    assert run(main()) == 200


def test_connection_loss_mid_body_fails_the_body(server):
    async def main():
        conn = await connect_h2(origin_for(server))
        r = await conn.request("GET", "/die", Headers(), None, timeout=10)
        assert r.status == 200
        with pytest.raises(BodyAborted):
            await r.body.read_all(1 << 20)
        return conn.usable
    assert run(main()) is False


def test_client_abort_resets_the_upstream_stream(server):
    async def main():
        conn = await connect_h2(origin_for(server))
        r = await conn.request("GET", "/bytes?n=50000000&chunk=65536", Headers(), None, timeout=10)
        await r.body.read()
        r.abort()
        await asyncio.to_thread(server.wait_until, lambda: "/bytes" in server.cancelled)
        r2 = await conn.request("GET", "/echo", Headers(), None, timeout=10)
        conn.close()
        return r2.status
    assert run(main()) == 200


def test_upload_aborted_by_the_client_resets_the_stream(server):
    async def main():
        conn = await connect_h2(origin_for(server))
        reader = BodyReader()
        reader.feed(b"first part")
        t = asyncio.get_running_loop().create_task(conn.request("POST", "/read-forever", Headers(), reader, timeout=10))
        await asyncio.to_thread(server.wait_until, lambda: "/read-forever" in server.started)
        reader.fail(BodyAborted("client went away"))
        await asyncio.to_thread(server.wait_until, lambda: "/read-forever" in server.cancelled)
        t.cancel()
        conn.close()
    run(main())


def test_tls_with_alpn_h2(certs):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certs["cert"], certs["key"])
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with H2TestServer(ssl=ctx) as srv:
        async def main():
            conn = await connect_h2(Origin.from_url(f"https://localhost:{srv.port}", http2=True,
                                                    ca_file=certs["ca"]))
            r = await conn.request("GET", "/echo", Headers(), None, timeout=10)
            doc = json.loads(await r.body.read_all(1 << 20))
            conn.close()
            return doc
        doc = run(main())
        assert doc["scheme"] == "https" and doc["protocol"] == "HTTP/2"


def test_tls_server_without_h2_is_a_connect_error(certs):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certs["cert"], certs["key"])
    ctx.set_alpn_protocols(["http/1.1"])
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)
    port = lsock.getsockname()[1]

    def serve():
        try:
            c, _ = lsock.accept()
            with ctx.wrap_socket(c, server_side=True) as s:
                s.recv(100)
        except (OSError, ssl.SSLError):
            pass
    th = threading.Thread(target=serve, daemon=True)
    th.start()

    async def main():
        with pytest.raises(UpstreamError) as e:
            await connect_h2(Origin.from_url(f"https://localhost:{port}", http2=True, ca_file=certs["ca"]))
        return e.value.kind
    try:
        assert run(main()) == "connect"
    finally:
        lsock.close()


def test_connect_refused_and_connect_timeout():
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    port_refused = refused.getsockname()[1]
    refused.close()
    silent = socket.socket()            # accepts (backlog) but never speaks HTTP/2
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)

    async def main():
        with pytest.raises(UpstreamError) as e1:
            await connect_h2(Origin.from_url(f"http://127.0.0.1:{port_refused}", http2=True))
        with pytest.raises(UpstreamError) as e2:
            await connect_h2(Origin.from_url(f"http://127.0.0.1:{silent.getsockname()[1]}", http2=True,
                                             connect_timeout=0.3))
        return e1.value.kind, e2.value.kind
    try:
        assert run(main()) == ("connect", "connect")
    finally:
        silent.close()


def test_http1_only_server_is_a_connect_error():
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)

    def serve():
        try:
            c, _ = lsock.accept()
            c.recv(1000)
            c.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            c.close()
        except OSError:
            pass
    threading.Thread(target=serve, daemon=True).start()

    async def main():
        with pytest.raises(UpstreamError) as e:
            await connect_h2(Origin.from_url(f"http://127.0.0.1:{lsock.getsockname()[1]}", http2=True))
        return e.value.kind
    try:
        assert run(main()) in ("connect", "protocol")
    finally:
        lsock.close()


def test_pool_uses_one_h2_connection_per_origin(server):
    from agproxy.upstream.pool import Pool

    async def main():
        pool = Pool()
        o = origin_for(server)
        rs = await asyncio.gather(*[pool.request(o, "GET", f"/echo/{i}", Headers(), None, timeout=10)
                                    for i in range(20)])
        bodies = [json.loads(await r.body.read_all(1 << 20)) for r in rs]
        await pool.close()
        return bodies, pool.connections_opened
    bodies, opened = run(main())
    assert [b["target"] for b in bodies] == [f"/echo/{i}" for i in range(20)]
    assert opened == 1 and server.connections == 1
