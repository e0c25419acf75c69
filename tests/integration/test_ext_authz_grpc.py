"""[route.ext_authz] in gRPC mode, end to end: a raw HTTP/1.1 (or httpx HTTP/2) client →
the agproxy binary → a strict recording upstream, with a real grpcio server on Envoy's
Authorization service deciding (tests/support/grpc_peers.py).

What the auth server received (the CheckRequest), what the upstream received (headers
byte for byte, the target, the body) and what the client got (status, headers, body)
are all asserted; a request the service refuses must never reach the upstream.
"""

from __future__ import annotations

import json
import time

import grpc
import httpx
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as ext
from google.protobuf import json_format, struct_pb2, wrappers_pb2
from google.rpc import status_pb2

from tests.support.authz_peers import h1_request
from tests.support.grpc_peers import CheckResponse, authorization_peer
from tests.support.idp import IdP
from tests.support.recorder import RecordingUpstream


def hvo(key: str, value: str, append: bool | None = None, action: int | None = None) -> base_pb2.HeaderValueOption:
    opt = base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, value=value))
    if append is not None:
        opt.append.CopyFrom(wrappers_pb2.BoolValue(value=append))
    if action is not None:
        opt.append_action = action
    return opt


def ok(**fields) -> CheckResponse:
    meta = fields.pop("metadata", None)
    resp = CheckResponse(status=status_pb2.Status(code=0), ok_response=ext.OkHttpResponse(**fields))
    if meta is not None:
        resp.dynamic_metadata.CopyFrom(meta)
    return resp


def denied(status: int = 0, headers=(), body: str = "", code: int = 7) -> CheckResponse:
    resp = CheckResponse(status=status_pb2.Status(code=code))
    if status or headers or body:
        resp.denied_response.CopyFrom(ext.DeniedHttpResponse(headers=list(headers), body=body))
        resp.denied_response.status.code = status
    return resp


def config(upstream: str, *routes: str) -> str:
    return "\n".join(routes) + f'''
[backend.app]
type = "http"
url = "{upstream}"
'''


def route(name: str, prefix: str, address: str, extra: str = "", *, timeout: str = "2s",
          failure_mode: str = "closed", after: str = "") -> str:
    return f'''
[[route]]
name = "{name}"
match = {{ path_prefix = "{prefix}" }}
backend = "app"
[route.ext_authz]
address = "{address}"
timeout = "{timeout}"
failure_mode = "{failure_mode}"
{extra}
{after}
'''


@pytest.fixture
def upstream():
    up = RecordingUpstream()
    yield up
    up.close()


@pytest.fixture
def authz():
    peer, servicer = authorization_peer()
    peer.start()
    yield peer, servicer
    servicer.release()
    peer.stop(0)


def decisions(gw, route: str) -> dict[str, float]:
    out = {}
    for line in gw.metrics().splitlines():
        if line.startswith("agproxy_ext_authz_decisions_total{") and f'route="{route}"' in line:
            result = line.split('result="', 1)[1].split('"', 1)[0]
            out[result] = float(line.rsplit(" ", 1)[1])
    return out


# -- allowed, with changes -------------------------------------------------------------------

