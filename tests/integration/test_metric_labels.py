"""No metric label takes raw client input: methods outside the standard set are counted
as `_OTHER` (HTTP/2 lets a client send any token as :method). Real gateway binary,
raw HTTP/2 and HTTP/1.1 clients, the metrics read from the admin port."""

from __future__ import annotations

import random
import socket
import string

from tests.integration.test_h2_helpers import RawH2Client

ROUTES = '''
[[route]]
name = "any"
match = { path_prefix = "/" }
backend = "hello"

[backend.hello]
type = "static"
body = "hi"
'''


def samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_random_methods_share_one_series(start_gateway):
    gw = start_gateway(ROUTES)
    rng = random.Random(8)
    methods = ["".join(rng.choices(string.ascii_uppercase + string.digits, k=12)) for _ in range(300)]
    client = RawH2Client(gw.port, validate=False)
    try:
        for i in range(0, len(methods), 50):      # under max_concurrent_streams (100)
            sids = [client.request(m, "/x") for m in methods[i:i + 50]]
            for sid in sids:
                client.response(sid)
                assert client.status(sid) == 200
        for m in ("GET", "PATCH", "DELETE", "get"):
            sid = client.request(m, "/x")
            client.response(sid)
    finally:
        client.sock.close()
    # HTTP/1.1: a method llhttp knows but RFC 9110 does not define
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(b"PROPFIND /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200 ")

    text = gw.metrics()
    m = samples(text)
    assert m['agproxy_requests_total{method="_OTHER",route="any",status="200"}'] == len(methods) + 2   # + "get", PROPFIND
    for std in ("GET", "PATCH", "DELETE"):
        assert m[f'agproxy_requests_total{{method="{std}",route="any",status="200"}}'] == 1
    assert not any(meth in text for meth in methods[:20])
    assert sum(1 for k in m if k.startswith("agproxy_requests_total{")) == 4
