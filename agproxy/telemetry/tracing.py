"""OpenTelemetry tracing: a server span per request, child spans per upstream call, OTLP/HTTP.

Theory of operation. `[telemetry].tracing` (or nothing: then `runtime.tracing` is None
and the per-request path makes no span object at all) gives `TracingSettings`; the
runtime owns a `Tracing`, started in each serving process (after the fork: the
supervisor never starts one) and shared across reloads with the same settings.

Per request, on the event loop: `start_server(request, conn)` reads W3C `traceparent`
(and `tracestate`) from the client, decides sampling (parent-based: a remote parent's
sampled flag is followed; without one, the trace-id ratio, the same test as the SDK's
TraceIdRatioBased), and returns a `Span`. Every span has ids, so `span.traceparent()`
can be injected upstream and the access log can carry the trace id even when the trace
is not sampled; only a sampled span records attributes and is queued when it ends.
`span.child(...)` makes the child spans the exchange, policies and backends open for
their upstream calls (`http_client_attributes`, `rpc_attributes`, ... below give the
semantic-convention attributes).

Why not the SDK's Tracer for that part: measured here, the SDK's start_span + end with
six attributes cost ~30 us of CPU (a plain relayed request costs ~60-100 us), a slotted
span of our own ~2 us. The SDK still does everything off the event loop: on the export
thread each batch becomes `ReadableSpan`s with the process's `Resource`, and the SDK's
`OTLPSpanExporter` encodes and POSTs them (honouring `OTEL_EXPORTER_OTLP_*`: headers,
timeout, compression, certificates). The queue is bounded (`OTEL_BSP_MAX_QUEUE_SIZE`):
a span that finds it full is dropped and counted, never waited for; an export that
fails (collector down, slow past its timeout, 4xx/5xx) counts its spans as dropped and
is logged at most once per `LOG_INTERVAL`, with the exporter's own last message.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from random import getrandbits
from typing import Any, Mapping
from urllib.parse import urlsplit

log = logging.getLogger("agproxy.telemetry")

LOG_INTERVAL = 60.0          # seconds between two "export failing" log lines
SCOPE = "agproxy"

# Span kinds (the OTLP enum values: SDK SpanKind by name on the export thread).
INTERNAL, SERVER, CLIENT = "INTERNAL", "SERVER", "CLIENT"

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
_PROTOCOL_VERSION = {"HTTP/1.1": "1.1", "HTTP/2": "2", "HTTP/1.0": "1.0"}
_MAX_TRACESTATE = 512        # W3C: propagate at least 512 characters; longer may be cut
_RATIO_LIMIT = (1 << 64) - 1


# -- settings -------------------------------------------------------------------------

SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on",
            "parentbased_always_off", "parentbased_traceidratio")


@dataclass(frozen=True)
class TracingSettings:
    endpoint: str | None          # full URL of the traces endpoint; None: the exporter's env/default
    sampler: str                  # one of SAMPLERS
    ratio: float
    max_queue: int = 2048
    batch_size: int = 512
    schedule_delay: float = 5.0   # seconds between exports when the batch is not full

    def describe(self) -> dict:
        return {"otlp_endpoint": self.endpoint or _env_endpoint(), "sampler": self.sampler,
                "ratio": self.ratio, "max_queue": self.max_queue}


def _env_endpoint() -> str:
    e = os.environ
    if e.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return e["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    base = e.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "http://localhost:4318"
    return base.rstrip("/") + "/v1/traces"


def traces_url(endpoint: str) -> str:
    """`otlp_endpoint` as written in the TOML → the URL spans are POSTed to: a base URL
    (no path, or "/") gets `/v1/traces`, as OTEL_EXPORTER_OTLP_ENDPOINT does."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"expected an http:// or https:// URL, got {endpoint!r}")
    if parts.path in ("", "/"):
        return endpoint.rstrip("/") + "/v1/traces"
    return endpoint