def test_allow_applies_header_query_and_response_changes_as_envoy(start_gateway, upstream, authz):
    peer, servicer = authz
    servicer.handler = lambda req, ctx: ok(
        headers=[hvo("x-user", "alice"),                               # append unset: set
                 hvo("x-existing", "new", append=False),               # replaces
                 hvo("x-list", "b", append=True),                      # appended to the value
                 hvo("x-fresh", "c", append=True),                     # appended to nothing: added
                 hvo("x-once", "n", action=1),                         # ADD_IF_ABSENT: kept as is
                 hvo("x-only-if", "o", action=3),                      # OVERWRITE_IF_EXISTS: absent
                 hvo("X-Upper", "u"),                                  # names are lowercased
                 hvo("host", "evil.example"), hvo(":path", "/admin")], # never touched
        headers_to_remove=["x-secret", ":path", "host"],
        response_headers_to_add=[hvo("x-authz", "ok"), hvo("set-cookie", "a=1", append=True),
                                 hvo("set-cookie", "b=2", append=True)],
        query_parameters_to_set=[base_pb2.QueryParameter(key="tenant", value="t 1")],
        query_parameters_to_remove=["drop"])
    gw = start_gateway(config(upstream.url, route("guarded", "/", peer.address)))
    r = h1_request(gw.port, "GET", "/api/items?drop=1&keep=2",
                   [("X-Existing", "old"), ("x-list", "a"), ("x-once", "kept"), ("x-secret", "s")])
    assert r.status == 200
    assert r.header("x-authz") == "ok"
    assert r.all("set-cookie") == ["a=1", "b=2"]
    seen = upstream.wait_for(1)[0]
    assert seen["target"] == "/api/items?keep=2&tenant=t%201"
    h = seen["headers"]
    got = {k: [v for k2, v in h if k2 == k] for k, _ in h}
    assert got["x-user"] == ["alice"]
    assert got["x-existing"] == ["new"]
    assert got["x-list"] == ["a,b"]
    assert got["x-fresh"] == ["c"]
    assert got["x-once"] == ["kept"]
    assert got["x-upper"] == ["u"]
    assert "x-only-if" not in got and "x-secret" not in got
    assert got["host"] == [f"127.0.0.1:{upstream.port}"]
    assert decisions(gw, "guarded") == {"allowed": 1.0}


def test_check_request_carries_what_envoy_sends(start_gateway, upstream, authz):
    peer, servicer = authz
    gw = start_gateway(config(upstream.url, route(
        "guarded", "/", peer.address, 'context_extensions = { team = "cx", tier = "gold" }')))
    before = time.time()
    r = h1_request(gw.port, "GET", "/a/./b//c?x=1&y=%20", [("X-Mixed-Case", "V"), ("Authorization", "Bearer t"),
                                                          ("x-multi", "1"), ("x-multi", "2"),
                                                          ("x-envoy-auth-partial-body", "spoof")])
    assert r.status == 200
    call = servicer.calls[0]
    a = call.request.attributes
    assert (a.source.address.socket_address.address, a.source.address.socket_address.port_value) == \
        ("127.0.0.1", r.local_port)
    assert (a.destination.address.socket_address.address, a.destination.address.socket_address.port_value) == \
        ("127.0.0.1", gw.port)
    http = a.request.http
    seen = upstream.wait_for(1)[0]
    request_id = dict(seen["headers"])["x-request-id"]
    assert http.id == request_id
    assert (http.method, http.path, http.host, http.scheme, http.protocol, http.size) == \
        ("GET", "/a/b/c?x=1&y=%20", "gw.test", "http", "HTTP/1.1", 0)
    assert seen["target"] == http.path            # the auth server saw the path the upstream got
    assert dict(http.headers) == {
        ":authority": "gw.test", ":method": "GET", ":path": "/a/b/c?x=1&y=%20", ":scheme": "http",
        "x-mixed-case": "V", "authorization": "Bearer t", "x-multi": "1,2",
        "x-forwarded-proto": "http", "x-request-id": request_id}
    assert not http.body and not http.raw_body
    assert before - 1 <= a.request.time.ToNanoseconds() / 1e9 <= time.time() + 1
    assert dict(a.context_extensions) == {"team": "cx", "tier": "gold"}
    assert call.time_remaining is not None and 0 < call.time_remaining <= 2.0


def test_include_headers_sends_only_those(start_gateway, upstream, authz):
    peer, servicer = authz
    gw = start_gateway(config(upstream.url, route("guarded", "/", peer.address,
                                                  'include_headers = ["Authorization", "x-tenant"]')))
    assert h1_request(gw.port, "GET", "/x", [("authorization", "Bearer t"), ("x-tenant", "t1"),
                                             ("x-other", "o")]).status == 200
    assert dict(servicer.calls[0].request.attributes.request.http.headers) == \
        {"authorization": "Bearer t", "x-tenant": "t1"}


