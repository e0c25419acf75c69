"""The core data path over HTTP/1.1: real curl/httpx/raw sockets → the agproxy binary → a real upstream."""

from __future__ import annotations

import json
import socket
import subprocess

import httpx
import pytest


def route_to(upstream_url: str, extra: str = "", timeout: str = "5s") -> str:
    return f'''
[[route]]
name = "echo"
match = {{ path_prefix = "/" }}
backend = "echo"
timeout = "{timeout}"
{extra}

[backend.echo]
type = "http"
url = "{upstream_url}"
'''


def raw_exchange(port: int, payload: bytes, read_until_close: bool = True, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        chunks = []
        while True:
            try:
                data = s.recv(65536)
            except socket.timeout:
                break
            if not data:
                break
            chunks.append(data)
            if not read_until_close:
                break
        return b"".join(chunks)


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args], capture_output=True, text=True)


def test_proxies_request_and_sets_forwarding_headers(start_gateway, upstream_echo):
    gw = start_gateway(route_to(upstream_echo.url))
    r = httpx.post(gw.url("/agents/x?q=1"), content=b"hello", headers={
        "x-custom": "1", "connection": "keep-alive, x-hop", "x-hop": "secret", "x-forwarded-for": "10.9.9.9",
        "keep-alive": "timeout=5", "proxy-authorization": "Basic abc"})
    assert r.status_code == 200
    seen = r.json()
    headers = dict(seen["headers"])
    assert seen["method"] == "POST" and seen["path"] == "/agents/x?q=1" and seen["body"] == "hello"
    assert headers["x-custom"] == "1"
    assert "x-hop" not in headers and "keep-alive" not in headers and "proxy-authorization" not in headers
    assert headers["x-forwarded-for"] == "10.9.9.9, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == f"127.0.0.1:{gw.port}"
    assert len(headers["x-request-id"]) == 32
    assert headers["host"] == f"127.0.0.1:{upstream_echo.port}"
    assert r.headers["x-upstream"] == "echo"


def test_no_route_is_json_404(start_gateway, upstream_echo):
    gw = start_gateway(route_to(upstream_echo.url).replace('path_prefix = "/"', 'path_prefix = "/only"'))
    r = httpx.get(gw.url("/elsewhere"))
    assert r.status_code == 404
    assert r.json()["error"] == "no_route"
    assert upstream_echo.requests == 0


def test_route_matching_methods_headers_host_regex(start_gateway, upstream_echo):
    gw = start_gateway(f'''
[[route]]
name = "posts"
match = {{ path_prefix = "/api", methods = ["POST"], headers = {{ "x-team" = "cx" }} }}
backend = "a"

[[route]]
name = "versioned"
match = {{ path_regex = "^/v[0-9]+/" }}
backend = "a"

[[route]]
name = "exact"
match = {{ path = "/exact", host = "api.example.com" }}
backend = "a"

[backend.a]
type = "http"
url = "{upstream_echo.url}"
''')
    assert httpx.post(gw.url("/api/x"), headers={"x-team": "cx"}).status_code == 200
    assert httpx.post(gw.url("/api/x"), headers={"x-team": "other"}).status_code == 404
    assert httpx.get(gw.url("/api/x"), headers={"x-team": "cx"}).status_code == 404
    assert httpx.post(gw.url("/apix"), headers={"x-team": "cx"}).status_code == 404
    assert httpx.get(gw.url("/v2/models")).status_code == 200
    assert httpx.get(gw.url("/exact"), headers={"host": "api.example.com"}).status_code == 200
    assert httpx.get(gw.url("/exact")).status_code == 404
    routes = [rec["route"] for rec in gw.access_log(min_lines=7)]
    assert routes.count("posts") == 1 and routes.count("versioned") == 1 and routes.count("exact") == 1


def test_keep_alive_upstream_connections_are_reused(start_gateway, upstream_echo):
    gw = start_gateway(route_to(upstream_echo.url))
    with httpx.Client() as client:
        for i in range(200):
            assert client.get(gw.url(f"/n/{i}")).status_code == 200
    assert upstream_echo.requests == 200
    assert upstream_echo.connections <= 4


