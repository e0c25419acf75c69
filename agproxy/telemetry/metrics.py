"""Prometheus metrics for the data path.

Theory of operation: metric families are created once per process; the per-request
cost is a dict lookup for the labelled child (cached by label tuple, since
prometheus-client's `.labels()` re-validates every call) plus an inc/observe.
With several worker processes, prometheus-client's multiprocess mode is used
(PROMETHEUS_MULTIPROC_DIR is set by the supervisor before this module is imported)
and the admin endpoint aggregates the workers' files.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, prefix: str = "agproxy", registry: CollectorRegistry | None = None):
        self.prefix = prefix
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        p = prefix
        self.requests = Counter(f"{p}_requests", "Requests answered, by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.duration = Histogram(f"{p}_request_duration_seconds", "Time from request head to response end",
                                  ["route"], buckets=_BUCKETS, registry=r)
        self.upstream_call = Histogram(f"{p}_upstream_request_duration_seconds",
                                       "Time from sending upstream to the response head",
                                       ["backend"], buckets=_BUCKETS, registry=r)
        self.upstream_connect_seconds = Histogram(f"{p}_upstream_connect_duration_seconds",
                                                  "Time to open an upstream connection (TCP+TLS)",
                                                  ["upstream"], buckets=_BUCKETS, registry=r)
        self.active = Gauge(f"{p}_active_connections", "Open client connections",
                            ["listener"], registry=r, multiprocess_mode="livesum")
        self.config_reloads = Counter(f"{p}_config_reloads", "Configuration reloads by result",
                                      ["result"], registry=r)
        self._req_children: dict[tuple, object] = {}
        self._dur_children: dict[str, object] = {}
        self._up_children: dict[str, object] = {}

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        c = self._req_children.get(key)
        if c is None:
            c = self._req_children[key] = self.requests.labels(route, method, str(status))
        c.inc()
        h = self._dur_children.get(route)
        if h is None:
            h = self._dur_children[route] = self.duration.labels(route)
        h.observe(seconds)

    def upstream(self, backend: str, seconds: float) -> None:
        h = self._up_children.get(backend)
        if h is None:
            h = self._up_children[backend] = self.upstream_call.labels(backend)
        h.observe(seconds)

    def upstream_connect(self, upstream: str, seconds: float) -> None:
        self.upstream_connect_seconds.labels(upstream).observe(seconds)

    def expose(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            reg = CollectorRegistry()
            multiprocess.MultiProcessCollector(reg)
            return generate_latest(reg)
        return generate_latest(self.registry)
