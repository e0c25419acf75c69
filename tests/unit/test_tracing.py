"""telemetry/tracing.py: W3C trace context, sampling, spans, settings (pure logic)."""

from __future__ import annotations

import random

import pytest

from agproxy.config.model import parse
from agproxy.config.reader import Problems, Section
from agproxy.http.messages import ConnInfo, Headers, RequestHead
from agproxy.telemetry.tracing import (Sampler, Tracing, TracingSettings, http_client_attributes,
                                       parse_traceparent, propagate, read_settings, traces_url)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


def test_parse_traceparent():
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-01") == (TRACE, SPAN, 1)
    assert parse_traceparent(f" 00-{TRACE}-{SPAN}-00\t") == (TRACE, SPAN, 0)
    # A later version may append fields; version 00 may not.
    assert parse_traceparent(f"01-{TRACE}-{SPAN}-01-future") == (TRACE, SPAN, 1)
    for bad in (f"00-{TRACE}-{SPAN}-01-x", f"ff-{TRACE}-{SPAN}-01", f"00-{TRACE.upper()}-{SPAN}-01",
                f"00-{'0' * 32}-{SPAN}-01", f"00-{TRACE}-{'0' * 16}-01", f"00-{TRACE}-{SPAN}", "", "garbage",
                f"0-{TRACE}-{SPAN}-01", f"00_{TRACE}_{SPAN}_01"):
        assert parse_traceparent(bad) is None, bad


@pytest.mark.parametrize("ratio", [0.0, 0.01, 0.25, 0.5, 1.0])
def test_ratio_sampler_decides_like_the_sdk(ratio):
    """Differential: the same trace ids get the same verdict as the SDK's TraceIdRatioBased,
    so a trace is sampled alike by agproxy and by SDK-instrumented services at one ratio."""
    from opentelemetry.sdk.trace.sampling import Decision, TraceIdRatioBased
    ours, sdk = Sampler("traceidratio", ratio), TraceIdRatioBased(ratio)
    rng = random.Random(7)
    for _ in range(2000):
        tid = rng.getrandbits(128) or 1
        expected = sdk.should_sample(None, tid, "x").decision is Decision.RECORD_AND_SAMPLE
        assert ours.sample(None, "%032x" % tid) is expected


@pytest.mark.parametrize("ratio", [0.0, 0.01, 0.25, 0.5, 0.999, 1.0])
def test_a_root_is_sampled_like_the_sdk_decides_on_its_request_id(ratio):
    """Differential, through start_request (which compares the request id's low 64 bits
    as hex text, not as a number): random ids, and ids at the bound, around it, and
    differing from it in the first or the last hex digit only."""
    from opentelemetry.sdk.trace.sampling import Decision, TraceIdRatioBased
    sdk = TraceIdRatioBased(ratio)
    t = Collected("parentbased_traceidratio", ratio)
    bound = round(ratio * (1 << 64))
    rng = random.Random(11)
    lows = [0, 1, (1 << 64) - 1, bound - 1, bound, bound + 1, bound ^ (0xF << 60), bound ^ 0xF,
            bound | (0xF << 56), *(rng.getrandbits(64) for _ in range(2000))]
    for low in lows:
        low &= (1 << 64) - 1
        tid = (rng.getrandbits(64) << 64) | low or 1
        expected = sdk.should_sample(None, tid, "x").decision is Decision.RECORD_AND_SAMPLE
        span = t.start_request(request([]), CONN, "%032x" % tid)
        assert (span is not None) is expected, hex(tid)
        if span is not None:
            assert span.trace_id == "%032x" % tid


def test_noted_fields_are_what_the_parser_saw():
    """A head from a parser says which trace-context fields came (RequestHead.noted): no
    lookup in its headers. One made otherwise (noted -1) is looked at."""
    t = Collected()
    head = RequestHead("GET", "/", Headers([("traceparent", f"00-{TRACE}-{SPAN}-01")]), "http", "h", "HTTP/1.1", 0)
    assert t.start_request(head, CONN).trace_id != TRACE        # the parser saw none: a root
    assert head.headers.items == [("traceparent", f"00-{TRACE}-{SPAN}-01")]
    noted = RequestHead("GET", "/", Headers([("traceparent", f"00-{TRACE}-{SPAN}-01")]), "http", "h", "HTTP/1.1")
    assert noted.noted == -1 and t.start_request(noted, CONN).trace_id == TRACE and noted.noted == 1


