"""JWT validation and policies end to end: real clients → the agproxy binary → a real
echo upstream, with a real identity provider (discovery + rotating JWKS) on 127.0.0.1.

The backend counts requests: every refused request must leave the count unchanged.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.support.gateway import ROOT
from tests.support.idp import IdP, hs256_with_public_key, unsigned_token

USER_HEADER = "X-Amzn-Bedrock-AgentCore-Runtime-Custom-User"


@pytest.fixture
def http():
    """One client per test (a fresh httpx.get costs ~100 ms of TLS-context setup)."""
    with httpx.Client(timeout=10) as client:
        yield client


@pytest.fixture
def idp():
    server = IdP(key_kinds=("RSA", "EC"))
    yield server
    server.close()


def config(idp: IdP, upstream_url: str, *, mode: str = "strict", jwt_extra: str = "",
           extra: str = "", jwks: str | None = None, refetch: str = "200ms") -> str:
    jwks = jwks or f'{{ discovery = "{idp.discovery_url}", refetch_interval = "{refetch}" }}'
    return f'''
[[route]]
name = "agents"
match = {{ path_prefix = "/" }}
backend = "echo"
[route.jwt]
mode = "{mode}"
audiences = ["agents"]
jwks = {jwks}
clock_skew = "5s"
required_claims = ["sub", "exp"]
{jwt_extra}
[route.claims_to_headers]
"{USER_HEADER}" = "jwt.sub"
{extra}

[backend.echo]
type = "http"
url = "{upstream_url}"
'''


def seen_headers(response: httpx.Response) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in response.json()["headers"]:
        out.setdefault(k, []).append(v)
    return out


def raw_request(port: int, lines: list[str]) -> tuple[int, bytes]:
    """Send a hand-written HTTP/1.1 request (for header shapes clients refuse to make)."""
    payload = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v)
        while len(rest) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
        return status, head + b"\r\n\r\n" + rest


def test_valid_token_reaches_backend_without_credential(http, start_gateway, upstream_echo, idp):
    gw = start_gateway(config(idp, upstream_echo.url))
    token = idp.mint(sub="alice")
    r = http.get(gw.url("/agents/x"), headers={"authorization": f"Bearer {token}",
                                                USER_HEADER: "admin"})
    assert r.status_code == 200, r.text
    h = seen_headers(r)
    assert "authorization" not in h
    assert h[USER_HEADER.lower()] == ["alice"]
    # EC key too
    r = http.get(gw.url("/"), headers={"authorization": f"Bearer {idp.mint(key=idp.keys[1], sub='bob')}"})
    assert r.status_code == 200 and seen_headers(r)[USER_HEADER.lower()] == ["bob"]
    assert upstream_echo.requests == 2
    # the access log names the user
    records = gw.access_log(min_lines=2)
    assert [rec.get("user") for rec in records[:2]] == ["alice", "bob"]


def test_bad_inputs_never_reach_the_backend(http, start_gateway, upstream_echo, idp):
    gw = start_gateway(config(idp, upstream_echo.url, refetch="3s"))
    now = int(time.time())
    rsa = idp.keys[0]
    good = idp.mint()
    h, p, s = good.split(".")
    cases = {
        "expired": idp.mint(exp=now - 600),
        "not yet valid": idp.mint(nbf=now + 600),
        "wrong issuer": idp.mint(iss="https://evil.example"),
        "wrong audience": idp.mint(aud="someone-else"),
        "unknown kid": idp.mint(kid="not-a-key"),
        "alg none": unsigned_token(idp.claims(), kid=rsa.kid),
        "HS256 with the RSA public key": hs256_with_public_key(idp.claims(), rsa),
        "truncated": good[: len(good) // 2],
        "garbled base64": f"{h}.{p}.{s[:-6]}$$##!!",
        "tampered payload": f"{h}.{p[:-4]}AAAA.{s}",
        "missing required claim": idp.mint(sub=None),
        "20 KB token": good + "A" * 20_000,
    }
    for name, token in cases.items():
        r = http.get(gw.url("/agents/x"), headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 401, (name, r.status_code, r.text)
        challenge = r.headers["www-authenticate"]
        assert challenge.startswith('Bearer error="invalid_token", error_description="'), (name, challenge)
        payload = r.json()
        assert payload["error"] == "invalid_token" and payload["message"], name
        assert "Traceback" not in r.text and "-----BEGIN" not in r.text and '"n"' not in r.text

    # duplicate Authorization headers (ambiguous credential)
    r = http.get(gw.url("/"), headers=[("authorization", f"Bearer {good}"), ("authorization", f"Bearer {good}")])
    assert r.status_code == 401 and "multiple credentials" in r.headers["www-authenticate"]
    status, _ = raw_request(gw.port, ["GET / HTTP/1.1", "Host: x", f"Authorization: Bearer {good}",
                                      "Authorization: Bearer other", "Connection: close"])
    assert status == 401

    # a token in the query string when only the header is configured: no credential
    r = http.get(gw.url(f"/?access_token={good}&token={good}"))
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    # no token at all (RFC 6750: a bare challenge)
    r = http.get(gw.url("/"))
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"] == "unauthorized"

    assert upstream_echo.requests == 0
    # unknown kids: at most one refetch per refetch_interval (3s here), whatever the
    # number of attempts
    fetches = idp.jwks_fetches
    started = time.monotonic()
    for i in range(50):
        assert http.get(gw.url("/"), headers={"authorization": f"Bearer {idp.mint(kid=f'k{i}')}"}).status_code == 401
    assert idp.jwks_fetches - fetches <= 1 + int((time.monotonic() - started) / 3)
    assert upstream_echo.requests == 0


def test_spoofed_identity_header_never_passes(http, start_gateway, upstream_echo, idp):
    gw = start_gateway(config(idp, upstream_echo.url, mode="optional"))
    # anonymous on an optional route: removed, not replaced
    r = http.get(gw.url("/"), headers={USER_HEADER: "admin"})
    assert r.status_code == 200 and USER_HEADER.lower() not in seen_headers(r)
    # several spellings and repeats
    status, raw = raw_request(gw.port, ["GET / HTTP/1.1", "Host: x", f"{USER_HEADER}: admin",
                                        f"{USER_HEADER.upper()}: root", f"{USER_HEADER.lower()}: x",
                                        "Connection: close"])
    assert status == 200 and b"admin" not in raw and b"root" not in raw
    # authenticated: only the gateway's value
    token = idp.mint()
    for _ in range(3):   # the same token again: the per-token memo must not let a spoof through
        r = http.get(gw.url("/"), headers=[(USER_HEADER, "admin"), ("authorization", f"Bearer {token}"),
                                            (USER_HEADER, "admin2")])
        assert seen_headers(r)[USER_HEADER.lower()] == ["alice"]


def test_rule_on_missing_claim_denies(http, start_gateway, upstream_echo, idp):
    extra = """