def _env_number(env: Mapping[str, str], name: str, default: float, minimum: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        log.warning("%s=%r is not a number; using %s", name, raw, default)
        return default
    if value < minimum:
        log.warning("%s=%r is below %s; using %s", name, raw, minimum, default)
        return default
    return value


def read_settings(sec, environ: Mapping[str, str] | None = None) -> TracingSettings | None:
    """`[telemetry].tracing` (a config Section; errors go to its TOML path) plus the
    standard variables. The TOML wins where both say something; None when
    OTEL_SDK_DISABLED=true."""
    env = os.environ if environ is None else environ
    raw_endpoint = sec.str("otlp_endpoint", None)
    ratio = sec.number("sampling", None)
    sec.done()
    endpoint = None
    if isinstance(raw_endpoint, str):
        endpoint = sec.convert("otlp_endpoint", raw_endpoint, traces_url)
    if isinstance(ratio, float) and not 0.0 <= ratio <= 1.0:
        sec.error("sampling", f"must be between 0 and 1, got {ratio}")
        ratio = None
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        log.info("tracing is configured but OTEL_SDK_DISABLED=true: no spans are made")
        return None
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        proto = env.get(name, "").strip()
        if proto and proto != "http/protobuf":
            log.warning("%s=%s is not supported; tracing exports http/protobuf", name, proto)
            break
    if ratio is not None:
        sampler = "parentbased_traceidratio"
    else:
        sampler = env.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_always_on"
        if sampler not in SAMPLERS:
            log.warning("OTEL_TRACES_SAMPLER=%s is not supported (one of %s); using parentbased_always_on",
                        sampler, ", ".join(SAMPLERS))
            sampler = "parentbased_always_on"
        ratio = 1.0
        if sampler.endswith("traceidratio"):
            arg = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
            try:
                ratio = float(arg) if arg else 1.0
                if not 0.0 <= ratio <= 1.0:
                    raise ValueError
            except ValueError:
                log.warning("OTEL_TRACES_SAMPLER_ARG=%r is not a ratio in [0, 1]; using 1.0", arg)
                ratio = 1.0
    max_queue = int(_env_number(env, "OTEL_BSP_MAX_QUEUE_SIZE", 2048, 1))
    batch = int(_env_number(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512, 1))
    delay = _env_number(env, "OTEL_BSP_SCHEDULE_DELAY", 5000, 1) / 1000
    return TracingSettings(endpoint, sampler, float(ratio), max_queue, min(batch, max_queue), delay)


# -- W3C trace context ------------------------------------------------------------------

def parse_traceparent(value: str) -> tuple[int, int, int] | None:
    """(trace id, parent span id, flags), or None when the header is not valid W3C."""
    m = _TRACEPARENT.fullmatch(value.strip(" \t"))
    if m is None:
        return None
    version, trace_id, span_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    tid, sid = int(trace_id, 16), int(span_id, 16)
    if not tid or not sid:
        return None
    return tid, sid, int(flags, 16)


class Sampler:
    """The six standard samplers; `sample(parent_flags, trace_id)`, parent_flags None at a root."""

    __slots__ = ("parent_based", "root", "bound")

    def __init__(self, name: str, ratio: float = 1.0):
        self.parent_based = name.startswith("parentbased_")
        self.root = name.removeprefix("parentbased_")
        # The SDK's TraceIdRatioBased: sampled when the low 64 bits are below the bound.
        self.bound = round(ratio * (1 << 64)) if self.root == "traceidratio" else 0

    def sample(self, parent_flags: int | None, trace_id: int) -> bool:
        if parent_flags is not None and self.parent_based:
            return bool(parent_flags & 1)
        root = self.root
        if root == "always_on":
            return True
        if root == "always_off":
            return False
        return (trace_id & _RATIO_LIMIT) < self.bound


# -- spans --------------------------------------------------------------------------------

class Span:
    """One span. Cheap when not sampled (`attributes` is None: `set` does nothing and
    `end` queues nothing), but it always has ids to propagate."""

    __slots__ = ("_tracing", "name", "kind", "trace_id", "span_id", "parent_id", "sampled",
                 "remote_parent", "tracestate", "start_ns", "end_ns", "attributes", "error")

    def __init__(self, tracing: "Tracing | None", name: str, kind: str, trace_id: int, parent_id: int,
                 sampled: bool, remote_parent: bool = False, tracestate: str | None = None,
                 attributes: dict | None = None):
        self._tracing = tracing
        self.name = name
        self.kind = kind
        self.trace_id = trace_id
        self.span_id = getrandbits(64) or 1
        self.parent_id = parent_id
        self.sampled = sampled
        self.remote_parent = remote_parent
        self.tracestate = tracestate
        self.start_ns = time.time_ns()
        self.end_ns = 0
        self.attributes = (attributes if attributes is not None else {}) if sampled else None
        self.error: str | None = None

    @property
    def trace_id_hex(self) -> str:
        return "%032x" % self.trace_id

    @property
    def span_id_hex(self) -> str:
        return "%016x" % self.span_id

    def traceparent(self) -> str:
        """The W3C `traceparent` naming this span as the parent (to inject upstream)."""
        return "00-%032x-%016x-%s" % (self.trace_id, self.span_id, "01" if self.sampled else "00")

    def set(self, key: str, value: Any) -> None:
        attrs = self.attributes
        if attrs is not None and value is not None:
            attrs[key] = value

    def update(self, attributes: Mapping[str, Any]) -> None:
        attrs = self.attributes
        if attrs is not None:
            for k, v in attributes.items():
                if v is not None:
                    attrs[k] = v

    def child(self, name: str, kind: str = CLIENT, attributes: dict | None = None) -> "Span":
        """A span for work this one waits on (an upstream call, a policy's remote check)."""
        return Span(self._tracing, name, kind, self.trace_id, self.span_id, self.sampled,
                    tracestate=self.tracestate, attributes=attributes)

    def end(self, error: str | None = None) -> None:
        """End once (later calls do nothing); `error` sets the span's status to ERROR."""
        if self.end_ns:
            return
        self.end_ns = time.time_ns()
        if error:
            self.error = error[:256]
        if self.attributes is not None and self._tracing is not None:
            self._tracing.queue(self)


def propagate(headers, span: Span) -> None:
    """Name `span` as the parent in request headers that will go upstream: `traceparent`
    replaced; the client's `tracestate` kept only with a valid `traceparent` (W3C)."""
    headers.set("traceparent", span.traceparent())
    if span.tracestate is None and "tracestate" in headers:
        headers.remove("tracestate")


def http_route(match) -> str | None:
    """A route's match as a low-cardinality `http.route`: the exact path, the prefix
    with `/*`, or the regex."""
    if match.path:
        return match.path
    if match.path_prefix:
        return match.path_prefix.rstrip("/") + "/*"
    if match.path_regex is not None:
        return match.path_regex.pattern
    return None


# -- semantic-convention attributes for the spans others open -------------------------------

def method_attributes(method: str) -> dict[str, str]:
    if method in _KNOWN_METHODS:
        return {"http.request.method": method}
    return {"http.request.method": "_OTHER", "http.request.method_original": method[:64]}


def http_client_attributes(backend: str, method: str, scheme: str, authority: str, path: str,
                           protocol: str | None = None) -> dict[str, Any]:
    """An upstream HTTP call (backend, JWKS fetch, token endpoint, HTTP ext_authz)."""
    host, _, port = authority.rpartition(":") if authority.rsplit(":", 1)[-1].isdigit() else (authority, "", "")
    attrs: dict[str, Any] = method_attributes(method)
    attrs["server.address"] = host.strip("[]")
    attrs["server.port"] = int(port) if port else (443 if scheme == "https" else 80)
    attrs["url.full"] = f"{scheme}://{authority}{path}"      # no query: it may carry secrets
    if backend:
        attrs["agproxy.backend"] = backend
    if protocol:
        attrs["network.protocol.version"] = _PROTOCOL_VERSION.get(protocol, protocol)
    return attrs


def rpc_attributes(service: str, method: str, address: str) -> dict[str, Any]:
    """A gRPC call (ext_authz Check, the rate-limit service's ShouldRateLimit)."""
    host, _, port = address.rpartition(":")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method,
            "server.address": host or address, "server.port": int(port) if port.isdigit() else None}


