"""A token with bytes outside ASCII is an invalid token, never a 500: 401 in strict and
optional mode, anonymous in permissive mode, in every location (header, query,
cookie). Real gateway binary, raw HTTP/1.1 (clients refuse to send such bytes), a
strict recording upstream."""

from __future__ import annotations

import socket

import httptools
import pytest

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


def config(idp: IdP, upstream_url: str, mode: str) -> str:
    return f'''
[[route]]
name = "agents"
match = {{ path_prefix = "/" }}
backend = "app"
[route.jwt]
mode = "{mode}"
issuer = "{idp.issuer}"
audiences = ["agents"]
jwks = {{ inline = '{idp.jwks_json()}' }}
location = [{{ header = "authorization" }}, {{ query = "token" }}, {{ cookie = "session" }}]
[route.claims_to_headers]
"x-user" = "jwt.sub"

[backend.app]
type = "http"
url = "{upstream_url}"
'''


def send(port: int, target: str, headers: list[tuple[str, str]]) -> tuple[int, dict, bytes]:
    lines = [f"GET {target} HTTP/1.1", "Host: gw.test", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        out: dict = {"headers": {}, "body": b"", "done": False}

        class P:
            def on_header(self, k: bytes, v: bytes) -> None:
                out["headers"][k.decode().lower()] = v.decode("latin-1")

            def on_body(self, b: bytes) -> None:
                out["body"] += b

            def on_message_complete(self) -> None:
                out["done"] = True

        parser = httptools.HttpResponseParser(P())
        while not out["done"]:
            data = s.recv(65536)
            assert data, "connection closed before the response was complete"
            parser.feed_data(data)
        return parser.get_status_code(), out["headers"], out["body"]


def bad_tokens(idp: IdP) -> dict[str, str]:
    h, p, s = idp.mint().split(".")
    return {
        "payload": f"{h}.{p[:10]}\u00e9{p[10:]}.{s}",
        "header": f"{h[:5]}\u00e9{h[5:]}.{p}.{s}",
        "signature": f"{h}.{p}.{s[:-1]}\u00ff",
    }


def requests_for(token: str) -> list[tuple[str, str, list]]:
    """(location, target, headers): the same bad token in every configured location."""
    utf8_pct = "".join(c if c.isascii() else "".join(f"%{b:02X}" for b in c.encode()) for c in token)
    return [
        ("header", "/h", [("Authorization", f"Bearer {token}")]),     # the raw latin-1 byte
        ("query", f"/q?token={utf8_pct}", []),                          # %C3%A9 decodes to é
        ("cookie", "/c", [("Cookie", f"a=1; session={token}")]),
        ("cookie, encoded", "/c2", [("Cookie", f"session={utf8_pct}")]),
    ]


@pytest.mark.parametrize("mode", ["strict", "optional"])
def test_non_ascii_token_is_401(start_gateway, idp, upstream, mode):
    gw = start_gateway(config(idp, upstream.url, mode))
    for where, token in bad_tokens(idp).items():
        for location, target, headers in requests_for(token):
            status, h, body = send(gw.port, target, headers)
            assert status == 401, (where, location, status, body)
            assert h["www-authenticate"].startswith('Bearer error="invalid_token"'), (where, location)
    assert upstream.targets() == []
    assert "Traceback" not in gw.logs()
    # a good token still passes
    status, _, body = send(gw.port, "/ok", [("Authorization", f"Bearer {idp.mint()}")])
    assert (status, body) == (200, b"/ok")


def test_non_ascii_token_is_anonymous_in_permissive_mode(start_gateway, idp, upstream):
    gw = start_gateway(config(idp, upstream.url, "permissive"))
    n = 0
    for where, token in bad_tokens(idp).items():
        for location, target, headers in requests_for(token):
            status, _, body = send(gw.port, target, headers)
            assert status == 200, (where, location, status, body)
            n += 1
            seen = upstream.wait_for(n)[-1]
            assert "x-user" not in dict(seen["headers"]), (where, location)
    assert "Traceback" not in gw.logs()
