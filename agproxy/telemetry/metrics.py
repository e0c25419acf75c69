"""Prometheus metrics for the data path.

Theory of operation: the per-request families (requests by route/method/status,
request duration, upstream call duration) are kept in plain dicts: a count per
label tuple, and per label a histogram as [sum, count per bucket] with the bucket
found by bisect. `request()` and `upstream()` only add to those dicts. Measured
with callgrind on the HTTP/1.1 relay: calling prometheus-client per request cost
~29k instructions of ~265k (11%: a lock per inc, a Python loop over the buckets);
the dict updates cost about a tenth of that.

- One process (`workers = 1`): the dicts are the truth. A collector registered in
  the registry turns them into metric families when /metrics is scraped.
- Several workers: prometheus-client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR
  is set by the supervisor before this module is imported) aggregates files the
  workers write, so the dicts hold only samples not yet written: the first sample
  of an event-loop iteration schedules `flush()` with `call_soon`, which adds the
  batch to prometheus-client's children (one inc per label tuple and bucket). A
  sample is written before the next request can be read. The histogram flush adds
  to the child's `_sum` and `_buckets` values, the ones its own `observe()` adds
  to, as prometheus-client has no bulk observe; tests read the exposition back.

Connection gauges, connect durations and reloads are rare events and use
prometheus-client directly. HTTP/2 flood trips (`<prefix>_http2_flood_total{kind}`)
are counted by http/h2_budget.py in its own dict (http/ does not import telemetry):
read at scrape time in one process, written out as deltas by `flush()` (scheduled
by the budget's `on_trip` hook) with several workers.
`target_info` (un-prefixed, the OpenMetrics convention for
an OpenTelemetry resource) carries the resource attributes as labels
(telemetry/resource.py), the same ones exported spans carry. Every series is listed in
docs/metrics.md; tests/integration/test_metrics_catalogue.py fails on one that is not.

Calls to remote dependencies (ext_authz, the rate-limit service, Redis) are
counted by upstream/remote.py in its own process-wide table; they are exposed as
`<prefix>_remote_calls_total{dependency, outcome}`: read at scrape time with one
process, added to prometheus-client's children by `flush()` (the difference since
the last flush) with several workers.

Label values never come from the client unbounded: routes, backends, listeners and
upstream authorities are names from the config; statuses are three digits; a method
outside the standard set is `_OTHER`; flood kinds are h2_budget.KINDS.
"""

from __future__ import annotations

import asyncio
import os
from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, InfoMetricFamily
from prometheus_client.utils import floatToGoString

from agproxy.http import h2_budget
from agproxy.upstream.remote import outcome_counts

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BUCKET_LABELS = tuple(floatToGoString(b) for b in _BUCKETS) + ("+Inf",)

# RFC 9110 §9 plus PATCH (RFC 5789); anything else is counted as "_OTHER", as the
# OpenTelemetry HTTP conventions say (an HTTP/2 :method is any token a client sends).
STANDARD_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})

_REQUESTS_HELP = "Requests answered, by route, method and status"
_DURATION_HELP = "Time from request head to response end"
_UPSTREAM_HELP = "Time from sending upstream to the response head"
_FLOOD_HELP = "HTTP/2 connections ended with ENHANCE_YOUR_CALM, by the budget spent (http/h2_budget.py)"
_REMOTE_HELP = ("Calls to remote dependencies (ext_authz, rate-limit service, Redis) by outcome: "
                "ok, timeout, unreachable, error, garbage")


def _new_histogram() -> list:
    return [0.0] * (len(_BUCKETS) + 2)     # [sum, one count per bucket incl. +Inf]