def redis_attributes(operation: str, address: str) -> dict[str, Any]:
    host, _, port = address.rpartition(":")
    return {"db.system.name": "redis", "db.operation.name": operation,
            "server.address": host or address, "server.port": int(port) if port.isdigit() else None}


def gen_ai_attributes(operation: str, provider: str, request_model: str, *,
                      response_model: str | None = None, input_tokens: int | None = None,
                      output_tokens: int | None = None, cache_read_tokens: int | None = None,
                      cache_creation_tokens: int | None = None) -> dict[str, Any]:
    """One LLM provider attempt (span name: f"{operation} {request_model}")."""
    return {"gen_ai.operation.name": operation, "gen_ai.provider.name": provider,
            "gen_ai.request.model": request_model, "gen_ai.response.model": response_model,
            "gen_ai.usage.input_tokens": input_tokens, "gen_ai.usage.output_tokens": output_tokens,
            "gen_ai.usage.cache_read.input_tokens": cache_read_tokens,
            "gen_ai.usage.cache_creation.input_tokens": cache_creation_tokens}


def mcp_attributes(method: str, tool: str | None = None, session: str | None = None,
                   request_id: Any = None) -> dict[str, Any]:
    """An MCP call (span name: f"{method} {tool}" when there is a tool, else the method)."""
    return {"mcp.method.name": method, "gen_ai.tool.name": tool, "mcp.session.id": session,
            "jsonrpc.request.id": None if request_id is None else str(request_id)}


