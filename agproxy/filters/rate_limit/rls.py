"""`[route.rate_limit.remote]`: the Envoy rate-limit service (RLS v3), e.g.
envoyproxy/ratelimit or Limitador.

Theory of operation
===================

Per request one unary call `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`
(upstream/grpc.py, under upstream/remote.py's deadline and failure mode) with the
section's `domain`, one descriptor per configured list of entries (each value a
CEL expression evaluated for the request) and `hits_addend` (1 per request). The
service keeps the counters and the limits; the gateway only asks.

- `overall_code` OVER_LIMIT → 429; `x-ratelimit-limit` is the `requests_per_unit`
  of the first descriptor status that is over its limit, `x-ratelimit-reset` and
  `retry-after` its `duration_until_reset`.
- OK → the request goes on, with the headers of the status that has the fewest
  `limit_remaining` (when the service reports limits).
- `response_headers_to_add` go on the answer either way (as Envoy's filter does).
- UNKNOWN, or a reply that is not a RateLimitResponse → a failure of the service.

A descriptor value that cannot be computed (a claim the token lacks, an
expression error) is a failure of the rate-limit step and follows `failure_mode`,
like the service being down: the descriptor is never left out, which would let
the request through unlimited with failure_mode closed (agentgateway #3523).

`unit = "tokens"`: the request counts one hit when it starts, and the LLM usage
reported on the exchange (less that one) is sent as `hits_addend` when it is done.
"""

from __future__ import annotations

import logging
from typing import Any

from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2

from agproxy.config.reader import Section
from agproxy.filters import compile_cel, eval_errors
from agproxy.filters.rate_limit.keys import RepeatedHeader, bounded, key_reader
from agproxy.filters.rate_limit.limits import NS, failed, limited, repeated
from agproxy.proxy.contract import LocalReply
from agproxy.telemetry import tracing
from agproxy.telemetry.counters import counter
from agproxy.upstream.grpc import GrpcClient, parse_target
from agproxy.upstream.remote import Failed, RemoteDependency, remote_settings

log = logging.getLogger("agproxy.policy")

_SERVICE = "envoy.service.ratelimit.v3.RateLimitService"
METHOD = f"/{_SERVICE}/ShouldRateLimit"
_OK = rls_pb2.RateLimitResponse.OK
_OVER = rls_pb2.RateLimitResponse.OVER_LIMIT
_Entry = ratelimit_pb2.RateLimitDescriptor.Entry
_Descriptor = ratelimit_pb2.RateLimitDescriptor


class _Garbage(Exception):
    failure = "garbage"


