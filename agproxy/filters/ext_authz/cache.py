"""The optional decision cache: answers of the authorization service kept for a while.

Theory of operation: `[route.ext_authz.cache]` names a CEL `key` (e.g.
`jwt.sub + " " + request.method + " " + request.path`), a `ttl` and a bound
(`max_entries`). Per request the key is evaluated; a fresh entry under that value
is the decision, with no call. A decision the service gave (allowed, with its
header changes, or denied, with its answer) is stored under the key; failures
never are. A key that cannot be evaluated (a missing claim) only means "not
cached": the service is asked.

The key must cover everything the service decides on: requests with the same
key get the same decision. Each worker process has its own cache.

Bounded: at most `max_entries` entries; when full, the oldest entry goes
(entries are kept in insertion order, so this is FIFO, which with one TTL for all
is also "the one expiring first"). Expired entries are dropped when found.
"""

from __future__ import annotations

import time
from typing import Callable

from agproxy.filters.ext_authz.decision import Decision

MAX_KEY = 1024      # a longer key value is not cached (a key from a huge header)


class DecisionCache:
    __slots__ = ("ttl", "max_entries", "_entries", "_clock")

    def __init__(self, ttl: float, max_entries: int, clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, Decision]] = {}
        self._clock = clock

    def get(self, key: str) -> Decision | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._entries[key]
            return None
        return entry[1]

    def put(self, key: str, decision: Decision) -> None:
        if len(key) > MAX_KEY:
            return
        entries = self._entries
        if key in entries:
            del entries[key]          # re-inserted last: its new expiry is the latest
        elif len(entries) >= self.max_entries:
            del entries[next(iter(entries))]
        entries[key] = (self._clock() + self.ttl, decision)

    def __len__(self) -> int:
        return len(self._entries)
