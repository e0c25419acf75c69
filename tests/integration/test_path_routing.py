"""Routing on the normalised path: spellings of `/secure/...` never reach the backend
through a catch-all, over HTTP/1.1 and HTTP/2, against the real gateway binary and a
strict (httptools) recording upstream.

Setup: `/secure` is JWT-protected (strict), `/` is a catch-all to the same upstream,
the way a normalising backend that serves both would be deployed.
"""

from __future__ import annotations

import socket

import httptools
import pytest

from tests.integration.test_h2_helpers import RawH2Client
from tests.support.idp import IdP
from tests.support.recorder import RecordingUpstream


@pytest.fixture(scope="module")
def idp():
    server = IdP()
    yield server
    server.close()


@pytest.fixture
def upstream():
    server = RecordingUpstream()
    yield server
    server.close()


def config(idp: IdP, upstream_url: str, gateway: str = "") -> str:
    return f'''{gateway}
[[route]]
name = "secure"
match = {{ path_prefix = "/secure" }}
backend = "app"
[route.jwt]
mode = "strict"
issuer = "{idp.issuer}"
audiences = ["agents"]
jwks = {{ inline = '{idp.jwks_json()}' }}

[[route]]
name = "public"
match = {{ path_prefix = "/" }}
backend = "app"

[backend.app]
type = "http"
url = "{upstream_url}"
'''


def h1(port: int, target: str, headers: dict | None = None) -> tuple[int, bytes]:
    """One request with the target byte for byte (clients would normalise it); the
    response parsed strictly."""
    lines = [f"GET {target} HTTP/1.1", "Host: gw.test", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        out: dict = {"body": b"", "done": False}

        class P:
            def on_body(self, b: bytes) -> None:
                out["body"] += b

            def on_message_complete(self) -> None:
                out["done"] = True

        parser = httptools.HttpResponseParser(P())
        while not out["done"]:
            data = s.recv(65536)
            assert data, "connection closed before the response was complete"
            parser.feed_data(data)
        return parser.get_status_code(), out["body"]


def h2(port: int, target: str, headers: dict | None = None) -> tuple[int, bytes]:
    client = RawH2Client(port, validate=False)
    try:
        sid = client.request("GET", target, headers=list((headers or {}).items()))
        r = client.response(sid)
        return client.status(sid), bytes(r["data"])
    finally:
        client.sock.close()


SEND = {"h1": h1, "h2": h2}

# Spellings of /secure/admin that a backend normalising paths serves as /secure/admin.
BYPASSES = ["/x/../secure/admin", "//secure/admin", "/%73ecure/admin", "/secure/./admin",
            "/%2e%2E/secure/admin", "/public/%2E%2E/secure//admin", "/secure/x/../admin"]
# Refused (400) whatever the route: invalid, or read differently by some backends.
REFUSED = ["/secure%2Fadmin", "/secure%5cadmin", "/public/..%2Fsecure/admin", "/secure;x=1/admin",
           "/public/..;/secure/admin", "/;/secure/admin", "/a%zz", "/a%2", "/a\\..\\secure/admin",
           "/public#/../secure/admin"]


@pytest.mark.parametrize("proto", ["h1", "h2"])
def test_spellings_of_a_protected_path_route_to_it(start_gateway, idp, upstream, proto):
    gw = start_gateway(config(idp, upstream.url))
    send = SEND[proto]
    for target in BYPASSES:
        status, body = send(gw.port, target)
        assert status == 401, (target, status, body)
    assert upstream.targets() == []
    token = {"authorization": f"Bearer {idp.mint()}"}
    for target in BYPASSES:
        status, body = send(gw.port, target, token)
        assert (status, body) == (200, b"/secure/admin"), target
    assert upstream.targets() == ["/secure/admin"] * len(BYPASSES)


@pytest.mark.parametrize("proto", ["h1", "h2"])
def test_ambiguous_and_invalid_paths_are_400(start_gateway, idp, upstream, proto):
    gw = start_gateway(config(idp, upstream.url))
    send = SEND[proto]
    token = {"authorization": f"Bearer {idp.mint()}"}
    for target in REFUSED:
        for headers in (None, token):
            status, body = send(gw.port, target, headers)
            assert status == 400, (target, status, body)
            assert b'"error":"invalid_path"' in body.replace(b" ", b"")
    assert upstream.targets() == []
    # the connection-level state is fine: the next request is served
    assert send(gw.port, "/public/ok") == (200, b"/public/ok")


@pytest.mark.parametrize("proto", ["h1", "h2"])
def test_what_is_forwarded_is_what_was_routed(start_gateway, idp, upstream, proto):
    gw = start_gateway(config(idp, upstream.url))
    send = SEND[proto]
    cases = [
        # case is significant: /SECURE is another path (routes match case-sensitively)
        ("/SECURE/admin", "/SECURE/admin"),
        # encoded slashes that route the same either way stay encoded; hex is uppercased;
        # the query is never touched
        ("/public/group%2fname/./x?q=%2e%2e//a&b=/../", "/public/group%2Fname/x?q=%2e%2e//a&b=/../"),
        ("/public//%7Euser/", "/public/~user/"),
        ("/app;jsessionid=1", "/app;jsessionid=1"),
        ("/.well-known/x", "/.well-known/x"),
        ("/a/b/../../..", "/"),
    ]
    for target, forwarded in cases:
        assert send(gw.port, target) == (200, forwarded.encode()), target
    assert upstream.targets() == [f for _, f in cases]
    log = gw.access_log(min_lines=len(cases))
    assert [r["path"] for r in log] == [f.partition("?")[0] for _, f in cases]


def test_opt_out_forwards_the_raw_path(start_gateway, idp, upstream, tmp_path):
    """`normalize_path = false` + `merge_slashes = false`: matching and forwarding
    use the path as received (documented as unsafe in front of normalising backends)."""
    gateway = (f'[gateway]\nadmin = "127.0.0.1:{{admin_port}}"\naccess_log = "off"\n'
               'normalize_path = false\nmerge_slashes = false\n')
    gw = start_gateway(config(idp, upstream.url, gateway))
    assert h1(gw.port, "/x/../secure/admin") == (200, b"/x/../secure/admin")
    assert h1(gw.port, "//secure/admin") == (200, b"//secure/admin")
    assert h1(gw.port, "/a%zz") == (200, b"/a%zz")
    gateway = gateway.replace("merge_slashes = false", "merge_slashes = true")
    gw = start_gateway(config(idp, upstream.url, gateway))
    assert h1(gw.port, "//x//../y") == (200, b"/x/../y")
