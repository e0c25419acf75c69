"""Provider eviction, backoff, restore with one probe, selection order; the CEL health check."""

from __future__ import annotations

import logging

from agproxy import cel
from agproxy.backends.llm.eviction import EVICTED, HEALTHY, RESTORED, EvictionPolicy, GroupHealth, ProviderHealth
from agproxy.backends.llm.health import DEFAULT_HEALTH, HealthCheck
from agproxy.http.messages import Headers


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _group(*specs, policy=None, rand=None):
    clock = Clock()
    g = GroupHealth([ProviderHealth(n, prio, w) for n, prio, w in specs], policy or EvictionPolicy(30, 1, 600),
                    clock=clock, rand=rand or (lambda: 0.0))
    return g, clock


def test_priority_first_and_evicted_providers_leave_the_rotation():
    g, clock = _group(("primary", 0, 1), ("fallback", 1, 1))
    assert g.plan() == [0, 1]
    assert g.record(0, healthy=False) is True          # consecutive_failures = 1
    assert g.providers[0].state == EVICTED
    assert g.plan() == [1]
    clock.t += 29.9
    assert g.plan() == [1]
    clock.t += 0.1
    assert g.plan() == [0, 1] and g.providers[0].state == RESTORED


def test_consecutive_failures_and_a_healthy_answer_resets_the_count():
    g, _ = _group(("a", 0, 1), policy=EvictionPolicy(10, 3, 100))
    assert not g.record(0, False) and not g.record(0, False)
    g.record(0, True)
    assert not g.record(0, False) and not g.record(0, False)
    assert g.record(0, False) and g.providers[0].state == EVICTED


def test_backoff_doubles_per_repeat_eviction_and_caps():
    g, clock = _group(("a", 0, 1), ("b", 1, 1), policy=EvictionPolicy(10, 1, 35))
    lengths = []
    for _ in range(4):
        assert g.plan()[0] == 0 and g.begin(0)
        g.record(0, False)
        lengths.append(g.providers[0].evicted_until - clock.t)
        clock.t = g.providers[0].evicted_until      # restored; its probe fails again
    assert lengths == [10, 20, 35, 35]


def test_level_resets_after_healthy_traffic_for_a_base_duration():
    g, clock = _group(("a", 0, 1), ("b", 1, 1), policy=EvictionPolicy(10, 1, 600))
    g.record(0, False)
    clock.t += 10
    g.plan()
    g.begin(0)
    g.record(0, True)                                 # the probe passes: healthy, level still 1
    assert g.providers[0].state == HEALTHY and g.providers[0].level == 1
    clock.t += 5
    g.record(0, True)
    assert g.providers[0].level == 1                  # not yet a base duration of healthy traffic
    clock.t += 5
    g.record(0, True)
    assert g.providers[0].level == 0
    g.record(0, False)
    assert g.providers[0].evicted_until - clock.t == 10


def test_retry_after_is_honoured_when_longer_up_to_max_duration():
    g, clock = _group(("a", 0, 1), policy=EvictionPolicy(10, 1, 120))
    g.record(0, False, retry_after=45)
    assert g.providers[0].evicted_until - clock.t == 45
    clock.t += 45
    g.plan()
    g.record(0, False, retry_after=5)                 # shorter than the backoff (20): backoff wins
    assert g.providers[0].evicted_until - clock.t == 20
    clock.t += 20
    g.plan()
    g.record(0, False, retry_after=99999)
    assert g.providers[0].evicted_until - clock.t == 120


def test_restored_provider_gets_one_probe_in_flight():
    g, clock = _group(("primary", 0, 1), ("fallback", 1, 1))
    g.record(0, False)
    clock.t += 30
    first = g.plan()
    assert first == [0, 1] and g.begin(0)             # request 1 probes the primary
    second = g.plan()
    assert second == [1]                              # request 2 meanwhile: not the primary
    assert g.begin(0) is False                        # even if a stale plan names it
    g.record(0, True)
    assert g.plan() == [0, 1] and g.providers[0].state == HEALTHY
    # A probe whose request was abandoned frees the slot.
    g.record(0, False)
    clock.t += 60
    g.plan()
    g.begin(0)
    g.release(0)
    assert g.plan()[0] == 0


def test_all_evicted_tries_the_one_whose_eviction_ends_soonest():
    g, clock = _group(("a", 0, 1), ("b", 0, 1), ("c", 1, 1), policy=EvictionPolicy(10, 1, 600))
    g.record(0, False)                 # until +10
    clock.t += 3
    g.record(2, False)                 # until +13 from the start
    g.record(1, False)
    g.record(1, False)                 # already evicted: a failed last resort changes nothing
    assert g.plan() == [0]
    clock.t += 7
    assert g.plan() == [0]             # restored now
    assert g.providers[0].state == RESTORED


def test_weighted_balance_within_a_priority():
    picks = iter([0.1, 0.0, 0.9, 0.0])
    g, _ = _group(("a", 0, 1), ("b", 0, 3), rand=lambda: next(picks))
    assert g.plan() == [0, 1]          # 0.1 * 4 = 0.4 < weight of a (1)
    assert g.plan() == [1, 0]          # 0.9 * 4 = 3.6: past a, inside b
    import random
    rng = random.Random(7)
    g, _ = _group(("a", 0, 1), ("b", 0, 3), rand=rng.random)
    firsts = [g.plan()[0] for _ in range(4000)]
    share = firsts.count(1) / len(firsts)
    assert 0.72 < share < 0.78


def _health(src=DEFAULT_HEALTH, clock=None):
    return HealthCheck(cel.compile_expression(src), "g", log_interval=60, clock=clock or Clock())


def test_health_expression_over_code_headers_and_body():
    h = _health()
    assert h.unhealthy(503, Headers()) and h.unhealthy(429, Headers()) and h.unhealthy(529, Headers())
    assert not h.unhealthy(200, Headers()) and not h.unhealthy(400, Headers())
    h = _health('response.code == 400 && response.body.error.type == "overloaded_error" '
                '|| response.headers["x-should-retry"] == "true"')
    assert h.unhealthy(400, Headers(), {"error": {"type": "overloaded_error"}})
    assert h.unhealthy(200, Headers([("x-should-retry", "true")]), None) is True


def test_health_expression_error_counts_unhealthy_and_logs_once_per_interval(caplog):
    clock = Clock()
    h = _health('response.body.error.type == "overloaded_error"', clock)
    with caplog.at_level(logging.WARNING, logger="agproxy.llm"):
        assert h.unhealthy(500, Headers(), {"message": "no error member"})
        assert h.unhealthy(500, Headers(), None)
        clock.t += 59
        assert h.unhealthy(500, Headers(), None)
        clock.t += 1
        assert h.unhealthy(500, Headers(), None)
    assert [r.getMessage().count("failures so far") for r in caplog.records] == [1, 1]
    assert h.eval_errors == 4