# -- the per-process tracer ------------------------------------------------------------------

class Tracing:
    """What a runtime snapshot traces with. `start_server` is the per-request entry."""

    def __init__(self, settings: TracingSettings, metrics: Any = None):
        self.settings = settings
        self.metrics = metrics
        self.sampler = Sampler(settings.sampler, settings.ratio)
        self._pipeline: _Pipeline | None = None

    # -- lifecycle (in the serving process, after the fork) ---------------------------------
    async def start(self) -> None:
        self._pipeline = _acquire(self.settings, self.metrics)

    async def stop(self) -> None:
        pipeline, self._pipeline = self._pipeline, None
        if pipeline is not None and _release(pipeline):
            await asyncio.get_running_loop().run_in_executor(None, pipeline.shutdown, 5.0)

    def queue(self, span: Span) -> None:
        pipeline = self._pipeline
        if pipeline is not None:
            pipeline.put(span)

    # -- the request's server span ----------------------------------------------------------
    def start_server(self, request, conn) -> Span:
        """A SERVER span for this request, child of the client's `traceparent` if valid."""
        headers = request.headers
        parent = None
        tracestate = None
        tp = headers.get("traceparent")
        if tp is not None:
            values = headers.get_all("traceparent")
            parent = parse_traceparent(tp) if len(values) == 1 else None   # W3C: several = invalid
            if parent is not None:
                ts = headers.get_all("tracestate")
                if ts:
                    tracestate = ",".join(ts)[:_MAX_TRACESTATE]
        if parent is not None:
            trace_id, parent_id, flags = parent
            sampled = self.sampler.sample(flags, trace_id)
        else:
            trace_id = getrandbits(128) or 1
            parent_id = 0
            sampled = self.sampler.sample(None, trace_id)
        method = request.method
        attrs = None
        if sampled:
            attrs = method_attributes(method)
            attrs["url.path"] = request.path
            attrs["url.scheme"] = request.scheme
            attrs["network.protocol.version"] = _PROTOCOL_VERSION.get(request.protocol, request.protocol)
            attrs["client.address"] = conn.peer_host
            if request.authority:
                attrs["server.address"] = request.host
            ua = headers.get("user-agent")
            if ua:
                attrs["user_agent.original"] = ua[:256]
        return Span(self, method if method in _KNOWN_METHODS else "HTTP", SERVER, trace_id, parent_id,
                    sampled, remote_parent=parent is not None, tracestate=tracestate, attributes=attrs)

    @staticmethod
    def end_server(span: Span, status: int, *, route: str | None = None, http_route: str | None = None,
                   user: str | None = None, request_id: str | None = None, error: str | None = None) -> None:
        """End the request's span: status, route, the verified user; ERROR on a 5xx, or
        when a response below 400 was cut (`error` set; 499, the client leaving, is not ours)."""
        attrs = span.attributes
        if attrs is not None:
            attrs["http.response.status_code"] = status
            if http_route:
                attrs["http.route"] = http_route
                span.name = f"{span.name} {http_route}"
            if route:
                attrs["agproxy.route"] = route
            if user:
                attrs["enduser.id"] = str(user)[:256]
            if request_id:
                attrs["agproxy.request_id"] = request_id
            failed = None
            if status >= 500:
                attrs["error.type"] = str(status)
                failed = error or str(status)
            elif error and status < 400 and status != 499:
                attrs["error.type"] = "response_aborted"
                failed = error
            span.end(failed)
        else:
            span.end()


