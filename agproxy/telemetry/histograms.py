"""Histogram samples of a module's own (LLM token usage, durations), cheap per request.

Theory of operation: prometheus-client's `Histogram.observe` costs a Python loop
over the buckets and a lock per increment; even with the bucket found by bisect,
two locked `inc` calls per observation cost ~2.5k instructions (callgrind,
benchmarks/instructions.py h1-llm: five observations a request). Instead
`pending(metrics).series(child)` gives a plain list for one histogram child,
`[sum, count of bucket 0, count of bucket 1, ...]`, that the caller adds to inline:

    h[0] += value
    h[1 + bisect_left(bounds, value)] += 1      # bounds: child._upper_bounds

and `flush()` moves those counts to the child's `_sum` and `_buckets` values (the
ones `observe()` adds to; prometheus-client has no bulk observe), so the exposition
is what `observe()` would have written. The flush runs:

- one process: before each exposition (`Metrics.expose` runs its `flush_hooks`);
- several workers (multiprocess mode): at the end of the event-loop iteration of the
  first sample (`added()` schedules it with `call_soon`), as telemetry/counters.py
  does, so the files the supervisor aggregates are never more than one iteration late.

One `PendingHistograms` per metrics object, reused by every config reload; a child
keeps its list for the life of the process (children are bounded by their labels).
"""

from __future__ import annotations

from typing import Any

from agproxy.telemetry.counters import flush_soon

_BY_METRICS: dict[int, "PendingHistograms"] = {}


class PendingHistograms:
    __slots__ = ("_series", "multiprocess", "_scheduled")

    def __init__(self, multiprocess: bool):
        self._series: dict[int, tuple[Any, list]] = {}
        self.multiprocess = multiprocess
        self._scheduled = False

    def series(self, child: Any) -> list:
        """The pending counts of one Histogram child (the same list every time)."""
        s = self._series.get(id(child))
        if s is None:
            s = self._series[id(child)] = (child, [0.0] * (len(child._upper_bounds) + 1))
        return s[1]

    def added(self) -> None:
        """Samples were added: with several workers, flush at the end of this iteration."""
        if self.multiprocess and not self._scheduled:
            self._scheduled = flush_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        for child, h in self._series.values():
            if not any(h):
                continue
            child._sum.inc(h[0])
            buckets = child._buckets
            for i in range(1, len(h)):
                n = h[i]
                if n:
                    buckets[i - 1].inc(n)
            h[:] = [0.0] * len(h)


def pending(metrics: Any) -> PendingHistograms:
    p = _BY_METRICS.get(id(metrics))
    if p is None:
        p = _BY_METRICS[id(metrics)] = PendingHistograms(bool(metrics.multiprocess))
        metrics.flush_hooks.append(p.flush)
    return p