def test_chunked_request_body_and_expect_continue(start_gateway, upstream_echo):
    gw = start_gateway(route_to(upstream_echo.url))
    body = b"0123456789" * 5000

    def gen():
        for i in range(0, len(body), 7000):
            yield body[i:i + 7000]
    r = httpx.post(gw.url("/upload"), content=gen())
    assert r.status_code == 200 and r.json()["body"] == body.decode()
    # Expect: 100-continue: the interim answer comes before the client sends its body.
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(b"POST /expect HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"hello")
        out = b""
        while b'"count"' not in out:
            out += s.recv(65536)
    assert out.startswith(b"HTTP/1.1 200 OK") and b'"body": "hello"' in out


def test_pipelined_requests_answer_in_order(start_gateway, upstream_echo):
    gw = start_gateway(route_to(upstream_echo.url))
    req = "GET /p/{} HTTP/1.1\r\nHost: x\r\n\r\n"
    payload = (req.format(1) + req.format(2) + "GET /p/3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").encode()
    out = raw_exchange(gw.port, payload)
    assert out.count(b"HTTP/1.1 200 OK") == 3
    assert out.index(b'"/p/1"') < out.index(b'"/p/2"') < out.index(b'"/p/3"')


@pytest.mark.parametrize("payload,status", [
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"400"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", b"400"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", b"431"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(150)) + b"\r\n", b"431"),
    (b"\x00\x01\x02garbage\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked, identity\r\n\r\n", b"400"),
])
def test_malformed_requests_get_4xx_and_gateway_keeps_serving(start_gateway, upstream_echo, payload, status):
    gw = start_gateway(route_to(upstream_echo.url))
    with httpx.Client() as other:   # a healthy keep-alive connection opened before the attack
        assert other.get(gw.url("/before")).status_code == 200
        out = raw_exchange(gw.port, payload)
        assert out.startswith(b"HTTP/1.1 " + status), out[:200]
        assert other.get(gw.url("/after")).status_code == 200
    assert all(r["path"] in ("/before", "/after") for r in upstream_echo.seen)


def test_upstream_failures_map_to_502_504_and_aborted_stream(start_gateway, upstream_echo):
    from tests.support.ports import free_port
    dead = free_port()
    gw = start_gateway(f'''
[[route]]
name = "dead"
match = {{ path_prefix = "/dead" }}
backend = "dead"

[[route]]
name = "slow"
match = {{ path_prefix = "/slow" }}
backend = "echo"
timeout = "300ms"

[[route]]
name = "echo"
match = {{ path_prefix = "/" }}
backend = "echo"

[backend.dead]
type = "http"
url = "http://127.0.0.1:{dead}"

[backend.echo]
type = "http"
url = "{upstream_echo.url}"
''')
    r = httpx.get(gw.url("/dead"))
    assert r.status_code == 502 and r.json()["error"] == "upstream_unavailable"
    r = httpx.get(gw.url("/slow?delay=2"))
    assert r.status_code == 504 and r.json()["error"] == "upstream_timeout"
    res = curl("-o", "/dev/null", "-w", "%{http_code}", gw.url("/die"))
    assert res.returncode == 18, (res.returncode, res.stdout, res.stderr)   # partial file: never looks complete
    assert httpx.get(gw.url("/still-alive")).status_code == 200
    metrics = gw.metrics()
    assert 'agproxy_requests_total{method="GET",route="dead",status="502"} 1.0' in metrics
    assert 'agproxy_requests_total{method="GET",route="slow",status="504"} 1.0' in metrics


def test_sse_reaches_client_event_by_event(start_gateway, upstream_echo):
    gw = start_gateway(route_to(upstream_echo.url))
    with httpx.Client(timeout=10) as client:
        with client.stream("GET", gw.url("/sse?n=5&interval=0.3")) as r:
            assert r.headers["content-type"] == "text/event-stream"
            it = r.iter_text()
            first = next(it)
            assert first.startswith("data: event 0")
            assert not upstream_echo.sse_finished.is_set()   # got it while the upstream still streams
            rest = first + "".join(it)
    assert rest.count("data: event") == 5


