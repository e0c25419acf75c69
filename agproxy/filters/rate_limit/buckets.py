"""Token buckets shared by every worker process of one gateway: exact local limits.

Theory of operation
===================

State. One fixed-size table in an anonymous shared memory mapping, created by
the first process that needs it (`shared_table()`): `app.serve` creates it in the
supervisor *before* the workers are forked, so every worker (and every worker the
supervisor restarts) maps the same pages. A limit of capacity 10 lets exactly 10
requests through however many workers share the port; Envoy and agentgateway keep
one bucket per worker, so N workers let N x 10 through.

Algorithm. Each bucket is GCRA (the generic cell rate algorithm), which is a token
bucket with continuous refill stored as one number: the bucket's "theoretical
arrival time" `tat` (CLOCK_MONOTONIC nanoseconds, the same clock in every process).
With `T` = nanoseconds per token (`every / tokens`) and burst `tau = capacity * T`,
a request of cost `c` is allowed when `max(tat, now) + c*T - now <= tau`, and then
stores that as the new `tat`. Remaining tokens are `(tau - (tat - now)) / T`; the
bucket is full again at `tat`. A bucket whose `tat <= now` is full: it is exactly
equivalent to no bucket at all, so such a slot is free to reuse (idle keys expire
by themselves, losing nothing).

Table. `slots` slots of two int64 (key hash, tat), grouped in `WAYS` consecutive
slots. A key's home slot comes from its hash; it lives in the home slot's group, at
the first slot from home (going round the group) holding its hash, else the first
free one (empty or expired). When all of
the group's slots hold live buckets, the one with the smallest `tat` (the closest
to full: the least state lost) is evicted and the eviction is reported to the
caller (a metric). Memory never grows: a flood of distinct keys only evicts.

Keys. A slot stores `hash(value) ^ salt` (64 bits), never the value: Python's str
hash is SipHash keyed by a per-process random seed, which forked workers share,
so clients cannot aim for collisions, and a 64-bit false match between two live
keys is ~2^-64 per pair. `salt` is `hash()` of the limit's identity (route name,
limit index, capacity, rate, unit): after a reload (SIGHUP) the same limit on the
same route finds its buckets again; a limit whose numbers changed starts with full
buckets (its old ones expire on their own).

Atomicity. Each group belongs to one of `STRIPES` locks, a
`multiprocessing.Lock` (a POSIX semaphore in shared memory; uncontended it is one
userspace atomic, no system call). Measured per lock + unlock pair on this
machine (benchmarks/ratelimit_bench.py): multiprocessing.Lock 0.14 us, a robust
pthread mutex through ctypes 1.0 us, fcntl record locks on a memfd 1.8 us; a
lock-free CAS needs a C library (the one on PyPI, `atomics`, is GPL-3 and ships
wheels only up to CPython 3.11). A semaphore is not released when its holder
dies, so the lock also records its holder's pid: a waiter that could not get the
lock within `HOLD_LIMIT` (the critical section is a few microseconds) checks that
pid, and if that process is gone (or has held it for `GIVE_UP`: stopped) it takes
the lock over, under an fcntl lock so that two waiters never both do. A worker
killed inside the critical section costs one wait of `HOLD_LIMIT` on one stripe,
never a deadlock.

One process. A table that no fork has shared since it was created (`workers = 1`:
`app.serve` forks nothing) is only ever updated by its process's event loop thread,
so `take` (the per-request update) skips the lock there: ~1,000 instructions of a
~7,000 update (callgrind). The first fork, in the parent and the child alike, turns
locking on for good.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import multiprocessing
import os
import time

log = logging.getLogger("agproxy.policy")

WAYS = 8                  # slots per group (a power of two; take() has it as literals)
STRIPES = 64              # locks (a power of two; take() has it as literals)
DEFAULT_SLOTS = 1 << 16   # 65,536 buckets: 1 MiB of shared memory
HOLD_LIMIT = 0.5          # seconds a lock may be held before its holder is checked
GIVE_UP = 10.0            # ... and after which it is taken over even from a live holder

# Layout (int64 words): [holder pid] * STRIPES, [takeover generation] * STRIPES, then
# the slots' keys, then their tats (slot j: key at KEYS + j, tat at KEYS + slots + j).
# Keys and tats in two runs rather than interleaved: a lookup then needs one
# operation on the 64-bit hash (`h & mask`) and the rest on small ints; on 64-bit
# ints every operation allocates (~3k instructions saved per take, callgrind).
KEYS = 2 * STRIPES


class BucketTable:
    """A fixed-size table of GCRA buckets in shared memory (see the module docstring).

    Every method takes `now` (time.monotonic_ns()) so that callers read the clock
    once per request and tests can move time. A key `h` is any non-zero int64.
    """

    __slots__ = ("slots", "evictions", "on_evict", "_q", "_mm", "_locks", "_mask", "_tats", "_fd", "_pid",
                 "_alone", "now")

    def __init__(self, slots: int = DEFAULT_SLOTS):
        if slots < WAYS or slots & (slots - 1):
            raise ValueError("slots must be a power of two >= WAYS")
        self.slots = slots
        self.evictions = 0      # by this process; the table itself is shared
        self.on_evict = None    # called on each eviction (the metric)
        self._mm = mmap.mmap(-1, (KEYS + 2 * slots) * 8, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self._q = memoryview(self._mm).cast("q")
        ctx = multiprocessing.get_context("fork")   # "fork": unlinked at once, no tracker process
        self._locks = [ctx.Lock() for _ in range(STRIPES)]
        self._mask = slots - 1
        self._tats = KEYS + slots                    # word index of slot 0's tat
        # A memfd shared across fork for the rare takeover of an orphaned lock.
        self._fd = os.memfd_create("agproxy-rate-limit", 0)
        self._pid = os.getpid()
        self._alone = True          # no other process can see the mapping: no lock needed
        self.now = 0                # the "now" the last take() used (the caller's, or later)
        os.register_at_fork(after_in_child=self._after_fork, after_in_parent=self._shared)

    def _after_fork(self) -> None:
        self._pid = os.getpid()
        self.evictions = 0
        self._alone = False

    def _shared(self) -> None:
        self._alone = False

    # -- per request -------------------------------------------------------------------
    # The update methods repeat their few lines instead of sharing helpers: a Python
    # call costs ~1,000 instructions here, a whole take ~5,000 (callgrind,
    # benchmarks/ratelimit_bench.py), on every request of a limited route.

    def take(self, h: int, interval: int, burst: int, cost: int, now: int) -> int:
        """Take `cost` tokens from bucket `h` if they are all there.

        Returns the bucket's new tat (> 0) when allowed; when refused, minus the
        nanoseconds until `cost` tokens will be there (< 0), and nothing changes.
        `self.now` is the time it took them at: `now`, or with other processes, the
        clock read under the lock when that is later (so the takes of one bucket see
        time in the order they hold its lock: a process that read the clock first and
        took second would count one token too few left).
        """
        j = h & self._mask                  # the key's home slot
        q = self._q
        if self._alone:
            lock = None
        else:
            stripe = (j >> 3) & 63          # its group's lock (WAYS = 8, STRIPES = 64)
            lock = self._locks[stripe]
            if not lock.acquire(False):
                self._wait(stripe, lock)
            q[stripe] = self._pid
            clock = time.monotonic_ns()
            if clock > now:
                now = clock
        self.now = now
        try:
            k = q[KEYS + j]
            t = self._tats + j
            if k == h:
                tat = q[t]
                if tat < now:
                    tat = now
            elif k == 0:
                tat = now
            else:
                j, k, tat = self._probe(q, j, h, now)
                t = self._tats + j
                if tat < now:
                    tat = now
            new = tat + cost * interval
            if new - now > burst:
                return now + burst - new
            if k != h:
                self._claim(q, j, k, h, t, now)
            q[t] = new
            return new
        finally:
            if lock is not None:
                lock.release()

    def _claim(self, q, j: int, k: int, h: int, t: int, now: int) -> None:
        """Slot j now holds key h; a live bucket of another key k there is evicted."""
        if k and q[t] > now:
            self.evictions += 1
            if self.on_evict is not None:
                self.on_evict()
        q[KEYS + j] = h

    def charge(self, h: int, interval: int, cost: int, now: int) -> int:
        """Take `cost` tokens whatever is left (the bucket may go into debt): usage
        charged after the fact. Returns the new tat."""
        j = h & self._mask
        stripe = (j >> 3) & 63
        lock = self._locks[stripe]
        if not lock.acquire(False):
            self._wait(stripe, lock)
        q = self._q
        try:
            q[stripe] = self._pid
            j, k, tat = self._probe(q, j, h, now)
            t = self._tats + j
            if tat < now:
                tat = now
            new = tat + cost * interval
            if k != h:
                self._claim(q, j, k, h, t, now)
            q[t] = new
            return new
        finally:
            lock.release()

    def refund(self, h: int, interval: int, cost: int, now: int) -> None:
        """Give back `cost` tokens that `take` took (a later limit of the same request
        refused it). A bucket evicted since has nothing to give back."""
        j = h & self._mask
        stripe = (j >> 3) & 63
        lock = self._locks[stripe]
        if not lock.acquire(False):
            self._wait(stripe, lock)
        q = self._q
        try:
            q[stripe] = self._pid
            j, k, tat = self._probe(q, j, h, now)
            if k == h:
                q[self._tats + j] = tat - cost * interval
        finally:
            lock.release()

    def peek(self, h: int, now: int) -> int:
        """The bucket's tat (now when it is full), read without the lock: reading one
        aligned int64 is atomic; a stale value is at most one update late."""
        j, k, tat = self._probe(self._q, h & self._mask, h, now)
        return tat if k == h and tat > now else now

    # -- internals ---------------------------------------------------------------------
    def _probe(self, q, home: int, h: int, now: int) -> tuple[int, int, int]:
        """(slot, its key, its tat) for `h`, starting at its home slot and going round
        its group of WAYS slots: the slot holding h, else the first free one (never
        used, or expired), else the live bucket closest to full (the one to evict)."""
        base = home & ~(WAYS - 1)
        tats = self._tats
        free = -1
        victim = -1
        victim_tat = 0
        for i in range(WAYS):
            j = base + ((home + i) & (WAYS - 1))
            k = q[KEYS + j]
            if k == h:
                return j, k, q[tats + j]
            if k == 0:
                # Never used: h was never put further on (slots are never emptied).
                return (j, 0, 0) if free < 0 else (free, q[KEYS + free], 0)
            tat = q[tats + j]
            if tat <= now:
                if free < 0:
                    free = j
            elif victim < 0 or tat < victim_tat:
                victim, victim_tat = j, tat
        if free >= 0:
            return free, q[KEYS + free], 0
        return victim, q[KEYS + victim], 0

    def _wait(self, stripe: int, lock) -> None:
        """The lock is taken: wait for it, and take it over if its holder died holding it."""
        if lock.acquire(True, HOLD_LIMIT):
            return
        q = self._q
        gw = STRIPES + stripe               # the stripe's takeover generation
        waited = HOLD_LIMIT
        while True:
            holder = q[stripe]
            generation = q[gw]
            if holder and holder != self._pid and _alive(holder) and waited < GIVE_UP:
                log.warning("rate limit: bucket lock %d held by pid %d for over %.1fs", stripe, holder, waited)
            else:
                fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, stripe)
                try:
                    if lock.acquire(False):
                        return           # released meanwhile: ours now
                    # Same holder, same generation: nobody released it or took it over since.
                    if q[stripe] == holder and q[gw] == generation:
                        q[gw] = generation + 1
                        q[stripe] = self._pid
                        log.error("rate limit: bucket lock %d was held by pid %d for over %.1fs "
                                  "(the process is gone or stuck); taking it over", stripe, holder, waited)
                        return
                finally:
                    fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, stripe)
            if lock.acquire(True, HOLD_LIMIT):
                return
            waited += HOLD_LIMIT

    # -- inspection (tests, /config) ----------------------------------------------------
    def live(self, now: int) -> int:
        """How many buckets are not full at `now` (a scan: not for the request path)."""
        q = self._q
        tats = self._tats
        return sum(1 for j in range(self.slots) if q[KEYS + j] and q[tats + j] > now)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (dead, not yet reaped by the supervisor) still answers kill(0).
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except OSError:
        return False


_TABLE: BucketTable | None = None


def shared_table(slots: int = DEFAULT_SLOTS) -> BucketTable:
    """The process's table, created on first use with `slots` slots. Call it before
    forking workers so that they all share it (app.serve does). The size is fixed
    for the life of the process: a reload asking for another size is logged."""
    global _TABLE
    if _TABLE is None:
        _TABLE = BucketTable(slots)
    elif _TABLE.slots != slots:
        log.warning("[gateway].rate_limit_buckets = %d takes effect after a restart (the table has %d)",
                    slots, _TABLE.slots)
    return _TABLE
