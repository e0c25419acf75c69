"""[route.ext_authz] in HTTP mode, end to end: a raw HTTP/1.1 client → the agproxy binary →
a strict recording upstream, with a strict HTTP authorization server deciding
(tests/support/authz_peers.py). What the auth server received, what the upstream
received and what the client got are asserted byte for byte."""

from __future__ import annotations

import pytest

from tests.support.authz_peers import HttpAuthServer, h1_request
from tests.support.recorder import RecordingUpstream


def config(upstream: str, address: str, extra: str = "") -> str:
    return f'''
[[route]]
name = "guarded"
match = {{ path_prefix = "/" }}
backend = "app"
[route.ext_authz]
protocol = "http"
address = "{address}"
timeout = "2s"
{extra}

[backend.app]
type = "http"
url = "{upstream}"
'''


@pytest.fixture
def upstream():
    up = RecordingUpstream()
    yield up
    up.close()


def test_allowed_request_copies_the_listed_headers_upstream(start_gateway, upstream):
    auth = HttpAuthServer(lambda req: (200, [("x-user", "alice"), ("x-not-listed", "n"),
                                             ("x-role", "admin")], b"ignored"))
    try:
        gw = start_gateway(config(upstream.url, auth.url + "/base", '''
path_prefix = "/check"
include_headers = ["cookie", "x-tenant"]
allowed_upstream_headers = ["x-user", "x-role", "x-team"]
'''))
        r = h1_request(gw.port, "POST", "/api/v1?x=1", [("Authorization", "Bearer t"), ("Cookie", "s=1"),
                                                       ("x-tenant", "t1"), ("x-other", "o"),
                                                       ("x-user", "spoofed"), ("x-team", "spoofed")],
                       body=b"payload")
        assert r.status == 200
        check = auth.wait_for(1)[0]
        assert (check["method"], check["target"], check["body"]) == ("POST", "/base/check/api/v1?x=1", b"")
        names = [k for k, _ in check["headers"]]
        assert names[0] == "host" and dict(check["headers"])["host"] == "gw.test"
        assert {k: v for k, v in check["headers"] if k not in ("host", "x-request-id", "content-length")} == \
            {"authorization": "Bearer t", "cookie": "s=1", "x-tenant": "t1"}
        assert "x-other" not in names
        seen = upstream.wait_for(1)[0]
        h = seen["headers"]
        assert [v for k, v in h if k == "x-user"] == ["alice"]        # replaced, not added
        assert [v for k, v in h if k == "x-role"] == ["admin"]
        assert "x-not-listed" not in [k for k, _ in h]
        assert "x-team" not in [k for k, _ in h]        # listed, not in the answer: the client's is gone
        assert seen["body"] == b"payload"
        assert dict(h)["x-request-id"] == dict(check["headers"])["x-request-id"]
    finally:
        auth.stop()


def test_any_other_status_is_the_answer(start_gateway, upstream):
    def handler(req):
        if req["target"] == "/login":
            return 302, [("location", "https://idp.example/login"), ("set-cookie", "state=1"),
                         ("x-internal", "i")], b""
        return 401, [("www-authenticate", "Basic"), ("content-type", "text/html"),
                     ("connection", "keep-alive")], b"<b>no</b>"
    auth = HttpAuthServer(handler)
    try:
        gw = start_gateway(config(upstream.url, auth.url))
        r = h1_request(gw.port, "GET", "/private")
        assert (r.status, r.body) == (401, b"<b>no</b>")
        assert r.header("www-authenticate") == "Basic" and r.header("content-type") == "text/html"
        assert r.header("connection") != "keep-alive"           # hop-by-hop: the gateway's own
        gw2 = start_gateway(config(upstream.url, auth.url,
                                   'allowed_client_headers = ["location", "set-cookie"]'))
        r = h1_request(gw2.port, "GET", "/login")
        assert (r.status, r.header("location"), r.header("set-cookie")) == \
            (302, "https://idp.example/login", "state=1")
        assert r.header("x-internal") is None
        assert upstream.seen == []
    finally:
        auth.stop()
