"""HTTP/2 server adapter (agproxy/http/h2.py) on a real socket, with curl, httpx and raw h2."""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import subprocess

import h2.errors
import h2.exceptions
import httpx
import pytest

from agproxy.http.h1 import Limits
from tests.integration.test_h2_helpers import H2TestServer, RawH2Client, pattern


@pytest.fixture
def server():
    with H2TestServer() as s:
        yield s


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "20", *args], capture_output=True)


# -- real clients ---------------------------------------------------------------------------------

def test_curl_prior_knowledge_get_and_post(server):
    r = curl("--http2-prior-knowledge", "-w", "\n%{http_version}", f"{server.url}/echo?x=1")
    body, version = r.stdout.rsplit(b"\n", 1)
    assert r.returncode == 0, r.stderr
    assert version == b"2"
    doc = json.loads(body)
    assert doc["method"] == "GET" and doc["target"] == "/echo?x=1"
    assert doc["authority"] == f"127.0.0.1:{server.port}"
    assert doc["scheme"] == "http" and doc["protocol"] == "HTTP/2"
    names = [k for k, _ in doc["headers"]]
    assert not any(n.startswith(":") for n in names)
    assert all(n == n.lower() for n in names)

    r = curl("--http2-prior-knowledge", "--data-binary", "hello h2", f"{server.url}/echo")
    doc = json.loads(r.stdout)
    assert doc["method"] == "POST" and doc["body"] == "hello h2"


def test_curl_sees_response_trailers(server):
    r = curl("--http2-prior-knowledge", "-v", "-o", "/dev/null", f"{server.url}/trailers")
    assert r.returncode == 0, r.stderr
    assert b"grpc-status: 0" in r.stderr and b"grpc-message: ok" in r.stderr


def test_connection_specific_response_headers_are_dropped(server):
    r = curl("--http2-prior-knowledge", "-D", "-", f"{server.url}/hop")
    assert r.returncode == 0, r.stderr   # curl refuses a response that carries them
    head = r.stdout.lower()
    for name in (b"connection:", b"transfer-encoding:", b"keep-alive:", b"upgrade:", b"proxy-connection:"):
        assert name not in head
    assert b"x-kept: yes" in head


def test_curl_over_tls_with_alpn(certs):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certs["cert"], certs["key"])
    ctx.set_alpn_protocols(["h2"])
    with H2TestServer(ssl=ctx) as srv:
        r = curl("--http2", "--cacert", certs["ca"], "-w", "\n%{http_version}", f"https://localhost:{srv.port}/echo")
        body, version = r.stdout.rsplit(b"\n", 1)
        assert r.returncode == 0, r.stderr
        assert version == b"2"
        assert json.loads(body)["scheme"] == "https"


def test_httpx_many_concurrent_requests_share_one_connection(server):
    async def main():
        async with httpx.AsyncClient(http1=False, http2=True, base_url=server.url, timeout=20) as client:
            rs = await asyncio.gather(*[client.post(f"/echo/{i}", content=b"x" * i) for i in range(60)])
            return rs
    rs = asyncio.run(main())
    for i, r in enumerate(rs):
        assert r.status_code == 200 and r.http_version == "HTTP/2"
        assert r.json()["body_len"] == i and r.json()["target"] == f"/echo/{i}"
    assert server.connections == 1


# -- raw h2: concurrency, resets, windows -----------------------------------------------------------

def test_one_stream_reset_by_client_leaves_the_others(server):
    c = RawH2Client(server.port)
    held = [c.request("GET", f"/gate/g{i}") for i in range(20)]
    victim = c.request("POST", "/read-forever", body=b"some", end=False)
    server.wait_until(lambda: len(server.started) == 21)
    c.h2.reset_stream(victim, h2.errors.ErrorCodes.CANCEL)
    c.flush()
    server.wait_until(lambda: "/read-forever" in server.cancelled or
                      any(e.startswith("/read-forever") for e in server.body_errors))
    for i in range(20):
        server.release(f"g{i}")
    for i, sid in enumerate(held):
        r = c.response(sid)
        assert c.status(sid) == 200 and bytes(r["data"]) == f"released /gate/g{i}".encode()
    # The connection is still good for new streams.
    sid = c.request("GET", "/echo")
    c.response(sid)
    assert c.status(sid) == 200 and c.goaway is None
    c.close()


