"""The upstream HTTP/1.1 path under hostile and unlucky conditions: real clients → the agproxy
binary → the strict (llhttp) recording upstream, asserting on the exact bytes it received.

Framing (exactly one framing header on every path, a body never parsed as a second
request), replay (never for a request that may have been processed unless idempotent;
the one retry on a fresh connection), stray upstream responses, response head caps,
Connection-nominated response headers, text header values (UTF-8 octets) and leaked
sockets.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import httpx
import pytest

from agproxy.http.messages import Headers
from agproxy.upstream.origin import Origin
from agproxy.upstream.pool import Pool
from tests.integration.test_h2_helpers import H2TestServer, RawH2Client
from tests.support.echo import EchoServer
from tests.support.idp import IdP
from tests.support.strict_http import StrictResponseReader


def route_to(url: str, extra: str = "", http2: bool = False) -> str:
    return f'''
[[route]]
name = "up"
match = {{ path_prefix = "/" }}
backend = "up"
timeout = "5s"
{extra}

[backend.up]
type = "http"
url = "{url}"
http2 = {"true" if http2 else "false"}
'''


def framing(raw: bytes) -> list[bytes]:
    """The framing header lines of a raw request, lowercased (the strict peer has
    already checked the request parses)."""
    head = raw.split(b"\r\n\r\n", 1)[0]
    return [line.lower() for line in head.split(b"\r\n")[1:]
            if line.lower().startswith((b"content-length:", b"transfer-encoding:"))]


class RawClient:
    """A client socket to the gateway reading responses with llhttp."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.reader = StrictResponseReader()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self, timeout: float = 10.0):
        return self.reader.read(self.sock, timeout)

    def close(self) -> None:
        self.sock.close()


def await_100_continue(c: RawClient) -> None:
    status, _, _ = c.response()
    assert status == 100


# -- 1. exactly one framing header, whatever the path --------------------------------------

@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
def test_body_after_the_head_is_forwarded_with_one_content_length(start_gateway, upstream_echo, method):
    """The body arrives after the head was forwarded (Expect: 100-continue makes that
    certain): one `content-length`, never a second `content-length: 0`."""
    gw = start_gateway(route_to(upstream_echo.url))
    c = RawClient(gw.port)
    c.send(f"{method} /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n".encode())
    await_100_continue(c)
    c.send(b"hello")
    status, _, _ = c.response()
    c.close()
    assert status == 200
    assert upstream_echo.rejected == []
    (req,) = upstream_echo.received
    assert framing(req.raw) == [b"content-length: 5"] and req.body == b"hello"


