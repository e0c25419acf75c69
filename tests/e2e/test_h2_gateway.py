"""HTTP/2 end to end through the agproxy binary: h2c and h2 over TLS downstream (curl, httpx,
raw h2), and an HTTP/2 upstream (`http2 = true`) relaying gRPC-style trailers."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess

import httpx
import pytest

from tests.integration.test_h2_helpers import H2TestServer, RawH2Client, pattern


def routes(url: str, http2: bool = False, extra: str = "") -> str:
    return f'''
[[route]]
name = "all"
match = {{ path_prefix = "/" }}
backend = "up"
timeout = "10s"

[backend.up]
type = "http"
url = "{url}"
http2 = {"true" if http2 else "false"}
{extra}
'''


def tls_listener(certs) -> str:
    return f'''
[[listener]]
name = "main"
bind = "127.0.0.1:{{port}}"
tls = {{ cert_file = "{certs['cert']}", key_file = "{certs['key']}" }}
'''


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "20", *args], capture_output=True)


@pytest.fixture
def h2_upstream():
    with H2TestServer() as s:
        yield s


def test_h2c_prior_knowledge_to_http1_upstream(start_gateway, upstream_echo):
    gw = start_gateway(routes(upstream_echo.url))
    r = curl("--http2-prior-knowledge", "--data-binary", "hi there", "-w", "\n%{http_version}",
             gw.url("/agents/a?x=1"))
    body, version = r.stdout.rsplit(b"\n", 1)
    assert r.returncode == 0, r.stderr + gw.logs().encode()
    assert version == b"2"
    seen = json.loads(body)
    assert seen["method"] == "POST" and seen["path"] == "/agents/a?x=1" and seen["body"] == "hi there"
    headers = dict(seen["headers"])
    assert headers["x-forwarded-proto"] == "http"
    assert headers["host"] == upstream_echo.url.split("://")[1]


def test_h2_over_tls_with_curl(start_gateway, upstream_echo, certs):
    gw = start_gateway(tls_listener(certs) + routes(upstream_echo.url))
    r = curl("--http2", "--cacert", certs["ca"], "-w", "\n%{http_version}",
             f"https://localhost:{gw.port}/secure")
    body, version = r.stdout.rsplit(b"\n", 1)
    assert r.returncode == 0, r.stderr + gw.logs().encode()
    assert version == b"2"
    seen = json.loads(body)
    assert seen["path"] == "/secure" and dict(seen["headers"])["x-forwarded-proto"] == "https"


def test_grpc_style_trailers_from_an_http2_upstream(start_gateway, h2_upstream):
    gw = start_gateway(routes(h2_upstream.url, http2=True))
    c = RawH2Client(gw.port)
    sid = c.request("POST", "/trailers", headers=[("content-type", "application/grpc"), ("te", "trailers")],
                    body=b"\x00\x00\x00\x00\x00")
    r = c.response(sid)
    assert c.status(sid) == 200, gw.logs()
    assert bytes(r["data"]) == b"\x00\x00\x00\x00\x05hello"
    assert dict(r["trailers"]) == {"grpc-status": "0", "grpc-message": "ok"}
    # The upstream saw te: trailers and an HTTP/2 request.
    sid = c.request("POST", "/echo", headers=[("te", "trailers")], body=b"x")
    doc = json.loads(bytes(c.response(sid)["data"]))
    assert doc["protocol"] == "HTTP/2" and ["te", "trailers"] in doc["headers"]
    # Trailers-only (an error status in gRPC) also makes it through.
    sid = c.request("POST", "/trailers-only", headers=[("te", "trailers")])
    r = c.response(sid)
    assert dict(r["trailers"])["grpc-status"] == "5"
    c.close()
    rc = curl("--http2-prior-knowledge", "-v", "-o", "/dev/null", "-H", "te: trailers", gw.url("/trailers"))
    assert b"grpc-status: 0" in rc.stderr


def test_concurrent_h2_clients_share_one_upstream_h2_connection(start_gateway, h2_upstream):
    gw = start_gateway(routes(h2_upstream.url, http2=True))

    async def main():
        async with httpx.AsyncClient(http1=False, http2=True, timeout=20) as client:
            return await asyncio.gather(*[client.post(gw.url(f"/echo/{i}"), content=b"y" * i) for i in range(40)])
    rs = asyncio.run(main())
    for i, r in enumerate(rs):
        assert r.status_code == 200 and r.http_version == "HTTP/2"
        assert r.json()["body_len"] == i and r.json()["target"] == f"/echo/{i}"
    assert h2_upstream.connections == 1


def test_large_bodies_through_h2_both_sides(start_gateway, h2_upstream):
    gw = start_gateway(routes(h2_upstream.url, http2=True))
    c = RawH2Client(gw.port)
    n = 3 * 1024 * 1024 + 11
    sid = c.request("GET", f"/bytes?n={n}&chunk=100000")
    assert bytes(c.response(sid)["data"]) == pattern(n)
    body = pattern(2 * 1024 * 1024 + 7)
    sid = c.request("POST", "/echo", body=body)
    doc = json.loads(bytes(c.response(sid)["data"]))
    assert doc["body_len"] == len(body)
    c.close()


def test_h2_upstream_over_tls(start_gateway, certs):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certs["cert"], certs["key"])
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with H2TestServer(ssl=ctx) as up:
        gw = start_gateway(routes(f"https://localhost:{up.port}", http2=True,
                                  extra=f'tls_ca_file = "{certs["ca"]}"'))
        r = curl("--http2-prior-knowledge", "-H", "te: trailers", "-v", gw.url("/trailers"))
        assert r.returncode == 0, r.stderr + gw.logs().encode()
        assert b"grpc-status: 0" in r.stderr
        r = curl("--http2-prior-knowledge", gw.url("/echo"))
        assert json.loads(r.stdout)["scheme"] == "https"


def test_upstream_reset_mid_body_aborts_the_client_stream(start_gateway, h2_upstream):
    gw = start_gateway(routes(h2_upstream.url, http2=True))
    c = RawH2Client(gw.port)
    sid = c.request("GET", "/reset")
    r = c.response(sid)
    assert r["reset"] is not None and not r["ended"]
    sid = c.request("GET", "/echo")             # the connection is still fine
    c.response(sid)
    assert c.status(sid) == 200
    c.close()