class Metrics:
    def __init__(self, prefix: str = "agproxy", registry: CollectorRegistry | None = None,
                 resource: dict[str, str] | None = None):
        from agproxy.telemetry.resource import process_resource, target_info_labels
        self.prefix = prefix
        self.target_info = target_info_labels(process_resource() if resource is None else resource)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        r = self.registry
        p = prefix
        self._requests: dict[tuple, float] = {}      # (route, method, status) -> count
        self._duration: dict[str, list] = {}         # route -> histogram
        self._upstream: dict[str, list] = {}         # backend -> histogram
        self._flush_scheduled = False
        self._families: dict[str, object] = {}
        # Writers of samples a module batches (telemetry/histograms.py): run before
        # every exposition, so /metrics shows them.
        self.flush_hooks: list = []
        if self.multiprocess:
            self.requests = Counter(f"{p}_requests", _REQUESTS_HELP, ["route", "method", "status"], registry=r)
            self.duration = Histogram(f"{p}_request_duration_seconds", _DURATION_HELP,
                                      ["route"], buckets=_BUCKETS, registry=r)
            self.upstream_call = Histogram(f"{p}_upstream_request_duration_seconds", _UPSTREAM_HELP,
                                           ["backend"], buckets=_BUCKETS, registry=r)
            self._children: dict[tuple, object] = {}
            self.http2_flood = Counter(f"{p}_http2_flood", _FLOOD_HELP, ["kind"], registry=r)
            for kind in h2_budget.KINDS:
                self.http2_flood.labels(kind)
            self._flood_written = dict(h2_budget.TRIPS)
            h2_budget.on_trip = self._flood_tripped
            self.remote_calls = Counter(f"{p}_remote_calls", _REMOTE_HELP, ["dependency", "outcome"],
                                        registry=r)
            self._remote_flushed: dict[tuple[str, str], int] = {}
        else:
            r.register(_DataPathCollector(self))
        self.upstream_connect_seconds = Histogram(f"{p}_upstream_connect_duration_seconds",
                                                  "Time to open an upstream connection (TCP+TLS)",
                                                  ["upstream"], buckets=_BUCKETS, registry=r)
        self.active = Gauge(f"{p}_active_connections", "Open client connections",
                            ["listener"], registry=r, multiprocess_mode="livesum")
        self.config_reloads = Counter(f"{p}_config_reloads", "Configuration reloads by result",
                                      ["result"], registry=r)
        # Tracing (telemetry/tracing.py): counted on the export thread; rare per span.
        self.spans_exported = Counter(f"{p}_tracing_spans_exported", "Spans the collector accepted",
                                      registry=r)
        self.spans_dropped = Counter(f"{p}_tracing_spans_dropped",
                                     "Spans not exported, by reason (queue_full, export_failed)",
                                     ["reason"], registry=r)
        if not self.multiprocess:
            r.register(_TargetInfo(self.target_info))

    def family(self, kind, name: str, documentation: str, labels: list[str], **kw):
        """A metric family of a module's own (an AgentCore response counter, LLM token
        usage): `kind` is prometheus-client's Counter, Histogram or Gauge, `name` gets
        the prefix. Made once per name, so a config reload that builds the module
        again gets the same family; in multiprocess mode prometheus-client aggregates
        it as it does the others. Modules record into it from their own hooks (a
        completion hook, `ex.on_done`), never through the exchange's accounting."""
        full = f"{self.prefix}_{name}"
        fam = self._families.get(full)
        if fam is None:
            fam = self._families[full] = kind(full, documentation, labels, registry=self.registry, **kw)
        return fam

    # -- the data path ------------------------------------------------------------------
    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        if method not in STANDARD_METHODS:
            method = "_OTHER"       # a client picks the method: never a label of its own
        key = (route, method, status)
        counts = self._requests
        counts[key] = counts.get(key, 0) + 1
        h = self._duration.get(route)
        if h is None:
            h = self._duration[route] = _new_histogram()
        h[0] += seconds
        h[1 + bisect_left(_BUCKETS, seconds)] += 1
        if self.multiprocess and not self._flush_scheduled:
            self._schedule_flush()

    def upstream(self, backend: str, seconds: float) -> None:
        h = self._upstream.get(backend)
        if h is None:
            h = self._upstream[backend] = _new_histogram()
        h[0] += seconds
        h[1 + bisect_left(_BUCKETS, seconds)] += 1
        if self.multiprocess and not self._flush_scheduled:
            self._schedule_flush()

    def upstream_connect(self, upstream: str, seconds: float) -> None:
        self.upstream_connect_seconds.labels(upstream).observe(seconds)

    # -- multiprocess: write batches to prometheus-client's files -----------------------
    def _flood_tripped(self) -> None:
        if not self._flush_scheduled:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        try:
            asyncio.get_running_loop().call_soon(self.flush)
        except RuntimeError:     # no running loop (a tool, a test): write now
            self.flush()
            return
        self._flush_scheduled = True

    def flush(self) -> None:
        """Multiprocess mode: hand the pending samples to prometheus-client."""
        self._flush_scheduled = False
        if not self.multiprocess:
            return
        children = self._children
        written = self._flood_written
        for kind, n in h2_budget.TRIPS.items():
            if n != written.get(kind, 0):
                self.http2_flood.labels(kind).inc(n - written.get(kind, 0))
                written[kind] = n
        self._flush_remote()
        if self._requests:
            pending, self._requests = self._requests, {}
            for key, n in pending.items():
                c = children.get(key)
                if c is None:
                    route, method, status = key
                    c = children[key] = self.requests.labels(route, method, str(status))
                c.inc(n)
        for family, attr in ((self.duration, "_duration"), (self.upstream_call, "_upstream")):
            pending = getattr(self, attr)
            if not pending:
                continue
            setattr(self, attr, {})
            for label, hist in pending.items():
                key = (attr, label)
                h = children.get(key)
                if h is None:
                    h = children[key] = family.labels(label)
                h._sum.inc(hist[0])
                buckets = h._buckets
                for i in range(1, len(hist)):
                    if hist[i]:
                        buckets[i - 1].inc(hist[i])

    def _flush_remote(self) -> None:
        flushed = self._remote_flushed
        for name, counts in outcome_counts().items():
            for outcome, n in counts.items():
                key = (name, outcome)
                delta = n - flushed.get(key, 0)
                if delta > 0:
                    self.remote_calls.labels(name, outcome).inc(delta)
                    flushed[key] = n

    def expose(self) -> bytes:
        for hook in self.flush_hooks:
            hook()
        if self.multiprocess:
            self.flush()
            reg = CollectorRegistry()
            multiprocess.MultiProcessCollector(reg)
            reg.register(_TargetInfo(self.target_info))
            return generate_latest(reg)
        return generate_latest(self.registry)