class RemoteLimits:
    """One `[route.rate_limit.remote]` section."""

    __slots__ = ("route", "domain", "descriptors", "method", "dep", "tokens", "decisions", "_keys",
                 "address")

    def __init__(self, route: str, domain: str, descriptors: list, method: Any, dep: RemoteDependency,
                 unit: str, address: str, metrics: Any):
        self.route = route
        self.domain = domain
        # [[(key, reader, expression, path)]]
        self.descriptors = tuple(tuple(d) for d in descriptors)
        self.method = method
        self.dep = dep
        self.tokens = unit == "tokens"
        self.address = address
        self.decisions = counter(metrics, "_rate_limit_decisions",
                                 "Rate-limit decisions by route, kind (local, redis, remote) and result "
                                 "(allowed, limited, error_allowed, error_denied)",
                                 ("route", "kind", "result"))
        self._keys = {r: (route, "remote", r) for r in ("allowed", "limited", "error_allowed", "error_denied")}

    def _request(self, ex: Any, hits: int) -> rls_pb2.RateLimitRequest:
        descriptors = []
        for entries in self.descriptors:
            values = []
            for key, read, expr, path in entries:
                try:
                    values.append(_Entry(key=key, value=bounded(read(ex))))
                except RepeatedHeader:
                    raise
                except Exception as exc:
                    eval_errors.error(path, expr.source, exc, "failed (rate limit descriptor)")
                    raise
            descriptors.append(_Descriptor(entries=values))
        return rls_pb2.RateLimitRequest(domain=self.domain, descriptors=descriptors, hits_addend=hits)

    async def decide(self, ex: Any, pending: Any) -> "tuple | LocalReply | None":
        """(remaining, limit text, reset ns) of the tightest status when allowed (None
        when the service reports no limits or failed open); a reply when refused or
        failed closed."""
        try:
            request = self._request(ex, 1)
        except RepeatedHeader as exc:
            ex.error = f"rate_limit: {exc}"
            return repeated(exc)              # the client's doing: 400, whatever failure_mode says
        except Exception:
            return self._failed(ex, "a rate limit descriptor could not be computed for this request")
        span = tracing.rpc_span(ex.span, _SERVICE, "ShouldRateLimit", self.address)
        result = await self.dep.call(self._call(request, tracing.context_headers(ex.span, span)), span)
        if type(result) is Failed:
            return self._failed(ex, "the rate limit service is unavailable")
        extra = [(h.key.lower(), h.value) for h in result.response_headers_to_add]
        if result.overall_code == _OVER:
            self.decisions.inc(self._keys["limited"])
            over = next((s for s in result.statuses if s.code == _OVER), None)
            limit = over.current_limit.requests_per_unit if over is not None and over.HasField("current_limit") else 0
            reset = _ns(over.duration_until_reset) if over is not None else 0
            reply = limited(limit, reset, reset)
            if not limit:      # no limit reported: only retry-after and the service's own headers
                reply.headers.remove("x-ratelimit-limit")
                reply.headers.remove("x-ratelimit-remaining")
                reply.headers.remove("x-ratelimit-reset")
            for name, value in extra:
                reply.headers.add(name, value)
            return reply
        self.decisions.inc(self._keys["allowed"])
        if extra:
            pending.headers.extend(extra)
        if self.tokens:
            pending.charges.append(lambda used: self.charge(request, used))
        best = None
        for s in result.statuses:
            if s.HasField("current_limit") and (best is None or s.limit_remaining < best[0]):
                best = (s.limit_remaining, str(s.current_limit.requests_per_unit), _ns(s.duration_until_reset))
        return best

    async def _call(self, request, metadata=()) -> Any:
        response = await self.method(request, timeout=self.dep.timeout, metadata=metadata, local_deadline=False)
        if response.overall_code not in (_OK, _OVER):
            raise _Garbage(f"overall_code {response.overall_code} (UNKNOWN)")
        return response

    async def charge(self, request, used: int) -> None:
        """Report the usage beyond the hit counted at the start (unit = "tokens")."""
        if used <= 1:
            return
        request.hits_addend = used - 1
        result = await self.dep.call(self._call(request))
        if type(result) is Failed:
            log.warning("%s: %d tokens could not be reported to the rate limit service (%s)",
                        self.route, used, result.failure)

    def _failed(self, ex: Any, why: str) -> LocalReply | None:
        if self.dep.allow_on_failure:
            self.decisions.inc(self._keys["error_allowed"])
            return None
        self.decisions.inc(self._keys["error_denied"])
        ex.error = f"rate_limit: remote: {why}"
        return failed(why)

    def describe(self) -> dict:
        return {"address": self.address, "domain": self.domain, "timeout_seconds": self.dep.timeout,
                "failure_mode": self.dep.failure_mode, "unit": "tokens" if self.tokens else "requests",
                "descriptors": [[{"key": k, "value": e.source} for k, _, e, _ in d] for d in self.descriptors]}


def _ns(duration) -> int:
    return duration.seconds * NS + duration.nanos


def build_remote(sec: Section, route: str, ctx: Any) -> RemoteLimits | None:
    before = len(sec.problems.items)
    address = sec.str("address")
    if isinstance(address, str):
        sec.convert("address", address, parse_target)
    domain = sec.str("domain")
    if isinstance(domain, str) and not domain:
        sec.error("domain", "must not be empty")
    settings = remote_settings(sec, default_timeout="20ms", max_timeout=60.0)
    unit = sec.str("unit", "requests", choices=("requests", "tokens"))
    tls = sec.bool("tls", False)
    ca_file = sec.str("tls_ca_file", None)
    if ca_file is not None:
        ca_file = ctx.path(ca_file)
        if not tls:
            sec.error("tls_ca_file", "only with tls = true")
    raw = sec.raw("descriptors")
    sec.done()
    descriptors = []
    if raw is not None:
        if not isinstance(raw, list) or not raw:
            sec.error("descriptors", "expected a non-empty list of descriptors (each a list of { key, value })")
        else:
            for i, entries in enumerate(raw):
                dpath = f"{sec.sub('descriptors')}[{i}]"
                if not isinstance(entries, list) or not entries:
                    sec.problems.add(dpath, "expected a non-empty list of { key = \"...\", value = \"<CEL>\" }")
                    continue
                built = []
                for j, entry in enumerate(entries):
                    epath = f"{dpath}[{j}]"
                    esec = Section(epath, entry, sec.problems)
                    key = esec.str("key")
                    source = esec.raw("value")
                    esec.done()
                    if isinstance(key, str) and not key:
                        esec.error("key", "must not be empty")
                    expr = compile_cel(sec.problems, f"{epath}.value", source)
                    if isinstance(key, str) and key and expr is not None:
                        built.append((key, key_reader(expr), expr, f"{epath}.value"))
                descriptors.append(built)
    if len(sec.problems.items) > before:
        return None
    client = GrpcClient(address, tls=tls, ca_file=ca_file, connect_timeout=max(settings.timeout, 0.25))
    method = client.unary(METHOD, rls_pb2.RateLimitResponse)
    dep = RemoteDependency("rate_limit_remote", settings, target=address)
    return RemoteLimits(route, domain, descriptors, method, dep, unit or "requests", address,
                        getattr(ctx, "metrics", None))
