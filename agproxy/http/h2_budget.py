"""Flood budgets of one HTTP/2 server connection, in one place.

Theory of operation: some frames cost the server work (a callback, an answer, a
stream slot, a task) without moving any request forward. A peer that sends them
without end is attacking, whatever each frame's validity. `FloodBudget` is the one
object per connection that counts them; the codec (http/h2_frames.py) and the
connection (http/h2.py) call it where such a frame is handled, and when a budget
is spent the connection ends with GOAWAY ENHANCE_YOUR_CALM (RFC 9113 §7: "the peer
is exhibiting a behavior that might be generating excessive load"). Each trip is
counted by kind in `TRIPS`, a per-process dict the metrics collector reads at
scrape time (`agproxy_http2_flood_total{kind}`); `http/` never imports telemetry.

The limits, and why they cannot touch a well-behaved client:

- ``reset``: streams reset either way, i.e. RST_STREAM from the client on a stream
  in flight (rapid reset, CVE-2023-44487) and the resets the gateway is made to
  send (MadeYouReset, CVE-2025-8671: WINDOW_UPDATE 0, DATA on a closed stream,
  flow-control and content-length errors, malformed requests, streams refused
  over the concurrency limit). Tolerated up to RESET_MIN, then only while fewer
  than the streams answered in full. Every reset stream's handler is cancelled
  (http/h2.py), so before the trip a client holds at most max_concurrent_streams
  handlers, as with well-formed requests.
- ``continuation``: more than MAX_CONTINUATIONS CONTINUATION frames in one header
  block (CVE-2024-27316 class; empty frames pass any byte cap). A header block is
  at most max_header_list bytes (256 KiB here) and a client splits it at its max
  frame size (16 KiB at least): 16 frames. nghttp2 allows 8.
- ``ping``, ``settings``, ``priority``, ``empty_frame`` (DATA without payload and
  without END_STREAM, HEADERS without a fragment and without END_HEADERS; empty
  CONTINUATION frames fall under ``continuation``): more than RATE_FRAMES of a kind
  within RATE_SECONDS. Keep-alive PINGs come every few seconds, SETTINGS a handful
  of times per connection, PRIORITY once per stream at most (RFC 9113 deprecates
  it). A peer that floods stays at about 100 frames per second per kind, which
  costs the gateway nothing measurable. The clock is read once per RATE_FRAMES
  frames of a kind, never per frame.
- ``unread_acks``: MAX_ACKS_WHILE_BLOCKED (h2_frames) PING/SETTINGS acknowledgements
  owed while the peer reads none of them (CVE-2019-9512/9515; counted by the codec
  while the transport has paused our writes).
- ``header_timeout``: a header block (HEADERS + CONTINUATION) not complete within
  `[gateway] header_timeout`: nothing else may use the connection meanwhile.
"""

from __future__ import annotations

import time
from typing import Callable

__all__ = ["FloodBudget", "TRIPS", "KINDS", "RESET_MIN", "MAX_CONTINUATIONS", "RATE_FRAMES",
           "RATE_SECONDS"]

#: resets tolerated before resets outnumbering answered streams end the connection
RESET_MIN = 100
#: CONTINUATION frames allowed in one header block
MAX_CONTINUATIONS = 32
#: frames of one rate-limited kind allowed within RATE_SECONDS
RATE_FRAMES = 1000
RATE_SECONDS = 10.0

KINDS = ("reset", "continuation", "ping", "settings", "priority", "empty_frame", "unread_acks",
         "header_timeout")
#: trips per kind in this process (read by telemetry at scrape time)
TRIPS: dict[str, int] = dict.fromkeys(KINDS, 0)
#: called after each trip when set (telemetry's multiprocess mode writes them out then)
on_trip: Callable[[], None] | None = None

# Rate-limited kinds: index into FloodBudget._counts / _since.
PING, SETTINGS, PRIORITY, EMPTY = range(4)
_RATE_KINDS = ("ping", "settings", "priority", "empty_frame")


class FloodSpent(Exception):
    """A budget is spent: the connection must end with ENHANCE_YOUR_CALM."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class FloodBudget:
    """The counters of one connection; every method raises FloodSpent past its limit.

    `count_resets=False` and `trips=None` are the client side's (upstream/h2.py): an
    upstream resetting the streams we opened is no flood, and its trips are not the
    client connections' metric."""

    __slots__ = ("resets", "answered", "_count_resets", "_trips", "_counts", "_since")

    def __init__(self, *, count_resets: bool = True, trips: dict[str, int] | None = TRIPS) -> None:
        self.resets = 0
        self.answered = 0
        self._count_resets = count_resets
        self._trips = trips
        now = time.monotonic()
        self._counts = [0, 0, 0, 0]
        self._since = [now, now, now, now]

    def reset(self) -> None:
        """A stream was reset, by the client or by us because of what the client sent."""
        self.resets += 1
        if self.resets > RESET_MIN and self.resets > self.answered and self._count_resets:
            self.trip("reset", "too many stream resets")

    def frame(self, kind: int) -> None:
        """One frame of a rate-limited kind (PING, SETTINGS, PRIORITY, EMPTY)."""
        counts = self._counts
        n = counts[kind] = counts[kind] + 1
        if n < RATE_FRAMES:
            return
        now = time.monotonic()
        if now - self._since[kind] < RATE_SECONDS:
            name = _RATE_KINDS[kind]
            self.trip(name, f"more than {RATE_FRAMES} frames in {RATE_SECONDS:g}s")
        counts[kind] = 0
        self._since[kind] = now

    def count(self, kind: str) -> None:
        """Record a trip of `kind` (the caller ends the connection)."""
        trips = self._trips
        if trips is not None:
            trips[kind] = trips.get(kind, 0) + 1
            if trips is TRIPS and on_trip is not None:
                on_trip()

    def trip(self, kind: str, message: str):
        """Record a trip of `kind` and raise FloodSpent."""
        self.count(kind)
        raise FloodSpent(kind, f"flood ({kind}): {message}")