def test_parent_based_follows_the_remote_parent():
    s = Sampler("parentbased_traceidratio", 0.0)
    tid = TRACE
    assert s.sample(1, tid) is True and s.sample(0, tid) is False and s.sample(None, tid) is False
    assert Sampler("parentbased_always_off").sample(1, tid) is True
    assert Sampler("parentbased_always_on").sample(0, tid) is False
    assert Sampler("always_on").sample(0, tid) is True          # not parent based: ignores the flag
    assert Sampler("always_off").sample(1, tid) is False
    assert Sampler("traceidratio", 1.0).root == "always_on" and Sampler("traceidratio", 0.0).root == "always_off"


def request(headers: list[tuple[str, str]], method: str = "GET") -> RequestHead:
    return RequestHead(method, "/a/b?token=secret", Headers(headers), "https", "api.example.com:8443", "HTTP/2")


CONN = ConnInfo("10.0.0.7", 5555, 443, True)


class Collected(Tracing):
    def __init__(self, sampler="parentbased_always_on", ratio=1.0):
        super().__init__(TracingSettings(None, sampler, ratio))
        self.queued = []
        self._pipeline = self       # ended spans are put here (no export thread)

    def put(self, span):
        self.queued.append(span)


def test_server_span_from_a_valid_parent_and_its_children():
    t = Collected()
    req = request([("traceparent", f"00-{TRACE}-{SPAN}-01"), ("tracestate", "a=1"), ("tracestate", "b=2")])
    span = t.start_request(req, CONN)
    assert (span.trace_id, span.parent_id, span.sampled, span.remote_parent) == (TRACE, SPAN, True, True)
    assert span.tracestate == "a=1,b=2"
    # Ready for the upstream: the client's traceparent gone (each upstream call of a
    # sampled request names its own CLIENT span), tracestate kept as sent.
    assert req.headers.items == [("tracestate", "a=1"), ("tracestate", "b=2")]
    assert span.attributes == {"http.request.method": "GET", "url.scheme": "https",
                               "network.protocol.version": "2", "client.address": "10.0.0.7",
                               "server.address": "api.example.com"}
    assert span.varying == ("url.path", "/a/b")     # exported as an attribute, apart from the cached block
    child = span.child("GET", attributes=http_client_attributes("echo", "GET", "http", "10.1.1.1:9000", "/x"))
    assert child.trace_id == span.trace_id and child.parent_id == span.span_id and not child.remote_parent
    assert child.attributes["server.port"] == 9000 and child.attributes["url.full"] == "http://10.1.1.1:9000/x"
    assert child.traceparent() == f"00-{TRACE}-{child.span_id}-01"
    child.end("connect refused")
    child.end()                                   # a second end does nothing
    Tracing.end_server(span, 502, route="r", http_route="/a/*", user="alice", error="upstream down")
    assert [s.name for s in t.queued] == ["GET", "GET /a/*"]
    assert child.error == "connect refused" and span.error == "upstream down"
    assert span.attributes["error.type"] == "502" and span.attributes["enduser.id"] == "alice"


def test_several_traceparent_headers_are_invalid():
    t = Collected()
    req = request([("traceparent", f"00-{TRACE}-{SPAN}-01"), ("traceparent", f"00-{TRACE}-{SPAN}-01"),
                   ("tracestate", "a=1")])
    span = t.start_request(req, CONN)
    assert span.trace_id != TRACE and span.parent_id == "" and span.tracestate is None
    assert req.headers.items == []     # sampled: the upstream call's span adds its own


def test_an_unsampled_root_costs_nothing_and_an_unsampled_parent_is_forwarded():
    t = Collected("parentbased_always_off")
    req = request([("tracestate", "orphan=1")])
    # No traceparent came and the root is not sampled: no span, no trace context sent
    # upstream (the request is what it is with tracing off), the orphan tracestate gone.
    assert t.start_request(req, CONN) is None
    assert req.headers.items == []
    # An unsampled parent is continued: the upstream gets the trace id, flag 00.
    req = request([("traceparent", f"00-{TRACE}-{SPAN}-00")])
    span = t.start_request(req, CONN)
    assert span.attributes is None and not span.sampled and span.trace_id == TRACE
    assert req.headers.items == [("traceparent", span.traceparent())]
    assert span.traceparent() == f"00-{TRACE}-{span.span_id}-00" and span.span_id != SPAN
    span.set("k", "v")
    child = span.child("x")
    assert child.attributes is None and child.traceparent().endswith("-00")
    Tracing.end_server(span, 200)
    child.end()
    assert t.queued == []
    headers = Headers([("traceparent", "junk"), ("tracestate", "a=1")])
    propagate(headers, span)
    assert headers.items == [("traceparent", span.traceparent())]