def test_access_log_and_metrics(start_gateway, upstream_echo):
    gw = start_gateway(route_to(upstream_echo.url))
    r = httpx.get(gw.url("/logged"), headers={"x-request-id": "req-123"})
    assert r.status_code == 200
    (rec,) = gw.access_log(min_lines=1)
    assert rec["route"] == "echo" and rec["method"] == "GET" and rec["path"] == "/logged"
    assert rec["status"] == 200 and rec["request_id"] == "req-123" and rec["protocol"] == "HTTP/1.1"
    assert rec["tls"] is False and rec["upstream"] == f"127.0.0.1:{upstream_echo.port}"
    assert rec["bytes_out"] == len(r.content) and rec["duration_ms"] >= 0
    m = gw.metrics()
    assert 'agproxy_requests_total{method="GET",route="echo",status="200"} 1.0' in m
    assert "agproxy_request_duration_seconds_bucket" in m
    assert "agproxy_upstream_request_duration_seconds_bucket" in m
    assert "agproxy_upstream_connect_duration_seconds_bucket" in m
    assert 'agproxy_active_connections{listener="main"}' in m


def test_metrics_count_every_request_exactly(start_gateway, upstream_echo):
    """Samples are batched per event-loop iteration; what /metrics shows is still exact."""
    gw = start_gateway(route_to(upstream_echo.url))
    with httpx.Client() as client:
        for i in range(25):
            assert client.get(gw.url(f"/n/{i}")).status_code == 200
    assert httpx.get(gw.url("/n"), params={"x": "1"}, headers={"expect": "nothing"}).status_code == 200
    samples = {}
    for line in gw.metrics().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['agproxy_requests_total{method="GET",route="echo",status="200"}'] == 26
    assert samples['agproxy_request_duration_seconds_count{route="echo"}'] == 26
    assert samples['agproxy_request_duration_seconds_bucket{le="+Inf",route="echo"}'] == 26
    assert samples['agproxy_request_duration_seconds_bucket{le="60.0",route="echo"}'] == 26
    assert 0 < samples['agproxy_request_duration_seconds_sum{route="echo"}'] < 26 * 5
    buckets = sorted((float(k.split('le="')[1].split('"')[0]), v) for k, v in samples.items()
                     if k.startswith("agproxy_request_duration_seconds_bucket{"))
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)    # cumulative
    assert samples['agproxy_upstream_request_duration_seconds_count{backend="echo"}'] == 26


def test_tls_and_plaintext_on_one_port(start_gateway, upstream_echo, certs):
    gw = start_gateway(f'''
[[listener]]
name = "main"
bind = "127.0.0.1:{{port}}"
tls = {{ cert_file = "{certs['cert']}", key_file = "{certs['key']}" }}
''' + route_to(upstream_echo.url))
    plain = curl("-s", gw.url("/plain"))
    assert json.loads(plain.stdout)["path"] == "/plain"
    secure = curl("-s", "--http1.1", "--cacert", certs["ca"], gw.url("/secure", scheme="https"))
    seen = json.loads(secure.stdout)
    assert dict(seen["headers"])["x-forwarded-proto"] == "https"
    # A TLS ClientHello cut in half, then garbage: those connections die, the port keeps serving.
    with socket.create_connection(("127.0.0.1", gw.port)) as s:
        s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x11" * 20)
    with socket.create_connection(("127.0.0.1", gw.port)) as s:
        s.sendall(b"\x16\x03\x01\x00\x05garbagegarbage")
        s.settimeout(5)
        try:
            assert s.recv(100) is not None
        except (ConnectionResetError, socket.timeout):
            pass
    again = curl("-s", "--http1.1", "--cacert", certs["ca"], gw.url("/again", scheme="https"))
    assert json.loads(again.stdout)["path"] == "/again"
    logs = gw.access_log(min_lines=3)
    assert [r["tls"] for r in logs] == [False, True, True]


