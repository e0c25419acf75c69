"""The gRPC unary client (agproxy/upstream/grpc.py) against real peers on 127.0.0.1.

Peers: a grpcio server on Envoy's Authorization service (tests/support/grpc_peers.py),
the same server in a child process (to kill it mid-call), raw TCP listeners that are
not gRPC, and agproxy's own HTTP/2 server (test_h2_helpers) answering crafted bytes
for the framing errors grpcio never sends. Each test runs its own uvloop loop and so
its own connection pool.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
import time

import grpc
import pytest
import uvloop

from agproxy.http.messages import Headers
from agproxy.upstream.grpc import GrpcClient, GrpcError, Status
from agproxy.upstream.pool import get_pool
from agproxy.upstream.remote import Failed, RemoteDependency, RemoteSettings
from tests.integration.test_h2_helpers import H2TestServer
from tests.support.grpc_peers import (CHECK, CheckRequest, CheckResponse, GrpcPeerProcess, RawPeer,
                                      authorization_peer, deny)
from tests.support.ports import free_port


def run(coro):
    return uvloop.run(coro)


async def in_thread(fn, *args):
    """A blocking wait on the test's side, off the loop (the client must keep running)."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def check_request(path: str = "/agents/x") -> CheckRequest:
    req = CheckRequest()
    http = req.attributes.request.http
    http.method = "POST"
    http.path = path
    http.host = "gw.example.com"
    http.headers["x-tenant"] = "t1"
    return req


def check_method(address: str, **kw):
    return GrpcClient(address, **kw).unary(CHECK, CheckResponse)


async def call_error(method, req=None, **kw) -> GrpcError:
    with pytest.raises(GrpcError) as info:
        await method(req or check_request(), **kw)
    return info.value


@pytest.fixture
def authz():
    peer, servicer = authorization_peer()
    peer.start()
    yield peer, servicer
    servicer.release()
    peer.stop(0)


# -- answers --------------------------------------------------------------------------------

def test_ok_call_carries_request_metadata_and_deadline(authz):
    peer, servicer = authz
    servicer.handler = lambda req, ctx: CheckResponse(
        status={"code": 0}, ok_response={"headers": [{"header": {"key": "x-user", "value": "alice"}}]})

    async def main():
        check = check_method(peer.address)
        return await check(check_request(), timeout=1.5,
                           metadata=[("x-request-id", "r-1"), ("trace-bin", b"\x00\xff\x10")])
    resp = run(main())
    assert resp.status.code == 0
    assert [(h.header.key, h.header.value) for h in resp.ok_response.headers] == [("x-user", "alice")]
    (call,) = servicer.calls
    assert call.request == check_request()                       # the message arrived intact
    md = dict(call.metadata)
    assert md["x-request-id"] == "r-1"
    assert md["trace-bin"] == b"\x00\xff\x10"                    # -bin: base64 on the wire, bytes again
    assert md["user-agent"].startswith("agproxy-grpc")
    assert 0 < call.time_remaining <= 1.5                        # grpc-timeout reached the server


def test_permission_denied_status(authz):
    peer, servicer = authz
    servicer.handler = lambda req, ctx: ctx.abort(grpc.StatusCode.PERMISSION_DENIED, "tenant t1 is not allowed")

    async def main():
        return await call_error(check_method(peer.address), timeout=2)
    err = run(main())
    assert err.code is Status.PERMISSION_DENIED and err.failure == "error"
    assert err.message == "tenant t1 is not allowed"
    assert err.trailers.get("grpc-status") == "7"


def test_unavailable_status_with_percent_encoded_message(authz):
    peer, servicer = authz
    message = "überlastet: 100% busy, retry in 2s \u2014 ok?"
    servicer.handler = lambda req, ctx: ctx.abort(grpc.StatusCode.UNAVAILABLE, message)

    async def main():
        return await call_error(check_method(peer.address), timeout=2)
    err = run(main())
    assert err.code is Status.UNAVAILABLE and err.failure == "error"   # the server said so: not unreachable
    assert err.message == message
    assert "%" in err.trailers.get("grpc-message")                     # it was percent-encoded on the wire


