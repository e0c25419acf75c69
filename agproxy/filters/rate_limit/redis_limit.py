"""`[route.rate_limit.redis]`: limits kept in Redis, exact across gateway replicas.

Theory of operation
===================

Algorithm: GCRA, the same as the local buckets (buckets.py), so a limit means the
same thing wherever it is kept: one integer per bucket (its theoretical arrival
time, in Redis's own clock, microseconds), O(1) per request, a key that expires
by itself when its bucket is full again (`PX`). A sliding-window log needs a
sorted set with one member per request (memory grows with the capacity) and the
sliding-window counter is an approximation; GCRA is exact with one number.

One round trip: one Lua script (`SCRIPT`) checks every limit of the route's
section at once, reading the time with `TIME` (replicas' clocks never enter),
and only when all allow does it write them, so the script is the atomic unit
and a refused request takes nothing. Requests that arrive together share one
pipeline (upstream/redis.py).

Keys: `<prefix><route>:<limit index>:<capacity>/<tokens>/<every>:<unit>:<value>`;
a value over 128 bytes (a client may choose it) is replaced by its BLAKE2b-128
digest, so a key's size is bounded. The same key names the same bucket on every
replica; changing a limit's numbers gives it new (full) buckets.

Failures (not listening, no answer within `timeout`, an error reply, a reply
that does not parse, a key expression that fails) follow `failure_mode`:
closed (the default) answers 500 with a JSON error, open lets the request
through; both are counted (`error_denied` / `error_allowed`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from agproxy.config.reader import Section
from agproxy.filters import eval_errors
from agproxy.filters.rate_limit.keys import RepeatedHeader, bounded, key_reader
from agproxy.filters.rate_limit.limits import LimitSpec, failed, limited, read_limit, repeated
from agproxy.proxy.contract import LocalReply
from agproxy.telemetry import tracing
from agproxy.telemetry.counters import counter
from agproxy.upstream.redis import Script, classify, client_for, parse_address
from agproxy.upstream.remote import Failed, RemoteDependency, remote_settings

log = logging.getLogger("agproxy.policy")

US = 1000            # ns per microsecond: Redis keeps microseconds

# KEYS: one per limit. ARGV[1]: "take" or "charge"; then per limit: interval (us),
# burst (us), cost, check_only ("1": must fit, is not written; unit = "tokens").
# Returns {allowed, now, new tat of each limit} (for a refused request, what the
# tat would have become).
SCRIPT = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local charge = ARGV[1] == 'charge'
local out = {1, now}
for i = 1, #KEYS do
  local b = 4 * i - 2
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then tat = now end
  local new = tat + tonumber(ARGV[b + 2]) * tonumber(ARGV[b])
  out[i + 2] = new
  if not charge and new - now > tonumber(ARGV[b + 1]) then out[1] = 0 end
end
if out[1] == 1 then
  for i = 1, #KEYS do
    if charge or ARGV[4 * i + 1] == '0' then
      local new = out[i + 2]
      redis.call('SET', KEYS[i], string.format('%.0f', new), 'PX', math.max(1, math.ceil((new - now) / 1000)))
    end
  end
end
return out
""")


