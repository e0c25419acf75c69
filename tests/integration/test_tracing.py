"""Tracing end to end: client → the agproxy binary → a real upstream, spans to a real OTLP/HTTP receiver.

What a user sees: the spans a collector receives (names, kinds, parent/child links,
attributes, the resource from OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES), the
`traceparent` the upstream receives, the trace id in the access log, `target_info` on
/metrics, and that a collector that is down or slow changes nothing for clients.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time

import httpx
import pytest

from tests.support.otlp import OtlpReceiver

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50"}


def config(upstream_url: str, endpoint: str, sampling: float | None = 1.0, extra_route: str = "") -> str:
    tracing = f'otlp_endpoint = "{endpoint}"' + (f", sampling = {sampling}" if sampling is not None else "")
    return f'''
[telemetry]
tracing = {{ {tracing} }}

[[route]]
name = "echo"
match = {{ path_prefix = "/api" }}
backend = "echo"
{extra_route}

[backend.echo]
type = "http"
url = "{upstream_url}"
'''


@pytest.fixture
def receiver():
    r = OtlpReceiver().start()
    yield r
    r.stop()
    assert r.errors == []


def servers(spans) -> list:
    return [s for s in spans if s.kind == "SPAN_KIND_SERVER"]


def clients(spans) -> list:
    return [s for s in spans if s.kind == "SPAN_KIND_CLIENT"]


def one_request(receiver, n: int = 2):
    """The server span and its CLIENT spans, once `n` spans arrived."""
    spans = receiver.wait_for(lambda spans: len(spans) >= n)
    (server,) = servers(spans)
    return server, clients(spans)


def upstream_traceparent(upstream_echo, index: int = -1) -> str:
    return dict(upstream_echo.seen[index]["headers"])["traceparent"]


def test_server_span_continues_the_client_trace_and_the_upstream_sees_it(start_gateway, upstream_echo, receiver):
    gw = start_gateway(config(upstream_echo.url, receiver.url), env={
        **FAST_EXPORT, "OTEL_SERVICE_NAME": "edge-gw",
        "OTEL_RESOURCE_ATTRIBUTES": "service.name=loses, deployment.environment=blue%20green ,team=a%2Cb%3Dc"})
    r = httpx.get(gw.url("/api/items?secret=1"), headers={
        "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", "tracestate": "vendor=abc",
        "user-agent": "trace-test/1"})
    assert r.status_code == 200
    span, (backend,) = one_request(receiver)
    assert span.name == "GET /api/*" and span.kind == "SPAN_KIND_SERVER" and span.scope == "agproxy"
    assert span.trace_id == CLIENT_TRACE and span.parent_span_id == CLIENT_SPAN
    assert span.trace_state == "vendor=abc"
    assert span.status_code == "STATUS_CODE_UNSET"
    assert span.end_ns > span.start_ns
    attrs = span.attributes
    assert attrs["http.request.method"] == "GET"
    assert attrs["url.path"] == "/api/items"            # never the query: it may hold secrets
    assert attrs["url.scheme"] == "http"
    assert attrs["http.route"] == "/api/*"
    assert attrs["agproxy.route"] == "echo"
    assert attrs["http.response.status_code"] == 200
    assert attrs["network.protocol.version"] == "1.1"
    assert attrs["client.address"] == "127.0.0.1"
    assert attrs["user_agent.original"] == "trace-test/1"
    assert "enduser.id" not in attrs
    # The resource: OTEL_SERVICE_NAME wins, values percent-decoded and trimmed.
    assert span.resource["service.name"] == "edge-gw"
    assert span.resource["deployment.environment"] == "blue green"
    assert span.resource["team"] == "a,b=c"
    assert span.resource["telemetry.sdk.language"] == "python"
    # The backend call is a CLIENT span under the server span; the upstream is called as
    # its child, same trace, tracestate kept.
    assert backend.name == "GET" and backend.trace_id == CLIENT_TRACE and backend.parent_span_id == span.span_id
    assert backend.start_ns >= span.start_ns and backend.end_ns <= span.end_ns
    assert backend.trace_state == "vendor=abc" and backend.status_code == "STATUS_CODE_UNSET"
    port = int(upstream_echo.url.rsplit(":", 1)[1])
    assert backend.attributes == {
        "http.request.method": "GET", "server.address": "127.0.0.1", "server.port": port,
        "url.full": f"{upstream_echo.url}/api/items", "agproxy.backend": "echo",
        "http.response.status_code": 200}
    assert upstream_traceparent(upstream_echo) == f"00-{CLIENT_TRACE}-{backend.span_id}-01"
    assert dict(upstream_echo.seen[-1]["headers"])["tracestate"] == "vendor=abc"
    # The access log line names the same trace and span.
    (line,) = gw.access_log(1)
    assert (line["trace_id"], line["span_id"], line["backend"]) == (CLIENT_TRACE, span.span_id, "echo")


def test_root_span_without_traceparent_and_target_info(start_gateway, upstream_echo, receiver):
    gw = start_gateway(config(upstream_echo.url, receiver.url), env={
        **FAST_EXPORT, "OTEL_RESOURCE_ATTRIBUTES": "k8s.pod.name=gw-0,1st.key=x"})
    assert httpx.post(gw.url("/api/x"), content=b"hi").status_code == 200
    span, (backend,) = one_request(receiver)
    assert span.parent_span_id == "" and re.fullmatch(r"[0-9a-f]{32}", span.trace_id)
    assert span.resource["service.name"] == "agproxy" and span.resource["k8s.pod.name"] == "gw-0"
    assert backend.resource == span.resource and backend.attributes["http.request.method"] == "POST"
    assert upstream_traceparent(upstream_echo) == f"00-{span.trace_id}-{backend.span_id}-01"
    from prometheus_client.parser import text_string_to_metric_families
    families = {f.name: f for f in text_string_to_metric_families(gw.metrics())}
    (sample,) = families["target_info"].samples   # an info metric: a gauge of 1 in the text format
    assert sample.name == "target_info" and sample.value == 1.0
    labels = sample.labels
    assert labels["service_name"] == "agproxy" and labels["k8s_pod_name"] == "gw-0"
    assert labels["key_1st_key"] == "x" and labels["telemetry_sdk_language"] == "python"
    assert set(labels) == {"key_1st_key", "k8s_pod_name", "service_name", "service_version",
                           "telemetry_sdk_language", "telemetry_sdk_name", "telemetry_sdk_version"}


@pytest.mark.parametrize("bad", [
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",    # uppercase hex
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",    # version ff
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",    # zero trace id
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",  # version 00 with more
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",       # short
])
def test_invalid_traceparent_starts_a_new_trace_and_drops_tracestate(start_gateway, upstream_echo, receiver, bad):
    gw = start_gateway(config(upstream_echo.url, receiver.url), env=FAST_EXPORT)
    r = httpx.get(gw.url("/api/x"), headers={"traceparent": bad, "tracestate": "vendor=abc"})
    assert r.status_code == 200
    span, (backend,) = one_request(receiver)
    assert span.trace_id != CLIENT_TRACE and span.parent_span_id == ""
    headers = dict(upstream_echo.seen[-1]["headers"])
    assert headers["traceparent"] == f"00-{span.trace_id}-{backend.span_id}-01"
    assert "tracestate" not in headers


def test_parent_based_sampling(start_gateway, upstream_echo, receiver):
    """sampling = 0: a root is not sampled and sends no trace context (it costs what it
    costs with tracing off), but a sampled parent is followed, and an unsampled parent's
    trace id still reaches the upstream (flag 00)."""
    gw = start_gateway(config(upstream_echo.url, receiver.url, sampling=0.0), env=FAST_EXPORT)
    assert httpx.get(gw.url("/api/root"), headers={"tracestate": "orphan=1"}).status_code == 200
    root_headers = dict(upstream_echo.seen[-1]["headers"])
    assert "traceparent" not in root_headers and "tracestate" not in root_headers
    unsampled = "1" * 32
    assert httpx.get(gw.url("/api/unsampled"),
                     headers={"traceparent": f"00-{unsampled}-{CLIENT_SPAN}-00"}).status_code == 200
    tp = upstream_traceparent(upstream_echo)
    assert tp.startswith(f"00-{unsampled}-") and tp.endswith("-00") and CLIENT_SPAN not in tp
    assert httpx.get(gw.url("/api/sampled"),
                     headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}).status_code == 200
    receiver.wait_for(lambda spans: len(spans) >= 2)
    # Spans leave in order, so the two unsampled requests would have arrived first.
    lines = gw.access_log(3)
    assert [s.attributes["url.path"] for s in servers(receiver.spans)] == ["/api/sampled"]
    assert len(receiver.spans) == 2
    assert "trace_id" not in lines[0]
    assert [l["trace_id"] for l in lines[1:]] == [unsampled, CLIENT_TRACE]


def test_a_root_trace_id_is_the_request_id(start_gateway, upstream_echo, receiver):
    gw = start_gateway(config(upstream_echo.url, receiver.url), env=FAST_EXPORT)
    assert httpx.get(gw.url("/api/x")).status_code == 200
    server, (backend,) = one_request(receiver)
    seen = dict(upstream_echo.seen[-1]["headers"])
    assert seen["x-request-id"] == server.trace_id == gw.access_log(1)[0]["request_id"]
    # A client's own request id is kept as the request id but never names the trace.
    assert httpx.get(gw.url("/api/y"), headers={"x-request-id": "ab" * 16}).status_code == 200
    spans = receiver.wait_for(lambda spans: len(spans) >= 4)
    (y,) = [s for s in servers(spans) if s.attributes["url.path"] == "/api/y"]
    assert y.trace_id != "ab" * 16 and dict(upstream_echo.seen[-1]["headers"])["x-request-id"] == "ab" * 16


@pytest.mark.parametrize("http2", [False, True], ids=["h1", "h2c"])
def test_sampling_decides_on_the_request_id_and_a_clients_context_is_followed(
        start_gateway, upstream_echo, receiver, http2):
    """sampling = 0.01, over each protocol's parser (the trace-context fields are noted
    there: http/messages.py NOTED_FIELDS). A root is sampled exactly when its request id's
    low 64 bits are below the ratio's bound (the SDKs' TraceIdRatioBased on the trace id,
    which is the request id); an unsampled root has no span, sends no trace context and
    logs no trace id, its request id still correlating the log and the upstream; a
    client's sampled `traceparent` is followed whatever the ratio, an unsampled one
    continued with flag 00; a `tracestate` without a `traceparent` is dropped."""
    gw = start_gateway(config(upstream_echo.url, receiver.url, sampling=0.01), env=FAST_EXPORT)
    bound = round(0.01 * (1 << 64))
    with httpx.Client(http2=http2, http1=not http2) as c:
        for i in range(300):
            assert c.get(gw.url(f"/api/root/{i}")).status_code == 200
        assert c.get(gw.url("/api/orphan"), headers={"tracestate": "orphan=1"}).status_code == 200
        assert c.get(gw.url("/api/theirs"), headers={"x-request-id": "client-id-7"}).status_code == 200
        unsampled = "1" * 32
        assert c.get(gw.url("/api/unsampled"),
                     headers={"traceparent": f"00-{unsampled}-{CLIENT_SPAN}-00"}).status_code == 200
        assert c.get(gw.url("/api/sampled"), headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
                                                      "tracestate": "k=v"}).status_code == 200
    # Spans leave in order: once the last request's are in, every sampled root's are.
    spans = receiver.wait_for(lambda spans: any(s.trace_id == CLIENT_TRACE for s in spans))
    lines = {l["path"]: l for l in gw.access_log(304)}
    seen = {r["path"]: dict(r["headers"]) for r in upstream_echo.seen}
    roots = [f"/api/root/{i}" for i in range(300)] + ["/api/orphan"]
    expected = {p for p in roots if int(lines[p]["request_id"][16:], 16) < bound}
    traced = {s.attributes["url.path"]: s for s in servers(spans)}
    # (/api/theirs: a root whose trace id is random, not its request id: sampled or not.)
    assert set(traced) - {"/api/theirs"} == expected | {"/api/sampled"}
    for path in roots:
        line, headers = lines[path], seen[path]
        assert headers["x-request-id"] == line["request_id"] and "tracestate" not in headers
        if path in expected:
            assert line["trace_id"] == traced[path].trace_id == line["request_id"]
            assert line["span_id"] == traced[path].span_id
            assert headers["traceparent"].startswith(f"00-{line['request_id']}-")
        else:
            assert "trace_id" not in line and "span_id" not in line and "traceparent" not in headers
    # A client's request id is the request id (the parser noted the field), never a trace id.
    assert lines["/api/theirs"]["request_id"] == seen["/api/theirs"]["x-request-id"] == "client-id-7"
    assert lines["/api/theirs"].get("trace_id") != "client-id-7"
    tp = seen["/api/unsampled"]["traceparent"]
    assert tp.startswith(f"00-{unsampled}-") and tp.endswith("-00") and lines["/api/unsampled"]["trace_id"] == unsampled
    server = traced["/api/sampled"]
    assert (server.trace_id, server.parent_span_id) == (CLIENT_TRACE, CLIENT_SPAN)
    (backend,) = [s for s in clients(spans) if s.parent_span_id == server.span_id]
    assert seen["/api/sampled"]["traceparent"] == f"00-{CLIENT_TRACE}-{backend.span_id}-01"
    assert seen["/api/sampled"]["tracestate"] == "k=v"


def test_http2_and_status_codes(start_gateway, upstream_echo, receiver):
    gw = start_gateway(config(upstream_echo.url, receiver.url) + '''
[[route]]
name = "demo"
match = { path = "/demo" }
backend = "demo"

[backend.demo]
type = "static"
status = 503
body = "down"
''', env=FAST_EXPORT)
    with httpx.Client(http2=True, http1=False) as c:
        assert c.get(gw.url("/api/x")).status_code == 200
        assert c.get(gw.url("/demo")).status_code == 503
        assert c.request("PROPFIND", gw.url("/nowhere")).status_code == 404
    spans = {s.attributes["url.path"]: s for s in servers(receiver.wait_for(lambda spans: len(spans) >= 4))}
    assert spans["/api/x"].attributes["network.protocol.version"] == "2"
    down = spans["/demo"]
    assert down.name == "GET /demo" and down.status_code == "STATUS_CODE_ERROR"
    assert down.attributes["error.type"] == "503"
    other = spans["/nowhere"]
    assert other.name == "HTTP" and other.status_code == "STATUS_CODE_UNSET"
    assert other.attributes["http.request.method"] == "_OTHER"
    assert other.attributes["http.request.method_original"] == "PROPFIND"
    assert "http.route" not in other.attributes and other.attributes["http.response.status_code"] == 404


def test_jwt_subject_is_the_end_user(start_gateway, upstream_echo, receiver, tmp_path):
    from tests.support.idp import IdP
    idp = IdP()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(idp.jwks_json())
    idp.close()
    gw = start_gateway(config(upstream_echo.url, receiver.url, extra_route=f'''
[route.jwt]
issuer = "{idp.issuer}"
audiences = ["agents"]
jwks = {{ file = "{jwks}" }}
'''), env=FAST_EXPORT)
    token = idp.mint(sub="alice")
    assert httpx.get(gw.url("/api/x"), headers={"authorization": f"Bearer {token}"}).status_code == 200
    assert httpx.get(gw.url("/api/x")).status_code == 401
    spans = servers(receiver.wait_for(lambda spans: len(spans) >= 3))
    assert spans[0].attributes["enduser.id"] == "alice"
    assert "enduser.id" not in spans[1].attributes
    assert spans[1].attributes["http.response.status_code"] == 401


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def metric_value(gw, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    total = 0.0
    for fam in text_string_to_metric_families(gw.metrics()):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def wait_metric(gw, name: str, minimum: float, timeout: float = 15.0, **labels) -> float:
    deadline = time.monotonic() + timeout
    while True:
        v = metric_value(gw, name, **labels)
        if v >= minimum or time.monotonic() > deadline:
            return v
        time.sleep(0.05)   # polling a condition with a deadline


def test_collector_down_changes_nothing_for_clients_and_is_logged_once(start_gateway, upstream_echo):
    # One export per second, each given up after 1 s: the 30 spans fail in a few batches.
    gw = start_gateway(config(upstream_echo.url, f"http://127.0.0.1:{closed_port()}"),
                       env={"OTEL_BSP_SCHEDULE_DELAY": "1000", "OTEL_EXPORTER_OTLP_TIMEOUT": "1"})
    with httpx.Client() as c:
        for i in range(30):
            started = time.monotonic()
            r = c.get(gw.url(f"/api/{i}"))
            assert r.status_code == 200 and time.monotonic() - started < 2.0
    assert wait_metric(gw, "agproxy_tracing_spans_dropped_total", 60, timeout=30, reason="export_failed") == 60
    assert metric_value(gw, "agproxy_tracing_spans_exported_total") == 0
    failures = [l for l in gw.logs().splitlines() if "exporting spans" in l]
    assert len(failures) == 1, failures
    assert "Connection refused" in failures[0] or "onnection" in failures[0]


def test_slow_collector_fills_the_bounded_queue_and_drops_are_counted(start_gateway, upstream_echo):
    slow = OtlpReceiver(delay=3.0).start()
    try:
        gw = start_gateway(config(upstream_echo.url, slow.url), env={
            "OTEL_BSP_SCHEDULE_DELAY": "10", "OTEL_BSP_MAX_QUEUE_SIZE": "4", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "2"})
        with httpx.Client() as c:
            assert c.get(gw.url("/api/first")).status_code == 200
            slow.wait_requests(1)                 # the export thread is now stuck on the slow collector
            started = time.monotonic()
            for i in range(20):
                assert c.get(gw.url(f"/api/{i}")).status_code == 200
            assert time.monotonic() - started < 3.0   # no request waited for the collector
        assert wait_metric(gw, "agproxy_tracing_spans_dropped_total", 36, reason="queue_full") == 36
        gw.stop()
        assert slow.errors == []
    finally:
        slow.stop()


def test_each_worker_process_exports_its_own_spans(start_gateway, upstream_echo, receiver):
    """workers = 2: the exporter thread starts in each forked worker (none in the supervisor)."""
    gw = start_gateway("[gateway]\nworkers = 2\nadmin = \"127.0.0.1:{admin_port}\"\n"
                       "access_log = \"{tmp}/workers-access.log\"\n" + config(upstream_echo.url, receiver.url),
                       env=FAST_EXPORT)
    for i in range(8):
        with httpx.Client() as c:     # a new connection each: SO_REUSEPORT spreads them
            assert c.get(gw.url(f"/api/{i}")).status_code == 200
    spans = servers(receiver.wait_for(lambda spans: len(spans) >= 16))
    assert sorted(s.attributes["url.path"] for s in spans) == sorted(f"/api/{i}" for i in range(8))


def threads(pid: int) -> set[int]:
    return {int(t) for t in os.listdir(f"/proc/{pid}/task")}


def blocking_waits(pid: int, tid: int) -> int:
    """How many times thread `tid` went to sleep (each sleep ends in a wake-up)."""
    for line in open(f"/proc/{pid}/task/{tid}/status"):
        if line.startswith("voluntary_ctxt_switches"):
            return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches")


def test_the_export_thread_starts_with_the_first_span_and_sleeps_while_none_comes(
        start_gateway, upstream_echo, receiver):
    """A worker that samples nothing has no export thread; once started it sleeps until
    a span is queued: no timer while there is nothing to send (each wake-up would take
    the GIL from the event loop)."""
    gw = start_gateway(config(upstream_echo.url, receiver.url, sampling=0.0), env=FAST_EXPORT)
    pid = gw.proc.pid                      # one worker: the serving process itself
    before = threads(pid)
    with httpx.Client() as c:
        for i in range(5):
            assert c.get(gw.url(f"/api/{i}")).status_code == 200
        assert threads(pid) == before      # unsampled roots: no span, no thread
        sampled = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
        assert c.get(gw.url("/api/first"), headers=sampled).status_code == 200
        receiver.wait_for(lambda spans: len(spans) >= 2)
        (export,) = threads(pid) - before
        waits = blocking_waits(pid, export)
        # An observation window of 20 schedule delays (50 ms each), not a synchronisation:
        # a thread on a timer would wake ~20 times in it.
        time.sleep(1.0)
        assert blocking_waits(pid, export) - waits <= 1
        assert c.get(gw.url("/api/second"), headers=sampled).status_code == 200
        spans = receiver.wait_for(lambda spans: len(spans) >= 4)
    assert sorted(s.attributes["url.path"] for s in servers(spans)) == ["/api/first", "/api/second"]
    assert threads(pid) - before == {export}


def test_spans_still_queued_at_sigterm_are_exported_before_exit(start_gateway, upstream_echo, receiver):
    gw = start_gateway(config(upstream_echo.url, receiver.url), env={"OTEL_BSP_SCHEDULE_DELAY": "600000"})
    assert httpx.get(gw.url("/api/last")).status_code == 200
    assert receiver.spans == []                 # a 10-minute schedule: nothing sent yet
    assert gw.stop() == 0
    (span,) = servers(receiver.wait_for(lambda spans: len(spans) >= 2, timeout=1))
    assert span.attributes["url.path"] == "/api/last"


def test_reload_keeps_the_exporter_and_can_turn_tracing_off(start_gateway, upstream_echo, receiver):
    gw = start_gateway(config(upstream_echo.url, receiver.url), env=FAST_EXPORT)
    assert httpx.get(gw.url("/api/one")).status_code == 200
    receiver.wait_for(lambda spans: len(spans) >= 2)

    def reload(text: str) -> None:
        before = gw.metrics().count('result="ok"')
        gw.config_path.write_text(text)
        gw.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while metric_value(gw, "agproxy_config_reloads_total", result="ok") < 1 + before and time.monotonic() < deadline:
            time.sleep(0.05)

    reload(gw.config_text.replace('name = "echo"', 'name = "echo2"', 1))
    assert httpx.get(gw.url("/api/two")).status_code == 200
    spans = servers(receiver.wait_for(lambda spans: len(spans) >= 4))
    assert spans[1].attributes["agproxy.route"] == "echo2"
    off = re.sub(r"\[telemetry\]\ntracing = \{[^}]*\}\n", "", gw.config_text)
    reload(off)
    r = httpx.get(gw.url("/api/three"), headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
    assert r.status_code == 200
    # Tracing off: the client's traceparent passes through untouched, no trace id is logged.
    assert upstream_traceparent(upstream_echo) == f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    assert "trace_id" not in gw.access_log(3)[-1]
    assert len(receiver.spans) == 4


# -- CLIENT spans for each upstream call ------------------------------------------------------

def backend_config(route: str, backend: str, endpoint: str, extra: str = "") -> str:
    return f'''
[telemetry]
tracing = {{ otlp_endpoint = "{endpoint}", sampling = 1.0 }}

[[route]]
name = "r"
match = {{ path_prefix = "/" }}
backend = "b"
{route}

[backend.b]
{backend}
{extra}
'''


def children_of(spans, parent) -> list:
    return [s for s in spans if s.parent_span_id == parent.span_id and s.trace_id == parent.trace_id]


def test_a_failed_backend_call_is_an_error_client_span(start_gateway, receiver):
    gw = start_gateway(backend_config("", f'type = "http"\nurl = "http://127.0.0.1:{closed_port()}"',
                                      receiver.url), env=FAST_EXPORT)
    assert httpx.get(gw.url("/x?token=secret")).status_code == 502
    server, (call,) = one_request(receiver)
    assert call.parent_span_id == server.span_id and call.kind == "SPAN_KIND_CLIENT"
    assert call.status_code == "STATUS_CODE_ERROR" and call.attributes["error.type"] == "connect"
    assert "http.response.status_code" not in call.attributes
    assert call.attributes["url.full"].endswith("/x")          # never the query
    assert server.attributes["error.type"] == "502"


def test_llm_failover_each_attempt_is_a_gen_ai_span(start_gateway, receiver):
    from tests.e2e.test_llm_group import ENV, _config
    from tests.support.llm_fakes import FakeProvider, Fault, Usage
    down = FakeProvider("openai", name="down").start()
    up = FakeProvider("anthropic", name="up", usage=Usage(input=20, output=9, cache_read=100, cache_write=30)).start()
    try:
        down.fault_always = Fault("status", 503)
        gw = start_gateway(_config([down, up]) + f'\n[telemetry]\ntracing = {{ otlp_endpoint = "{receiver.url}" }}\n',
                           env={**ENV, **FAST_EXPORT})
        r = httpx.post(gw.url("/v1/chat/completions"), json={
            "model": "smart", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        server, (first, second) = one_request(receiver, 3)
        assert [first.parent_span_id, second.parent_span_id] == [server.span_id] * 2
        assert first.name == "chat gpt-4o-mini" and second.name == "chat claude-sonnet-4-5"
        assert first.status_code == "STATUS_CODE_ERROR" and first.attributes["error.type"] == "unhealthy"
        assert first.attributes["http.response.status_code"] == 503
        assert first.attributes["gen_ai.provider.name"] == "openai"
        a = second.attributes
        assert second.status_code == "STATUS_CODE_UNSET"
        assert (a["gen_ai.operation.name"], a["gen_ai.provider.name"], a["gen_ai.request.model"]) == (
            "chat", "anthropic", "claude-sonnet-4-5")
        assert a["gen_ai.response.model"] == r.json()["model"]
        assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (150, 9)
        assert a["gen_ai.usage.cache_read.input_tokens"] == 100
        assert a["gen_ai.usage.cache_creation.input_tokens"] == 30
        assert a["agproxy.llm.provider"] == "up" and a["server.port"] == up.port
        # Each provider was called as the child of its own attempt's span.
        assert down.requests[-1].header("traceparent") == f"00-{server.trace_id}-{first.span_id}-01"
        assert up.requests[-1].header("traceparent") == f"00-{server.trace_id}-{second.span_id}-01"
    finally:
        down.stop()
        up.stop()


def test_ext_authz_grpc_check_span_and_metadata(start_gateway, upstream_echo, receiver):
    from tests.support.grpc_peers import authorization_peer
    peer, servicer = authorization_peer()
    peer.start()
    try:
        gw = start_gateway(backend_config(f'[route.ext_authz]\naddress = "{peer.address}"\n',
                                          f'type = "http"\nurl = "{upstream_echo.url}"', receiver.url), env=FAST_EXPORT)
        assert httpx.get(gw.url("/x"), headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}).status_code == 200
        server, calls = one_request(receiver, 3)
        (check,) = [c for c in calls if c.attributes.get("rpc.system") == "grpc"]
        assert check.name == "envoy.service.auth.v3.Authorization/Check" and check.parent_span_id == server.span_id
        host, port = peer.address.rsplit(":", 1)
        assert check.attributes == {"rpc.system": "grpc", "rpc.service": "envoy.service.auth.v3.Authorization",
                                    "rpc.method": "Check", "server.address": host, "server.port": int(port)}
        assert dict(servicer.calls[-1].metadata)["traceparent"] == f"00-{CLIENT_TRACE}-{check.span_id}-01"
        assert check.end_ns <= min(c.start_ns for c in calls if c is not check)   # before the backend call
    finally:
        peer.stop(0)


def test_ext_authz_http_check_span_and_its_failure(start_gateway, upstream_echo, receiver):
    from tests.support.authz_peers import HttpAuthServer
    auth = HttpAuthServer(lambda req: (200, [], b""))
    try:
        gw = start_gateway(backend_config(
            f'[route.ext_authz]\nprotocol = "http"\naddress = "http://127.0.0.1:{auth.port}"\n'
            f'\n[[route]]\nname = "dead"\nmatch = {{ path_prefix = "/dead" }}\nbackend = "b"\n'
            f'[route.ext_authz]\nprotocol = "http"\naddress = "http://127.0.0.1:{closed_port()}"\n',
            f'type = "http"\nurl = "{upstream_echo.url}"', receiver.url).replace(
            'match = { path_prefix = "/" }', 'match = { path_prefix = "/ok" }'), env=FAST_EXPORT)
        assert httpx.get(gw.url("/ok")).status_code == 200
        server, calls = one_request(receiver, 3)
        (check,) = [c for c in calls if c.name == "GET ext_authz"]
        assert check.parent_span_id == server.span_id and check.status_code == "STATUS_CODE_UNSET"
        assert check.attributes["http.response.status_code"] == 200
        assert check.attributes["url.full"] == f"http://127.0.0.1:{auth.port}/ok"
        assert dict(auth.seen[-1]["headers"])["traceparent"] == f"00-{server.trace_id}-{check.span_id}-01"
        assert httpx.get(gw.url("/dead")).status_code == 403
        spans = receiver.wait_for(lambda spans: len(spans) >= 5)
        (dead,) = [s for s in servers(spans) if s.attributes["url.path"] == "/dead"]
        (failed,) = children_of(spans, dead)
        assert failed.status_code == "STATUS_CODE_ERROR" and failed.attributes["error.type"] == "unreachable"
    finally:
        auth.stop()


def test_rate_limit_service_and_redis_spans(start_gateway, upstream_echo, receiver, tmp_path):
    from tests.support.redis_server import RedisServer
    from tests.support.rls_peer import rls_peer
    peer, rls = rls_peer({(("user", None),): (10, 86400)})
    peer.start()
    redis = RedisServer(tmp_path)
    try:
        gw = start_gateway(backend_config(
            f'[route.rate_limit.remote]\naddress = "{peer.address}"\ndomain = "agents"\n'
            'descriptors = [[ { key = "user", value = \'request.headers["x-user"]\' } ]]\n'
            f'[route.rate_limit.redis]\naddress = "{redis.address}"\n'
            'limits = [ { capacity = 5, refill = { tokens = 5, every = "1h" } } ]\n',
            f'type = "http"\nurl = "{upstream_echo.url}"', receiver.url), env=FAST_EXPORT)
        assert httpx.get(gw.url("/x"), headers={"x-user": "u1"}).status_code == 200
        server, calls = one_request(receiver, 4)
        by_name = {c.name: c for c in calls}
        rl = by_name["envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"]
        assert rl.parent_span_id == server.span_id and rl.attributes["rpc.method"] == "ShouldRateLimit"
        assert dict(rls.metadata[-1])["traceparent"] == f"00-{server.trace_id}-{rl.span_id}-01"
        db = by_name["EVALSHA"]
        assert db.parent_span_id == server.span_id
        assert (db.attributes["db.system.name"], db.attributes["db.operation.name"]) == ("redis", "EVALSHA")
        assert "GET" in by_name
    finally:
        peer.stop(0)
        redis.stop()


def test_mcp_call_span_names_the_method_and_tool(start_gateway, upstream_echo, receiver):
    gw = start_gateway(backend_config("", f'type = "mcp"\nurl = "{upstream_echo.url}/mcp"', receiver.url),
                       env=FAST_EXPORT)
    call = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "get_weather", "arguments": {}}}
    r = httpx.post(gw.url("/mcp"), json=call, headers={"accept": "application/json, text/event-stream"})
    assert r.status_code == 200
    server, (client,) = one_request(receiver)
    assert client.name == "tools/call get_weather" and client.parent_span_id == server.span_id
    a = client.attributes
    assert (a["mcp.method.name"], a["gen_ai.tool.name"], a["jsonrpc.request.id"]) == ("tools/call", "get_weather", "7")
    assert a["gen_ai.operation.name"] == "execute_tool" and a["http.request.method"] == "POST"
    assert server.attributes["mcp.method.name"] == "tools/call" and server.name == "POST /*"
    assert upstream_traceparent(upstream_echo) == f"00-{server.trace_id}-{client.span_id}-01"


def test_a_request_waiting_on_a_jwks_fetch_has_its_span(start_gateway, upstream_echo, receiver):
    from tests.support.idp import IdP
    idp = IdP()
    try:
        gw = start_gateway(backend_config(
            f'[route.jwt]\nissuer = "{idp.issuer}"\naudiences = ["agents"]\n'
            f'jwks = {{ url = "{idp.jwks_url}", refetch_interval = "100ms" }}\n',
            f'type = "http"\nurl = "{upstream_echo.url}"', receiver.url), env=FAST_EXPORT)
        idp.rotate()                    # a token with a kid the gateway has not fetched yet
        token = idp.mint(sub="alice")
        deadline = time.monotonic() + 10
        while (status := httpx.get(gw.url("/x"), headers={"authorization": f"Bearer {token}"}).status_code) != 200:
            assert status == 401 and time.monotonic() < deadline   # (within refetch_interval of the last fetch)
        spans = receiver.wait_for(lambda spans: any(s.attributes.get("enduser.id") == "alice" for s in spans)
                                  and len(clients(spans)) >= 2)
        (ok,) = [s for s in servers(spans) if s.attributes.get("enduser.id") == "alice"]
        fetch, backend = sorted(children_of(spans, ok), key=lambda s: s.start_ns)
        assert fetch.name == "GET" and fetch.attributes["url.full"] == idp.jwks_url
        assert fetch.attributes["agproxy.jwt.provider"] and fetch.status_code == "STATUS_CODE_UNSET"
        assert backend.attributes["agproxy.backend"] == "b"
    finally:
        idp.close()


def test_openapi_mcp_rest_call_span_carries_the_tool(start_gateway, receiver):
    import asyncio
    import os
    from mcp import Client
    from tests.support.petstore.service import PetstoreService
    api = PetstoreService()
    spec = os.path.join(os.path.dirname(__file__), "..", "support", "petstore", "openapi.yaml")
    try:
        gw = start_gateway(backend_config("", f'type = "openapi_mcp"\nspec_file = "{os.path.abspath(spec)}"\n'
                                              f'base_url = "{api.url}/api"\ntimeout = "5s"', receiver.url),
                           env=FAST_EXPORT)

        async def go():
            async with Client(gw.url("/mcp"), mode="auto") as client:
                return await client.call_tool("echo", {"value__path": "p", "value__query": "q", "value__header": "h",
                                                       "value__body": "b", "n": 1})
        echoed = asyncio.run(go()).structured_content
        spans = receiver.wait_for(lambda spans: any(s.attributes.get("gen_ai.tool.name") == "echo"
                                                    for s in clients(spans)))
        (call,) = [s for s in clients(spans) if s.attributes.get("gen_ai.tool.name") == "echo"]
        (server,) = [s for s in servers(spans) if s.span_id == call.parent_span_id]
        assert call.name == "POST" and call.attributes["mcp.method.name"] == "tools/call"
        assert call.attributes["url.full"] == f"{api.url}/api/echo/p"       # never the query
        assert call.attributes["http.response.status_code"] == 200 and call.status_code == "STATUS_CODE_UNSET"
        assert server.attributes["gen_ai.tool.name"] == "echo"
        assert ["traceparent", f"00-{server.trace_id}-{call.span_id}-01"] in echoed["headers"]
    finally:
        api.close()


from tests.integration.test_agentcore import identity, jwt_emulator  # noqa: E402,F401 (fixtures)


def test_token_exchange_span_on_a_cache_miss_only(start_gateway, identity, jwt_emulator, receiver):  # noqa: F811
    from tests.integration.test_agentcore import SESSION, bearer, obo_config, post
    gw = start_gateway(obo_config(identity, jwt_emulator) +
                       f'\n[telemetry]\ntracing = {{ otlp_endpoint = "{receiver.url}" }}\n', env=FAST_EXPORT)
    jwt_emulator.set_discovery(gw.url("/.well-known/openid-configuration"))
    user = identity.user_token("alice")
    for _ in range(2):
        st, _, body = post(gw, "/agents/support/chat", {"prompt": "hi"}, {**bearer(user), "x-conversation": SESSION})
        assert st == 200, body
    spans = receiver.wait_for(lambda spans: len(servers(spans)) >= 2 and len(clients(spans)) >= 2)
    first, second = sorted((s for s in servers(spans) if s.attributes["url.path"] == "/agents/support/chat"),
                           key=lambda s: s.start_ns)
    (exchange,) = [s for s in spans if s.name == "token_exchange"]
    assert exchange.kind == "SPAN_KIND_INTERNAL" and exchange.parent_span_id == first.span_id
    assert exchange.attributes == {"agproxy.token_exchange.audience": "support-agent",
                                   "agproxy.token_exchange.joined": False}
    assert exchange.status_code == "STATUS_CODE_UNSET"
    # The second request was served from the OBO cache: its children are the AgentCore call only.
    (call,) = children_of(spans, second)
    assert call.name == "POST" and call.kind == "SPAN_KIND_CLIENT" and call.attributes["http.response.status_code"] == 200
