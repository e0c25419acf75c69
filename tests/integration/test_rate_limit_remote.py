"""`[route.rate_limit.remote]` against a real RLS v3 server (grpcio on Envoy's protos):
the request the service sees, 429 and headers, descriptor values that cannot be
computed (never dropped), and faults under failure_mode closed and open."""

from __future__ import annotations

import time

import grpc
import pytest

from tests.support.gateway import metric
from tests.support.grpc_peers import RawPeer
from tests.support.ports import free_port
from tests.support.recorder import RecordingUpstream
from tests.support.rls_peer import rls_peer
from tests.support.strict_client import concurrently, request

DAY = 86400


@pytest.fixture
def upstream():
    server = RecordingUpstream()
    yield server
    server.close()


def config(upstream_url: str, address: str, *, timeout: str = "2s", failure_mode: str = "closed",
           descriptors: str = '[[ { key = "user", value = \'request.headers["x-user"]\' } ]]') -> str:
    return f'''
[gateway]
admin = "127.0.0.1:{{admin_port}}"
access_log = "off"
drain_timeout = "5s"

[[listener]]
name = "main"
bind = "127.0.0.1:{{port}}"

[[route]]
name = "agents"
match = {{ path_prefix = "/" }}
backend = "app"

[route.rate_limit.remote]
address = "{address}"
domain = "agents"
descriptors = {descriptors}
timeout = "{timeout}"
failure_mode = "{failure_mode}"

[backend.app]
type = "http"
url = "{upstream_url}"
'''




ERROR = {"error": "rate_limit_error", "message": "the rate limit service is unavailable"}


def test_the_service_decides_with_the_request_it_sees(start_gateway, upstream):
    peer, rls = rls_peer({(("user", None), ("path", None)): (3, DAY)},
                         response_headers=[("x-rls-said", "hello")])
    with peer:
        descriptors = ('[[ { key = "user", value = \'request.headers["x-user"]\' }, '
                       '{ key = "path", value = "request.path" } ], [ { key = "static", value = \'"all"\' } ]]')
        gw = start_gateway(config(upstream.url, peer.address, descriptors=descriptors))
        answers = [request(gw.port, "/a", {"x-user": "alice"}) for _ in range(4)]
        assert [r.status for r in answers] == [200, 200, 200, 429]
        assert [r.header("x-ratelimit-remaining") for r in answers[:3]] == ["2", "1", "0"]
        assert all(r.header("x-ratelimit-limit") == "3" for r in answers)
        assert all(r.header("x-rls-said") == "hello" for r in answers)
        refused = answers[3]
        assert refused.json()["error"] == "rate_limited"
        reset = int(refused.header("x-ratelimit-reset"))
        assert 1 <= reset <= DAY and refused.header("retry-after") == str(reset)
        assert len(upstream.targets()) == 3
        # Exactly what the service received, for every request.
        request_seen, time_left = rls.calls[0]
        assert request_seen.domain == "agents" and request_seen.hits_addend == 1
        assert [[(e.key, e.value) for e in d.entries] for d in request_seen.descriptors] == [
            [("user", "alice"), ("path", "/a")], [("static", "all")]]
        assert time_left is not None and 0 < time_left <= 2.0     # the deadline travels with the call
        # Another user has a bucket of their own at the service.
        assert request(gw.port, "/a", {"x-user": "bob"}).status == 200
        text = gw.metrics()
        assert metric(text, "agproxy_rate_limit_decisions_total", kind="remote", result="allowed") == 4
        assert metric(text, "agproxy_rate_limit_decisions_total", kind="remote", result="limited") == 1


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_a_descriptor_that_cannot_be_computed_is_a_failure_never_dropped(start_gateway, upstream, mode):
    peer, rls = rls_peer({(("user", None),): (1, DAY)})
    with peer:
        gw = start_gateway(config(upstream.url, peer.address, failure_mode=mode))
        r = request(gw.port, "/nobody")        # no x-user header: the value cannot be computed
        if mode == "closed":
            assert (r.status, r.json()) == (500, {
                "error": "rate_limit_error",
                "message": "a rate limit descriptor could not be computed for this request"})
            assert upstream.targets() == []
        else:
            assert r.status == 200 and upstream.targets() == ["/nobody"]
        # The descriptor was not left out to ask the service about the rest: no call at all.
        assert rls.calls == []
        result = "error_denied" if mode == "closed" else "error_allowed"
        assert metric(gw.metrics(), "agproxy_rate_limit_decisions_total", result=result) == 1