def test_rapid_reset_ends_the_connection(server):
    from agproxy.http.h2 import RAPID_RESET_MIN
    c = RawH2Client(server.port)
    try:
        for _ in range(RAPID_RESET_MIN + 50):
            sid = c.request("GET", "/gate/rr")
            c.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            c.flush()
        c.read_until_closed()
    except (ConnectionResetError, BrokenPipeError, h2.exceptions.ProtocolError):
        pass     # the server closed while we were still writing: that is the point
    assert c.goaway is None or c.goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    server.wait_until(lambda: not server.conns)
    # Other clients are unaffected.
    other = RawH2Client(server.port)
    sid = other.request("GET", "/echo")
    other.response(sid)
    assert other.status(sid) == 200
    other.close()
    c.close()


def test_rst_stream_cancels_the_handler_task(server):
    c = RawH2Client(server.port)
    sid = c.request("GET", "/gate/never")
    server.wait_until(lambda: "/gate/never" in server.started)
    c.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    c.flush()
    server.wait_until(lambda: "/gate/never" in server.cancelled)
    c.close()


def test_large_bodies_exceed_the_initial_window_both_ways(server):
    c = RawH2Client(server.port)        # default 65,535-byte windows on the client side
    body = pattern(3 * 1024 * 1024 + 17)
    sid = c.request("POST", "/echo", body=body)
    doc = json.loads(bytes(c.response(sid)["data"]))
    assert doc["body_len"] == len(body)
    assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()

    n = 2 * 1024 * 1024 + 5
    sid = c.request("GET", f"/bytes?n={n}&chunk=100000")
    r = c.response(sid)
    assert bytes(r["data"]) == pattern(n)
    c.close()


def test_request_body_is_flow_controlled_until_the_proxy_reads(server):
    c = RawH2Client(server.port)
    body = pattern(8 * 1024 * 1024)
    sid = c.request("POST", "/hold-body/up", body=None, end=False)
    # Send what the windows allow; the server acknowledges only what its reader takes in,
    # and the reader stops taking at its high-water mark: the client must run dry.
    sent = c.send_until_blocked(sid, body)
    server.wait_until(lambda: "/hold-body/up" in server.streams)
    stream = server.streams["/hold-body/up"]
    limit = Limits().body_high_water + server.call(lambda: stream.proto.stream_window) + 65536
    assert sent < len(body) and sent <= limit
    server.release("up")
    c.send_body(sid, body[sent:], end=True)
    r = c.response(sid)
    length, digest = bytes(r["data"]).split()
    assert int(length) == len(body) and digest.decode() == hashlib.sha256(body).hexdigest()
    c.close()


def test_withheld_window_is_returned_when_a_stream_ends_unread():
    # A small connection window: streams answered without reading their (paused) bodies
    # must give their withheld bytes back, or the connection stalls after a few of them.
    limits = Limits(max_concurrent_streams=2, body_high_water=16384)   # pauses inside the first window
    with H2TestServer(limits=limits) as srv:
        c = RawH2Client(srv.port)
        c.read_until(lambda: c.remote_settings_seen)
        conn_window = srv.call(lambda: next(iter(srv.conns)).conn_window)
        body = pattern(1024 * 1024)
        for i in range(12):
            sid = c.request("POST", f"/answer-unread/w{i}", end=False)
            sent = c.send_until_blocked(sid, body)
            assert sent < len(body)
            srv.release(f"w{i}")
            c.response(sid)
            assert c.status(sid) == 200
        assert 12 * (65535 - 16384 - 16384) > conn_window   # what 12 paused streams withhold, at least
        sid = c.request("POST", "/echo", body=pattern(300_000))
        doc = json.loads(bytes(c.response(sid)["data"]))
        assert doc["body_len"] == 300_000
        c.close()


