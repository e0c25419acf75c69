"""`[route.rate_limit]`: local token buckets exact across workers, Redis across replicas.

Theory of operation
===================

A route's rate limits are one filter, at the rate-limiting stage (after
authentication and authorization, so keys may read verified claims). It holds:

- `[[route.rate_limit.local]]` limits: buckets in the table the worker processes
  share (buckets.py), checked synchronously, so a route with only local limits
  costs no task and no await;
- `[route.rate_limit.redis]`: limits kept in Redis (redis_limit.py), one atomic
  script per request, for gateways with several replicas;
- `[route.rate_limit.remote]`: the Envoy rate-limit service (rls.py), one
  ShouldRateLimit call per request.

Per request every limit is asked in that order; the first that refuses answers
429 (limits.py has the headers) and gives back what the earlier ones took, so a
refused request costs no tokens. An allowed request carries the headers of the
most constrained limit (the fewest tokens left). A key whose CEL expression
cannot be evaluated (a claim the token lacks) is a failure of the rate-limit
step, never a silent pass: local limits answer 500 (fail closed), Redis and the
rate-limit service follow their `failure_mode`; write `default(jwt.sub,
"anonymous")` for a shared bucket instead. A Redis or service that fails or
exceeds `timeout` follows its `failure_mode` too (upstream/remote.py).

`unit = "tokens"` limits need one token left to let a request start, and charge
the LLM usage reported on the exchange once it is done.

Decisions are counted by route, kind (`local`, `redis`, `remote`) and result (`allowed`,
`limited`, `error_allowed`, `error_denied`); evictions from the shared table in
their own counter.
"""

from __future__ import annotations

import asyncio
import logging
import time
from operator import itemgetter
from typing import Any

from agproxy.config.reader import Section
from agproxy.filters import eval_errors
from agproxy.filters.rate_limit.keys import RepeatedHeader, key_reader
from agproxy.filters.rate_limit.limits import NS, LimitSpec, failed, limited, read_limit, repeated
from agproxy.proxy.contract import Filter, FilterResult, LocalReply
from agproxy.proxy.registry import RATE_LIMITING
from agproxy.telemetry.counters import counter, direct_counts

KEY = "rate_limit"
STAGE = RATE_LIMITING

log = logging.getLogger("agproxy.policy")
_now_ns = time.monotonic_ns

# ex.rate_limit: what on_response writes into the answer's headers, (remaining, limit
# text, reset ns), or (remaining, limit text, reset ns, headers to add) when a rate-limit
# service asked for headers of its own (remaining None: no limit to show).


class Pending:
    """What the limits of a request leave for later: usage to charge, headers to add."""

    __slots__ = ("charges", "headers")

    def __init__(self) -> None:
        self.charges: list = []      # callables used_tokens -> None or an awaitable
        self.headers: list = []      # (name, value) from the rate-limit service


class LocalLimit:
    """One `[[route.rate_limit.local]]` entry, bound to its route's buckets."""

    __slots__ = ("spec", "salt", "interval", "burst", "capacity", "label", "read", "key", "tokens", "where")

    def __init__(self, spec: LimitSpec, route: str):
        self.spec = spec
        # The key's bucket is hash(value) ^ salt: the salt names (route, limit, numbers),
        # so a reload that keeps them keeps the buckets (buckets.py, "Keys").
        self.salt = hash(f"{route}\x00{spec.identity}") or 1
        self.interval = spec.interval
        self.burst = spec.burst
        self.capacity = spec.capacity
        self.label = str(spec.capacity)
        self.key = spec.key
        self.read = key_reader(spec.key) if spec.key is not None else None
        self.tokens = spec.unit == "tokens"
        self.where = f"{spec.path}.key"


_HEADER_NAMES = frozenset(("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"))
_name = itemgetter(0)