def test_body_sent_once_the_upstream_is_connected_is_streamed_with_its_length(start_gateway, upstream_echo):
    """A large upload whose head is forwarded before its body (a plain curl/httpx upload)."""
    gw = start_gateway(route_to(upstream_echo.url))
    body = bytes(range(256)) * 4096      # 1 MiB
    c = RawClient(gw.port)
    c.send(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
    upstream_echo.wait_until(lambda: upstream_echo.connections == 1)   # the head went upstream first
    c.send(body)
    status, _, _ = c.response()
    c.close()
    assert status == 200 and upstream_echo.rejected == []
    (req,) = upstream_echo.received
    assert framing(req.raw) == [b"content-length: %d" % len(body)] and req.body == body


def test_chunked_upload_is_forwarded_chunked_only(start_gateway, upstream_echo):
    gw = start_gateway(route_to(upstream_echo.url))
    c = RawClient(gw.port)
    c.send(b"POST /chunks HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n")
    await_100_continue(c)
    c.send(b"5\r\nhello\r\n")
    c.send(b"6\r\n world\r\n0\r\n\r\n")
    status, _, _ = c.response()
    c.close()
    assert status == 200 and upstream_echo.rejected == []
    (req,) = upstream_echo.received
    assert framing(req.raw) == [b"transfer-encoding: chunked"] and req.body == b"hello world"


@pytest.mark.parametrize("request_bytes,expected", [
    (b"GET /g HTTP/1.1\r\nHost: x\r\n\r\n", []),
    (b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n", []),
    (b"DELETE /d HTTP/1.1\r\nHost: x\r\n\r\n", []),
    (b"POST /empty HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", [b"content-length: 0"]),
    (b"POST /buffered HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", [b"content-length: 5"]),
    (b"GET /with-body HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", [b"content-length: 3"]),
])
def test_requests_in_one_write_carry_one_framing_header_or_none(start_gateway, upstream_echo,
                                                                request_bytes, expected):
    gw = start_gateway(route_to(upstream_echo.url))
    c = RawClient(gw.port)
    c.send(request_bytes)
    if request_bytes.startswith(b"HEAD"):      # (the response reader would wait for a body)
        upstream_echo.wait_until(lambda: len(upstream_echo.received) == 1)
    else:
        assert c.response()[0] == 200
    c.close()
    (req,) = upstream_echo.received
    assert framing(req.raw) == expected and upstream_echo.rejected == []


def test_a_request_smuggled_in_a_body_stays_a_body(start_gateway, upstream_echo):
    """The body arrives after the head: were a second `content-length: 0` sent, an
    upstream honouring the last value would parse the body as a request of its own."""
    gw = start_gateway(route_to(upstream_echo.url))
    smuggled = b"GET /secure/admin HTTP/1.1\r\nHost: x\r\nx-user: admin\r\n\r\n"
    c = RawClient(gw.port)
    c.send(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n"
           % len(smuggled))
    await_100_continue(c)
    c.send(smuggled)
    status, _, _ = c.response()
    c.close()
    assert status == 200
    assert [(r.method, r.target, r.body) for r in upstream_echo.received] == [("POST", "/upload", smuggled)]
    assert upstream_echo.rejected == []


@pytest.mark.parametrize("with_length", [True, False])
def test_http2_client_data_after_headers_to_http1_upstream(start_gateway, upstream_echo, with_length):
    gw = start_gateway(route_to(upstream_echo.url))
    client = RawH2Client(gw.port)
    try:
        extra = [("content-length", "11")] if with_length else []
        sid = client.request("POST", "/h2up", headers=extra, end=False)
        upstream_echo.wait_until(lambda: upstream_echo.connections == 1)   # streamed, not buffered
        client.send_body(sid, b"hello", end=False)
        client.send_body(sid, b" world", end=True)
        resp = client.response(sid)
    finally:
        client.close()
    assert dict(resp["headers"])[":status"] == "200"
    assert upstream_echo.rejected == []
    (req,) = upstream_echo.received
    assert framing(req.raw) == ([b"content-length: 11"] if with_length else [b"transfer-encoding: chunked"])
    assert req.body == b"hello world"


# -- 3. replay ----------------------------------------------------------------------------

def _warm(gw) -> None:
    assert httpx.get(gw.url("/warm-up")).status_code == 200   # one idle upstream connection


@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_non_idempotent_request_is_not_replayed_when_the_upstream_drops_it(start_gateway, upstream_echo,
                                                                           method):
    gw = start_gateway(route_to(upstream_echo.url))
    _warm(gw)
    c = RawClient(gw.port)
    c.send(f"{method} /drop HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello".encode())
    status, _, _ = c.response()
    c.close()
    assert status == 502
    assert [r.path for r in upstream_echo.received].count("/drop") == 1   # processed at most once


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_idempotent_request_is_retried_once_on_a_fresh_connection(start_gateway, upstream_echo, method):
    gw = start_gateway(route_to(upstream_echo.url))
    # Two idle upstream connections: the barrier holds both requests until both arrived.
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: httpx.get(gw.url("/barrier?n=2"), timeout=10).status_code, range(2)))
    assert results == [200, 200] and upstream_echo.connections == 2
    r = httpx.request(method, gw.url("/drop-once?key=a"))
    assert r.status_code == 200
    tries = [req for req in upstream_echo.received if req.path == "/drop-once"]
    assert len(tries) == 2
    # The retry did not take the other idle connection (as stale as the first), it connected.
    assert upstream_echo.connections == 3 and tries[1].connection == 3