def test_admin_endpoints_and_config_redaction(start_gateway, upstream_echo):
    gw = start_gateway(route_to(upstream_echo.url))
    assert gw.admin_get("/healthz") == (200, b"ok\n")
    status, body = gw.admin_get("/readyz")
    assert status == 200 and json.loads(body)["ready"] is True
    status, body = gw.admin_get("/config")
    cfg = json.loads(body)
    assert cfg["routes"][0]["name"] == "echo"
    assert cfg["backends"]["echo"]["url"] == upstream_echo.url


def test_https_upstream_verified_with_ca_file(start_gateway, certs):
    from tests.support.echo import EchoServer
    tls_echo = EchoServer(tls=certs).start()
    try:
        gw = start_gateway(f'''
[[route]]
name = "verified"
match = {{ path_prefix = "/verified" }}
backend = "good"

[[route]]
name = "unverified"
match = {{ path_prefix = "/" }}
backend = "untrusted"

[backend.good]
type = "http"
url = "{tls_echo.url}"
tls_ca_file = "{certs['ca']}"

[backend.untrusted]
type = "http"
url = "{tls_echo.url}"
''')
        r = httpx.get(gw.url("/verified/x"))
        assert r.status_code == 200 and r.json()["path"] == "/verified/x"
        # The system trust store does not know the test CA: certificate verification fails → 502.
        assert httpx.get(gw.url("/other")).status_code == 502
        assert tls_echo.requests == 1
    finally:
        tls_echo.stop()


def test_idle_client_connections_are_closed(start_gateway, upstream_echo):
    gw = start_gateway(f'''
[gateway]
admin = "127.0.0.1:{{admin_port}}"
idle_timeout = "1s"
access_log = "off"
''' + route_to(upstream_echo.url))
    with socket.create_connection(("127.0.0.1", gw.port), timeout=15) as s:
        s.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        if b'"count"' not in first:
            s.recv(65536)
        # Now say nothing: the gateway closes the idle connection (recv returns EOF).
        assert s.recv(1) == b""


def test_request_body_limit_413(start_gateway, upstream_echo):
    gw = start_gateway(f'''
[gateway]
admin = "127.0.0.1:{{admin_port}}"
access_log = "off"
max_request_body = 1000
''' + route_to(upstream_echo.url))
    r = httpx.post(gw.url("/declared"), content=b"x" * 1001)
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"

    def chunks():
        for _ in range(10):
            yield b"y" * 500
    r = httpx.post(gw.url("/chunked"), content=chunks())
    assert r.status_code == 413
    assert httpx.post(gw.url("/small"), content=b"z" * 1000).status_code == 200
    assert [s["path"] for s in upstream_echo.seen] == ["/small"]


def test_head_204_and_http10_framing(start_gateway, upstream_echo):
    gw = start_gateway(route_to(upstream_echo.url))
    # HEAD: the upstream's content-length is relayed, no body follows, the connection stays usable.
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\nGET /status/204 HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        out = b""
        while True:
            data = s.recv(65536)
            if not data:
                break
            out += data
    first, _, rest = out.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200") and b"content-length:" in first.lower()
    assert rest.startswith(b"HTTP/1.1 204"), rest[:80]
    second, _, rest = rest.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in second.lower()
    assert rest.startswith(b"HTTP/1.1 200") and b'"/after"' in rest
    # HTTP/1.0 without keep-alive: answered, then closed.
    out = raw_exchange(gw.port, b"GET /ten HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200") and b'"/ten"' in out


def test_large_bodies_stream_both_ways(start_gateway, upstream_echo):
    gw = start_gateway(route_to(upstream_echo.url, timeout="30s"))
    big = bytes(range(256)) * 8192          # 2 MiB up
    r = httpx.post(gw.url("/big"), content=big, timeout=30)
    assert r.status_code == 200 and len(r.json()["body"].encode("latin-1")) == len(big)
    r = httpx.get(gw.url("/bytes?n=5000000"), timeout=30)   # 5 MB down
    assert r.status_code == 200 and len(r.content) == 5_000_000
