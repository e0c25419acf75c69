"""Counter families that a policy module adds to /metrics, cheap enough per request.

Theory of operation: `counter(metrics, "_name", help, labels)` returns the process's
one `Counter` `<prefix>_name` (the name is written with its leading underscore, as
`f"{prefix}_name"` elsewhere, so docs/metrics.md's catalogue test finds it) (created on first use, reused by every config reload,
so a count never goes down). `inc(key)` adds to a dict keyed by the label tuple,
as telemetry/metrics.py does for the request counters, and the values reach
Prometheus the same two ways:

- one process: a collector registered in the metrics registry reads the dict
  when /metrics is scraped;
- several workers (prometheus-client multiprocess mode): the first `inc` of an
  event-loop iteration schedules a flush (`call_soon`) that adds the pending
  counts to prometheus-client's children, which write the files the supervisor
  aggregates.

Label values must be bounded (config names and fixed words), never client input.
With no metrics (the supervisor's own build, `agproxy validate`) counting is a no-op.
"""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import Counter as _PromCounter
from prometheus_client.core import CounterMetricFamily

_BY_METRICS: dict[int, dict[str, "Counter"]] = {}



def flush_soon(flush: Any) -> bool:
    """Run `flush` at the end of this event-loop iteration (True: it is scheduled), or
    now when no loop is running, as in a tool (False). The counters and the pending
    histograms batch their multiprocess writes this way: one flush per iteration."""
    try:
        asyncio.get_running_loop().call_soon(flush)
        return True
    except RuntimeError:
        flush()
        return False

class Counter:
    __slots__ = ("name", "help", "labels", "counts", "_prom", "_children", "_multiprocess",
                 "_scheduled")

    def __init__(self, metrics: Any, name: str, help: str, labels: tuple[str, ...]):
        self.name = f"{metrics.prefix}{name}"
        self.help = help
        self.labels = labels
        self.counts: dict[tuple, int] = {}
        self._multiprocess = bool(metrics.multiprocess)
        self._scheduled = False
        self._children: dict[tuple, Any] = {}
        if self._multiprocess:
            self._prom = _PromCounter(self.name, help, list(labels), registry=metrics.registry)
        else:
            self._prom = None
            metrics.registry.register(_Collector(self))

    def inc(self, key: tuple = (), n: int = 1) -> None:
        counts = self.counts
        counts[key] = counts.get(key, 0) + n
        if self._multiprocess and not self._scheduled:
            self._scheduled = flush_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._multiprocess or not self.counts:
            return
        pending, self.counts = self.counts, {}
        for key, n in pending.items():
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._prom.labels(*key) if key else self._prom
            child.inc(n)

    def value(self, key: tuple = ()) -> int:
        """This process's count (one process: the total; tests)."""
        return self.counts.get(key, 0)


def direct_counts(c: Any) -> dict | None:
    """The dict a per-request caller may add to itself (`d[key] = d.get(key, 0) + 1`,
    no method call) when that is all `inc` does: one process. None otherwise (several
    workers: the flush must be scheduled; no metrics): call `inc`."""
    if type(c) is Counter and not c._multiprocess:
        return c.counts
    return None


class _NullCounter:
    __slots__ = ()

    def inc(self, key: tuple = (), n: int = 1) -> None:
        return None

    def value(self, key: tuple = ()) -> int:
        return 0


NULL = _NullCounter()


def counter(metrics: Any, name: str, help: str, labels: tuple[str, ...] = ()) -> "Counter | _NullCounter":
    """The counter `<prefix><name>` (exposed as `..._total`) of this metrics object; `name`
    starts with "_"."""
    if metrics is None:
        return NULL
    mine = _BY_METRICS.setdefault(id(metrics), {})
    c = mine.get(name)
    if c is None:
        c = mine[name] = Counter(metrics, name, help, labels)
    return c


class _Collector:
    def __init__(self, c: Counter):
        self.c = c

    def collect(self):
        c = self.c
        family = CounterMetricFamily(c.name, c.help, labels=list(c.labels))
        for key, n in list(c.counts.items()):
            family.add_metric(list(key), n)
        yield family
