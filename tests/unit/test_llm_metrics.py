"""backends/llm/group.py records its histograms without prometheus-client's observe()
(a Python loop over the buckets, a lock per inc): pending counts (telemetry/histograms.py)
flushed into the children. What the exposition shows must be what observe() writes,
however the samples and the flushes interleave."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from agproxy.backends.llm.group import DURATION_BUCKETS, TOKEN_BUCKETS, _observe
from agproxy.telemetry.histograms import PendingHistograms


def _exposition(registry: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


def test_observe_shortcut_matches_prometheus_client():
    for buckets, values in ((TOKEN_BUCKETS, (0, 1, 2, 4, 5, 256, 257, 312, 67108864, 67108865, 10**12)),
                            (DURATION_BUCKETS, (0.0, 0.001, 0.01, 0.0100001, 0.5, 81.92, 81.93, 3600.0))):
        ours, theirs = CollectorRegistry(), CollectorRegistry()
        a = Histogram("h", "h", ["l"], buckets=buckets, registry=theirs).labels("x")
        b = Histogram("h", "h", ["l"], buckets=buckets, registry=ours).labels("x")
        pend = PendingHistograms(multiprocess=False)
        h = pend.series(b)
        assert pend.series(b) is h
        for n, v in enumerate(values):
            a.observe(v)
            _observe(h, b._upper_bounds, v)
            if n % 3 == 0:
                pend.flush()        # some samples flushed alone, some together
        pend.flush()
        assert _exposition(ours) == _exposition(theirs)
        pend.flush()                # nothing pending: adds nothing
        assert _exposition(ours) == _exposition(theirs)