def test_response_waits_for_the_client_window(server):
    c = RawH2Client(server.port, auto_ack=False)   # never grants more window by itself
    n = 1024 * 1024
    sid = c.request("GET", f"/bytes?n={n}&chunk=16384")
    c.read_until(lambda: len(c.responses[sid]["data"]) >= 65535)
    stream = server.streams["/bytes"]
    server.wait_until(lambda: stream._waiter is not None)     # send_data is waiting for window
    assert len(c.responses[sid]["data"]) == 65535 and not c.responses[sid]["ended"]
    got = len(c.responses[sid]["data"])
    c.h2.acknowledge_received_data(got, sid)
    c.auto_ack = True
    c.flush()
    r = c.response(sid)
    assert bytes(r["data"]) == pattern(n)
    c.close()


def test_max_concurrent_streams_is_advertised_and_enforced():
    with H2TestServer(limits=Limits(max_concurrent_streams=2)) as srv:
        c = RawH2Client(srv.port)
        # Opened before the client has read the server's SETTINGS: the third is over the limit.
        sids = [c.request("GET", f"/gate/m{i}") for i in range(3)]
        c.read_until(lambda: c.responses[sids[2]]["reset"] is not None)
        assert c.responses[sids[2]]["reset"] == h2.errors.ErrorCodes.REFUSED_STREAM
        assert c.h2.remote_settings.max_concurrent_streams == 2
        srv.release("m0")
        srv.release("m1")
        for sid in sids[:2]:
            c.response(sid)
            assert c.status(sid) == 200
        sid = c.request("GET", "/echo")      # slots are free again
        c.response(sid)
        assert c.status(sid) == 200 and c.goaway is None
        c.close()


@pytest.mark.parametrize("headers, expect", [
    ([("X-Upper", "1")], 400),
    ([("connection", "keep-alive")], 400),
    ([("te", "gzip")], 400),
    ([("x-bad", "a\r\nb")], 400),
    ([("x-big", "v" * 70000)], 431),
])
def test_malformed_request_fails_only_its_stream(server, headers, expect):
    c = RawH2Client(server.port, validate=False)
    good = c.request("GET", "/gate/ok")
    bad = c.request("GET", "/echo", headers=headers)
    r = c.response(bad)
    assert c.status(bad) == expect or r["reset"] is not None
    server.release("ok")
    c.response(good)
    assert c.status(good) == 200 and c.goaway is None
    assert "/echo" not in server.started
    c.close()


def test_missing_pseudo_header_is_rejected_on_its_stream(server):
    c = RawH2Client(server.port, validate=False)
    sid = c.h2.get_next_available_stream_id()
    c.h2.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":authority", "x")], end_stream=True)
    c.flush()
    c.response(sid)
    assert c.status(sid) == 400
    sid = c.request("GET", "/echo")
    c.response(sid)
    assert c.status(sid) == 200
    c.close()


def test_content_length_mismatch_resets_only_that_stream(server):
    c = RawH2Client(server.port, validate=False)
    sid = c.request("POST", "/echo", headers=[("content-length", "10")], body=b"abc")
    r = c.response(sid)
    assert r["reset"] == h2.errors.ErrorCodes.PROTOCOL_ERROR
    sid = c.request("POST", "/echo", headers=[("content-length", "3")], body=b"abc")
    c.response(sid)
    assert c.status(sid) == 200 and c.goaway is None
    c.close()


