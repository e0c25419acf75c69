"""telemetry/otlp.py writes OTLP protobuf by hand: it must decode, with the opentelemetry-proto
messages, to exactly what the OpenTelemetry SDK's own encoder produces for the same spans."""

from __future__ import annotations

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from agproxy.telemetry import otlp
from agproxy.telemetry.tracing import CLIENT, SERVER, Span

RESOURCE = {"service.name": "agproxy", "team": "a,b", "deployment.environment": "blue green"}


def our_spans() -> list[Span]:
    root = Span(None, "GET /api/*", SERVER, "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", True,
                remote_parent=True, tracestate="vendor=abc,x=1",
                attributes={"http.request.method": "GET", "http.response.status_code": 200, "url.path": "/é",
                            "flag": True, "ratio": 0.25, "negative": -5, "big": 2 ** 62, "tags": ["a", "b"]})
    root.start_ns, root.end_ns = 1_700_000_000_000_000_000, 1_700_000_000_123_456_789
    child = root.child("GET", CLIENT, {"server.port": 9000, "none": None})
    same_name = Span(None, "GET", SERVER, "4bf92f3577b34da6a3ce929d0e0e4736", "", True, attributes={})
    child.start_ns, child.end_ns, child.error = root.start_ns + 10, root.end_ns - 10, "connect refused"
    lone = Span(None, "x", SERVER, "0" * 31 + "5", "", True, attributes={})
    lone.start_ns, lone.end_ns = 1, 2
    same_name.start_ns, same_name.end_ns = 3, 4
    return [root, child, lone, same_name]


def sdk_span(s: Span, resource: Resource) -> ReadableSpan:
    tid, sid = int(s.trace_id, 16), int(s.span_id, 16)
    pid = int(s.parent_id, 16) if s.parent_id else 0
    state = TraceState.from_header([s.tracestate]) if s.tracestate else TraceState()
    flags = TraceFlags(TraceFlags.SAMPLED)
    parent = SpanContext(tid, pid, s.remote_parent, flags, state) if pid else None
    return ReadableSpan(s.name, context=SpanContext(tid, sid, False, flags, state), parent=parent,
                        resource=resource, attributes=s.attributes, kind=getattr(SpanKind, s.kind),
                        status=Status(StatusCode.ERROR, s.error) if s.error else Status(StatusCode.UNSET),
                        start_time=s.start_ns, end_time=s.end_ns,
                        instrumentation_scope=InstrumentationScope("agproxy", "0.1.0"))


def test_encoding_matches_the_sdk_field_by_field():
    spans = our_spans()
    ours = ExportTraceServiceRequest.FromString(
        otlp.encode(spans, otlp.encode_resource(RESOURCE), otlp.encode_scope("agproxy", "0.1.0")))
    resource = Resource(RESOURCE)
    theirs = ExportTraceServiceRequest.FromString(
        encode_spans([sdk_span(s, resource) for s in spans]).SerializeToString())
    # Span.flags: bits 0-7 are the W3C trace flags (OTLP's trace.proto); the SDK leaves
    # them 0, we set "sampled". Everything else is identical.
    for a, b in zip(ours.resource_spans[0].scope_spans[0].spans, theirs.resource_spans[0].scope_spans[0].spans):
        assert a.flags == b.flags | 1 and b.flags & 0x100
        b.flags = a.flags
    assert ours == theirs
    span = ours.resource_spans[0].scope_spans[0].spans[1]
    assert span.status.message == "connect refused" and span.parent_span_id == bytes.fromhex(spans[0].span_id)
    assert [kv.key for kv in span.attributes] == ["server.port"]


def span_with(attributes: dict) -> Span:
    s = Span(None, "x", SERVER, "0" * 31 + "5", "", True, attributes=attributes, span_id="1" * 16)
    s.start_ns, s.end_ns = 1, 2
    return s


def test_attribute_cache_is_bounded_and_type_aware():
    otlp._kv_cache.clear()
    fields = [otlp._attribute_field(("k", v)) for v in (1, True, 1.0, "1", 1, True)]
    assert len(set(fields[:4])) == 4 and fields[4:] == fields[:2]     # 1 == True == 1.0, not the same bytes
    assert set(otlp._kv_cache) == {("k", "1")}                         # only the string was cached
    assert otlp.encode_span(span_with({"k": 1})) != otlp.encode_span(span_with({"k": True}))
    assert otlp.encode_span(span_with({"server.port": 443})) == otlp.encode_span(span_with({"server.port": 443}))
    assert ("server.port", 443) in otlp._kv_cache                     # INT_KEYS: ints only, cached
    for i in range(otlp._CACHE_MAX + 10):
        otlp._attribute_field(("url.path", f"/{i}"))
    assert 0 < len(otlp._kv_cache) <= otlp._CACHE_MAX


def test_a_keyed_attempt_span_is_cached_by_its_key_and_status_and_a_failure_leaves_the_cache():
    """backends/relay.py keys a plain attempt's span (origin, backend, method, resend): the
    encoder's cache then goes by (key, status). What is decoded must still be each span's
    own attributes: its status, and after `fail` its error.type."""
    from agproxy.telemetry.tracing import end_http_client, http_client_span

    def attempt(status: int | str) -> Span:
        parent = Span(None, "GET", SERVER, "4bf92f3577b34da6a3ce929d0e0e4736", "", True, attributes={})
        span = http_client_span(parent, "GET", "http", "10.0.0.9:8080", "/x", "echo")
        span.key = ("http", "10.0.0.9:8080", "echo", "GET", 0)
        if isinstance(status, str):
            span.fail(status)            # no answer (relay.py: an UpstreamError's kind)
        else:
            end_http_client(span, status)
        return span

    spans = [attempt(200), attempt(201), attempt(200), attempt(503), attempt("timeout"), attempt("connect")]
    got = ExportTraceServiceRequest.FromString(otlp.encode(spans, b"", b"")).resource_spans[0].scope_spans[0].spans

    def attrs(s):
        return {kv.key: kv.value.int_value or kv.value.string_value for kv in s.attributes}
    assert [attrs(s).get("http.response.status_code") for s in got] == [200, 201, 200, 503, None, None]
    assert [attrs(s).get("error.type") for s in got[3:]] == ["503", "timeout", "connect"]
    assert "error.type" not in attrs(got[1]) and attrs(got[3])["error.type"] == "503"
    assert got[3].status.code == 2 and got[1].status.code == 0
    assert attrs(got[0]) == {"server.address": "10.0.0.9", "server.port": 8080, "agproxy.backend": "echo",
                             "http.request.method": "GET", "http.response.status_code": 200,
                             "url.full": "http://10.0.0.9:8080/x"}