def test_aborted_response_is_an_error_but_a_client_leaving_is_not():
    t = Collected()
    cut = t.start_request(request([]), CONN)
    Tracing.end_server(cut, 200, error="upstream broke mid-body")
    gone = t.start_request(request([]), CONN)
    Tracing.end_server(gone, 499, error="client went away")
    denied = t.start_request(request([]), CONN)
    Tracing.end_server(denied, 403, error=None)
    assert cut.error and cut.attributes["error.type"] == "response_aborted"
    assert gone.error is None and "error.type" not in gone.attributes
    assert denied.error is None


def settings(table: dict, env: dict | None = None):
    problems = Problems()
    s = read_settings(Section("telemetry.tracing", table, problems), env or {})
    return s, problems.items


def test_settings_toml_wins_and_environment_fills_in():
    s, problems = settings({"otlp_endpoint": "http://c:4318", "sampling": 0.25},
                           {"OTEL_TRACES_SAMPLER": "always_off", "OTEL_BSP_MAX_QUEUE_SIZE": "10"})
    assert problems == []
    assert (s.endpoint, s.sampler, s.ratio, s.max_queue, s.batch_size) == (
        "http://c:4318/v1/traces", "parentbased_traceidratio", 0.25, 10, 10)
    s, _ = settings({}, {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5",
                         "OTEL_BSP_SCHEDULE_DELAY": "250"})
    assert (s.endpoint, s.sampler, s.ratio, s.schedule_delay) == (None, "traceidratio", 0.5, 0.25)
    s, _ = settings({}, {"OTEL_TRACES_SAMPLER": "nonsense", "OTEL_BSP_MAX_QUEUE_SIZE": "x"})
    assert (s.sampler, s.ratio, s.max_queue) == ("parentbased_always_on", 1.0, 2048)
    assert settings({}, {"OTEL_SDK_DISABLED": "true"})[0] is None


def test_traces_url():
    assert traces_url("http://c:4318") == "http://c:4318/v1/traces"
    assert traces_url("https://c/") == "https://c/v1/traces"
    assert traces_url("https://c/custom/path") == "https://c/custom/path"
    with pytest.raises(ValueError):
        traces_url("c:4318")


def test_config_errors_name_their_toml_path():
    raw = {"listener": [{"name": "main", "bind": "127.0.0.1:0"}],
           "telemetry": {"tracing": {"endpoint": "x", "otlp_endpoint": "ftp://c", "sampling": 2},
                         "access_log_fields": {"status": "1", "bad name": "1", "ok": 3}}}
    problems = parse(raw).problems.items
    assert 'telemetry.tracing.endpoint: unknown key (did you mean "otlp_endpoint"?)' in problems
    assert "telemetry.tracing.otlp_endpoint: expected an http:// or https:// URL, got 'ftp://c'" in problems
    assert "telemetry.tracing.sampling: must be between 0 and 1, got 2.0" in problems
    assert "telemetry.access_log_fields.ok: expected a string, got an integer" in problems
    ok = parse({"listener": [{"name": "main", "bind": "127.0.0.1:0"}],
                "telemetry": {"tracing": {"sampling": 0.5}, "access_log_fields": {"status": "1", "a b": "1"}}})
    assert "telemetry.access_log_fields.status: 'status' is a field the access log always has; choose another name" \
        in ok.problems.items
    assert "telemetry.access_log_fields.a b: a field name is letters, digits, '_' and '.'" in ok.problems.items
    assert ok.tracing.ratio == 0.5


def test_a_root_trace_id_is_the_generated_request_id_never_a_clients():
    t = Collected()
    rid = "%032x" % 0xABC
    assert t.start_request(request([]), CONN, rid).trace_id == rid
    theirs = "0123456789abcdef0123456789abcdef"
    span = t.start_request(request([("x-request-id", theirs)]), CONN, theirs)
    assert span.trace_id != theirs and len(span.trace_id) == 32
    assert t.start_request(request([]), CONN, "short").trace_id != "short"