def test_request_trailers_reach_the_handler(server):
    c = RawH2Client(server.port)
    sid = c.request("POST", "/echo", headers=[("te", "trailers")], body=b"payload", end=False)
    c.h2.send_headers(sid, [("x-checksum", "abc")], end_stream=True)
    c.flush()
    doc = json.loads(bytes(c.response(sid)["data"]))
    assert doc["body"] == "payload" and doc["trailers"] == [["x-checksum", "abc"]]
    assert ["te", "trailers"] in doc["headers"]
    c.close()


def test_trailers_only_response(server):
    c = RawH2Client(server.port)
    sid = c.request("POST", "/trailers-only", headers=[("content-type", "application/grpc")])
    r = c.response(sid)
    assert c.status(sid) == 200 and not r["data"]
    assert dict(r["trailers"])["grpc-status"] == "5"


def test_handler_abort_resets_the_stream(server):
    c = RawH2Client(server.port)
    sid = c.request("GET", "/reset")
    r = c.response(sid)
    assert r["reset"] == h2.errors.ErrorCodes.INTERNAL_ERROR and not r["ended"]
    sid = c.request("GET", "/forget")        # a handler that returns without answering
    r = c.response(sid)
    assert r["reset"] is not None
    sid = c.request("GET", "/echo")
    c.response(sid)
    assert c.status(sid) == 200
    c.close()


def test_cookie_crumbs_are_joined(server):
    c = RawH2Client(server.port)
    sid = c.request("GET", "/echo", headers=[("cookie", "a=1"), ("x-other", "o"), ("cookie", "b=2")])
    doc = json.loads(bytes(c.response(sid)["data"]))
    assert ["cookie", "a=1; b=2"] in doc["headers"]
    c.close()


def test_host_header_used_without_authority(server):
    c = RawH2Client(server.port, validate=False)
    sid = c.h2.get_next_available_stream_id()
    c.h2.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":path", "/echo"),
                            ("host", "example.test:8443")], end_stream=True)
    c.flush()
    doc = json.loads(bytes(c.response(sid)["data"]))
    assert doc["authority"] == "example.test:8443"
    c.close()


# -- connection lifecycle ---------------------------------------------------------------------------

def test_shutdown_sends_goaway_and_lets_streams_finish(server):
    c = RawH2Client(server.port)
    a = c.request("GET", "/gate/drain-a")
    b = c.request("GET", "/gate/drain-b")
    server.wait_until(lambda: len(server.started) == 2)
    server.shutdown_connections()
    c.read_until(lambda: c.goaway is not None)
    assert c.goaway.last_stream_id == b
    assert c.goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
    server.release("drain-a")
    server.release("drain-b")
    for sid in (a, b):
        c.response(sid)
        assert c.status(sid) == 200
    c.read_until_closed()
    c.close()


def test_idle_connection_is_closed_with_goaway():
    with H2TestServer(limits=Limits(idle_timeout=0.3)) as srv:
        c = RawH2Client(srv.port)
        sid = c.request("GET", "/echo")
        c.response(sid)
        c.read_until_closed()            # the server closes it; the socket timeout is only a guard
        assert c.goaway is not None and c.goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
        c.close()


def test_protocol_error_closes_only_that_connection(server):
    other = RawH2Client(server.port)
    c = RawH2Client(server.port)
    c.read_until(lambda: c.remote_settings_seen)      # handshake done: the client writes nothing more
    c.sock.sendall(b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00")   # WINDOW_UPDATE of 0 on the connection
    c.read_until_closed()
    assert c.goaway is not None and c.goaway.error_code != h2.errors.ErrorCodes.NO_ERROR
    sid = other.request("GET", "/echo")
    other.response(sid)
    assert other.status(sid) == 200
    other.close()
    c.close()


def test_client_disconnect_fails_bodies_and_cancels_handlers(server):
    c = RawH2Client(server.port)
    c.request("POST", "/read-forever", body=b"partial", end=False)
    c.request("GET", "/gate/lost")
    server.wait_until(lambda: len(server.started) == 2)
    c.close()
    server.wait_until(lambda: len(server.cancelled) + len(server.body_errors) == 2 and not server.conns)