class _DataPathCollector:
    """One process: the data-path dicts as Prometheus metric families, at scrape time."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        m = self.metrics
        p = m.prefix
        requests = CounterMetricFamily(f"{p}_requests", _REQUESTS_HELP, labels=["route", "method", "status"])
        for (route, method, status), n in list(m._requests.items()):
            requests.add_metric([route, method, str(status)], n)
        yield requests
        yield _histogram_family(f"{p}_request_duration_seconds", _DURATION_HELP, "route", m._duration)
        yield _histogram_family(f"{p}_upstream_request_duration_seconds", _UPSTREAM_HELP, "backend",
                                m._upstream)
        flood = CounterMetricFamily(f"{p}_http2_flood", _FLOOD_HELP, labels=["kind"])
        for kind, n in list(h2_budget.TRIPS.items()):
            flood.add_metric([kind], n)
        yield flood
        counts_by_name = outcome_counts()
        if counts_by_name:
            remote = CounterMetricFamily(f"{p}_remote_calls", _REMOTE_HELP, labels=["dependency", "outcome"])
            for name, counts in counts_by_name.items():
                for outcome, n in counts.items():
                    remote.add_metric([name, outcome], n)
            yield remote


class _TargetInfo:
    """`target_info{<resource attributes>} 1`: one series, the process's resource."""

    def __init__(self, labels: dict[str, str]):
        self.labels = labels

    def collect(self):
        yield InfoMetricFamily("target", "Target metadata: the OpenTelemetry resource attributes",
                               value=self.labels)


def _histogram_family(name: str, documentation: str, label: str, data: dict) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=[label])
    for value, hist in list(data.items()):
        cumulative = 0.0
        buckets = []
        for le, n in zip(_BUCKET_LABELS, hist[1:]):
            cumulative += n
            buckets.append((le, cumulative))
        family.add_metric([value], buckets, sum_value=hist[0])
    return family