# -- faults --------------------------------------------------------------------------------

def check_failure(gw, upstream, mode: str, path: str) -> None:
    r = request(gw.port, path, {"x-user": "u"})
    if mode == "closed":
        assert (r.status, r.json()) == (500, ERROR)
        assert path not in upstream.targets()
    else:
        assert r.status == 200 and r.header("x-ratelimit-limit") is None
        assert path in upstream.targets()


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_service_not_listening(start_gateway, upstream, mode):
    gw = start_gateway(config(upstream.url, f"127.0.0.1:{free_port()}", failure_mode=mode))
    check_failure(gw, upstream, mode, "/down")
    assert "rate_limit_remote" in gw.logs() and "unreachable" in gw.logs()


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_service_that_never_answers_times_out(start_gateway, upstream, mode):
    peer, rls = rls_peer({(("user", None),): (100, DAY)})
    with peer:
        rls.hold()
        try:
            gw = start_gateway(config(upstream.url, peer.address, timeout="300ms", failure_mode=mode))
            start = time.monotonic()
            statuses = [r.status for r in concurrently(4, lambda i: request(gw.port, f"/t{i}", {"x-user": "u"}))]
            assert time.monotonic() - start < 5
            assert statuses == ([500] * 4 if mode == "closed" else [200] * 4)
            assert "timeout" in gw.logs()
        finally:
            rls.release()


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_service_answering_unavailable(start_gateway, upstream, mode):
    peer, rls = rls_peer({(("user", None),): (100, DAY)})
    with peer:
        rls.fail_with = grpc.StatusCode.UNAVAILABLE
        gw = start_gateway(config(upstream.url, peer.address, failure_mode=mode))
        check_failure(gw, upstream, mode, "/unavailable")
        assert len(rls.calls) == 1
        rls.fail_with = None          # the service recovers: counted normally again
        r = request(gw.port, "/ok", {"x-user": "u"})
        assert (r.status, r.header("x-ratelimit-remaining")) == (200, "99")


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_service_answering_garbage(start_gateway, upstream, mode):
    peer = RawPeer(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").start()
    try:
        gw = start_gateway(config(upstream.url, peer.address, failure_mode=mode))
        check_failure(gw, upstream, mode, "/garbage")
        assert peer.connections >= 1
    finally:
        peer.stop()


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_service_dying_and_coming_back(start_gateway, upstream, mode):
    port = free_port()
    peer, rls = rls_peer({(("user", None),): (100, DAY)}, port=port)
    peer.start()
    try:
        gw = start_gateway(config(upstream.url, peer.address, failure_mode=mode))
        assert request(gw.port, "/before", {"x-user": "u"}).header("x-ratelimit-remaining") == "99"
        peer.stop()
        check_failure(gw, upstream, mode, "/during")
        peer2, rls2 = rls_peer({(("user", None),): (100, DAY)}, port=port)
        peer2.start()
        try:
            deadline = time.monotonic() + 15
            while True:
                r = request(gw.port, "/after", {"x-user": "u"})
                if r.header("x-ratelimit-remaining") is not None:
                    break
                assert time.monotonic() < deadline, gw.logs()
                time.sleep(0.05)     # polling for the recovery (a condition), bounded
            assert r.status == 200 and r.header("x-ratelimit-remaining") == "99"
        finally:
            peer2.stop()
    finally:
        peer.stop()


def test_a_long_or_unprintable_descriptor_value_is_sent_as_its_digest(start_gateway, upstream):
    # A client's 8 KB header must not become an 8 KB descriptor value at the service (its
    # cache keys, its logs): values over 128 characters go as '#' + a 128-bit digest.
    peer, rls = rls_peer({(("user", None),): (100, DAY)})
    with peer:
        gw = start_gateway(config(upstream.url, peer.address))
        for value in ("x" * 8000, "x" * 8000, "a\tb", "short"):
            assert request(gw.port, "/", {"x-user": value}).status == 200
        sent = [d.entries[0].value for req, _ in rls.calls for d in req.descriptors]
        assert sent[0] == sent[1] and sent[0].startswith("#") and len(sent[0]) == 33
        assert sent[2].startswith("#") and len(sent[2]) == 33
        assert sent[3] == "short"
