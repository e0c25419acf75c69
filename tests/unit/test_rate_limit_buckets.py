"""The shared bucket table (filters/rate_limit/buckets.py): GCRA arithmetic, bounded
memory, expiry, exactness across forked processes, and a lock whose holder died."""

from __future__ import annotations

import os
import signal
import time

import pytest

from agproxy.filters.rate_limit import buckets
from agproxy.filters.rate_limit.buckets import BucketTable

S = 1_000_000_000          # one second in ns
T0 = 10_000 * S            # a fixed "now" (monotonic ns) for deterministic tests


def limit(capacity: int, tokens: int, every_s: float) -> tuple[int, int]:
    interval = int(every_s * S) // tokens
    return interval, capacity * interval


def test_capacity_then_refused_then_refilled_continuously():
    t = BucketTable(slots=64)
    interval, burst = limit(3, 1, 1.0)          # 3 tokens, one more per second
    h = 0x1234_5678_9ABC
    assert [t.take(h, interval, burst, 1, T0) > 0 for _ in range(4)] == [True, True, True, False]
    refused = t.take(h, interval, burst, 1, T0)
    assert refused == -S                        # one token in exactly one second
    assert t.take(h, interval, burst, 1, T0 + S - 1) < 0
    assert t.take(h, interval, burst, 1, T0 + S) > 0
    assert t.take(h, interval, burst, 1, T0 + S) < 0


def test_refused_request_changes_nothing_and_cost_above_one():
    t = BucketTable(slots=64)
    interval, burst = limit(10, 10, 10.0)       # 10 tokens, 1/s
    h = 77 << 33
    assert t.take(h, interval, burst, 7, T0) == T0 + 7 * S
    assert t.take(h, interval, burst, 4, T0) == -(1 * S)    # 3 left, 4 asked: 1 s short
    assert t.take(h, interval, burst, 3, T0) == T0 + 10 * S
    assert t.peek(h, T0) == T0 + 10 * S


def test_charge_goes_into_debt_and_refund_gives_back():
    t = BucketTable(slots=64)
    interval, burst = limit(5, 5, 5.0)
    h = 99 << 40
    assert t.charge(h, interval, 8, T0) == T0 + 8 * S      # 3 tokens of debt
    assert t.take(h, interval, burst, 1, T0) == -(4 * S)   # 5 - 8 = -3: 4 s to one token
    t.refund(h, interval, 8, T0)
    assert t.peek(h, T0) == T0                              # full again
    assert t.take(h, interval, burst, 1, T0) > 0


def test_keys_do_not_share_buckets():
    t = BucketTable(slots=64)
    interval, burst = limit(1, 1, 60)
    keys = [hash(f"user-{i}") or 1 for i in range(20)]
    assert all(t.take(k, interval, burst, 1, T0) > 0 for k in keys)
    assert not any(t.take(k, interval, burst, 1, T0) > 0 for k in keys)


def test_a_full_bucket_is_free_space_and_a_flood_of_keys_evicts_within_fixed_memory():
    t = BucketTable(slots=64)
    interval, burst = limit(2, 1, 1.0)
    victim = 0x7FFF_0000_0000_0001
    assert t.take(victim, interval, burst, 1, T0) > 0
    # 10,000 distinct keys into 64 slots: memory does not move, every eviction is counted.
    for i in range(10_000):
        assert t.take(hash(f"flood-{i}") or 1, interval, burst, 1, T0) > 0
    assert t.live(T0) == 64
    assert t.evictions == 10_000 + 1 - 64
    # Once the buckets are full again (one interval later) they are free slots:
    # new keys take them without evicting anything.
    before = t.evictions
    later = T0 + 2 * S
    assert t.live(later) == 0
    spread = [(j << 32) | (g << 3) | j for g in range(8) for j in range(8)]   # 8 keys in each of the 8 groups
    spread = [k or (1 << 40) for k in spread]
    for k in spread:
        assert t.take(k, interval, burst, 1, later) > 0
    assert t.evictions == before
    assert t.live(later) == 64