def test_denied_answer_is_a_response_not_an_error(authz):
    peer, servicer = authz
    servicer.handler = deny

    async def main():
        return await check_method(peer.address)(check_request(), timeout=2)
    assert run(main()).status.code == 7


def test_tls_target_verified_against_its_ca(certs, tmp_path):
    from tests.support.certs import make_certs
    other = make_certs(tmp_path / "other")             # a CA that did not sign the server's cert
    peer, servicer = authorization_peer(tls=certs)
    with peer:
        async def main():
            ok = await check_method(peer.address, tls=True, ca_file=certs["ca"])(check_request(), timeout=5)
            bad = await call_error(check_method(peer.address, tls=True, ca_file=other["ca"]), timeout=5)
            return ok, bad
        ok, bad = run(main())
    assert ok.status.code == 0 and len(servicer.calls) == 1
    assert bad.code is Status.UNAVAILABLE and bad.failure == "unreachable"
    assert "certificate" in bad.message.lower()


# -- deadlines --------------------------------------------------------------------------------

def test_deadline_exceeded_while_the_server_works_and_the_connection_survives(authz):
    peer, servicer = authz
    servicer.hold()

    async def main():
        check = check_method(peer.address)
        start = time.monotonic()
        err = await call_error(check, check_request("/slow"), timeout=0.3)
        elapsed = time.monotonic() - start
        await in_thread(servicer.wait_for, lambda: servicer.calls and servicer.calls[-1].ended)
        servicer.release()
        ok = await check(check_request("/after"), timeout=2)
        return err, elapsed, ok, get_pool().connections_opened
    err, elapsed, ok, opened = run(main())
    assert err.code is Status.DEADLINE_EXCEEDED and err.failure == "timeout"
    assert 0.29 <= elapsed < 1.5
    slow = servicer.calls[0]
    assert slow.request.attributes.request.http.path == "/slow"
    assert slow.time_remaining <= 0.3
    assert slow.ended_before_answer                  # the server saw the call end before it answered
    assert ok.status.code == 0 and opened == 1       # same connection afterwards (only the stream was reset)


def test_silent_peer_times_out_within_the_deadline_not_the_connect_timeout():
    with RawPeer(None) as silent:                     # accepts, never speaks HTTP/2
        async def main():
            check = check_method(silent.address, connect_timeout=5.0)
            start = time.monotonic()
            err = await call_error(check, timeout=0.25)
            return err, time.monotonic() - start
        err, elapsed = run(main())
    assert err.code is Status.DEADLINE_EXCEEDED and err.failure == "timeout"
    assert elapsed < 1.5
    assert silent.received.startswith(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")


def test_a_caller_giving_up_does_not_fail_others_waiting_on_the_same_connect():
    """Two calls wait for one HTTP/2 connect to a peer that never answers; the one
    with the shorter deadline gives up. The other must end on its own deadline, as a
    DEADLINE_EXCEEDED, not with the first one's cancellation."""
    with RawPeer(None) as silent:
        async def main():
            check = check_method(silent.address, connect_timeout=5.0)
            short = asyncio.ensure_future(call_error(check, timeout=0.1))
            start = time.monotonic()
            long = await asyncio.gather(call_error(check, timeout=0.6), return_exceptions=True)
            return await short, long[0], time.monotonic() - start
        short, long, elapsed = run(main())
    assert short.code is Status.DEADLINE_EXCEEDED
    assert isinstance(long, GrpcError), long
    assert long.code is Status.DEADLINE_EXCEEDED and elapsed >= 0.6
    assert silent.connections == 1


# -- the server is not there, dies, comes back ------------------------------------------------

def test_server_down_is_unavailable():
    address = f"127.0.0.1:{free_port()}"               # nobody listens

    async def main():
        start = time.monotonic()
        err = await call_error(check_method(address), timeout=2)
        return err, time.monotonic() - start
    err, elapsed = run(main())
    assert err.code is Status.UNAVAILABLE and err.failure == "unreachable"
    assert elapsed < 1.0                                 # refused at once, not a timeout


def test_server_dies_mid_call_then_comes_back():
    port = free_port()
    peer = GrpcPeerProcess(port).start()
    try:
        async def main():
            check = check_method(peer.address)
            assert (await check(check_request(), timeout=5)).status.code == 0
            hanging = asyncio.ensure_future(call_error(check, check_request("/hang"), timeout=10))
            await in_thread(peer.wait_line, "hang")
            peer.kill()                                  # SIGKILL: no GOAWAY, no trailers
            died = await hanging
            down = await call_error(check, timeout=2)
            await in_thread(peer.start)                  # the same port again
            back = await check(check_request(), timeout=5)
            return died, down, back
        died, down, back = run(main())
    finally:
        peer.stop()
    assert died.code is Status.UNAVAILABLE and died.failure == "unreachable"
    assert down.code is Status.UNAVAILABLE and down.failure == "unreachable"
    assert back.status.code == 0                         # the client recovered by itself


# -- garbage ------------------------------------------------------------------------------------

@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 11\r\nconnection: close\r\n\r\nBad Request",
    os.urandom(64) + b"\x00" * 64,
], ids=["http1", "raw-bytes"])
def test_peer_that_is_not_grpc(reply):
    with RawPeer(reply) as peer:
        async def main():
            return await call_error(check_method(peer.address), timeout=2)
        err = run(main())
    assert err.failure == "garbage", err
    assert err.code is Status.UNAVAILABLE


