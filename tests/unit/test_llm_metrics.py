"""backends/llm/group.py records its histograms without prometheus-client's observe()
(a Python loop over the buckets, a lock per inc): pending counts (telemetry/histograms.py)
flushed into the children. What the exposition shows must be what observe() writes,
however the samples and the flushes interleave."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from agproxy.backends.llm.group import DURATION_BUCKETS, TOKEN_BUCKETS, TOKEN_TYPES, _observe, _observe_usage
from agproxy.backends.llm.usage import Usage
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


def test_usage_shortcut_matches_prometheus_client():
    """The four token samples of an answer (`_observe_usage`, int bounds) land where
    observe() puts them, each in its own token type's histogram."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    a = Histogram("t", "t", ["type"], buckets=TOKEN_BUCKETS, registry=theirs)
    b = Histogram("t", "t", ["type"], buckets=TOKEN_BUCKETS, registry=ours)
    pend = PendingHistograms(multiprocess=False)
    series = tuple(pend.series(b.labels(k)) for k in TOKEN_TYPES)
    for n, v in enumerate((0, 1, 2, 4, 5, 256, 257, 67108864, 67108865, 10**12)):
        u = Usage(v, v + 3, v // 2, n)
        for k, x in zip(TOKEN_TYPES, (u.input, u.output, u.cache_read, u.cache_write)):
            a.labels(k).observe(x)
        _observe_usage(series, u)
        if n % 4 == 0:
            pend.flush()
    pend.flush()
    assert _exposition(ours) == _exposition(theirs)