# -- export: a bounded queue and one thread per process -----------------------------------------

class _ExporterLog(logging.Filter):
    """Keeps the OTLP exporter's last message and stops it from being logged per batch;
    the pipeline logs one summary per LOG_INTERVAL instead."""

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []     # of the current export: the first says why

    def filter(self, record: logging.LogRecord) -> bool:
        if len(self.messages) < 8:
            try:
                self.messages.append(record.getMessage())
            except Exception:
                self.messages.append(str(record.msg))
        return False

    @property
    def reason(self) -> str:
        m = self.messages
        if not m:
            return "unknown reason"
        return m[0] if len(m) == 1 or m[-1] == m[0] else f"{m[0]} ... {m[-1]}"


class _Pipeline:
    def __init__(self, settings: TracingSettings, metrics: Any):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import _logger as exporter_logger
        from opentelemetry.sdk.resources import Resource
        from agproxy.telemetry.resource import process_resource

        self.settings = settings
        self.metrics = metrics
        self.resource = Resource(process_resource())
        self.queue: collections.deque = collections.deque()
        self.max_queue = settings.max_queue
        self.batch_size = settings.batch_size
        self.exporter = OTLPSpanExporter(endpoint=settings.endpoint) if settings.endpoint else OTLPSpanExporter()
        self.endpoint = settings.endpoint or _env_endpoint()
        self._exporter_log = _ExporterLog()
        exporter_logger.addFilter(self._exporter_log)
        self._filtered_logger = exporter_logger
        self._wake = threading.Event()
        self._stopping = False
        self._failed_since_log = 0
        self._last_log = 0.0
        self._dropped_full = 0
        self._deadline = 0.0
        self.users = 0
        self.thread = threading.Thread(target=self._run, name="agproxy-otlp-export", daemon=True)
        self.thread.start()

    # The event loop's side: never blocks, never raises.
    def put(self, span: Span) -> None:
        q = self.queue
        if len(q) >= self.max_queue:
            self._dropped_full += 1
            if self.metrics is not None:
                self.metrics.spans_dropped.labels("queue_full").inc()
            return
        q.append(span)
        if len(q) >= self.batch_size and not self._wake.is_set():
            self._wake.set()

    # The export thread's side.
    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self.settings.schedule_delay)
            self._wake.clear()
            self._drain()
        self._drain()

    def _drain(self) -> None:
        q = self.queue
        while q:
            batch = []
            while q and len(batch) < self.batch_size:
                batch.append(q.popleft())
            self._export(batch)
            if self._stopping and self._deadline and time.monotonic() > self._deadline:
                return


    def _export(self, batch: list[Span]) -> None:
        from opentelemetry.sdk.trace.export import SpanExportResult
        self._exporter_log.messages = []
        try:
            ok = self.exporter.export([self._readable(s) for s in batch]) is SpanExportResult.SUCCESS
        except Exception as exc:   # the exporter should not raise; never let the thread die
            self._exporter_log.messages.append(f"{type(exc).__name__}: {exc}")
            ok = False
        m = self.metrics
        if ok:
            if m is not None:
                m.spans_exported.inc(len(batch))
            if self._failed_since_log and time.monotonic() - self._last_log >= LOG_INTERVAL:
                self._log_failures(recovered=True)
            return
        if m is not None:
            m.spans_dropped.labels("export_failed").inc(len(batch))
        self._failed_since_log += len(batch)
        if time.monotonic() - self._last_log >= LOG_INTERVAL:
            self._log_failures()

    def _log_failures(self, recovered: bool = False) -> None:
        n, self._failed_since_log = self._failed_since_log, 0
        self._last_log = time.monotonic()
        if recovered:
            log.info("tracing: export to %s works again (%d spans lost before)", self.endpoint, n)
        else:
            log.warning("tracing: exporting spans to %s failed (%d spans lost; next report in %ds at most): %s",
                        self.endpoint, n, int(LOG_INTERVAL), self._exporter_log.reason)

    def _readable(self, s: Span):
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState
        state = TraceState()
        if s.tracestate:
            try:
                state = TraceState.from_header([s.tracestate])
            except Exception:
                pass
        flags = TraceFlags(TraceFlags.SAMPLED)
        ctx = SpanContext(s.trace_id, s.span_id, False, flags, state)
        parent = SpanContext(s.trace_id, s.parent_id, s.remote_parent, flags, state) if s.parent_id else None
        status = Status(StatusCode.ERROR, s.error) if s.error else Status(StatusCode.UNSET)
        return ReadableSpan(s.name, context=ctx, parent=parent, resource=self.resource,
                            attributes=s.attributes, kind=getattr(SpanKind, s.kind), status=status,
                            start_time=s.start_ns, end_time=s.end_ns or time.time_ns(),
                            instrumentation_scope=_scope())

    def shutdown(self, timeout: float = 5.0) -> None:
        """Export what is queued (bounded by `timeout`), then stop."""
        self._deadline = time.monotonic() + timeout
        self._stopping = True
        self._wake.set()
        self.thread.join(timeout)
        try:
            self.exporter.shutdown()
        except Exception:
            pass
        self._filtered_logger.removeFilter(self._exporter_log)


_SCOPE = None


def _scope():
    global _SCOPE
    if _SCOPE is None:
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from agproxy import __version__
        _SCOPE = InstrumentationScope(SCOPE, __version__)
    return _SCOPE


# One pipeline per process and settings, shared by the runtime snapshots that use it, so a
# reload that keeps the tracing settings neither restarts the thread nor loses spans.
_pipelines: dict[TracingSettings, _Pipeline] = {}
_lock = threading.Lock()


def _acquire(settings: TracingSettings, metrics: Any) -> _Pipeline:
    with _lock:
        p = _pipelines.get(settings)
        if p is None or not p.thread.is_alive():   # (a pipeline inherited through a fork has no thread)
            p = _pipelines[settings] = _Pipeline(settings, metrics)
        p.users += 1
        return p


def _release(p: _Pipeline) -> bool:
    """True when this was the last user (the caller shuts it down)."""
    with _lock:
        p.users -= 1
        if p.users > 0:
            return False
        if _pipelines.get(p.settings) is p:
            del _pipelines[p.settings]
        return True