def test_http2_client(start_gateway, upstream, authz):
    peer, servicer = authz
    gw = start_gateway(config(upstream.url, route("guarded", "/", peer.address)))
    with httpx.Client(http1=False, http2=True, timeout=10) as client:
        resp = client.post(gw.url("/h2?q=1"), content=b"data", headers={"x-h2": "yes"})
    assert resp.status_code == 200 and resp.http_version == "HTTP/2"
    http = servicer.calls[0].request.attributes.request.http
    assert (http.protocol, http.method, http.path, http.size) == ("HTTP/2", "POST", "/h2?q=1", 4)
    headers = dict(http.headers)
    assert headers[":authority"] == f"127.0.0.1:{gw.port}" and headers["x-h2"] == "yes"
    assert headers[":path"] == "/h2?q=1" and headers[":method"] == "POST"
    assert upstream.wait_for(1)[0]["body"] == b"data"


def test_dynamic_metadata_reaches_later_cel(start_gateway, upstream, authz):
    peer, servicer = authz
    meta = struct_pb2.Struct()
    meta.update({"tenant": "t-42", "tier": {"name": "gold"}})
    servicer.handler = lambda req, ctx: ok(metadata=meta)
    gw = start_gateway(config(upstream.url, route("guarded", "/", peer.address, after='''
[route.transform.request]
set = { "x-tenant" = 'ext_authz.metadata.tenant', "x-tier" = 'ext_authz.metadata.tier.name' }
''')))
    assert h1_request(gw.port, "GET", "/m", [("x-tenant", "spoofed")]).status == 200
    h = upstream.wait_for(1)[0]["headers"]
    assert [v for k, v in h if k == "x-tenant"] == ["t-42"]
    assert [v for k, v in h if k == "x-tier"] == ["gold"]


def test_metadata_context_carries_the_verified_jwt_payload_as_envoys_jwt_authn(start_gateway, upstream, authz):
    """`metadata_context = { jwt_payload = KEY }`: the verified claims under Envoy's
    jwt_authn namespace (or the configured one); nothing without a verified token; nothing
    on a route that does not ask for it."""
    peer, servicer = authz
    idp = IdP()
    try:
        jwt_table = f'''
[route.jwt]
mode = "optional"
issuer = "{idp.issuer}"
audiences = ["agents"]
jwks = {{ inline = '{idp.jwks_json()}' }}
'''
        gw = start_gateway(config(
            upstream.url,
            route("meta", "/meta", peer.address, 'metadata_context = { jwt_payload = "jwt_payload" }',
                  after=jwt_table),
            route("ns", "/ns", peer.address,
                  'metadata_context = { namespace = "com.example.auth", jwt_payload = "verified" }', after=jwt_table),
            route("off", "/off", peer.address, after=jwt_table)))
        claims = idp.claims(groups=["eng", "ops"], level=3, org={"id": "o1", "admin": False})
        token = idp.mint(claims)
        for path in ("/meta/x", "/ns/x", "/off/x"):
            assert h1_request(gw.port, "GET", path, [("authorization", f"Bearer {token}")]).status == 200
        assert h1_request(gw.port, "GET", "/meta/anonymous").status == 200
        metas = [json_format.MessageToDict(c.request.attributes.metadata_context) for c in servicer.calls]
        as_struct = {k: (float(v) if type(v) is int else v) for k, v in claims.items()}   # Struct numbers
        assert metas[0] == {"filterMetadata": {"envoy.filters.http.jwt_authn": {"jwt_payload": as_struct}}}
        assert metas[1] == {"filterMetadata": {"com.example.auth": {"verified": as_struct}}}
        assert metas[2] == {} and metas[3] == {}
        filters = json.loads(gw.admin_get("/config")[1])["routes"][0]["filters"]
        assert [f["metadata_context"] for f in filters if f["type"] == "ext_authz"] == [{
            "namespace": "envoy.filters.http.jwt_authn", "jwt_payload": "jwt_payload"}]
    finally:
        idp.close()


# -- denied ----------------------------------------------------------------------------------