def _h2_server(answer):
    """agproxy's HTTP/2 server answering every stream with `answer(stream)`."""
    async def route(server, stream):
        await stream.body.read_all(1 << 20)
        await answer(stream)
    return H2TestServer(handler=route)


def _grpc_frame(payload: bytes, flag: int = 0) -> bytes:
    return struct.pack(">BI", flag, len(payload)) + payload


async def _answer(stream, status=200, ctype="application/grpc", body=b"", trailers=(("grpc-status", "0"),)):
    stream.send_head(status, Headers([("content-type", ctype)]))
    if body:
        await stream.send_data(body)
    await stream.end(Headers(list(trailers)) if trailers is not None else None)


OK_MESSAGE = CheckResponse(status={"code": 0}).SerializeToString() or b""


@pytest.mark.parametrize("case, answer, code, failure", [
    ("json", lambda s: _answer(s, ctype="application/json", body=b'{"ok":true}', trailers=None),
     Status.UNKNOWN, "garbage"),
    ("http-404", lambda s: _answer(s, status=404, ctype="text/plain", body=b"nope", trailers=None),
     Status.UNIMPLEMENTED, "garbage"),
    ("http-503", lambda s: _answer(s, status=503, ctype="text/plain", trailers=None),
     Status.UNAVAILABLE, "unreachable"),                 # a proxy in front says the service is not there
    ("http-429", lambda s: _answer(s, status=429, ctype="text/plain", trailers=None),
     Status.UNAVAILABLE, "error"),                       # ... or that it refuses us
    ("no-status", lambda s: _answer(s, body=_grpc_frame(OK_MESSAGE), trailers=None), Status.INTERNAL, "garbage"),
    ("bad-status", lambda s: _answer(s, trailers=(("grpc-status", "ok"),)), Status.UNKNOWN, "garbage"),
    ("odd-digit", lambda s: _answer(s, trailers=(("grpc-status", "\u00b2"),)), Status.UNKNOWN, "garbage"),
    ("no-message", lambda s: _answer(s), Status.INTERNAL, "garbage"),
    ("compressed", lambda s: _answer(s, body=_grpc_frame(b"\x1f\x8b", flag=1)), Status.INTERNAL, "garbage"),
    ("truncated", lambda s: _answer(s, body=_grpc_frame(b"\x0a\x02\x08\x00")[:-2]), Status.INTERNAL, "garbage"),
    ("two-messages", lambda s: _answer(s, body=_grpc_frame(b"") * 2), Status.INTERNAL, "garbage"),
    ("not-protobuf", lambda s: _answer(s, body=_grpc_frame(b"\xff\xff\xff\xff")), Status.INTERNAL, "garbage"),
])
def test_http2_answers_that_are_not_valid_grpc(case, answer, code, failure):
    with _h2_server(answer) as server:
        async def main():
            return await call_error(check_method(f"127.0.0.1:{server.port}"), timeout=2)
        err = run(main())
    assert err.failure == failure, err
    assert err.code is code, err


