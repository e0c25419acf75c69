"""One rate limit's numbers, read from its config table, and the answers it gives.

A limit is `capacity` tokens refilled continuously at `refill.tokens` per
`refill.every` (GCRA, see buckets.py), keyed by an optional CEL `key`, counting
`unit = "requests"` (one token per request, taken before the request goes on) or
`"tokens"` (LLM tokens: the request needs one token left to start, and the
usage reported on the exchange is charged when it is done).

Answers (draft-ietf-httpapi-ratelimit-headers-03, as Envoy sends them):
`x-ratelimit-limit` = capacity, `x-ratelimit-remaining` = whole tokens left,
`x-ratelimit-reset` = seconds until the bucket is full again, and on a 429
`retry-after` = seconds until the request would be allowed (at least 1).
"""

from __future__ import annotations

from typing import Any

from agproxy.config.reader import Section
from agproxy.filters import compile_cel
from agproxy.proxy.contract import LocalReply

NS = 1_000_000_000
UNITS = ("requests", "tokens")
MAX_CAPACITY = 10 ** 12
MAX_WINDOW_NS = 10 * 365 * 86400 * NS     # capacity x interval: a full bucket's worth of time


class LimitSpec:
    """The parsed numbers of one limit (times in nanoseconds)."""

    __slots__ = ("path", "index", "capacity", "tokens", "every", "interval", "burst", "unit", "key")

    def __init__(self, path: str, index: int, capacity: int, tokens: int, every: float, unit: str, key: Any):
        self.path = path
        self.index = index
        self.capacity = capacity
        self.tokens = tokens
        self.every = every                     # seconds
        self.interval = int(round(every * NS)) // tokens
        self.burst = capacity * self.interval
        self.unit = unit
        self.key = key                         # a compiled CEL expression, or None: one bucket

    @property
    def identity(self) -> str:
        """What names this limit's buckets across reloads (same numbers, same buckets)."""
        return f"{self.index}\x00{self.capacity}\x00{self.tokens}\x00{self.every!r}\x00{self.unit}"

    def describe(self) -> dict:
        out = {"capacity": self.capacity, "refill": {"tokens": self.tokens, "every_seconds": self.every},
               "unit": self.unit}
        if self.key is not None:
            out["key"] = self.key.source
        return out


def read_limit(sec: Section, index: int, *, min_interval_ns: int = 1) -> LimitSpec | None:
    """A limit table: key, capacity, refill = { tokens, every }, unit (problems by TOML path)."""
    key_src = sec.raw("key", None)
    key = compile_cel(sec.problems, sec.sub("key"), key_src) if key_src is not None else None
    capacity = sec.int("capacity", min=1, max=MAX_CAPACITY)
    unit = sec.str("unit", "requests", choices=UNITS)
    rsec = sec.section("refill", required=True)
    tokens = every = None
    if rsec is not None:
        tokens = rsec.int("tokens", min=1, max=MAX_CAPACITY)
        every = rsec.duration("every")
        if every is not None and every <= 0:
            rsec.error("every", "must be more than 0")
            every = None
        rsec.done()
    sec.done()
    if (key_src is not None and key is None) or not isinstance(capacity, int) or capacity < 1 \
            or not isinstance(tokens, int) or tokens < 1 or every is None or unit is None:
        return None
    every_ns = int(round(every * NS))
    if every_ns // tokens < min_interval_ns:
        sec.error("refill", f"more than {NS // min_interval_ns:,} tokens per second is not supported")
        return None
    if capacity * (every_ns // tokens) > MAX_WINDOW_NS:
        sec.error("capacity", "capacity / refill rate is over 10 years")
        return None
    return LimitSpec(sec.path, index, capacity, tokens, every, unit, key)


def _ceil_s(ns: int) -> int:
    return -(-ns // NS) if ns > 0 else 0


def headers(capacity: int, remaining: int, reset_ns: int) -> list[tuple[str, str]]:
    return [("x-ratelimit-limit", str(capacity)),
            ("x-ratelimit-remaining", str(remaining if remaining > 0 else 0)),
            ("x-ratelimit-reset", str(_ceil_s(reset_ns)))]


def limited(capacity: int, reset_ns: int, retry_ns: int) -> LocalReply:
    """The 429 answer of a limit that refused the request."""
    retry = _ceil_s(retry_ns) or 1
    h = headers(capacity, 0, reset_ns)
    h.append(("retry-after", str(retry)))
    return LocalReply.error(429, "rate_limited", "too many requests: the route's rate limit is reached", h)


def repeated(exc: Exception) -> LocalReply:
    """The 400 for a request that repeats a header a rate limit key reads (keys.RepeatedHeader)."""
    return LocalReply.error(400, "bad_request", str(exc))


def failed(why: str) -> LocalReply:
    """The answer when the rate-limit step itself fails and fails closed."""
    return LocalReply.error(500, "rate_limit_error", why)