def test_denied_answer_reaches_the_client_and_nothing_reaches_the_upstream(start_gateway, upstream, authz):
    peer, servicer = authz

    def handler(req, ctx):
        path = req.attributes.request.http.path
        if path == "/custom":
            return denied(401, [hvo("www-authenticate", 'Bearer realm="x"'), hvo("x-reason", "expired")],
                          '{"error":"expired"}')
        if path == "/typed":
            return denied(429, [hvo("content-type", "application/json")], "{}")
        return denied()
    servicer.handler = handler
    gw = start_gateway(config(upstream.url, route("guarded", "/", peer.address)))
    r = h1_request(gw.port, "GET", "/custom")
    assert (r.status, r.body) == (401, b'{"error":"expired"}')
    assert r.header("www-authenticate") == 'Bearer realm="x"' and r.header("x-reason") == "expired"
    assert r.header("content-type") == "text/plain"            # Envoy's, for a body without one
    r = h1_request(gw.port, "GET", "/typed")
    assert (r.status, r.body, r.all("content-type")) == (429, b"{}", ["application/json"])
    r = h1_request(gw.port, "POST", "/plain", body=b"payload")
    assert (r.status, r.body, r.header("content-length")) == (403, b"", "0")
    assert upstream.seen == []
    assert decisions(gw, "guarded")["denied"] == 3.0
    log = [rec for rec in gw.access_log(3) if rec["route"] == "guarded"]
    assert [rec["status"] for rec in log] == [401, 429, 403]
    assert all(rec["error"] == "ext_authz: denied by the authorization service" for rec in log)


# -- bodies ----------------------------------------------------------------------------------

def test_body_included_up_to_max_bytes_else_413(start_gateway, upstream, authz):
    peer, servicer = authz
    gw = start_gateway(config(upstream.url, route("guarded", "/", peer.address,
                                                  "include_body = { max_bytes = 16 }")))
    r = h1_request(gw.port, "POST", "/b", body=b"0123456789")
    assert r.status == 200
    http = servicer.calls[0].request.attributes.request.http
    assert (http.body, http.size, http.headers["x-envoy-auth-partial-body"]) == ("0123456789", 10, "false")
    assert upstream.wait_for(1)[0]["body"] == b"0123456789"
    r = h1_request(gw.port, "POST", "/b", body=b"x" * 17)
    assert r.status == 413
    assert len(servicer.calls) == 1 and len(upstream.seen) == 1     # neither was asked
    r = h1_request(gw.port, "GET", "/nobody")
    assert r.status == 200
    http = servicer.calls[1].request.attributes.request.http
    assert not http.body and "x-envoy-auth-partial-body" not in http.headers


def test_partial_body_is_truncated_and_the_upstream_gets_it_whole(start_gateway, upstream, authz):
    peer, servicer = authz
    gw = start_gateway(config(
        upstream.url,
        route("partial", "/p", peer.address, "include_body = { max_bytes = 16, allow_partial = true }"),
        route("raw", "/raw", peer.address, "include_body = { max_bytes = 64, raw_body = true }"),
        route("text", "/text", peer.address, "include_body = { max_bytes = 64 }")))
    body = bytes(range(48, 88))       # 40 bytes
    assert h1_request(gw.port, "POST", "/p", body=body).status == 200
    http = servicer.calls[0].request.attributes.request.http
    assert (http.body, http.headers["x-envoy-auth-partial-body"]) == (body[:16].decode(), "true")
    assert upstream.wait_for(1)[0]["body"] == body
    assert h1_request(gw.port, "POST", "/p", body=b"short").status == 200
    http = servicer.calls[1].request.attributes.request.http
    assert (http.body, http.headers["x-envoy-auth-partial-body"]) == ("short", "false")
    assert h1_request(gw.port, "POST", "/raw", body=b"\xff\x00abc").status == 200
    http = servicer.calls[2].request.attributes.request.http
    assert (http.raw_body, http.body) == (b"\xff\x00abc", "")
    # a body that is not UTF-8 cannot go in the string field: raw_body instead
    assert h1_request(gw.port, "POST", "/text", body=b"caf\xe9").status == 200
    http = servicer.calls[3].request.attributes.request.http
    assert (http.raw_body, http.body) == (b"caf\xe9", "")
    assert [s["body"] for s in upstream.wait_for(4)][2:] == [b"\xff\x00abc", b"caf\xe9"]


