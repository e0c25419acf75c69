"""The exchange's contracts through the real pipeline, over 127.0.0.1 sockets.

Policies and backends written here for the test plug into routes built by the real
loader (tests/support/inproc.py): body hooks rewriting SSE events that arrive one
byte at a time, an observe-only hook on a 10 MB body, content coding on hook
routes, the request body buffered only after authentication, completion hooks,
and a backend that tries several upstreams before the exchange commits.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import socket
import struct

import h2.config
import h2.connection
import h2.events
import pytest

from agproxy.backends.relay import relay, upstream_request_headers
from agproxy.http.sse import format_event, parse
from agproxy.proxy.body import SseHook
from agproxy.proxy.contract import Backend, BodyHook, Filter, LocalReply
from agproxy.upstream.errors import UpstreamError
from agproxy.upstream.origin import Origin
from tests.support.idp import IdP
from tests.support.inproc import InProcessGateway, Progress, ScriptedUpstream, h1_request, h2_request
from tests.support.ports import free_port

ROUTE = '''
[[route]]
name = "up"
match = { path_prefix = "/" }
backend = "up"
timeout = "5s"
{extra}

[backend.up]
type = "http"
url = "{upstream}"
'''


def run(coro):
    return asyncio.run(coro)


async def started(tmp_path, upstream_script, extra: str = "", add_filters=None, backend=None):
    up = await ScriptedUpstream(upstream_script).start()
    gw = InProcessGateway(ROUTE, tmp_path, upstream=up.url, extra=extra)
    if add_filters or backend is not None:
        gw.replace_route("up", add_filters=add_filters, backend=backend)
    await gw.start()
    return up, gw


def head(status: int, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} X"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# -- a transforming SSE hook, one byte at a time -------------------------------------------

SSE_IN = (
    b": ping\n\n"
    b'event: message\ndata: {"jsonrpc":"2.0","id":1,"result":{"tools":'
    b'[{"name":"read_file"},{"name":"delete_file"}]}}\n\n'
    b"data: drop me\n\n"
    b"data: line one\rdata: line two\r\r"
    b"id: 9\ndata: last\n\n"
)
SSE_OUT = (
    b": ping\n\n"
    b'event: message\ndata: {"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"read_file"}]}}\n\n'
    b"data: LINE ONE\ndata: LINE TWO\n\n"
    b"id: 9\ndata: LAST\n\n"
)


def rewrite_event(raw: bytes) -> bytes:
    """What an MCP filter does to tools/list inside SSE: keep only allowed tools."""
    ev = parse(raw)
    if ev is None:
        return raw                     # comments pass byte for byte
    if ev.data == "drop me":
        return b""
    if ev.data.startswith("{"):
        doc = json.loads(ev.data)
        doc["result"]["tools"] = [t for t in doc["result"]["tools"] if t["name"].startswith("read_")]
        ev.data = json.dumps(doc, separators=(",", ":"))
    else:
        ev.data = ev.data.upper()
    return format_event(ev)


class SseRewrite(Filter):
    name = "test_sse_rewrite"
    reads_response_body = True

    def __init__(self):
        self.fed = Progress()
        self.chunk_sizes: list[int] = []

    def on_response(self, ex, resp):
        if resp.headers.get("content-type") != "text/event-stream":
            return None
        f = self

        class Counting(SseHook):
            def feed(self, chunk):
                f.chunk_sizes.append(len(chunk))
                out = super().feed(chunk)
                f.fed.advance(len(chunk))
                return out

        return Counting(rewrite_event)


def one_byte_at_a_time(policy: SseRewrite):
    async def script(req, writer):
        writer.write(head(200, [("content-type", "text/event-stream"),
                                ("content-length", str(len(SSE_IN)))]))
        for i in range(len(SSE_IN)):
            writer.write(SSE_IN[i:i + 1])
            await writer.drain()
            await policy.fed.wait(i + 1)   # the gateway has read this byte before the next
    return script


@pytest.mark.parametrize("protocol", ["h1", "h2"])
def test_sse_hook_rewrites_events_arriving_one_byte_at_a_time(tmp_path, protocol):
    async def main():
        policy = SseRewrite()
        up, gw = await started(tmp_path, one_byte_at_a_time(policy), add_filters=[policy])
        try:
            hdrs = [("accept-encoding", "gzip, br")]
            if protocol == "h1":
                r = await h1_request(gw.port, "GET", "/events", hdrs)
                assert r.complete
                # content-length dropped: re-framed as chunked
                assert r.header("content-length") is None and r.header("transfer-encoding") == "chunked"
            else:
                r = await h2_request(gw.port, "GET", "/events", hdrs)
                assert not r.reset and r.header("content-length") is None
            assert r.status == 200 and r.header("content-type") == "text/event-stream"
            assert r.body == SSE_OUT
            assert policy.chunk_sizes == [1] * len(SSE_IN)
            # a route whose filters read bodies asks upstream for identity coding
            assert up.requests[0].header("accept-encoding") == "identity"
        finally:
            await gw.close()
            await up.close()
    run(main())


# -- an observe-only hook on 10 MB -------------------------------------------------------------

BIG = bytes(range(256)) * (10 * 1024 * 1024 // 256)


class Observe(Filter):
    name = "test_observe"
    reads_response_body = True

    def __init__(self):
        self.total = 0
        self.digest = hashlib.sha256()
        self.ended = 0

    def on_response(self, ex, resp):
        policy = self

        class Watch(BodyHook):
            transforms = False

            def feed(self, chunk):
                policy.total += len(chunk)
                policy.digest.update(chunk)

            def end(self):
                policy.ended += 1

        return Watch()


async def send_big(req, writer):
    writer.write(head(200, [("content-type", "application/octet-stream"), ("content-length", str(len(BIG)))]))
    view = memoryview(BIG)
    for i in range(0, len(BIG), 256 * 1024):
        writer.write(view[i:i + 256 * 1024])
        await writer.drain()


@pytest.mark.parametrize("protocol", ["h1", "h2"])
def test_observe_only_hook_on_10_mb_keeps_length_and_bytes(tmp_path, protocol):
    async def main():
        policy = Observe()
        up, gw = await started(tmp_path, send_big, add_filters=[policy])
        try:
            if protocol == "h1":
                r = await h1_request(gw.port, "GET", "/big", timeout=60)
                assert r.complete and r.header("transfer-encoding") is None
            else:
                r = await h2_request(gw.port, "GET", "/big", timeout=60)
                assert not r.reset
            assert r.status == 200
            assert r.header("content-length") == str(len(BIG))      # nothing could change
            assert hashlib.sha256(r.body).digest() == hashlib.sha256(BIG).digest()
            assert policy.total == len(BIG) and policy.digest.digest() == hashlib.sha256(BIG).digest()
            assert policy.ended == 1
        finally:
            await gw.close()
            await up.close()
    run(main())


# -- content coding on hook routes -------------------------------------------------------------

def test_encoded_response_to_a_body_hook_is_refused(tmp_path):
    packed = gzip.compress(b"data: secret\n\n")

    async def ignores_identity(req, writer):
        writer.write(head(200, [("content-type", "text/event-stream"), ("content-encoding", "gzip"),
                                ("content-length", str(len(packed)))]) + packed)

    async def main():
        up, gw = await started(tmp_path, ignores_identity, add_filters=[SseRewrite()])
        try:
            r = await h1_request(gw.port, "GET", "/events", [("accept-encoding", "gzip")])
            assert r.status == 502 and json.loads(r.body)["error"] == "upstream_encoding"
            assert up.requests[0].header("accept-encoding") == "identity"
        finally:
            await gw.close()
            await up.close()
    run(main())


def test_encoded_response_without_hooks_passes_untouched(tmp_path):
    packed = gzip.compress(b"hello " * 100)

    async def gzipped(req, writer):
        writer.write(head(200, [("content-type", "text/plain"), ("content-encoding", "gzip"),
                                ("content-length", str(len(packed)))]) + packed)

    async def main():
        up, gw = await started(tmp_path, gzipped)
        try:
            r = await h1_request(gw.port, "GET", "/plain", [("accept-encoding", "gzip")])
            assert r.status == 200 and r.header("content-encoding") == "gzip" and r.body == packed
            assert up.requests[0].header("accept-encoding") == "gzip"   # the client's choice
        finally:
            await gw.close()
            await up.close()
    run(main())


# -- the request body is buffered after authentication -----------------------------------------

class NeedsBody(Filter):
    name = "test_needs_body"
    body_limit = 1024

    def __init__(self):
        self.seen: list[bytes] = []

    def on_request(self, ex):
        self.seen.append(ex.body)
        return None


async def echo_length(req, writer):
    body = f"got {len(req.body)}".encode()
    writer.write(head(200, [("content-length", str(len(body)))]) + body)


def test_request_body_is_buffered_only_after_authentication(tmp_path):
    with IdP() as idp:
        jwt = f'''
[route.jwt]
issuer = "{idp.issuer}"
audiences = ["agents"]
jwks = {{ inline = '{idp.jwks_json()}' }}
'''

        async def main():
            policy = NeedsBody()
            up, gw = await started(tmp_path, echo_length, extra=jwt, add_filters=[policy])
            try:
                # No token: 401, whatever the body; the gateway never waits for it.
                r = await h1_request(gw.port, "POST", "/x", body=b"a" * 4096)
                assert r.status == 401
                r = await h1_request(gw.port, "POST", "/x", [("content-length", "100000")], b"x",
                                     send_body=False)
                assert r.status == 401
                assert policy.seen == []
                token = [("authorization", "Bearer " + idp.mint())]
                r = await h1_request(gw.port, "POST", "/x", token, b"b" * 100)
                assert r.status == 200 and r.body == b"got 100"
                assert policy.seen == [b"b" * 100] and up.requests[-1].body == b"b" * 100
                # Authenticated, over the filter's limit: 413, declared or sent.
                r = await h1_request(gw.port, "POST", "/x", token, b"c" * 4096)
                assert r.status == 413 and json.loads(r.body)["error"] == "payload_too_large"
                r = await h1_request(gw.port, "POST", "/x", token + [("transfer-encoding", "chunked")],
                                     b"800\r\n" + b"d" * 2048 + b"\r\n0\r\n\r\n")
                assert r.status == 413
                assert len(policy.seen) == 1 and len(up.requests) == 1
            finally:
                await gw.close()
                await up.close()
        run(main())


# -- completion hooks ---------------------------------------------------------------------------

class Done(Filter):
    """Registers a completion hook; records what the exchange looked like then."""

    name = "test_done"

    def __init__(self, gw_ref: list):
        self.calls: list[dict] = []
        self.gw_ref = gw_ref

    def on_request(self, ex):
        ex.on_done(self.done)
        return None

    def done(self, ex):
        metrics = self.gw_ref[0].metrics.expose().decode()
        counted = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                      if line.startswith("agproxy_requests_total{"))
        self.calls.append({"status": ex.status, "bytes_out": ex.bytes_out, "error": ex.error,
                           "counted_before": counted})
        ex.log("test_done", len(self.calls))


class Deny(Filter):
    name = "test_deny"

    def on_request(self, ex):
        if ex.request.path == "/deny":
            return LocalReply.error(403, "forbidden", "denied by the test policy")
        return None


async def done_script(req, writer):
    if req.target == "/broken":
        writer.write(head(200, [("content-length", "100")]) + b"0123456789")
        await writer.drain()
        writer.close()
        return
    writer.write(head(200, [("content-length", "5")]) + b"hello")


def test_completion_hooks_run_once_before_accounting(tmp_path):
    async def main():
        ref: list = []
        policy = Done(ref)
        up, gw = await started(tmp_path, done_script, add_filters=[policy, Deny()])
        ref.append(gw)
        try:
            r = await h1_request(gw.port, "GET", "/ok")
            assert r.status == 200 and r.body == b"hello"
            r = await h1_request(gw.port, "GET", "/broken")
            assert r.status == 200 and not r.complete            # cut, never looks complete
            r = await h1_request(gw.port, "GET", "/deny")
            assert r.status == 403
            assert [(c["status"], c["bytes_out"]) for c in policy.calls] == \
                [(200, 5), (200, 10), (403, len(r.body))]
            assert policy.calls[0]["error"] is None and "mid-body" in policy.calls[1]["error"]
            # each ran before its own exchange was counted
            assert [c["counted_before"] for c in policy.calls] == [0, 1, 2]
            recs = gw.access_records()
            assert [(r["path"], r.get("test_done")) for r in recs] == [("/ok", 1), ("/broken", 2), ("/deny", 3)]
        finally:
            await gw.close()
            await up.close()
    run(main())


# -- a backend that tries again before committing ----------------------------------------------

class Failover(Backend):
    """Tries each upstream in turn: a failure or a 5xx moves on, the last answer is sent."""

    kind = "test_failover"

    def __init__(self, urls: list[str]):
        self.name = "failover"
        self.origins = [Origin.from_url(u, connect_timeout=2.0) for u in urls]
        self.seen: list = []

    async def respond(self, ex):
        ex.on_done(lambda ex: self.seen.append(ex.attempts))
        for i, o in enumerate(self.origins):
            last = i == len(self.origins) - 1
            headers = upstream_request_headers(ex, o.authority)
            try:
                resp = await relay(ex, o, ex.request.method, ex.request.target, headers, None, 5.0, None,
                                   self.name, f"p{i}")
            except UpstreamError:
                if last:
                    raise
                continue
            if resp.status >= 500 and not last:
                resp.discard()
                continue
            return resp


def test_backend_retries_elsewhere_before_anything_is_sent(tmp_path):
    async def unavailable(req, writer):
        writer.write(head(503, [("content-length", "4"), ("x-from", "bad")]) + b"busy")

    async def main():
        bad = await ScriptedUpstream(unavailable).start()
        good = await ScriptedUpstream(echo_length).start()
        dead = f"http://127.0.0.1:{free_port()}"
        backend = Failover([dead, bad.url, good.url])
        gw = InProcessGateway(ROUTE, tmp_path, upstream=good.url, extra="")
        gw.replace_route("up", backend=backend)
        await gw.start()
        try:
            r = await h1_request(gw.port, "GET", "/try")
            assert r.status == 200 and r.body == b"got 0" and r.header("x-from") is None
            (attempts,) = backend.seen
            assert [(a.provider, a.status) for a in attempts] == [("p0", 0), ("p1", 503), ("p2", 200)]
            assert attempts[0].error and attempts[0].upstream == dead.split("//")[1]
            assert all(a.backend == "failover" and a.seconds >= 0 for a in attempts)
            (rec,) = gw.access_records()
            assert rec["upstream"] == f"127.0.0.1:{good.port}" and rec["status"] == 200
            assert 'agproxy_upstream_request_duration_seconds_count{backend="failover"} 3.0' in \
                gw.metrics.expose().decode()
            # every upstream failing: the exchange answers 502, in its one place
            backend.origins = backend.origins[:1]
            r = await h1_request(gw.port, "GET", "/try")
            assert r.status == 502 and json.loads(r.body)["error"] == "upstream_unavailable"
        finally:
            await gw.close()
            await bad.close()
            await good.close()
    run(main())


# -- a client that leaves mid-stream -----------------------------------------------------------

async def endless_sse(req, writer):
    # The head and one event; the stream stays open (an agent or LLM still generating).
    writer.write(head(200, [("content-type", "text/event-stream"), ("transfer-encoding", "chunked")]))
    event = b"data: thinking\n\n"
    writer.write(b"%x\r\n%b\r\n" % (len(event), event))
    await writer.drain()


async def h1_leave_after_first_event(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /stream HTTP/1.1\r\nhost: gw.test\r\n\r\n")
    got = b""
    while b"data: thinking" not in got:
        data = await asyncio.wait_for(reader.read(65536), 5)
        assert data, got
        got += data
    # Gone, not half-closed: a FIN alone still lets the gateway answer (RFC 9112 §9.6),
    # a reset says nobody reads.
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


async def h2_reset_after_first_event(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "GET"), (":path", "/stream"), (":scheme", "http"),
                          (":authority", "gw.test")], end_stream=True)
    writer.write(conn.data_to_send())
    while True:
        data = await asyncio.wait_for(reader.read(65536), 5)
        assert data
        if any(isinstance(ev, h2.events.DataReceived) for ev in conn.receive_data(data)):
            break
    conn.reset_stream(1)                 # the connection itself stays open
    writer.write(conn.data_to_send())
    return writer


@pytest.mark.parametrize("protocol", ["h1", "h2"])
def test_client_leaving_mid_stream_closes_the_upstream_call(tmp_path, protocol):
    """The upstream call is given up with the client: an abandoned stream must not keep an
    upstream connection (and the generation behind it) open until it ends by itself."""
    async def main():
        up, gw = await started(tmp_path, endless_sse)
        try:
            if protocol == "h1":
                await h1_leave_after_first_event(gw.port)
            else:
                client = await h2_reset_after_first_event(gw.port)
            await up.closed.wait(1, timeout=5)
            if protocol == "h2":
                client.close()
            (rec,) = gw.access_records()
            assert rec["status"] == 200 and rec["error"] == "client went away"
        finally:
            await gw.close()
            await up.close()
    run(main())