[route.authorization]
rules = [
  '"admin" in jwt.groups',
  { deny = 'jwt.suspended' },
]
"""
    # the deny rule on a claim that is absent denies too; give it to the allowed user
    gw = start_gateway(config(idp, upstream_echo.url, extra=extra))
    ok = idp.mint(groups=["admin"], suspended=False)
    assert http.get(gw.url("/"), headers={"authorization": f"Bearer {ok}"}).status_code == 200
    for token in (idp.mint(), idp.mint(groups=["admin"]), idp.mint(groups=["user"], suspended=False),
                  idp.mint(groups=["admin"], suspended=True)):
        r = http.get(gw.url("/"), headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 403 and r.json()["error"] == "forbidden"
    assert upstream_echo.requests == 1
    assert "jwt.groups" in gw.logs() or "jwt.suspended" in gw.logs()


def test_transform_and_header_value_errors(http, start_gateway, upstream_echo, idp):
    extra = """
[route.transform.request]
set = { "x-tenant" = "jwt.tenant" }
remove = ["x-debug"]
[route.transform.response]
set = { "x-upstream-status" = "string(response.code)" }
"""
    gw = start_gateway(config(idp, upstream_echo.url, extra=extra))
    r = http.get(gw.url("/"), headers={"authorization": f"Bearer {idp.mint(tenant='t1')}", "x-debug": "1",
                                        "x-tenant": "spoof"})
    assert r.status_code == 200 and r.headers["x-upstream-status"] == "200"
    h = seen_headers(r)
    assert h["x-tenant"] == ["t1"] and "x-debug" not in h
    # the claim is missing: 500, a log line naming the expression, nothing sent upstream
    before = upstream_echo.requests
    r = http.get(gw.url("/"), headers={"authorization": f"Bearer {idp.mint()}"})
    assert r.status_code == 500 and r.json()["error"] == "internal_error"
    assert upstream_echo.requests == before
    deadline = time.monotonic() + 5
    while "jwt.tenant" not in gw.logs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "jwt.tenant" in gw.logs()


def test_query_and_cookie_locations_and_forward(http, start_gateway, upstream_echo, idp):
    gw = start_gateway(config(idp, upstream_echo.url,
                              jwt_extra='location = [{ query = "token" }, { cookie = "session" }]'))
    token = idp.mint()
    r = http.get(gw.url(f"/p?a=1&token={token}&b=2"))
    assert r.status_code == 200 and r.json()["path"] == "/p?a=1&b=2"
    r = http.get(gw.url("/p"), headers={"cookie": f"x=1; session={token}"})
    assert r.status_code == 200 and seen_headers(r)["cookie"] == ["x=1"]
    # the header is not a configured location
    assert http.get(gw.url("/p"), headers={"authorization": f"Bearer {token}"}).status_code == 401

    gw2 = start_gateway(config(idp, upstream_echo.url, jwt_extra="forward = true"))
    r = http.get(gw2.url("/"), headers={"authorization": f"Bearer {token}"})
    assert seen_headers(r)["authorization"] == [f"Bearer {token}"]


def test_key_rotation_is_picked_up(http, start_gateway, upstream_echo, idp):
    gw = start_gateway(config(idp, upstream_echo.url))
    assert http.get(gw.url("/"), headers={"authorization": f"Bearer {idp.mint()}"}).status_code == 200
    new = idp.rotate()           # the old RSA key leaves the JWKS, a new one signs
    fetches = idp.jwks_fetches
    # Within refetch_interval (200ms) of the startup fetch the unknown kid is refused
    # without a fetch; after it, one refetch picks up the new key. Poll, bounded.
    deadline = time.monotonic() + 10
    while True:
        r = http.get(gw.url("/"), headers={"authorization": f"Bearer {idp.mint(key=new)}"})
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        assert r.status_code == 401
        time.sleep(0.02)
    assert r.status_code == 200, r.text
    assert idp.jwks_fetches == fetches + 1   # many tries, one refetch: no amplification


def test_jwks_down_at_start_fails_closed_then_recovers(http, start_gateway, upstream_echo, idp):
    idp.down = True
    gw = start_gateway(config(idp, upstream_echo.url), wait_ready=False)
    deadline = time.monotonic() + 10
    status, body = 0, b""
    while time.monotonic() < deadline:
        try:
            status, body = gw.admin_get("/readyz")
            if status == 503 and b"no signing keys" in body and b"HTTP 503" in body:
                break
        except OSError:
            pass
        time.sleep(0.05)
    assert status == 503 and b"HTTP 503" in body, body
    r = http.get(gw.url("/"), headers={"authorization": f"Bearer {idp.mint()}"})
    assert r.status_code == 401 and "signing keys unavailable" in r.headers["www-authenticate"]
    assert upstream_echo.requests == 0
    idp.down = False
    # The next fetch (retry or refetch, each rate limited) recovers: poll for it, bounded.
    deadline = time.monotonic() + 10
    while True:
        r = http.get(gw.url("/"), headers={"authorization": f"Bearer {idp.mint()}"})
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert r.status_code == 200, r.text
    assert gw.admin_get("/readyz")[0] == 200


def test_jwks_outage_keeps_last_good_keys(http, start_gateway, upstream_echo, idp):
    gw = start_gateway(config(idp, upstream_echo.url))
    token = idp.mint()
    assert http.get(gw.url("/"), headers={"authorization": f"Bearer {token}"}).status_code == 200
    idp.down = True
    # An unknown kid makes the gateway refetch (at most once per refetch_interval): poll
    # until the down endpoint has seen that refetch; the old keys must stay in use.
    fetches = idp.jwks_fetches
    deadline = time.monotonic() + 10
    while idp.jwks_fetches == fetches and time.monotonic() < deadline:
        assert http.get(gw.url("/"), headers={"authorization": f"Bearer {idp.mint(kid='x')}"}).status_code == 401
        time.sleep(0.05)
    assert idp.jwks_fetches > fetches
    assert http.get(gw.url("/"), headers={"authorization": f"Bearer {idp.mint(sub='bob')}"}).status_code == 200
    assert gw.admin_get("/readyz")[0] == 200


def test_named_provider_shared_by_routes(http, start_gateway, upstream_echo, idp, tmp_path):
    (tmp_path / "jwks.json").write_text(idp.jwks_json())
    toml = f'''
[jwt_provider.idp]
issuer = "{idp.issuer}"
audiences = ["agents"]
jwks = {{ file = "{tmp_path / 'jwks.json'}" }}

[[route]]
name = "a"
match = {{ path_prefix = "/a" }}
backend = "echo"
[route.jwt]
providers = ["idp"]

[[route]]
name = "b"
match = {{ path_prefix = "/b" }}
backend = "echo"
[route.jwt]
providers = ["idp"]
[route.authorization]
rules = ['jwt.sub == "bob"']

[backend.echo]
type = "http"
url = "{upstream_echo.url}"
'''
    gw = start_gateway(toml)
    auth = {"authorization": f"Bearer {idp.mint()}"}
    assert http.get(gw.url("/a"), headers=auth).status_code == 200
    assert http.get(gw.url("/b"), headers=auth).status_code == 403


def validate(text: str, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / "check.toml"
    path.write_text(text)
    venv = ROOT / ".venv" / "bin" / "agproxy"
    cmd = [str(venv)] if venv.exists() else [sys.executable, "-m", "agproxy.cli"]
    return subprocess.run(cmd + ["validate", str(path)], capture_output=True, text=True, cwd=str(ROOT),
                          timeout=60)


def test_validate_reports_policy_errors_with_paths(tmp_path, idp):
    (tmp_path / "broken.json").write_text("{not json")
    text = '''
[[listener]]
name = "main"
bind = "127.0.0.1:8080"

[backend.echo]
type = "http"
url = "http://127.0.0.1:9000"

[[route]]
name = "a"
backend = "echo"
[route.jwt]
issuer = "https://idp"
jwks = { file = "broken.json" }
[route.authorization]
rules = ['jwt.sub != ""', 'jwt.sub ==', { deny = 'nosuch(jwt.x)' }]

[[route]]
name = "b"
backend = "echo"
[route.jwt]
providers = ["nobody"]
[route.claims_to_headers]
"X-User" = "jwt.sub +"
'''
    res = validate(text, tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    err = res.stderr
    for expected in (
        "route[0].jwt.jwks.file: invalid JWKS",
        "route[0].authorization.rules[1]: invalid CEL",
        "route[0].authorization.rules[2].deny: invalid CEL",
        "route[1].jwt.providers[0]: unknown JWT provider 'nobody'",
        "route[1].claims_to_headers.X-User: invalid CEL",
    ):
        assert expected in err, (expected, err)
    # and a good one validates without touching the network
    (tmp_path / "jwks.json").write_text(idp.jwks_json())
    good = text.replace("broken.json", "jwks.json").replace("'jwt.sub ==', ", "").replace(
        "{ deny = 'nosuch(jwt.x)' }", "{ deny = 'jwt.x == 1' }").replace(
        'providers = ["nobody"]', f'issuer = "{idp.issuer}"\njwks = {{ discovery = "https://unreachable.invalid/.well-known/openid-configuration" }}').replace(
        '"jwt.sub +"', '"jwt.sub"')
    res = validate(good, tmp_path)
    assert res.returncode == 0, res.stderr