def test_trailers_only_error_and_empty_ok_message():
    """The status in the head with END_STREAM (trailers-only) is an error like any
    other; an OK with an empty (zero-length) message is a default response."""
    async def answer(stream):
        if stream.request.headers.get("x-case") == "trailers-only":
            stream.send_head(200, Headers([("content-type", "application/grpc"), ("grpc-status", "16"),
                                           ("grpc-message", "token%20expired")]))
            await stream.end()
        else:
            await _answer(stream, body=_grpc_frame(b""))
    with _h2_server(answer) as server:
        async def main():
            check = check_method(f"127.0.0.1:{server.port}")
            err = await call_error(check, timeout=2, metadata=[("x-case", "trailers-only")])
            ok = await check(check_request(), timeout=2)
            return err, ok
        err, ok = run(main())
    assert err.code is Status.UNAUTHENTICATED and err.failure == "error" and err.message == "token expired"
    assert ok == CheckResponse()


def test_request_bytes_on_the_wire():
    """What the server receives: POST to the method path, gRPC head, one framed message."""
    seen = {}

    async def answer(stream):
        seen["head"] = stream.request
        await _answer(stream, body=_grpc_frame(OK_MESSAGE))

    async def route(server, stream):
        seen["body"] = await stream.body.read_all(1 << 20)
        await answer(stream)
    with H2TestServer(handler=route) as server:
        async def main():
            check = check_method(f"127.0.0.1:{server.port}")
            return await check(check_request(), timeout=0.25, metadata=[("x-b-bin", b"\xfb")])
        run(main())
    head = seen["head"]
    payload = check_request().SerializeToString()
    assert seen["body"] == b"\x00" + struct.pack(">I", len(payload)) + payload
    assert head.method == "POST" and head.target == CHECK and head.scheme == "http"
    assert head.authority == f"127.0.0.1:{server.port}"
    h = head.headers
    assert h.get("content-type") == "application/grpc" and h.get("te") == "trailers"
    assert h.get("grpc-timeout") == "250m"
    assert h.get("x-b-bin") == base64.b64encode(b"\xfb").decode().rstrip("=")


# -- through the remote-call helper -------------------------------------------------------------

def test_remote_dependency_over_grpc_outcomes(authz):
    peer, servicer = authz
    closed = RemoteDependency("test_grpc_closed", RemoteSettings(0.3, "closed"), target=peer.address)
    opened = RemoteDependency("test_grpc_open", RemoteSettings(0.3, "open"), target="127.0.0.1:1")

    async def main():
        check = check_method(peer.address)
        ok = await closed.call(check(check_request(), timeout=closed.timeout, local_deadline=False))
        servicer.hold()
        late = await closed.call(check(check_request("/slow"), timeout=closed.timeout, local_deadline=False))
        await in_thread(servicer.wait_for, lambda: len(servicer.calls) == 2 and servicer.calls[1].ended)
        servicer.release()
        down = await opened.call(check_method("127.0.0.1:1")(check_request(), timeout=opened.timeout,
                                                              local_deadline=False))
        return ok, late, down
    ok, late, down = run(main())
    assert isinstance(ok, CheckResponse) and ok.status.code == 0
    assert isinstance(late, Failed) and late.failure == "timeout" and not late.allowed
    assert isinstance(down, Failed) and down.failure == "unreachable" and down.allowed
    assert servicer.calls[1].ended_before_answer      # the deadline reset the stream: the server saw it