def _seconds(ns: int) -> str:
    """Whole seconds, rounded up (x-ratelimit-reset): "0" for a full bucket."""
    return str(-(-ns // NS)) if ns > 0 else "0"


class RateLimitFilter(Filter):
    name = "rate_limit"

    def __init__(self, route: str, local: list[LocalLimit], remotes: list, table: Any, metrics: Any):
        self.route = route
        self.local = tuple(local)
        self.remotes = tuple(remotes)       # RedisLimits, RemoteLimits: asked after the local ones
        self.table = table
        self.decisions = counter(metrics, "_rate_limit_decisions",
                                 "Rate-limit decisions by route, kind (local, redis, remote) and result "
                                 "(allowed, limited, error_allowed, error_denied)",
                                 ("route", "kind", "result"))
        evictions = counter(metrics, "_rate_limit_evictions",
                            "Live buckets dropped from the shared local table to make room for new keys")
        if table is not None and metrics is not None:
            table.on_evict = evictions.inc
        self.charged = any(l.tokens for l in self.local) or any(r.tokens for r in self.remotes)
        one = self.local[0] if len(self.local) == 1 and not self.remotes else None
        self._one = one if one is not None and not one.tokens else None
        self._counts = direct_counts(self.decisions)     # (one process: no call per request)
        self._table = table
        self._take = table.take if table is not None else None
        self._allowed = (route, "local", "allowed")
        self._limited = (route, "local", "limited")
        self._error = (route, "local", "error_denied")

    # -- per request ---------------------------------------------------------------------
    def on_request(self, ex: Any) -> FilterResult:
        lim = self._one
        if lim is None:
            return self._all(ex)
        # The common case, one local limit counting requests: the loop below without
        # its bookkeeping (~2k instructions less per request, ratelimit_bench.py).
        read = lim.read
        if read is None:
            h = lim.salt
        else:
            try:
                h = (hash(read(ex)) ^ lim.salt) or 1
            except Exception as exc:
                return self._key_failed(ex, lim, exc, None, 0)
        now = _now_ns()
        interval = lim.interval
        burst = lim.burst
        tat = self._take(h, interval, burst, 1, now)
        if tat < 0:
            self.decisions.inc(self._limited)
            return limited(lim.capacity, burst - interval - tat, -tat)
        counts = self._counts
        if counts is not None:
            key = self._allowed
            counts[key] = counts.get(key, 0) + 1
        else:
            self.decisions.inc(self._allowed)
        now = self._table.now       # with other workers, maybe later than the clock read above
        ex.rate_limit = ((burst - tat + now) // interval, lim.label, tat - now)
        return None

    def _key_failed(self, ex: Any, lim: LocalLimit, exc: Exception, taken: list | None, now: int) -> LocalReply:
        self._give_back(taken, now)
        if type(exc) is RepeatedHeader:
            self.decisions.inc(self._error)
            ex.error = f"rate_limit: {exc}"
            return repeated(exc)
        eval_errors.error(lim.where, lim.key.source, exc, "failed (rate limit key: refusing)")
        self.decisions.inc(self._error)
        ex.error = f"rate_limit: {lim.where} could not be evaluated"
        return failed("the rate limit key could not be computed for this request")

    def _all(self, ex: Any) -> FilterResult:
        now = _now_ns()
        best = None                  # (remaining, capacity text, reset ns) of the tightest limit
        taken = None                 # [(limit, bucket)] to give back if a later limit refuses
        pending = Pending() if self.charged or self.remotes else None
        table = self.table
        for lim in self.local:
            read = lim.read
            if read is None:
                h = lim.salt
            else:
                try:
                    h = (hash(read(ex)) ^ lim.salt) or 1
                except Exception as exc:
                    return self._key_failed(ex, lim, exc, taken, now)
            if lim.tokens:
                # Start only with a token left; the usage is charged when the exchange is done.
                tat = table.peek(h, now)
                if tat + lim.interval - now > lim.burst:
                    self._give_back(taken, now)
                    self.decisions.inc(self._limited)
                    return limited(lim.capacity, tat - now, tat + lim.interval - now - lim.burst)
                remaining = (lim.burst - tat + now) // lim.interval
                reset = tat - now
                pending.charges.append(_local_charge(table, lim, h))
            else:
                tat = table.take(h, lim.interval, lim.burst, 1, now)
                if tat < 0:
                    self._give_back(taken, now)
                    self.decisions.inc(self._limited)
                    return limited(lim.capacity, lim.burst - lim.interval - tat, -tat)
                took_at = table.now     # with other workers, maybe later than `now`
                remaining = (lim.burst - tat + took_at) // lim.interval
                reset = tat - took_at
                if taken is None:
                    taken = [(lim, h)]
                else:
                    taken.append((lim, h))
            if best is None or remaining < best[0]:
                best = (remaining, lim.label, reset)
        if self.local:
            self.decisions.inc(self._allowed)
        if self.remotes:
            return self._remote(ex, best, taken, now, pending)
        self._done(ex, best, pending)
        return None

    async def _remote(self, ex: Any, best: tuple | None, taken: list | None, now: int,
                      pending: Pending) -> LocalReply | None:
        for remote in self.remotes:
            verdict = await remote.decide(ex, pending)
            if isinstance(verdict, LocalReply):
                self._give_back(taken, now)
                return verdict
            if verdict is not None and (best is None or verdict[0] < best[0]):
                best = verdict
        self._done(ex, best, pending)
        return None

    @staticmethod
    def _done(ex: Any, best: tuple | None, pending: Pending | None) -> None:
        """Every limit allowed the request: keep the answer's headers, and charge its usage
        to the "tokens" limits when the exchange is done."""
        if pending is None:
            ex.rate_limit = best
            return
        if pending.headers:
            ex.rate_limit = (best or (None, None, None)) + (pending.headers,)
        else:
            ex.rate_limit = best
        if pending.charges:
            charges = pending.charges
            ex.on_done(lambda ex: charge_usage(ex, charges))

    def _give_back(self, taken: list | None, now: int) -> None:
        if taken:
            for lim, h in taken:
                self.table.refund(h, lim.interval, 1, now)

    def on_response(self, ex: Any, head: Any) -> None:
        state = ex.rate_limit
        if state is None:
            return
        remaining = state[0]
        if remaining is not None:
            headers = head.headers
            items = headers.items
            if not _HEADER_NAMES.isdisjoint(map(_name, items)):     # (C loops, no Python one)
                headers.items = items = [(k, v) for k, v in items if k not in _HEADER_NAMES]  # ours replace the backend's
            reset = state[2]
            items += (("x-ratelimit-limit", state[1]),
                      ("x-ratelimit-remaining", str(remaining) if remaining > 0 else "0"),
                      ("x-ratelimit-reset", "1" if 0 < reset <= NS else _seconds(reset)))
        if len(state) == 4:
            head.headers.items.extend(state[3])     # the rate-limit service's response_headers_to_add

    def describe(self) -> dict:
        out: dict = {"type": self.name}
        if self.local:
            out["local"] = [l.spec.describe() for l in self.local]
        for remote in self.remotes:
            out["redis" if hasattr(remote, "client") else "remote"] = remote.describe()
        return out


# -- completion: LLM token usage ------------------------------------------------------------

_tasks: set = set()                 # charges to Redis / the service in flight (kept referenced)


def _local_charge(table: Any, lim: LocalLimit, h: int):
    return lambda used: table.charge(h, lim.interval, used, _now_ns())


def charge_usage(ex: Any, charges: list) -> None:
    """The exchange is done: charge its LLM usage (input + output tokens, cached
    input included) to the `unit = "tokens"` limits that let it in. Local buckets
    at once; Redis and the rate-limit service by a task (completion hooks are
    synchronous), whose failure is logged."""
    llm = getattr(ex, "llm", None)
    used = ((llm.input_tokens or 0) + (llm.output_tokens or 0)) if llm is not None else 0
    if used <= 0:
        return
    for charge in charges:
        pending = charge(used)
        if pending is not None and hasattr(pending, "__await__"):
            task = asyncio.get_running_loop().create_task(pending)
            _tasks.add(task)
            task.add_done_callback(_tasks.discard)


def build(sec: Section, ctx: Any) -> RateLimitFilter | None:
    problems_before = len(sec.problems.items)
    route = _route_name(sec, ctx)
    local_specs = []
    for i, lsec in enumerate(sec.sections("local")):
        spec = read_limit(lsec, i)
        if spec is not None:
            local_specs.append(spec)
    remotes = []
    rsec = sec.section("redis")
    if rsec is not None:
        from agproxy.filters.rate_limit.redis_limit import build_redis
        remotes.append(build_redis(rsec, route, ctx))
    rsec = sec.section("remote")
    if rsec is not None:
        from agproxy.filters.rate_limit.rls import build_remote
        remotes.append(build_remote(rsec, route, ctx))
    sec.done()
    if len(sec.problems.items) > problems_before:
        return None
    if not local_specs and not remotes:
        sec.error(None, "no limits: add [[...local]] entries, a [...redis] or a [...remote] table")
        return None
    table = None
    if local_specs:
        from agproxy.filters.rate_limit.buckets import shared_table
        table = shared_table(ctx.cfg.gateway.rate_limit_buckets)
    cls = RateLimitFilter
    from agproxy.filters.rate_limit.mcp import McpRateLimitFilter, is_mcp_route
    if is_mcp_route(_route_cfg(sec, ctx), ctx.cfg):
        cls = McpRateLimitFilter          # refusals as JSON-RPC errors (mcp.py)
    return cls(route, [LocalLimit(s, route) for s in local_specs], remotes, table,
               getattr(ctx, "metrics", None))


def _route_cfg(sec: Section, ctx: Any) -> Any:
    """The config of the route this section is under (`route[2].rate_limit`), or None."""
    prefix = sec.path.rsplit(".", 1)[0]
    for rcfg in getattr(ctx.cfg, "routes", ()):
        if rcfg.path == prefix:
            return rcfg
    return None


def _route_name(sec: Section, ctx: Any) -> str:
    """The name of the route this section is under (`route[2].rate_limit` → its name)."""
    rcfg = _route_cfg(sec, ctx)
    return rcfg.name if rcfg is not None else sec.path.rsplit(".", 1)[0]