def test_eviction_takes_the_bucket_closest_to_full():
    t = BucketTable(slots=8)                    # one group of 8
    interval, burst = limit(100, 1, 1.0)
    keys = [((i + 1) << 20) | i for i in range(8)]          # the one group, each its own home
    for n, k in enumerate(keys):                # key n has n+1 tokens taken
        for _ in range(n + 1):
            assert t.take(k, interval, burst, 1, T0) > 0
    newcomer = (123 << 20) | 3
    assert t.take(newcomer, interval, burst, 1, T0) > 0
    assert t.evictions == 1
    assert t.peek(keys[0], T0) == T0            # the least used bucket was dropped
    assert all(t.peek(k, T0) > T0 for k in keys[1:])


def _child_takes(t: BucketTable, h: int, interval: int, burst: int, n: int, w) -> None:
    allowed = 0
    for _ in range(n):
        if t.take(h, interval, burst, 1, time.monotonic_ns()) > 0:
            allowed += 1
    os.write(w, allowed.to_bytes(4, "big"))
    os._exit(0)


def test_exact_across_forked_processes():
    t = BucketTable(slots=1024)
    interval, burst = limit(500, 1, 3600)       # 500 tokens, refill negligible
    h = 0x0BAD_CAFE
    pipes, pids = [], []
    for _ in range(4):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            _child_takes(t, h, interval, burst, 300, w)
        os.close(w)
        pipes.append(r)
        pids.append(pid)
    total = 0
    for r in pipes:
        data = b""
        while len(data) < 4:
            chunk = os.read(r, 4)
            assert chunk, "a child died before reporting"
            data += chunk
        total += int.from_bytes(data, "big")
        os.close(r)
    for pid in pids:
        assert os.waitpid(pid, 0)[1] == 0
    assert total == 500                         # 4 x 300 asked, exactly the capacity passed


def test_a_lock_left_held_by_a_dead_process_is_taken_over(monkeypatch, caplog):
    monkeypatch.setattr(buckets, "HOLD_LIMIT", 0.2)
    t = BucketTable(slots=64)
    interval, burst = limit(10, 1, 60)
    h = 5 << 36
    stripe = ((h & t._mask) >> 3) & (buckets.STRIPES - 1)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:      # take the stripe's lock the way take() does, and die holding it
        t._locks[stripe].acquire()
        t._q[stripe] = os.getpid()
        os.write(w, b"x")
        os.kill(os.getpid(), signal.SIGKILL)
    os.close(w)
    assert os.read(r, 1) == b"x"
    os.close(r)
    os.waitpid(pid, 0)
    start = time.monotonic()
    assert t.take(h, interval, burst, 1, time.monotonic_ns()) > 0
    assert time.monotonic() - start < 2.0
    assert "taking it over" in caplog.text
    # And the lock works normally afterwards.
    assert t.take(h, interval, burst, 1, time.monotonic_ns()) > 0


def test_slots_must_be_a_power_of_two():
    with pytest.raises(ValueError):
        BucketTable(slots=100)


def test_shared_takes_see_time_in_lock_order():
    """Two workers read the clock, then take one after the other in the other order: the
    later taker's `now` is the one that read the clock first. Each take's `now` (what the
    filter computes x-ratelimit-remaining from) is never before an earlier take's, so the
    tokens left read 9, then 8 (with the earlier reading: 7, and 7 again next)."""
    interval, burst = 6 * 60 * S, 10 * 6 * 60 * S     # 10 a hour
    t = BucketTable(slots=64)
    t._shared()             # as after fork: other processes see the mapping
    h = 77
    early = time.monotonic_ns()
    late = early + 1000
    left = []
    for now in (late, early):
        tat = t.take(h, interval, burst, 1, now)
        assert tat > 0
        assert t.now >= now
        left.append((burst - tat + t.now) // interval)
    assert left == [9, 8]