# -- 4. text header values, leaked sockets -------------------------------------------------

def _gateway_fds(gw) -> int:
    pids = [gw.proc.pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if ppid == gw.proc.pid:
                pids.append(int(entry))
    return sum(len(os.listdir(f"/proc/{p}/fd")) for p in pids)


TRANSFORM_FROM_QUERY = '''
[route.transform.request]
set = { "x-user" = 'request.query["u"]' }
'''


def test_percent_decoded_query_value_reaches_http1_upstream_as_utf8_without_leaking(start_gateway,
                                                                                 upstream_echo):
    gw = start_gateway(route_to(upstream_echo.url, TRANSFORM_FROM_QUERY))
    target = "/t?u=" + quote("user-日本")
    with httpx.Client() as client:
        first = client.get(gw.url(target)).status_code
        before = _gateway_fds(gw)
        statuses = [client.get(gw.url(target)).status_code for _ in range(30)]
        r = client.get(gw.url(target))
    assert _gateway_fds(gw) - before <= 3          # no socket per request left behind
    assert first == r.status_code == 200 and statuses == [200] * 30
    assert b"\r\nx-user: user-\xe6\x97\xa5\xe6\x9c\xac\r\n" in upstream_echo.raw[-1]
    assert dict(r.json()["headers"])["x-user"].encode("latin-1").decode("utf-8") == "user-日本"
    assert upstream_echo.connections == 1


def test_percent_decoded_query_value_reaches_http2_upstream_as_utf8(start_gateway):
    with H2TestServer() as h2up:
        gw = start_gateway(route_to(h2up.url, TRANSFORM_FROM_QUERY, http2=True))
        with httpx.Client() as client:
            for _ in range(3):
                r = client.get(gw.url("/echo?u=" + quote("user-日本")))
                assert r.status_code == 200
        headers = dict(r.json()["headers"])
        assert headers["x-user"].encode("latin-1") == "user-日本".encode()


def test_unicode_claim_copied_to_a_header_is_sent_as_utf8(start_gateway, upstream_echo):
    with IdP() as idp:
        gw = start_gateway(route_to(upstream_echo.url, f'''
[route.jwt]
audiences = ["agents"]
jwks = {{ discovery = "{idp.discovery_url}" }}
[route.claims_to_headers]
"x-user" = "jwt.sub"
'''))
        token = idp.mint(idp.claims(sub="user-日本", aud="agents"))
        with httpx.Client() as client:
            for _ in range(3):
                r = client.get(gw.url("/c"), headers={"authorization": f"Bearer {token}"})
                assert r.status_code == 200
    assert b"\r\nx-user: user-\xe6\x97\xa5\xe6\x9c\xac\r\n" in upstream_echo.raw[-1]
    assert upstream_echo.connections == 1


def test_pool_aborts_the_connection_when_a_request_cannot_be_written(upstream_echo):
    """Any exception between taking a connection and the response head closes it."""
    async def main() -> BaseException | None:
        pool = Pool()
        origin = Origin.from_url(upstream_echo.url)
        ok = await pool.request(origin, "GET", "/first", Headers([("host", "x")]))
        assert ok.status == 200 and await ok.body.read()
        try:
            await pool.request(origin, "GET", "/never", Headers([("host", "x"), ("x-raw", "日本")]))
        except Exception as exc:
            return exc
        finally:
            await asyncio.wait_for(asyncio.to_thread(
                upstream_echo.wait_until, lambda: upstream_echo.server.open_connections == 0, 5), 10)
            await pool.close()
        return None

    exc = asyncio.run(main())
    assert isinstance(exc, UnicodeEncodeError)
    assert [r.path for r in upstream_echo.received] == ["/first"]


# -- 5. a stray response never reaches the next client -------------------------------------

def test_stray_response_in_the_same_write_closes_the_connection(start_gateway, upstream_echo):
    gw = start_gateway(route_to(upstream_echo.url))
    with httpx.Client() as client:
        r = client.get(gw.url("/stray"))
        assert r.status_code == 200 and r.json()["path"] == "/stray" and "x-evil" not in r.headers
        upstream_echo.wait_until(lambda: upstream_echo.server.open_connections == 0, 5)
        r = client.get(gw.url("/next"))
    assert r.status_code == 200 and "x-evil" not in r.headers and r.json()["path"] == "/next"


def test_stray_response_on_an_idle_connection_closes_it(start_gateway, upstream_echo):
    gw = start_gateway(route_to(upstream_echo.url))
    with httpx.Client() as client:
        r = client.get(gw.url("/stray?after=k1"))
        assert r.status_code == 200 and r.json()["path"] == "/stray?after=k1"
        upstream_echo.release("k1")        # now the upstream writes to the idle connection
        upstream_echo.wait_until(lambda: upstream_echo.server.open_connections == 0, 5)
        r = client.get(gw.url("/next"))
    assert r.status_code == 200 and "x-evil" not in r.headers and r.json()["path"] == "/next"
    assert upstream_echo.received[-1].connection == 2


# -- 6. response head caps -----------------------------------------------------------------

@pytest.mark.parametrize("query", ["kb=20480", "kb=80", "count=150"])
def test_oversized_upstream_response_head_is_502(start_gateway, upstream_echo, query):
    gw = start_gateway(route_to(upstream_echo.url))
    with httpx.Client(timeout=10) as client:
        r = client.get(gw.url(f"/bighead?{query}"))
        assert r.status_code == 502 and r.json()["error"] == "upstream_unavailable"
        assert client.get(gw.url("/after")).status_code == 200


def test_response_head_under_the_cap_is_relayed(start_gateway, upstream_echo):
    gw = start_gateway(route_to(upstream_echo.url))
    r = httpx.get(gw.url("/bighead?kb=60"))
    assert r.status_code == 200 and r.headers["x-big59"] == "a" * 1020
    r = httpx.get(gw.url("/bighead?count=90"))
    assert r.status_code == 200 and r.headers["x-h89"] == "v"


# -- 7. Connection-nominated response headers ----------------------------------------------

def test_connection_nominated_response_headers_are_dropped_http1(start_gateway, upstream_echo):
    gw = start_gateway(route_to(upstream_echo.url))
    r = httpx.get(gw.url("/hop"))
    assert r.status_code == 200 and r.text == "hop"
    assert "x-hop-secret" not in r.headers and "keep-alive" not in r.headers
    assert r.headers["x-kept"] == "yes"


def test_connection_nominated_response_headers_are_dropped_http2(start_gateway, upstream_echo):
    gw = start_gateway(route_to(upstream_echo.url))
    client = RawH2Client(gw.port)
    try:
        resp = client.response(client.request("GET", "/hop"))
    finally:
        client.close()
    names = [k for k, _ in resp["headers"]]
    assert dict(resp["headers"])[":status"] == "200" and bytes(resp["data"]) == b"hop"
    assert "x-hop-secret" not in names and "keep-alive" not in names and "x-kept" in names


# -- the strict peer itself ----------------------------------------------------------------

@pytest.mark.parametrize("payload", [
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 0\r\n\r\nhello",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n folded\r\n\r\n",
    b"GET / HTTP/1.1\nHost: x\n\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
])
def test_the_test_upstream_refuses_what_llhttp_refuses(payload):
    echo = EchoServer().start()
    try:
        c = RawClient(echo.port)
        c.send(payload)
        status, _, _ = c.response()
        assert status == 400
        assert c.sock.recv(1) == b""          # and closes
        c.close()
        echo.wait_until(lambda: len(echo.rejected) == 1)
        assert echo.received == [] and echo.rejected[0].raw == payload
    finally:
        echo.stop()
