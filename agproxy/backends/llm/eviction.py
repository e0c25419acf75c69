"""Provider health within one group: eviction with backoff, restore with a probe, selection.

Theory of operation (pure: the clock and the random source are injected). Each
provider is in one of three states:

- healthy: in rotation. An unhealthy answer adds to `failures`; at
  `consecutive_failures` the provider is evicted. A healthy answer resets the count.
- evicted (until `evicted_until`): out of rotation. The eviction lasts
  `duration × 2^level`, capped at `max_duration`, where `level` counts the
  evictions since the provider last served healthy traffic; a `Retry-After` the
  provider sent (429/503) is honoured when it is longer, up to `max_duration`.
  (agentgateway multiplies without a cap; we cap.)
- restored (probation): the eviction time passed. The next request that selects
  it is its probe, and while that probe is in flight no other request is sent
  there. A healthy probe returns it to healthy; an unhealthy one evicts it again
  at the next level.

`level` goes back to 0 once the provider, healthy again, answers healthy
traffic a full base `duration` after it was restored: a provider that flaps
keeps backing off, one that recovered starts from the base duration next time.

Selection (`plan()`), per request: the providers in rotation ordered by
`priority` (lowest first); within one priority a restored provider comes first
(its probe), then the healthy ones in a weighted random order (`weight`). When
none is in rotation the plan holds the one whose eviction ends soonest (a probe
in flight counts as ending now), so a request is tried rather than refused.

State is per process (each worker keeps its own, as it keeps its own
connections): with N workers a failing provider may be tried N times before
every worker has evicted it. Nothing here does I/O or takes a lock; the event
loop is the only caller.
"""

from __future__ import annotations

import random
import time
from typing import Callable

HEALTHY, EVICTED, RESTORED = "healthy", "evicted", "restored"


class EvictionPolicy:
    __slots__ = ("duration", "consecutive_failures", "max_duration")

    def __init__(self, duration: float = 30.0, consecutive_failures: int = 1, max_duration: float = 600.0):
        self.duration = duration
        self.consecutive_failures = max(1, consecutive_failures)
        self.max_duration = max(duration, max_duration)

    def length(self, level: int, retry_after: float | None) -> float:
        d = min(self.duration * (2 ** min(level, 32)), self.max_duration)
        if retry_after is not None and retry_after > d:
            d = min(retry_after, self.max_duration)
        return d


class ProviderHealth:
    __slots__ = ("name", "priority", "weight", "state", "failures", "level", "evicted_until", "probing",
                 "restored_at", "evictions")

    def __init__(self, name: str, priority: int = 0, weight: float = 1.0):
        self.name = name
        self.priority = priority
        self.weight = weight if weight > 0 else 1.0
        self.state = HEALTHY
        self.failures = 0
        self.level = 0
        self.evicted_until = 0.0
        self.probing = False
        self.restored_at: float | None = None
        self.evictions = 0

    @property
    def gauge(self) -> float:
        """1 healthy, 0.5 restored and waiting for its probe, 0 evicted."""
        return 1.0 if self.state == HEALTHY else (0.5 if self.state == RESTORED else 0.0)


class GroupHealth:
    def __init__(self, providers: list[ProviderHealth], policy: EvictionPolicy,
                 clock: Callable[[], float] = time.monotonic, rand: Callable[[], float] = random.random):
        self.providers = providers
        self.policy = policy
        self.clock = clock
        self.rand = rand
        # Bumped whenever a provider's state changes: the health gauges are republished
        # only then, not by a loop over the providers on every request (group.py _publish).
        self.version = 0

    def _refresh(self, now: float) -> None:
        for p in self.providers:
            if p.state == EVICTED and now >= p.evicted_until:
                p.state = RESTORED
                p.probing = False
                self.version += 1

    def plan(self) -> list[int]:
        """Indices of the providers to try for one request, in order."""
        now = self.clock()
        self._refresh(now)
        ps = self.providers
        if len(ps) == 1:
            return [0]      # the one provider is tried whatever its state (below, the soonest back)
        ready = [i for i, p in enumerate(ps) if p.state == HEALTHY or (p.state == RESTORED and not p.probing)]
        if not ready:
            soonest = min(range(len(ps)), key=lambda i: ps[i].evicted_until if ps[i].state == EVICTED else now)
            return [soonest]
        out: list[int] = []
        for prio in sorted({ps[i].priority for i in ready}):
            tier = [i for i in ready if ps[i].priority == prio]
            out.extend(i for i in tier if ps[i].state == RESTORED)
            out.extend(self._weighted([i for i in tier if ps[i].state == HEALTHY]))
        return out

    def _weighted(self, idx: list[int]) -> list[int]:
        if len(idx) < 2:
            return idx
        ps = self.providers
        left = list(idx)
        out = []
        while left:
            total = sum(ps[i].weight for i in left)
            r = self.rand() * total
            for j, i in enumerate(left):
                r -= ps[i].weight
                if r < 0 or j == len(left) - 1:
                    out.append(left.pop(j))
                    break
        return out

    def begin(self, i: int) -> bool:
        """Called before an attempt: False when a restored provider's probe is already
        in flight (another request took it; try the next one)."""
        p = self.providers[i]
        if p.state == RESTORED:
            if p.probing:
                return False
            p.probing = True
        return True

    def record(self, i: int, healthy: bool, retry_after: float | None = None) -> bool:
        """The verdict on one attempt; True when it evicted the provider."""
        p = self.providers[i]
        now = self.clock()
        if healthy:
            p.failures = 0
            if p.state == RESTORED:
                p.state = HEALTHY
                p.probing = False
                p.restored_at = now
                self.version += 1
            elif p.state == HEALTHY and p.level and p.restored_at is not None \
                    and now - p.restored_at >= self.policy.duration:
                p.level = 0
            return False
        if p.state == EVICTED:
            return False           # a last-resort attempt failed: it is already out
        p.failures += 1
        if p.state == RESTORED or p.failures >= self.policy.consecutive_failures:
            self._evict(p, now, retry_after)
            return True
        return False

    def release(self, i: int) -> None:
        """An attempt ended with no verdict (the client went away): free a probe slot."""
        p = self.providers[i]
        if p.state == RESTORED:
            p.probing = False

    def _evict(self, p: ProviderHealth, now: float, retry_after: float | None) -> None:
        p.evicted_until = now + self.policy.length(p.level, retry_after)
        p.level += 1
        p.state = EVICTED
        self.version += 1
        p.failures = 0
        p.probing = False
        p.evictions += 1
