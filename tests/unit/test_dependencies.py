"""The OTLP protobuf messages and the Envoy messages live in one process.

`xds-protos` ships its own, older copy of `opentelemetry/proto/*`; when pip installs it
after `opentelemetry-proto` (a test dependency: the OTLP receiver decodes with it) the
newer files are overwritten and the OTLP messages and the SDK's encoder cannot be
imported (`cannot import name 'InstrumentationScope'`). `./dev` reinstalls
`opentelemetry-proto` last; the image (Dockerfile) has no opentelemetry-proto at all.
This test fails if the two conflict again, in either direction: the OTLP messages and
encoder must import, and Envoy's own modules that refer to the OpenTelemetry protos must
load against the newer files.
"""

from __future__ import annotations

import subprocess
import sys


def test_otlp_exporter_and_envoy_messages_round_trip_in_one_process():
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans  # noqa: F401
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
    from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

    from envoy.service.auth.v3.external_auth_pb2 import CheckRequest
    from envoy.service.ratelimit.v3.rls_pb2 import RateLimitRequest
    # Envoy modules that import the OpenTelemetry protos themselves.
    import envoy.config.trace.v3.opentelemetry_pb2  # noqa: F401
    import envoy.extensions.access_loggers.open_telemetry.v3.logs_service_pb2  # noqa: F401

    otlp = ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(
        scope=InstrumentationScope(name="agproxy", version="1"),
        spans=[Span(name="GET /", trace_id=b"\x01" * 16, span_id=b"\x02" * 8,
                    attributes=[KeyValue(key="http.request.method", value=AnyValue(string_value="GET"))])])])])
    back = ExportTraceServiceRequest.FromString(otlp.SerializeToString())
    span = back.resource_spans[0].scope_spans[0].spans[0]
    assert back.resource_spans[0].scope_spans[0].scope.name == "agproxy"
    assert (span.name, span.trace_id, span.attributes[0].value.string_value) == ("GET /", b"\x01" * 16, "GET")

    check = CheckRequest()
    check.attributes.request.http.method = "POST"
    check.attributes.request.http.headers["x-tenant"] = "a"
    assert CheckRequest.FromString(check.SerializeToString()).attributes.request.http.headers["x-tenant"] == "a"

    rls = RateLimitRequest(domain="agents", hits_addend=2)
    entry = rls.descriptors.add().entries.add()
    entry.key, entry.value = "user", "alice"
    back_rls = RateLimitRequest.FromString(rls.SerializeToString())
    assert (back_rls.domain, back_rls.descriptors[0].entries[0].value, back_rls.hits_addend) == ("agents", "alice", 2)


def test_envoy_first_then_exporter_in_a_fresh_interpreter():
    """Import order must not matter either: Envoy's OTel-referencing modules first."""
    code = ("import envoy.config.trace.v3.trace_pb2, envoy.service.auth.v3.external_auth_pb2\n"
            "from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
