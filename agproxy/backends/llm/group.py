"""`type = "llm_group"`: several LLM providers behind one route, with failover.

Theory of operation, per request (`respond`):

1. The client's API comes from the path: `.../chat/completions` is OpenAI Chat
   Completions, `.../messages` is Anthropic Messages; other paths are 404, other
   methods 405. The body is read (up to `max_request_body`, else 413), parsed and
   checked (400), and its model must be one the group serves (404). All of these
   answer in the client's API's error format, and no provider sees the request.
2. The eviction state (eviction.py) gives the order to try the providers in. For
   each, within `max_attempts`: translate the request (translate.py), send it
   (providers.py) and judge the answer before anything reaches the client:
   connect errors, resets, timeouts, garbage and a stream that breaks before its
   first event are unhealthy; an HTTP answer is unhealthy when the `health`
   expression (health.py) says so. With `failover = "retry"` an unhealthy answer
   moves on to the next provider (the request body is kept in memory for that),
   and counts toward that provider's eviction. A healthy error answer (400, 404,
   ...) is the client's: it is returned, translated into the client's format.
   When every attempt failed: 503 in the client's format naming the group.
3. A healthy answer is returned to the exchange, which commits it: JSON
   translated whole, or a stream (`LlmStream`) translated chunk by chunk. Once
   the stream has begun it is finished or, if the provider breaks it, ended
   with an error event (translate.py `fail`); never continued on another provider.
   A client that goes away cancels the upstream call (the exchange aborts the
   response's `source`, the provider's connection).
4. A completion hook (`ex.on_done`) records what happened: the verdict on a
   stream (complete or not), token usage, durations, the access-log fields
   (`llm_provider`, `llm_attempts`, `llm_model`, usage) and CEL `llm.*`.

Metrics (families made once per name through `Metrics.family`):
`<prefix>_gen_ai_client_token_usage` (histogram, `gen_ai_token_type` = input,
output, input_cache_read, input_cache_write; `input` includes the cached tokens),
`<prefix>_gen_ai_server_request_duration_seconds`,
`<prefix>_gen_ai_server_time_to_first_token_seconds`, `<prefix>_llm_provider_health`
(gauge: 1 healthy, 0.5 restored awaiting its probe, 0 evicted),
`<prefix>_llm_provider_evictions_total` and `<prefix>_llm_failovers_total`.
The histogram samples are batched in plain lists and flushed into prometheus-client's
children before each exposition (telemetry/histograms.py: its locked `inc` calls were
~23k instructions a request). Model labels are bounded: a requested model the config does not name, or a
response model past the first 64 seen, is recorded as `_OTHER`.

Eviction state is per process and survives a config reload when the group and
its provider names are unchanged.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from typing import Any

import orjson

from agproxy.backends.llm import translate
from agproxy.backends.llm.chat import BadRequest, ProviderError
from agproxy.backends.llm.eviction import EvictionPolicy, GroupHealth, ProviderHealth
from agproxy.backends.llm.health import DEFAULT_HEALTH, HealthCheck
from agproxy.backends.llm.providers import Provider, build_provider
from agproxy.backends.llm.record import UsageRecord
from agproxy.backends.llm.translate import ClientRequest, StreamTranslator
from agproxy.backends.llm.usage import Usage
from agproxy.config.reader import Section
from agproxy.http.messages import BodyAborted, BodyTooLarge, Headers
from agproxy.proxy.contract import Backend, Response
from agproxy.telemetry import tracing
from agproxy.telemetry.histograms import pending as pending_histograms
from agproxy.upstream.deadline import within
from agproxy.upstream.errors import UpstreamError

log = logging.getLogger("agproxy.llm")

TYPE = "llm_group"
MAX_BODY = 4 * 1024 * 1024
MAX_ANSWER = 32 * 1024 * 1024       # a non-streamed answer is read whole (to translate and count it)
MAX_ERROR_BODY = 64 * 1024
# OpenTelemetry GenAI semantic conventions' advised bucket boundaries.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
PROVIDER_NAMES = {"openai": "openai", "openai_compatible": "openai", "anthropic": "anthropic",
                  "bedrock": "aws.bedrock"}     # gen_ai.provider.name values
_JSON = (("content-type", "application/json"),)
_SSE = (("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache"))

_states: dict[tuple, GroupHealth] = {}      # per process: survives reloads


class _Bounded:
    """Label values from outside the config: the first `limit` distinct ones, then _OTHER."""

    __slots__ = ("known", "limit", "seen")

    def __init__(self, known: frozenset[str], limit: int = 64):
        self.known = known
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: str | None) -> str:
        if not value:
            return ""
        if value in self.known or value in self.seen:
            return value
        if len(self.seen) < self.limit and len(value) <= 128 and value.isprintable():
            self.seen.add(value)
            return value
        return "_OTHER"


TOKEN_TYPES = ("input", "output", "input_cache_read", "input_cache_write")


def _observe(h: list, bounds: Any, value: float) -> None:
    """One sample into a pending histogram (telemetry/histograms.py): the sum and the
    one bucket, found by bisect. Through prometheus-client (a lock per inc) an
    observation cost ~2.5k instructions (callgrind, h1-llm)."""
    h[0] += value
    h[1 + bisect_left(bounds, value)] += 1


def _observe_usage(tokens: tuple, u: Usage) -> None:
    """The four token samples of one answer (TOKEN_TYPES order), as `_observe` adds them,
    in one call and bisecting the int TOKEN_BUCKETS (an int against the children's
    float bounds compares by conversion): ~6k instructions a request less (callgrind)."""
    h_in, h_out, h_read, h_write = tokens
    v = u.input
    h_in[0] += v
    h_in[1 + bisect_left(TOKEN_BUCKETS, v)] += 1
    v = u.output
    h_out[0] += v
    h_out[1 + bisect_left(TOKEN_BUCKETS, v)] += 1
    v = u.cache_read
    h_read[0] += v
    h_read[1 + bisect_left(TOKEN_BUCKETS, v)] += 1
    v = u.cache_write
    h_write[0] += v
    h_write[1 + bisect_left(TOKEN_BUCKETS, v)] += 1


class _Metrics:
    """This group's metric children, cached per label tuple."""

    def __init__(self, metrics: Any):
        from prometheus_client import Counter, Gauge, Histogram
        fam = metrics.family
        model_labels = ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model",
                        "gen_ai_response_model", "route"]
        self.tokens = fam(Histogram, "gen_ai_client_token_usage",
                          "LLM tokens per request by type (input includes cached tokens)",
                          ["gen_ai_token_type", *model_labels], buckets=TOKEN_BUCKETS)
        self.duration = fam(Histogram, "gen_ai_server_request_duration_seconds",
                            "LLM request duration, from the request to the answer's last byte",
                            model_labels, buckets=DURATION_BUCKETS)
        self.ttft = fam(Histogram, "gen_ai_server_time_to_first_token_seconds",
                        "Time from the request to the first streamed token", model_labels, buckets=TTFT_BUCKETS)
        self.health = fam(Gauge, "llm_provider_health",
                          "Provider health in this process: 1 healthy, 0.5 restored awaiting its probe, 0 evicted",
                          ["group", "provider"], multiprocess_mode="livemin")
        self.evictions = fam(Counter, "llm_provider_evictions", "Providers taken out of a group's rotation",
                             ["group", "provider"])
        self.failovers = fam(Counter, "llm_failovers",
                             "Requests retried on another provider after an unhealthy answer", ["group", "provider"])
        self._children: dict[tuple, Any] = {}
        self._series: dict[tuple, tuple] = {}
        self.pending = pending_histograms(metrics)
        self.multiprocess = self.pending.multiprocess

    def series(self, labels: tuple) -> tuple:
        """The pending histograms (telemetry/histograms.py) of one label tuple: duration,
        ttft, the token ones in TOKEN_TYPES order, then the bucket bounds of the first two.
        One dict lookup a request instead of six (the label values are bounded, so is this)."""
        s = self._series.get(labels)
        if s is None:
            p = self.pending
            d, t = self.duration.labels(*labels), self.ttft.labels(*labels)
            toks = [self.tokens.labels(k, *labels) for k in TOKEN_TYPES]
            s = self._series[labels] = (p.series(d), p.series(t), tuple(p.series(c) for c in toks),
                                        d._upper_bounds, t._upper_bounds)
        return s

    def child(self, family: Any, labels: tuple) -> Any:
        key = (id(family), labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = family.labels(*labels)
        return c


class _Call:
    """One request's story, for the completion hook."""

    __slots__ = ("creq", "provider", "index", "model", "tr", "usage", "response_model", "ttft", "attempts",
                 "start", "status", "committed_stream", "span")

    def __init__(self, creq: ClientRequest, start: float):
        self.creq = creq
        self.provider: Provider | None = None
        self.index = -1
        self.model = ""
        self.tr: StreamTranslator | None = None
        self.usage: Usage | None = None
        self.response_model: str | None = None
        self.ttft: float | None = None
        self.attempts: list[dict] = []
        self.start = start
        self.status = 0
        self.committed_stream = False
        self.span = None        # the answering attempt's CLIENT span, ended by the completion hook


class LlmStream:
    """The committed stream: the provider's body through the translator."""

    __slots__ = ("src", "tr", "pending", "done", "call", "failure")

    trailers = None

    def __init__(self, src: Any, tr: StreamTranslator, first: bytes, call: _Call):
        self.src = src
        self.tr = tr
        self.pending = first
        self.done = False
        self.call = call
        self.failure: str | None = None

    @property
    def at_eof(self) -> bool:
        """Nothing more to read: the exchange sends the last chunk with the body's end."""
        return self.done and not self.pending

    async def read(self) -> bytes:
        body = self.src.body
        if self.pending:
            out, self.pending = self.pending, b""
            if not self.done and body.at_eof:
                # The provider's stream has already ended (a short answer arrives in one
                # read): its ending goes with these bytes, in one write to the client.
                self.done = True
                out += self.tr.end()
            return out
        tr = self.tr
        while not self.done:
            try:
                chunk = await body.read()
            except BodyAborted as exc:
                self.done = True
                self.failure = f"provider stream broke: {exc}"
                return tr.fail("the provider's stream broke")
            if not chunk:
                self.done = True
                return tr.end()
            try:
                out = tr.feed(chunk)
            except ProviderError as exc:
                self.done = True
                self.failure = str(exc)
                self.src.abort()
                return tr.fail("the provider sent an invalid stream")
            if self.call.ttft is None and tr.first_token:
                self.call.ttft = time.monotonic() - self.call.start
            if body.at_eof:
                self.done = True
                out += tr.end()
            if out:
                return out
        return b""


def _retry_after(headers: Headers) -> float | None:
    v = headers.get("retry-after")
    if v is None:
        return None
    try:
        return max(0.0, float(v.strip()))
    except ValueError:
        from email.utils import parsedate_to_datetime
        try:
            return max(0.0, parsedate_to_datetime(v).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


async def _read_all(body: Any, limit: int) -> bytes:
    parts = []
    total = 0
    while True:
        chunk = await body.read()
        if not chunk:
            return b"".join(parts)
        total += len(chunk)
        if total > limit:
            raise ProviderError(f"the answer exceeds {limit} bytes")
        parts.append(chunk)


async def _first_output(body: Any, tr: StreamTranslator) -> bytes:
    """Read the provider's stream until the translator has something for the client
    (or the stream ended: then whatever its end produces)."""
    while True:
        chunk = await body.read()
        if not chunk:
            return tr.end()
        first = tr.feed(chunk)
        if first:
            return first


class LlmGroup(Backend):
    kind = TYPE

    def __init__(self, name: str, providers: list[Provider], health: HealthCheck, state: GroupHealth, *,
                 failover: bool, max_attempts: int, max_body: int, models: frozenset[str] | None,
                 metrics: _Metrics | None, api: str):
        self.name = name
        self.providers = providers
        self.check = health
        self.state = state
        self.failover = failover
        self.max_attempts = max_attempts
        self.max_body = max_body
        self.models = models
        self.metrics = metrics
        self.api = api
        known = set(models or ())
        for p in providers:
            known.update(p.models)
            if p.model:
                known.add(p.model)
            known.update(p.models.values())
        self._label = _Bounded(frozenset(known))
        self._series: dict[tuple, tuple] = {}      # (kind, model, response model, route) → metric series
        self._served: dict[str, bool] = {}         # requested model → served (bounded)
        self._published: dict[int, float] = {}
        self._published_version = -1
        self._publish()

    # -- the client's side ------------------------------------------------------------
    def _client_api(self, path: str) -> str | None:
        if self.api != "auto":
            return self.api
        if path.endswith("/chat/completions"):
            return "openai"
        if path.endswith("/messages"):
            return "anthropic"
        return None

    @staticmethod
    def _error(api: str, status: int, kind: str, message: str, headers: tuple = ()) -> Response:
        return Response(status, Headers([*_JSON, *headers]), translate.error_reply(api, kind, message))

    def _serves(self, model: str) -> bool:
        served = self._served.get(model)
        if served is None:
            served = (self.models is None or model in self.models) and \
                any(p.model_for(model) is not None for p in self.providers)
            if len(self._served) < 1024:
                self._served[model] = served
        return served

    async def respond(self, ex: Any) -> Response:
        req = ex.request
        api = self._client_api(req.path)
        if api is None:
            return self._error("openai", 404, "not_found",
                               f"llm group {self.name!r} serves /v1/chat/completions and /v1/messages")
        if req.method != "POST":
            return self._error(api, 405, "invalid_request", "use POST", (("allow", "POST"),))
        declared = req.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            return self._error(api, 413, "too_large", f"the request body exceeds {self.max_body} bytes")
        try:
            raw = await ex.read_body(self.max_body)
        except BodyTooLarge:
            return self._error(api, 413, "too_large", f"the request body exceeds {self.max_body} bytes")
        try:
            creq = translate.parse_client(api, raw)
        except BadRequest as exc:
            return self._error(api, exc.status, exc.kind, str(exc))
        if not self._serves(creq.model):
            return self._error(api, 404, "not_found",
                               f"the model {creq.model[:100]!r} is not served by llm group {self.name!r}")
        call = _Call(creq, ex.start)
        # What token rate limits charge, and CEL's `llm` (record.py).
        ex.llm = UsageRecord(call, len(raw), self._cel)
        ex.on_done(self._done_hook(call))
        return await self._attempts(ex, call, api)

    # -- trying providers ------------------------------------------------------------
    async def _attempts(self, ex: Any, call: _Call, api: str) -> Response:
        creq = call.creq
        state = self.state
        timeout = ex.route.timeout if ex.route is not None else 60.0
        tried = 0
        plan = state.plan()
        self._publish()
        last_unhealthy: str | None = None
        for pos, i in enumerate(plan):
            if tried >= self.max_attempts:
                break
            p = self.providers[i]
            model = p.model_for(creq.model)
            if model is None or not state.begin(i):
                continue
            tried += 1
            if last_unhealthy is not None and self.metrics is not None:
                self.metrics.child(self.metrics.failovers, (self.name, last_unhealthy)).inc()
            try:
                path, body = translate.provider_request(creq, p.kind, model)
            except BadRequest as exc:
                state.release(i)
                return self._error(api, exc.status, exc.kind, str(exc))
            span = (tracing.gen_ai_span(ex.span, PROVIDER_NAMES[p.kind], model, p.origin, p.name)
                    if ex.span is not None else None)
            try:
                verdict = await self._try(ex, call, i, p, model, path, body, timeout, span)
            except BaseException:
                if span is not None:
                    span.fail("cancelled")
                raise
            if isinstance(verdict, Response):
                if span is not None:
                    call.span = span
                return verdict
            if span is not None:
                a = call.attempts[-1]
                if a["status"]:
                    span.attributes["http.response.status_code"] = a["status"]
                span.fail(a.get("error") or str(a["status"]))
            last_unhealthy = p.name
            self._publish()
            if not self.failover:
                break
        self._publish()
        why = f"every provider of llm group {self.name!r} failed" if tried else \
            f"no provider of llm group {self.name!r} can take this request now"
        ex.error = ex.error or why
        return self._error(api, 503, "unavailable", why)

    async def _try(self, ex: Any, call: _Call, i: int, p: Provider, model: str, path: str, body: bytes,
                   timeout: float, span: Any = None) -> Response | None:
        """One attempt: the Response to commit, or None (unhealthy: try the next)."""
        creq = call.creq
        state = self.state
        start = time.monotonic()
        attempt = {"provider": p.name, "status": 0}
        call.attempts.append(attempt)
        try:
            trace = tracing.context_headers(ex.span, span) if ex.span is not None else ()
            resp = await p.request(path, body, creq.stream, timeout, trace)
        except UpstreamError as exc:
            ex.add_attempt(self.name, p.origin.authority, p.name, start, 0, time.monotonic() - start, str(exc))
            attempt["error"] = exc.kind
            self._verdict(i, p, False)
            return None
        except BaseException:
            state.release(i)
            raise
        ex.add_attempt(self.name, p.origin.authority, p.name, start, resp.status, time.monotonic() - start)
        attempt["status"] = resp.status
        status = resp.status
        try:
            if not 200 <= status < 300:
                return await self._error_answer(ex, call, i, p, resp, attempt, timeout)
            if self.check.unhealthy(status, resp.headers, None):
                resp.abort()
                attempt["error"] = "unhealthy"
                self._verdict(i, p, False, _retry_after(resp.headers))
                return None
            if not creq.stream:
                return await self._json_answer(call, i, p, model, resp, attempt, timeout)
            return await self._stream_answer(call, i, p, model, resp, attempt, timeout)
        except BaseException:
            resp.abort()
            state.release(i)
            raise

    async def _error_answer(self, ex, call: _Call, i: int, p: Provider, resp, attempt: dict, timeout) -> Response | None:
        status = resp.status
        parsed = None
        try:
            data = await within(timeout, _read_all(resp.body, MAX_ERROR_BODY))
            if "json" in (resp.headers.get("content-type") or ""):
                parsed = orjson.loads(data)
        except (ProviderError, BodyAborted, TimeoutError, orjson.JSONDecodeError):
            resp.abort()
        unhealthy = self.check.unhealthy(status, resp.headers, parsed)
        self._verdict(i, p, not unhealthy, _retry_after(resp.headers) if unhealthy else None)
        if unhealthy:
            attempt["error"] = "unhealthy"
            return None
        # The provider's answer to this request (400, 404, 413, ...): the client's to read.
        err = translate.provider_error(p.kind, parsed, resp.headers.get("x-amzn-errortype"))
        message = err[1] if err else f"the provider answered {status}"
        call.provider, call.index, call.status = p, i, status
        if status in (401, 403, 407):
            # The provider refused the gateway's credentials: not the client's to fix.
            log.error("llm group %s: provider %s refused the gateway's credentials (%d)", self.name, p.name, status)
            return self._error(call.creq.api, 502, "upstream", f"provider {p.name!r} refused the gateway's credentials")
        kind = {404: "not_found", 413: "too_large", 429: "rate_limit"}.get(status, "invalid_request")
        return self._error(call.creq.api, status, kind, message[:1000])

    async def _json_answer(self, call: _Call, i: int, p: Provider, model: str, resp, attempt: dict,
                           timeout) -> Response | None:
        try:
            body = resp.body
            if body.complete and body.error is None and body.received <= MAX_ANSWER:
                data = body.take_buffered()     # the whole answer came with its head: no wait, no timer
            else:
                data = await within(timeout, _read_all(body, MAX_ANSWER))
            if translate.WIRE[p.kind] == call.creq.api:
                # Same format: the provider's bytes as they came (parsed to check and count them).
                response_model, usage = translate.parse_passthrough_reply(p.kind, data, model)
                out = data
            else:
                parsed, reply = translate.parse_provider_reply(p.kind, data, model)
                response_model, usage = reply.model, reply.usage
                out = translate.client_reply(call.creq, p.kind, parsed, reply)
        except (ProviderError, BodyAborted, TimeoutError) as exc:
            resp.abort()
            attempt["error"] = "invalid answer" if isinstance(exc, ProviderError) else "broken answer"
            self._verdict(i, p, False)
            return None
        self._verdict(i, p, True)
        call.provider, call.index, call.model, call.status = p, i, model, 200
        call.usage = usage
        call.response_model = response_model or model
        return Response(200, Headers(list(_JSON)), out)

    async def _stream_answer(self, call: _Call, i: int, p: Provider, model: str, resp, attempt: dict,
                             timeout) -> Response | None:
        """Read until the stream produced something for the client: a stream that dies
        or says garbage before that can still go to the next provider."""
        tr = StreamTranslator(call.creq, p.kind, model)
        try:
            body = resp.body
            if body.complete and body.error is None:
                # The whole stream came with its head (a short answer): read without a
                # wait or a timer, as _first_output would.
                chunk = body.take_buffered()
                first = (tr.feed(chunk) if chunk else b"") or tr.end()
            else:
                first = await within(timeout, _first_output(body, tr))
        except (ProviderError, BodyAborted, TimeoutError) as exc:
            resp.abort()
            attempt["error"] = "invalid stream" if isinstance(exc, ProviderError) else "broken stream"
            self._verdict(i, p, False)
            return None
        if tr.error is not None and not tr.first_token:
            # The stream opened with an error event (overloaded, throttled): unhealthy, not begun.
            resp.abort()
            attempt["error"] = "stream error"
            self._verdict(i, p, False)
            return None
        if tr.complete is False and resp.body.at_eof and not tr.first_token:
            attempt["error"] = "empty stream"
            self._verdict(i, p, False)
            return None
        call.provider, call.index, call.model, call.status = p, i, model, 200
        call.tr = tr
        call.committed_stream = True
        if tr.first_token:
            call.ttft = time.monotonic() - call.start
        return Response(200, Headers(list(_SSE)), LlmStream(resp, tr, first, call), resp)

    def _verdict(self, i: int, p: Provider, healthy: bool, retry_after: float | None = None) -> None:
        if self.state.record(i, healthy, retry_after):
            log.warning("llm group %s: provider %s evicted until +%.1fs (eviction %d)", self.name, p.name,
                        self.state.providers[i].evicted_until - self.state.clock(),
                        self.state.providers[i].evictions)
            if self.metrics is not None:
                self.metrics.child(self.metrics.evictions, (self.name, p.name)).inc()
        self._publish()

    def _publish(self) -> None:
        state = self.state
        if state.version == self._published_version:
            return
        self._published_version = state.version
        m = self.metrics
        if m is None:
            return
        for i, ph in enumerate(self.state.providers):
            v = ph.gauge
            if self._published.get(i) != v:
                self._published[i] = v
                m.child(m.health, (self.name, ph.name)).set(v)

    # -- completion -----------------------------------------------------------------------
    def _done_hook(self, call: _Call):
        def done(ex: Any) -> None:
            tr = call.tr
            if call.committed_stream and tr is not None:
                call.usage = tr.usage
                call.response_model = tr.response_model
                stream = ex.response.body if ex.response is not None else None
                if tr.complete:
                    self._verdict(call.index, call.provider, True)
                elif isinstance(stream, LlmStream) and (stream.failure or stream.done):
                    self._verdict(call.index, call.provider, False)     # truncated or garbled by the provider
                else:
                    self.state.release(call.index)                      # the client went away
            if call.span is not None:
                self._end_span(ex, call)
            self._account(ex, call)
        return done

    @staticmethod
    def _end_span(ex: Any, call: _Call) -> None:
        """The answering attempt's span gets what the answer said: the response model,
        the token usage; ERROR when the answer was not a 200 or its stream broke."""
        span, call.span = call.span, None
        span.attributes["http.response.status_code"] = call.status
        tracing.gen_ai_usage(span, call.response_model, call.usage)
        stream = ex.response.body if ex.response is not None else None
        if call.status != 200:
            span.fail(str(call.status))
        elif isinstance(stream, LlmStream) and stream.failure:
            span.fail("stream_broken")
        else:
            span.end()

    def _account(self, ex: Any, call: _Call) -> None:
        p = call.provider
        u = call.usage
        if p is None:
            ex.log("llm_attempts", call.attempts)
        elif u is None:
            ex.log_fields({"llm_provider": p.name, "llm_model": call.model, "llm_attempts": call.attempts})
        else:
            ex.log_fields({"llm_provider": p.name, "llm_model": call.model,
                           "llm_usage": {"input": u.input, "output": u.output, "input_cache_read": u.cache_read,
                                         "input_cache_write": u.cache_write},
                           "llm_attempts": call.attempts})
        m = self.metrics
        if m is None or p is None or call.status != 200:
            return
        route = ex.route.name if ex.route is not None else ""
        # The series by the raw values (one lookup); the bounded labels only for a new key.
        key = (p.kind, call.creq.model, call.response_model, route)
        series = self._series.get(key)
        if series is None:
            series = m.series(("chat", PROVIDER_NAMES[p.kind], self._label(call.creq.model),
                               self._label(call.response_model), route))
            if len(self._series) < 1024:
                self._series[key] = series
        duration, ttft, tokens, dur_bounds, ttft_bounds = series
        _observe(duration, dur_bounds, time.monotonic() - call.start)
        if call.ttft is not None:
            _observe(ttft, ttft_bounds, call.ttft)
        if u is not None:
            _observe_usage(tokens, u)
        if m.multiprocess:
            m.pending.added()

    def _cel(self, call: _Call) -> dict:
        p = call.provider
        u = call.usage if call.tr is None else call.tr.usage
        out: dict[str, Any] = {"group": self.name, "model": call.creq.model, "streaming": call.creq.stream,
                               "provider": p.name if p is not None else "",
                               "provider_kind": p.kind if p is not None else "",
                               "response_model": call.response_model or ""}
        if u is not None:
            out["usage"] = {"input": u.input, "output": u.output, "input_cache_read": u.cache_read,
                            "input_cache_write": u.cache_write}
        return out

    def describe(self) -> dict:
        return {"type": self.kind, "health": self.check.source, "failover": "retry" if self.failover else "none",
                "max_attempts": self.max_attempts, "max_request_body": self.max_body,
                "models": sorted(self.models) if self.models is not None else None,
                "eviction": {"duration": self.state.policy.duration,
                             "consecutive_failures": self.state.policy.consecutive_failures,
                             "max_duration": self.state.policy.max_duration},
                "providers": [dict(p.describe(), state=ph.state)
                              for p, ph in zip(self.providers, self.state.providers)]}


def build(name: str, sec: Section, ctx: Any) -> LlmGroup | None:
    sec.str("type")
    health_src = sec.str("health", DEFAULT_HEALTH)
    failover = sec.str("failover", "retry", choices=("retry", "none"))
    max_attempts = sec.int("max_attempts", 0, min=1, max=16)
    max_body = sec.int("max_request_body", MAX_BODY, min=1)
    models = sec.str_list("models", None)
    api = sec.str("api", "auto", choices=("auto", "openai", "anthropic"))
    ev = sec.section("eviction")
    policy = EvictionPolicy()
    if ev is not None:
        duration = ev.duration("duration", 30.0)
        failures = ev.int("consecutive_failures", 1, min=1)
        max_duration = ev.duration("max_duration", 600.0)
        ev.done()
        if isinstance(duration, float) and isinstance(max_duration, float) and max_duration < duration:
            ev.error("max_duration", "must be at least duration")
        policy = EvictionPolicy(duration or 30.0, failures or 1, max_duration or 600.0)
    creds = getattr(ctx, "_llm_credentials", None)
    if creds is None:
        creds = ctx._llm_credentials = {}
    providers = []
    seen = set()
    tables = sec.sections("provider")
    for t in tables:
        p = build_provider(t, ctx, creds)
        if p is None:
            continue
        if p.name in seen:
            t.error("name", f"duplicate provider name {p.name!r}")
        seen.add(p.name)
        providers.append(p)
    sec.done()
    if not tables:
        sec.error("provider", "an llm_group needs at least one [[backend.NAME.provider]]")
    from agproxy.cel import CelCompileError, compile_expression
    expr = None
    if isinstance(health_src, str):
        try:
            expr = compile_expression(health_src)
        except CelCompileError as exc:
            sec.error("health", str(exc))
    if expr is None or not providers or len(providers) != len(tables):
        return None
    key = (name, tuple((p.name, p.priority, p.weight) for p in providers))
    state = _states.get(key)
    if state is None:
        state = _states[key] = GroupHealth([ProviderHealth(p.name, p.priority, p.weight) for p in providers], policy)
    else:
        state.policy = policy
    metrics = _Metrics(ctx.metrics) if getattr(ctx, "metrics", None) is not None else None
    return LlmGroup(name, providers, HealthCheck(expr, name), state, failover=failover == "retry",
                    max_attempts=max_attempts or len(providers), max_body=max_body or MAX_BODY,
                    models=frozenset(models) if models is not None else None, metrics=metrics, api=api or "auto")
