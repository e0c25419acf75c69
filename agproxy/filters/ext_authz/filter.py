"""The ext_authz filter: ask the authorization service, apply what it decided.

Theory of operation: per request, `on_request`

1. evaluates the cache key, when the route has a decision cache; a fresh entry
   is applied at once, synchronously (no task, no call);
2. otherwise returns the call as an awaitable: the body part when the route
   includes the body (`ex.body`, buffered by the exchange up to `max_bytes`, or,
   with `allow_partial`, the first `max_bytes` bytes peeked (`ex.peek_body`), left
   for the backend to stream), then one call under the dependency's deadline
   (upstream/remote.py), whose result is a `Decision` or a `Failed`;
3. applies the decision: a denial is the client's answer; an allowed request gets
   its header and query changes, keeps the response changes for `on_response`
   (`ex.ext_authz`),
   and the dynamic metadata for CEL (`ext_authz.metadata`); a failure lets the
   request through (`failure_mode = "open"`) or answers `status_on_error`, with
   an empty body as Envoy does (or the service's `error_response`).

Every outcome is counted in `agproxy_ext_authz_decisions_total{route, result}`
(`allowed`, `denied`, `error_allowed`, `error_denied`) and named in the access log.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from agproxy.filters import eval_errors
from agproxy.filters.ext_authz.cache import DecisionCache
from agproxy.filters.ext_authz.decision import Decision, apply_mutations, denied_reply
from agproxy.filters.ext_authz.grpc_check import ErrorAnswer
from agproxy.proxy.contract import Filter, FilterResult, LocalReply, Response
from agproxy.telemetry.counters import counter
from agproxy.upstream.remote import Failed, RemoteDependency

log = logging.getLogger("agproxy.policy")

RESULTS = ("allowed", "denied", "error_allowed", "error_denied")


def _too_large(limit: int) -> LocalReply:
    return LocalReply.error(413, "payload_too_large",
                            f"the request body exceeds the {limit} bytes the authorization check accepts")


class ExtAuthzFilter(Filter):
    name = "ext_authz"

    def __init__(self, route: str, path: str, call: Callable[[Any, bytes | None, bool, Any], Any],
                 dep: RemoteDependency, *, max_bytes: int | None, allow_partial: bool,
                 status_on_error: int, cache: DecisionCache | None, cache_key: Any,
                 metrics: Any, describe: dict, sets_request_headers: frozenset[str] = frozenset(),
                 span: Callable[[Any], Any] | None = None):
        self.route = route
        # Known at load in HTTP mode (allowed_upstream_headers); a gRPC service names its own.
        self.sets_request_headers = sets_request_headers
        self.path = path
        self._call = call           # (ex, body, partial, its span or None) -> the call
        self._span = span or (lambda ex: None)   # the call's CLIENT span (sampled requests)
        self.dep = dep
        self.max_bytes = max_bytes
        self.allow_partial = allow_partial
        # Buffered by the exchange before this filter runs (413 over it); a partial
        # body is peeked here instead, so the rest can stream to the backend.
        self.body_limit = max_bytes if max_bytes is not None and not allow_partial else None
        self.error_reply = LocalReply(status_on_error)
        self.cache = cache
        self.cache_key = cache_key
        self._describe = describe
        self.decisions = counter(metrics, "_ext_authz_decisions",
                                 "External authorization outcomes by route and result (allowed, denied, "
                                 "error_allowed, error_denied)", ("route", "result"))
        self.cache_lookups = counter(metrics, "_ext_authz_cache_lookups",
                                     "Decision cache lookups by route and result (hit, miss)",
                                     ("route", "result")) if cache is not None else None
        # label tuples made once (counters are dicts keyed by them)
        self._allowed, self._denied, self._error_allowed, self._error_denied = ((route, r) for r in RESULTS)
        self._hit, self._miss = (route, "hit"), (route, "miss")

    # -- per request ------------------------------------------------------------------
    def on_request(self, ex: Any) -> FilterResult:
        key = None
        cache = self.cache
        if cache is not None:
            try:
                key = self.cache_key.evaluate_str(ex.activation)
            except Exception as exc:
                eval_errors.error(f"{self.path}.cache.key", self.cache_key.source, exc,
                                  "failed (not cached: asking the service)", level=logging.INFO)
            if key is not None:
                decision = cache.get(key)
                if decision is not None:
                    self.cache_lookups.inc(self._hit)
                    return self._apply(ex, decision)
                self.cache_lookups.inc(self._miss)
        return self._ask(ex, key)

    async def _ask(self, ex: Any, key: str | None) -> LocalReply | None:
        body = None
        partial = False
        limit = self.max_bytes
        if limit is not None:
            if self.allow_partial:
                body, whole = await ex.peek_body(limit)
                partial = not whole
            else:
                body = ex.body
                if body is not None and len(body) > limit:
                    return _too_large(limit)
            if not body and not partial:
                body = None        # no body: no body fields, as Envoy (it buffers nothing)
        span = self._span(ex) if ex.span is not None else None
        result = await self.dep.call(self._call(ex, body, partial, span), span)
        if type(result) is Failed:
            return self._failed(ex, result)
        if key is not None:
            self.cache.put(key, result)
        return self._apply(ex, result)

    def _apply(self, ex: Any, decision: Decision) -> LocalReply | None:
        if not decision.allowed:
            self.decisions.inc(self._denied)
            ex.log("ext_authz", "denied")
            ex.error = "ext_authz: denied by the authorization service"
            return decision.reply
        self.decisions.inc(self._allowed)
        ex.log("ext_authz", "allowed")
        decision.apply_to_request(ex.request)
        if decision.response_mutations:
            ex.ext_authz = decision
        meta = decision.metadata
        if meta is not None:
            view = {"metadata": meta}
            ex.add_cel_variable("ext_authz", lambda: view)
        return None

    def _failed(self, ex: Any, failed: Failed) -> LocalReply | None:
        ex.log("ext_authz_failure", failed.failure)
        if failed.allowed:
            self.decisions.inc(self._error_allowed)
            ex.log("ext_authz", "error_allowed")
            return None
        self.decisions.inc(self._error_denied)
        ex.log("ext_authz", "error_denied")
        ex.error = f"ext_authz: {failed.failure} (failure_mode closed)"
        err = failed.error
        if type(err) is ErrorAnswer:
            return denied_reply(err.status or self.error_reply.status, err.headers, err.body)
        return self.error_reply

    def on_response(self, ex: Any, resp: Response) -> None:
        decision = ex.ext_authz
        if decision is not None:
            apply_mutations(resp.headers, decision.response_mutations)

    def describe(self) -> dict:
        return {"type": self.name, **self._describe}
