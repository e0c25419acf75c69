"""OpenTelemetry tracing: a server span per request, child spans per upstream call, OTLP/HTTP.

Theory of operation. `[telemetry].tracing` (or nothing: then `runtime.tracing` is None
and the per-request path makes no span object at all) gives `TracingSettings`; the
runtime owns a `Tracing`, started in each serving process (after the fork: the
supervisor never starts one) and shared across reloads with the same settings.

Per request, on the event loop: `start_request(request, conn, request_id)` reads W3C
`traceparent` (and `tracestate`) from the client and decides sampling (parent-based: a
remote parent's sampled flag is followed; without one, the trace-id ratio, the same test
as the OpenTelemetry SDKs' TraceIdRatioBased, on the request id the exchange generated,
which becomes the trace id). A root that is not sampled gets no span at all (None: the
request costs what it costs with tracing off, one call and a few tests: the parser noted
whether trace-context fields came, so nothing is looked up or built, and it sends no
trace context); an unsampled remote parent is continued with an unsampled span, so its
trace id still goes upstream.
Only a sampled span records attributes and is queued when it ends.

Each upstream call of a sampled request is a CLIENT child made at its call site through
one helper per kind (`http_client_span` for a backend attempt or an HTTP check,
`rpc_span`, `redis_span`, `gen_ai_span`, `jwks_span`, `client_span` for the rest); each
returns None when the request is not sampled, so the call site pays one test.
`context_headers(parent, child)` gives the `traceparent` / `tracestate` to send; a
call site ends its span (`end()`, `fail(error_type)`, `end_http_client(status)`), or
hands it to `RemoteDependency.call`, which does. No call site knows about the exporter.

Spans are our own slotted objects, not the OpenTelemetry SDK's, and telemetry/otlp.py
encodes and sends them: measured with callgrind, the SDK's span start + end cost ~30k
instructions and its export path (ReadableSpan, then its protobuf encoder) ~365k per
span, against ~240k for a whole relayed request. The export runs on one thread per
process, started by the first span queued and asleep (no timer) while the queue is
empty, so a worker that samples nothing, or little, has none or one wake-up per batch
(a wake-up takes the GIL from the event loop); the queue is bounded
(`OTEL_BSP_MAX_QUEUE_SIZE`): a span that finds it full is dropped and counted, never
waited for; an export that fails (collector down, slow past its timeout, an error
status) counts its spans as dropped and is logged at most once per `LOG_INTERVAL`.
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

from agproxy.http.messages import NOTE_REQUEST_ID, NOTE_TRACEPARENT, NOTE_TRACESTATE

log = logging.getLogger("agproxy.telemetry")

LOG_INTERVAL = 60.0          # seconds between two "export failing" log lines
SCOPE = "agproxy"

# Span kinds, by name (telemetry/otlp.py maps them to OTLP's enum).
INTERNAL, SERVER, CLIENT = "INTERNAL", "SERVER", "CLIENT"

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
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
    from agproxy.telemetry.otlp import env_endpoint
    return env_endpoint()


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

_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16


def parse_traceparent(value: str) -> tuple[str, str, int] | None:
    """(trace id, parent span id, flags), ids as lowercase hex, or None when the header is
    not valid W3C."""
    m = _TRACEPARENT.fullmatch(value.strip(" \t"))
    if m is None:
        return None
    version, trace_id, span_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return trace_id, span_id, int(flags, 16)


class Sampler:
    """The six standard samplers; `sample(parent_flags, trace_id)` (hex), parent_flags None
    at a root."""

    __slots__ = ("parent_based", "root", "bound")

    def __init__(self, name: str, ratio: float = 1.0):
        self.parent_based = name.startswith("parentbased_")
        root = name.removeprefix("parentbased_")
        # The SDKs' TraceIdRatioBased: sampled when the low 64 bits are below the bound.
        self.bound = round(ratio * (1 << 64)) if root == "traceidratio" else 0
        if root == "traceidratio" and self.bound > _RATIO_LIMIT:
            root = "always_on"              # every 64-bit value is below the bound
        elif root == "traceidratio" and self.bound == 0:
            root = "always_off"
        self.root = root

    def sample(self, parent_flags: int | None, trace_id: str) -> bool:
        if parent_flags is not None and self.parent_based:
            return bool(parent_flags & 1)
        root = self.root
        if root == "always_on":
            return True
        if root == "always_off":
            return False
        return int(trace_id[16:], 16) < self.bound


# -- spans --------------------------------------------------------------------------------

class Span:
    """One span; ids are lowercase hex (as W3C and the access log write them). Cheap when
    not sampled (`attributes` is None: `set` does nothing and `end` queues nothing), but it
    always has ids to propagate."""

    __slots__ = ("_tracing", "name", "kind", "trace_id", "span_id", "parent_id", "sampled",
                 "remote_parent", "tracestate", "start_ns", "end_ns", "attributes", "error", "_tp",
                 "varying", "key")

    def __init__(self, tracing: "Tracing | None", name: str, kind: str, trace_id: str, parent_id: str,
                 sampled: bool, remote_parent: bool = False, tracestate: str | None = None,
                 attributes: dict | None = None, span_id: str | None = None):
        self._tracing = tracing
        self.name = name
        self.kind = kind
        self.trace_id = trace_id
        self.span_id = span_id or new_span_id()
        self.parent_id = parent_id
        self.sampled = sampled
        self.remote_parent = remote_parent
        self.tracestate = tracestate
        self.end_ns = 0
        self.error: str | None = None
        self._tp: str | None = None
        # One attribute that differs on every request (`url.path`): exported like the
        # others, kept apart so the rest encode as one cached block (telemetry/otlp.py).
        self.varying: tuple[str, Any] | None = None
        # Set only where nothing but the status code can change the attributes after it
        # (a plain backend attempt: backends/relay.py): the encoder's cache key then.
        self.key: tuple | None = None
        if sampled:
            self.start_ns = time.time_ns()
            self.attributes = attributes if attributes is not None else {}
        else:
            self.start_ns = 0
            self.attributes = None

    def traceparent(self) -> str:
        """The W3C `traceparent` naming this span as the parent (to inject upstream)."""
        tp = self._tp
        if tp is None:
            tp = self._tp = f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"
        return tp

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
        """A span for work this one waits on (an upstream call, a policy's remote check);
        `None` values in `attributes` are left out."""
        if attributes is not None and self.sampled:
            attributes = {k: v for k, v in attributes.items() if v is not None}
        return Span(self._tracing, name, kind, self.trace_id, self.span_id, self.sampled,
                    tracestate=self.tracestate, attributes=attributes)

    def fail(self, error_type: str, message: str | None = None) -> None:
        """End with status ERROR and `error.type` (a low-cardinality kind: "timeout",
        "503", ...); `message` (or the type) is the status description."""
        attrs = self.attributes
        self.key = None
        if attrs is not None and not self.end_ns:
            attrs["error.type"] = error_type
        self.end(message or error_type)

    def end(self, error: str | None = None) -> None:
        """End once (later calls do nothing); `error` sets the span's status to ERROR."""
        if self.end_ns:
            return
        if self.attributes is None:
            self.end_ns = 1
            return
        self.end_ns = time.time_ns()
        if error:
            self.error = error[:256]
        tracing = self._tracing
        if tracing is not None:
            pipeline = tracing._pipeline     # (Tracing.queue, inline: one call less per span)
            if pipeline is not None:
                pipeline.put(self)


_new = object.__new__


def new_span_id() -> str:
    return "%016x" % (getrandbits(64) or 1)


def new_ids() -> tuple[str, str]:
    """A new trace id and span id, hex: one call to the process PRNG (reseeded in every
    forked worker; no syscall per request)."""
    h = (getrandbits(192) | 1).to_bytes(24, "big").hex()
    return h[:32], h[32:]


def propagate(headers, span: Span) -> None:
    """Name `span` as the parent in request headers that will go upstream (a child span's
    call): `traceparent` replaced; `tracestate` kept only beside a valid parent (W3C)."""
    headers.set("traceparent", span.traceparent())
    if span.tracestate is None and "tracestate" in headers:
        headers.remove("tracestate")


def client_span(parent: Span | None, name: str, attributes: dict | None = None,
                kind: str = CLIENT) -> Span | None:
    """A CLIENT child of `parent` (the request's span, `ex.span`) for one upstream call,
    or None when nothing would be recorded (tracing off, or the request not sampled):
    the call site then does nothing else, so an unsampled request pays one test. The
    caller ends it (`end()`, `fail(error_type)`); `None` values in `attributes` are
    left out."""
    if parent is None or parent.attributes is None:
        return None
    return parent.child(name, kind, attributes)


def context_headers(parent: Span | None, child: Span | None) -> tuple[tuple[str, str], ...]:
    """The W3C trace-context headers (or gRPC metadata) for an upstream call: naming
    `child` when it records, else the request's own span (an unsampled trace still
    carries its trace id and flag 00 downstream); nothing when tracing is off."""
    span = child if child is not None else parent
    if span is None:
        return ()
    if span.tracestate:
        return (("traceparent", span.traceparent()), ("tracestate", span.tracestate))
    return (("traceparent", span.traceparent()),)


_server_attrs: dict[tuple[str, str, str], dict[str, Any]] = {}
_hosts: dict[str, str] = {}      # authority -> host, for the server span's `server.address`


def _address_attributes(scheme: str, authority: str, backend: str) -> dict[str, Any]:
    """`server.address` / `server.port` (and the backend's name) of an origin, made once
    per (scheme, authority, backend): copied per span, never re-parsed."""
    key = (scheme, authority, backend)
    attrs = _server_attrs.get(key)
    if attrs is None:
        host, sep, port = authority.rpartition(":")
        if not sep or not port.isdigit() or host.endswith(":"):
            host, port = authority, ""
        attrs = {"server.address": host.strip("[]"),
                 "server.port": int(port) if port else (443 if scheme == "https" else 80)}
        if backend:
            attrs["agproxy.backend"] = backend
        if len(_server_attrs) < 1024:
            _server_attrs[key] = attrs
    return attrs


_rpc_attrs: dict[tuple, dict[str, Any]] = {}


def rpc_span(parent: Span | None, service: str, method: str, address: str) -> Span | None:
    """`client_span` for a gRPC call (RPC semantic conventions; named
    `{rpc.service}/{rpc.method}`), its attributes made once per target."""
    if parent is None or parent.attributes is None:
        return None
    key = (service, method, address)
    attrs = _rpc_attrs.get(key)
    if attrs is None:
        attrs = {k: v for k, v in rpc_attributes(service, method, address).items() if v is not None}
        if len(_rpc_attrs) < 1024:
            _rpc_attrs[key] = attrs
    span = parent.child(f"{service}/{method}", CLIENT)
    span.attributes = attrs.copy()
    return span


def redis_span(parent: Span | None, operation: str, address: str) -> Span | None:
    """`client_span` for a Redis command (database semantic conventions)."""
    if parent is None or parent.attributes is None:
        return None
    key = ("redis", operation, address)
    attrs = _rpc_attrs.get(key)
    if attrs is None:
        attrs = {k: v for k, v in redis_attributes(operation, address).items() if v is not None}
        if len(_rpc_attrs) < 1024:
            _rpc_attrs[key] = attrs
    span = parent.child(operation, CLIENT)
    span.attributes = attrs.copy()
    return span


def gen_ai_span(parent: Span | None, provider: str, model: str, origin: Any, name: str) -> Span | None:
    """`client_span` for one LLM provider attempt (GenAI semantic conventions: named
    `chat {gen_ai.request.model}`); `gen_ai_usage` adds what the answer said."""
    if parent is None or parent.attributes is None:
        return None
    attrs = _address_attributes(origin.scheme, origin.authority, "").copy()
    attrs["gen_ai.operation.name"] = "chat"
    attrs["gen_ai.provider.name"] = provider
    attrs["gen_ai.request.model"] = model
    attrs["agproxy.llm.provider"] = name
    span = parent.child(f"chat {model}", CLIENT)
    span.attributes = attrs
    return span


def gen_ai_usage(span: Span, response_model: str | None, usage: Any) -> None:
    """`gen_ai.response.model` and the `gen_ai.usage.*` token counts (backends/llm/usage.py
    Usage: input, output, cache_read, cache_write)."""
    attrs = span.attributes
    if attrs is None:
        return
    if response_model:
        attrs["gen_ai.response.model"] = response_model[:256]
    if usage is not None:
        for key, n in (("gen_ai.usage.input_tokens", usage.input), ("gen_ai.usage.output_tokens", usage.output),
                       ("gen_ai.usage.cache_read.input_tokens", usage.cache_read),
                       ("gen_ai.usage.cache_creation.input_tokens", usage.cache_write)):
            if n is not None:
                attrs[key] = n


def jwks_span(parent: Span | None, provider: str, source: Any) -> Span | None:
    """`client_span` for a request that waits on a JWKS fetch (the first fetch, or an
    unknown `kid`'s refetch; identity/jwks.py HttpKeySource). The fetch is shared by
    the requests that wait on it, so no trace context is sent with it."""
    if parent is None or parent.attributes is None:
        return None
    url = getattr(source, "jwks_uri", None) or getattr(source, "discovery", None)
    if not url:
        return None
    parts = urlsplit(url)
    span = http_client_span(parent, "GET", parts.scheme, parts.netloc, parts.path)
    span.attributes["agproxy.jwt.provider"] = provider
    return span


def http_client_span(parent: Span, method: str, scheme: str, authority: str, target: str,
                     backend: str = "", resend: int = 0, name: str | None = None) -> Span:
    """A sampled request's CLIENT span for one HTTP call (HTTP client semantic
    conventions; `url.full` without the query: it may carry secrets). The caller
    checked `parent.attributes is not None`.

    Written for the instruction count (one per backend attempt of a sampled request):
    slots set directly, not through Span.__init__ (~13k → ~6k instructions, callgrind)."""
    attrs = _address_attributes(scheme, authority, backend).copy()
    known = method in KNOWN_METHODS
    attrs["http.request.method"] = method if known else "_OTHER"
    q = target.find("?")
    if resend:
        attrs["http.request.resend_count"] = resend
    span = _new(Span)
    span._tracing = parent._tracing
    span.name = name or (method if known else "HTTP")
    span.kind = CLIENT
    span.trace_id = trace_id = parent.trace_id
    span.span_id = span_id = "%016x" % (getrandbits(64) or 1)
    span.parent_id = parent.span_id
    span.sampled = True
    span.remote_parent = False
    span.tracestate = parent.tracestate
    span.error = None
    span.end_ns = 0
    span._tp = f"00-{trace_id}-{span_id}-01"
    span.key = None
    span.attributes = attrs
    span.varying = ("url.full", f"{scheme}://{authority}{target if q < 0 else target[:q]}")
    span.start_ns = time.time_ns()
    return span


def end_http_client(span: Span, status: int) -> None:
    """End an HTTP CLIENT span at the response head: a 4xx or 5xx is an error for a
    client span (HTTP semantic conventions)."""
    span.attributes["http.response.status_code"] = status
    if status >= 400:
        span.fail(str(status))
    elif not span.end_ns:            # Span.end, inline (once per backend attempt)
        span.end_ns = time.time_ns()
        pipeline = span._tracing._pipeline if span._tracing is not None else None
        if pipeline is not None:
            pipeline.put(span)


def add_mcp(span: Span, mcp, rename: bool = True) -> None:
    """The MCP semantic conventions on a span whose request carries a JSON-RPC call
    (`ex.mcp`, mcp/call.py; a batch is named by its first call): `mcp.method.name`,
    `gen_ai.tool.name` (or `gen_ai.prompt.name`, `mcp.resource.uri`), the session and
    request id; a CLIENT span is named `{method} {target}` (`rename`). Client-chosen
    strings, so bounded."""
    attrs = span.attributes
    call = mcp.calls[0] if mcp.calls else None
    if attrs is None or call is None or not call.method:
        return
    method = call.method[:128]
    attrs["mcp.method.name"] = method
    title = method
    name = call.name
    if isinstance(name, str) and name:
        name = name[:256]
        if method == "tools/call":
            attrs["gen_ai.tool.name"] = name
            attrs["gen_ai.operation.name"] = "execute_tool"
            title = f"{method} {name}"
        elif method == "prompts/get":
            attrs["gen_ai.prompt.name"] = name
            title = f"{method} {name}"
        elif method == "resources/read":
            attrs["mcp.resource.uri"] = name
    if rename:
        span.name = title
    if call.id is not None:
        attrs["jsonrpc.request.id"] = str(call.id)[:128]
    session = mcp.session
    if session:
        attrs["mcp.session.id"] = session[:256]


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
    if method in KNOWN_METHODS:
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
    """What a runtime snapshot traces with. `start_request` is the per-request entry."""

    def __init__(self, settings: TracingSettings, metrics: Any = None):
        self.settings = settings
        self.metrics = metrics
        self.sampler = Sampler(settings.sampler, settings.ratio)
        root = self.sampler.root
        self._root_sampled = True if root == "always_on" else False if root == "always_off" else None
        # The ratio's bound as 16 hex digits: for ids of lowercase hex (the exchange's),
        # text order is number order, so `id[16:] < _bound_hex` is the SDKs' test.
        self._bound_hex = "%016x" % self.sampler.bound if self._root_sampled is None else ""
        self._bound_first = self._bound_hex[:1]
        self._routes: dict = {}    # (route of this runtime snapshot, method name) -> names
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
    def start_request(self, request, conn, request_id: str | None = None) -> Span | None:
        """A SERVER span for this request, child of the client's `traceparent` if valid,
        and the request's headers made ready for the upstream: the client's `tracestate`
        stays only beside a valid `traceparent` (W3C). None for a root (no valid
        `traceparent` came) that is not sampled: such a request costs what it costs
        with tracing off, and sends no trace context upstream (W3C lets a vendor start a
        trace or not when none came; an incoming `traceparent`, sampled or not, is
        always continued and forwarded).

        A root's trace id is `request_id`, the 128 random bits (32 lowercase hex digits)
        the exchange generated as the request id: one value to correlate on (a client's
        own `x-request-id` never names a trace; a head the parser noted nothing in has the
        exchange's id, which is then taken as is).

        Written for the instruction count (benchmarks/instructions.py --tracing 0.01:
        ~1k instructions for an unsampled root, ~4.6k before): the root is decided
        before anything is built, from the fields the parser noted (http/messages.py
        NOTED_FIELDS; a dict of the head to look them up cost ~2.4k) and the request
        id's low 64 bits compared as hex text (`int(id[16:], 16)` cost ~2.2k, the
        slice alone ~0.9k: one character first, the slice 1 time in 16 at 0.01)."""
        noted = request.noted
        if noted:         # a trace-context field or a request id came, or not noted (-1)
            if noted < 0:
                noted = request.note()
            if noted & NOTE_TRACEPARENT:
                return self._continue_request(request, conn)
            if noted & NOTE_TRACESTATE:
                request.headers.remove("tracestate")     # (W3C: only beside a valid traceparent)
            # The client's request id (kept as the request id) never names a trace.
            if request_id is None or len(request_id) != 32 or (
                    noted & NOTE_REQUEST_ID and request.headers.get("x-request-id") == request_id):
                request_id = "%032x" % (getrandbits(128) or 1)
        # (Else, nothing noted: `request_id` is the exchange's, generated.)
        sampled = self._root_sampled
        if sampled is None:     # the trace-id ratio: int(request_id[16:], 16) < bound
            sampled = request_id[16] <= self._bound_first and request_id[16:] < self._bound_hex
        if not sampled:
            return None
        span = _new(Span)
        span._tracing = self
        span.kind = SERVER
        span.trace_id = request_id
        span.span_id = "%016x" % (getrandbits(64) or 1)
        span.parent_id = ""
        span.sampled = True
        span.remote_parent = False
        span.tracestate = span.error = None
        span.end_ns = 0
        span._tp = span.key = None
        # No `traceparent` in the request's headers: each upstream call of a sampled
        # request names its own CLIENT span (backends/relay.py appends it, cheaper
        # than replacing one).
        span.start_ns = time.time_ns()
        return self._server_attributes(span, request, conn)

    def _continue_request(self, request, conn) -> Span:
        """start_request when the client sent a `traceparent` (valid or not)."""
        headers = request.headers
        span = self._continue(headers)
        if not span.sampled:
            headers.set("traceparent", span.traceparent())
            return span
        headers.remove("traceparent")
        return self._server_attributes(span, request, conn)

    @staticmethod
    def _server_attributes(span: Span, request, conn) -> Span:
        method = request.method
        known = method in KNOWN_METHODS
        span.name = method if known else "HTTP"
        span.attributes = attrs = {
            "http.request.method": method if known else "_OTHER",
            "url.scheme": request.scheme,
            "network.protocol.version": _PROTOCOL_VERSION.get(request.protocol, request.protocol),
            "client.address": conn.peer_host,
        }
        if not known:
            attrs["http.request.method_original"] = method[:64]
        authority = request.authority
        if authority:
            host = _hosts.get(authority)
            if host is None:
                host = request.host
                if len(_hosts) < 1024:
                    _hosts[authority] = host
            attrs["server.address"] = host
        ua = request.headers.get("user-agent")
        if ua:
            attrs["user_agent.original"] = ua[:256]
        span.varying = ("url.path", request.path)
        return span

    def _continue(self, headers) -> Span:
        parent = None
        values = headers.get_all("traceparent")
        if len(values) == 1:                       # W3C: several traceparent headers = invalid
            parent = parse_traceparent(values[0])
        if parent is None:
            if "tracestate" in headers:
                headers.remove("tracestate")
            trace_id, span_id = new_ids()
            return Span(self, "", SERVER, trace_id, "", self.sampler.sample(None, trace_id), span_id=span_id)
        trace_id, parent_id, flags = parent
        ts = headers.get_all("tracestate")
        return Span(self, "", SERVER, trace_id, parent_id, self.sampler.sample(flags, trace_id),
                    remote_parent=True, tracestate=",".join(ts)[:_MAX_TRACESTATE] if ts else None)

    def end_request(self, span: Span, ex) -> None:
        """End the request's span from what the exchange learnt (duck-typed: `status`,
        `route`, `jwt_claims`, `request_id`, `error`)."""
        attrs = span.attributes
        if attrs is None:
            return
        status = ex.status or 0
        attrs["http.response.status_code"] = status
        route = ex.route
        if route is not None:
            key = (route, span.name)
            names = self._routes.get(key)
            if names is None:      # (route name, http.route, the span's name), once per route and method
                hr = http_route(route.match)
                names = self._routes[key] = (route.name, hr, f"{span.name} {hr}" if hr else span.name)
            attrs["agproxy.route"] = names[0]
            if names[1]:
                attrs["http.route"] = names[1]
            span.name = names[2]
        if ex.mcp is not None:
            add_mcp(span, ex.mcp, rename=False)
        claims = ex.jwt_claims
        if claims:
            user = claims.get("sub")
            if user:
                attrs["enduser.id"] = str(user)[:256]
        error = ex.error
        failed = None
        if status >= 500:
            attrs["error.type"] = str(status)
            failed = error or str(status)
        elif error and status < 400 and status != 499:
            attrs["error.type"] = "response_aborted"
            failed = error
        span.end_ns = time.time_ns()
        if failed:
            span.error = failed[:256]
        pipeline = self._pipeline
        if pipeline is not None:
            pipeline.put(span)

    @staticmethod
    def end_server(span: Span, status: int, *, route: str | None = None, http_route: str | None = None,
                   user: str | None = None, request_id: str | None = None, error: str | None = None) -> None:
        """End a server span: status, route, the verified user; ERROR on a 5xx, or when a
        response below 400 was cut (`error` set; 499, the client leaving, is not ours)."""
        attrs = span.attributes
        if attrs is None:
            return
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


# -- export: a bounded queue and one thread per process -----------------------------------------

class _Pipeline:
    def __init__(self, settings: TracingSettings, metrics: Any):
        from agproxy import __version__
        from agproxy.telemetry import otlp
        from agproxy.telemetry.resource import process_resource

        self.settings = settings
        self.metrics = metrics
        self.resource = otlp.encode_resource(process_resource())
        self.scope = otlp.encode_scope(SCOPE, __version__)
        self.queue: collections.deque = collections.deque()
        self.max_queue = settings.max_queue
        self.batch_size = settings.batch_size
        self.endpoint = settings.endpoint or otlp.env_endpoint()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.sender = otlp.Sender(self.endpoint, stop=self._stop)
        self._failed_since_log = 0
        self._last_log = 0.0
        self._deadline = 0.0
        self.users = 0
        self.pid = os.getpid()
        # Started by the first span (a worker that samples nothing has no export thread).
        self.thread: threading.Thread | None = None

    # The event loop's side: never blocks, never raises.
    def put(self, span: Span) -> None:
        q = self.queue
        n = len(q)
        if n >= self.max_queue:
            if self.metrics is not None:
                self.metrics.spans_dropped.labels("queue_full").inc()
            return
        q.append(span)
        # The thread sleeps untimed while the queue is empty: the first span wakes it
        # (then it waits for the schedule delay), and so does a full batch.
        if n == 0 or n + 1 == self.batch_size:
            if self.thread is None:
                self._start_thread()
            self._wake.set()

    def _start_thread(self) -> None:
        if self._stop.is_set():
            return          # shutting down: shutdown() exports what is queued
        thread = threading.Thread(target=self._run, name="agproxy-otlp-export", daemon=True)
        try:
            thread.start()
        except RuntimeError as exc:    # (no thread to be had: spans queue up, then count as dropped)
            log.warning("tracing: cannot start the export thread: %s", exc)
            return
        self.thread = thread

    # The export thread's side. Wake-ups: one when a span arrives in an empty queue, one
    # when a batch fills or the schedule delay ends; none while there is nothing to send
    # (each costs the event loop a GIL hand-off).
    def _run(self) -> None:
        wake, stop, q = self._wake, self._stop, self.queue
        while not stop.is_set():
            wake.clear()
            if not q:
                wake.wait()                  # until a span is queued (or shutdown)
                wake.clear()
            if len(q) < self.batch_size and not stop.is_set():
                wake.wait(self.settings.schedule_delay)   # until a full batch (or shutdown)
            self._drain()
        self._drain()

    def _drain(self) -> None:
        q = self.queue
        pop = q.popleft
        while q:
            # (The event loop only appends: at least len(q) spans are there to take.)
            batch = [pop() for _ in range(min(len(q), self.batch_size))]
            self._export(batch)
            if self._deadline and time.monotonic() > self._deadline:
                return

    def _export(self, batch: list[Span]) -> None:
        from agproxy.telemetry import otlp
        try:
            why = self.sender.send(otlp.encode(batch, self.resource, self.scope))
        except Exception as exc:   # a bug must not kill the thread
            why = f"{type(exc).__name__}: {exc}"
        m = self.metrics
        if why is None:
            if m is not None:
                m.spans_exported.inc(len(batch))
            if self._failed_since_log and time.monotonic() - self._last_log >= LOG_INTERVAL:
                self._log(None)
            return
        if m is not None:
            m.spans_dropped.labels("export_failed").inc(len(batch))
        self._failed_since_log += len(batch)
        if time.monotonic() - self._last_log >= LOG_INTERVAL:
            self._log(why)

    def _log(self, why: str | None) -> None:
        n, self._failed_since_log = self._failed_since_log, 0
        self._last_log = time.monotonic()
        if why is None:
            log.info("tracing: export to %s works again (%d spans lost before)", self.endpoint, n)
        else:
            log.warning("tracing: exporting spans to %s failed (%d spans lost; next report in %ds at most): %s",
                        self.endpoint, n, int(LOG_INTERVAL), why)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Export what is queued (bounded by `timeout`), then stop."""
        self._deadline = time.monotonic() + timeout
        self._stop.set()
        self._wake.set()
        if self.thread is not None:
            self.thread.join(timeout)
        else:
            self._drain()       # (nothing queued, unless the thread could not start)
        self.sender.close()


# One pipeline per process and settings, shared by the runtime snapshots that use it, so a
# reload that keeps the tracing settings neither restarts the thread nor loses spans.
_pipelines: dict[TracingSettings, _Pipeline] = {}
_lock = threading.Lock()


def _acquire(settings: TracingSettings, metrics: Any) -> _Pipeline:
    with _lock:
        p = _pipelines.get(settings)
        # (A pipeline inherited through a fork is the parent's: its thread is not here.)
        if p is None or p.pid != os.getpid() or (p.thread is not None and not p.thread.is_alive()):
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