class RedisLimits:
    """The limits of one `[route.rate_limit.redis]` section."""

    __slots__ = ("route", "specs", "client", "dep", "prefix", "decisions", "_keys", "_static_args",
                 "_charged", "address", "_iv", "_bu", "_bases", "_readers", "tokens")

    def __init__(self, route: str, specs: list[LimitSpec], client: Any, dep: RemoteDependency, prefix: str,
                 address: str, metrics: Any):
        self.route = route
        self.specs = tuple(specs)
        self.client = client
        self.dep = dep
        self.prefix = prefix
        self.address = address
        self.decisions = counter(metrics, "_rate_limit_decisions",
                                 "Rate-limit decisions by route, kind (local, redis, remote) and result "
                                 "(allowed, limited, error_allowed, error_denied)",
                                 ("route", "kind", "result"))
        self._keys = {r: (route, "redis", r) for r in ("allowed", "limited", "error_allowed", "error_denied")}
        self._bases = tuple(f"{prefix}{route}:{s.index}:{s.capacity}/{s.tokens}/{s.every:g}:{s.unit}"
                            for s in self.specs)
        self._readers = tuple(key_reader(s.key) if s.key is not None else None for s in self.specs)
        # Microseconds per token and of burst, as the script computes with them.
        self._iv = tuple(max(1, s.interval // US) for s in self.specs)
        self._bu = tuple(s.capacity * iv for s, iv in zip(self.specs, self._iv))
        args: list = ["take"]
        for s, iv, bu in zip(self.specs, self._iv, self._bu):
            args += [iv, bu, 1, 1 if s.unit == "tokens" else 0]
        self._static_args = args
        self._charged = tuple(i for i, s in enumerate(self.specs) if s.unit == "tokens")
        self.tokens = bool(self._charged)

    def _key(self, i: int, ex: Any) -> str:
        base = self._bases[i]
        read = self._readers[i]
        if read is None:
            return base
        return f"{base}:{bounded(read(ex))}"

    async def decide(self, ex: Any, pending: Any) -> "tuple | LocalReply | None":
        """(remaining, capacity, reset_ns) of the tightest limit when allowed; a reply when
        refused or failed closed; None when failed open."""
        keys = []
        for i, spec in enumerate(self.specs):
            try:
                keys.append(self._key(i, ex))
            except RepeatedHeader as exc:
                ex.error = f"rate_limit: {exc}"
                return repeated(exc)          # the client's doing: 400, whatever failure_mode says
            except Exception as exc:
                eval_errors.error(f"{spec.path}.key", spec.key.source, exc, "failed (rate limit key)")
                return self._failed(ex, "the rate limit key could not be computed for this request", exc)
        result = await self.dep.call(self._run(keys, self._static_args),
                                     tracing.redis_span(ex.span, "EVALSHA", self.address))
        if type(result) is Failed:
            return self._failed(ex, "the rate limit service is unavailable", result.error)
        allowed, now, news = result
        best = None
        for spec, iv, bu, new in zip(self.specs, self._iv, self._bu, news):
            tat = new - iv
            if not allowed and new - now > bu:
                self.decisions.inc(self._keys["limited"])
                return limited(spec.capacity, (tat - now) * US, (new - now - bu) * US)
            if spec.unit == "tokens":
                remaining = (bu - (tat - now)) // iv
                reset = (tat - now) * US
            else:
                remaining = (bu - (new - now)) // iv
                reset = (new - now) * US
            if best is None or remaining < best[0]:
                best = (remaining, str(spec.capacity), reset)
        if self._charged:
            charged = [keys[i] for i in self._charged]
            pending.charges.append(lambda used: self.charge(charged, used))
        self.decisions.inc(self._keys["allowed"])
        return best

    async def _run(self, keys: list, args: list) -> tuple[int, int, list[int]]:
        """One script call; a reply of the wrong shape is the dependency's failure (garbage)."""
        result = await self.client.script(SCRIPT, keys, args)
        try:
            allowed, now, *news = result
            news = [int(n) for n in news]
            if allowed not in (0, 1) or len(news) != len(keys):
                raise ValueError
            return allowed, int(now), news
        except (TypeError, ValueError):
            raise _Garbage(f"unexpected reply to the rate limit script: {result!r:.200}") from None

    def _failed(self, ex: Any, why: str, exc: BaseException) -> LocalReply | None:
        if self.dep.allow_on_failure:
            self.decisions.inc(self._keys["error_allowed"])
            return None
        self.decisions.inc(self._keys["error_denied"])
        ex.error = f"rate_limit: redis: {why}"
        return failed(why)

    async def charge(self, keys: list[str], used: int) -> None:
        """Charge `used` tokens to the `unit = "tokens"` limits' buckets (after the fact)."""
        args: list = ["charge"]
        for i in self._charged:
            args += [self._iv[i], self._bu[i], used, 0]
        result = await self.dep.call(self._run(keys, args))
        if type(result) is Failed:
            log.warning("%s: %d tokens could not be charged (%s)", self.route, used, result.failure)

    def describe(self) -> dict:
        return {"address": self.address, "timeout_seconds": self.dep.timeout,
                "failure_mode": "open" if self.dep.allow_on_failure else "closed",
                "limits": [s.describe() for s in self.specs]}


class _Garbage(Exception):
    failure = "garbage"


def build_redis(sec: Section, route: str, ctx: Any) -> RedisLimits | None:
    before = len(sec.problems.items)
    address = sec.str("address")
    target = sec.convert("address", address, parse_address) if isinstance(address, str) else None
    password_env = sec.str("password_env", None)
    password = None
    if password_env is not None:
        password = os.environ.get(password_env)
        if password is None:
            sec.error("password_env", f"environment variable {password_env} is not set")
    tls_ca_file = sec.str("tls_ca_file", None)
    if tls_ca_file is not None:
        tls_ca_file = ctx.path(tls_ca_file)
        if not os.path.isfile(tls_ca_file):
            sec.error("tls_ca_file", f"file not found: {tls_ca_file}")
        elif target is not None and target.scheme != "rediss":
            sec.error("tls_ca_file", "only for a rediss:// address")
    settings = remote_settings(sec, default_timeout="20ms", max_timeout=60.0)
    prefix = sec.str("key_prefix", "agproxy:rl:")
    specs = []
    lsecs = sec.sections("limits")
    if sec.has("limits") and not lsecs and not sec.problems.items[before:]:
        sec.error("limits", "at least one limit is required")
    elif not sec.has("limits"):
        sec.error("limits", "required")
    for i, lsec in enumerate(lsecs):
        spec = read_limit(lsec, i, min_interval_ns=US)
        if spec is not None:
            specs.append(spec)
    sec.done()
    if len(sec.problems.items) > before or target is None:
        return None
    timeout = settings.timeout
    client = client_for(target, password=password, tls_ca_file=tls_ca_file,
                        socket_timeout=max(1.0, 4 * timeout), connect_timeout=max(0.25, 2 * timeout))
    dep = RemoteDependency("rate_limit_redis", settings, target=str(target), classify=classify)
    return RedisLimits(route, specs, client, dep, prefix, str(target), getattr(ctx, "metrics", None))