# -- the decision cache ----------------------------------------------------------------------

def test_decision_cache_asks_once_per_key(start_gateway, upstream, authz):
    peer, servicer = authz
    servicer.handler = lambda req, ctx: (denied(401, body="no") if req.attributes.request.http.path == "/deny"
                                         else ok(headers=[hvo("x-user", "alice")]))
    gw = start_gateway(config(upstream.url, route("guarded", "/", peer.address,
                                                  'cache = { key = "request.path", ttl = "60s" }')))
    assert [h1_request(gw.port, "GET", p).status for p in ("/a", "/a", "/b", "/deny", "/deny")] == \
        [200, 200, 200, 401, 401]
    assert [c.request.attributes.request.http.path for c in servicer.calls] == ["/a", "/b", "/deny"]
    seen = upstream.wait_for(3)
    assert all(("x-user", "alice") in s["headers"] for s in seen)     # a cached allow keeps its changes
    metrics = gw.metrics()
    assert 'agproxy_ext_authz_cache_lookups_total{result="hit",route="guarded"} 2.0' in metrics
    assert 'agproxy_ext_authz_cache_lookups_total{result="miss",route="guarded"} 3.0' in metrics


# -- the service failing ---------------------------------------------------------------------

def test_error_response_is_a_failure_with_its_own_answer(start_gateway, upstream, authz):
    peer, servicer = authz

    def handler(req, ctx):
        resp = CheckResponse(status=status_pb2.Status(code=14))
        resp.error_response.status.code = 503
        resp.error_response.body = "busy"
        resp.error_response.headers.append(hvo("retry-after", "1"))
        return resp
    servicer.handler = handler
    gw = start_gateway(config(upstream.url, route("closed", "/c", peer.address),
                              route("open", "/o", peer.address, failure_mode="open")))
    r = h1_request(gw.port, "GET", "/c")
    assert (r.status, r.body, r.header("retry-after")) == (503, b"busy", "1")
    assert upstream.seen == []
    assert h1_request(gw.port, "GET", "/o").status == 200
    assert upstream.wait_for(1)[0]["target"] == "/o"
    assert decisions(gw, "closed")["error_denied"] == 1.0
    assert decisions(gw, "open")["error_allowed"] == 1.0


def test_invalid_header_from_the_service_is_garbage(start_gateway, upstream, authz):
    peer, servicer = authz
    servicer.handler = lambda req, ctx: ok(headers=[hvo("x-user", "alice\r\nx-admin: true")])
    gw = start_gateway(config(upstream.url, route("guarded", "/", peer.address)))
    r = h1_request(gw.port, "GET", "/x")
    assert (r.status, r.body) == (403, b"")
    assert upstream.seen == []
    assert gw.access_log(1)[-1]["error"] == "ext_authz: garbage (failure_mode closed)"


@pytest.mark.parametrize("http2", [False, True])
def test_partial_body_larger_than_the_buffers_streams_whole(start_gateway, upstream, authz, http2):
    # 1 MiB peeked: more than the reader's high-water mark (256 KiB) and the HTTP/2 window,
    # so the peek must keep the client sending; the upstream still gets all 3 MiB.
    peer, servicer = authz
    gw = start_gateway(config(upstream.url, route(
        "big", "/", peer.address, "include_body = { max_bytes = 1048576, allow_partial = true }",
        timeout="10s")))
    body = bytes(range(256)) * (3 * 4096)
    with httpx.Client(http1=not http2, http2=http2, timeout=30) as client:
        resp = client.post(gw.url("/upload"), content=iter([body[i:i + 65536]
                                                            for i in range(0, len(body), 65536)]))
    assert resp.status_code == 200
    http = servicer.calls[0].request.attributes.request.http
    assert (http.raw_body, http.headers["x-envoy-auth-partial-body"], http.size) == (body[:1048576], "true", -1)
    assert upstream.wait_for(1)[0]["body"] == body
