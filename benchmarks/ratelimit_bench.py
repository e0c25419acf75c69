"""Micro-benchmarks behind the local rate limit's shared state (filters/rate_limit/buckets.py).

What: the cost of one lock + unlock pair for each way to make a bucket update
atomic across worker processes, and of the table operations themselves.

    .venv/bin/python benchmarks/ratelimit_bench.py              # wall ns per op (noisy on a shared VM)
    .venv/bin/python benchmarks/ratelimit_bench.py --callgrind  # instructions per op (deterministic)

`--callgrind` runs each op under valgrind twice (N and 2N iterations) and prints
the difference divided by N, so start-up and import costs cancel out. Callgrind
counts user space only: a system call (fcntl) shows as its few user-space
instructions, so read the wall-clock column for those.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import mmap
import multiprocessing
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def op_mp_lock():
    lock = multiprocessing.get_context("fork").Lock()
    acq, rel = lock.acquire, lock.release

    def f():
        acq(True, 0.5)
        rel()
    return f


def op_fcntl():
    fd = os.memfd_create("bench")
    os.ftruncate(fd, 4096)
    lockf, ex, un = fcntl.lockf, fcntl.LOCK_EX, fcntl.LOCK_UN

    def f():
        lockf(fd, ex, 1, 7)
        lockf(fd, un, 1, 7)
    return f


def op_pthread_robust():
    libc = ctypes.CDLL(None, use_errno=True)
    buf = mmap.mmap(-1, 4096, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    attr = ctypes.create_string_buffer(64)
    libc.pthread_mutexattr_init(attr)
    libc.pthread_mutexattr_setpshared(attr, 1)
    libc.pthread_mutexattr_setrobust(attr, 1)
    libc.pthread_mutex_init(ctypes.c_void_p(addr), attr)
    lock, unlock = libc.pthread_mutex_lock, libc.pthread_mutex_unlock
    lock.argtypes = unlock.argtypes = [ctypes.c_void_p]
    f_buf = buf  # keep the mapping alive

    def f():
        lock(addr)
        unlock(addr)
    f.keep = f_buf
    return f


def op_take_same_key():
    from agproxy.filters.rate_limit.buckets import BucketTable
    t = BucketTable()
    h = hash("alice") ^ 0x5EED
    now = time.monotonic_ns()

    def f():
        t.take(h, 1, 1 << 60, 1, now)
    return f


def op_take_distinct_keys():
    from agproxy.filters.rate_limit.buckets import BucketTable
    t = BucketTable()
    now = time.monotonic_ns()
    keys = iter(range(1 << 40))

    def f():
        t.take(hash(str(next(keys))), 10**9, 10**10, 1, now)
    return f




_FILTER_TOML = """
[[listener]]
name = "main"
bind = "127.0.0.1:1"

[[route]]
name = "limited"
backend = "up"
[[route.rate_limit.local]]
%s
capacity = 1000000000
refill = { tokens = 1000000000, every = "1s" }

[backend.up]
type = "static"
"""


def _filter_op(key_line: str):
    """One request through the built rate_limit filter (request and response phase)
    on a real Exchange; the stream is a stand-in with the attributes Exchange reads."""
    from agproxy.config.model import parse
    from agproxy.http.messages import ConnInfo, Headers, RequestHead, ResponseHead
    from agproxy.proxy.build import build_runtime
    from agproxy.proxy.exchange import Exchange
    rt = build_runtime(parse(__import__("tomllib").loads(_FILTER_TOML % key_line)))
    f = rt.router.routes[0].filters[0]

    class Stream:
        pass

    stream = Stream()
    stream.conn = ConnInfo("127.0.0.1", 5555, 8080, False)

    def op():
        stream.request = RequestHead("GET", "/limited/", Headers([("host", "gw"), ("x-user", "bench-user"),
                                                                ("accept", "*/*")]), "http", "gw", "HTTP/1.1")
        ex = Exchange(stream)
        f.on_request(ex)
        f.on_response(ex, ResponseHead(200, Headers([("content-length", "5")])))
        ex._activation = None
    return op


def op_exchange_only():
    """The baseline of the two filter ops: building the request and the Exchange."""
    from agproxy.http.messages import ConnInfo, Headers, RequestHead, ResponseHead
    from agproxy.proxy.exchange import Exchange

    class Stream:
        pass

    stream = Stream()
    stream.conn = ConnInfo("127.0.0.1", 5555, 8080, False)

    def op():
        stream.request = RequestHead("GET", "/limited/", Headers([("host", "gw"), ("x-user", "bench-user"),
                                                                ("accept", "*/*")]), "http", "gw", "HTTP/1.1")
        ex = Exchange(stream)
        ResponseHead(200, Headers([("content-length", "5")]))
        ex._activation = None
    return op


OPS = {
    "multiprocessing.Lock": op_mp_lock,
    "fcntl.lockf (memfd)": op_fcntl,
    "pthread robust (ctypes)": op_pthread_robust,
    "table.take same key": op_take_same_key,
    "table.take new keys": op_take_distinct_keys,
    "exchange only (baseline)": op_exchange_only,
    "filter, no key": lambda: _filter_op(""),
    "filter, header key": lambda: _filter_op("key = 'request.headers[\"x-user\"]'"),
}


def wall(name: str, n: int) -> float:
    f = OPS[name]()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            f()
        best = min(best, (time.perf_counter() - t) / n)
    return best * 1e9


def instructions(name: str, n: int) -> float:
    totals = []
    for count in (n, 2 * n):
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "cg.out"
            subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                            sys.executable, __file__, "--run", name, str(count)],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            text = out.read_text()
            totals.append(int(re.search(r"^totals: (\d+)", text, re.M).group(1)))
    return (totals[1] - totals[0]) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--callgrind", action="store_true")
    ap.add_argument("--run", nargs=2, metavar=("OP", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--ops", nargs="+", choices=list(OPS), default=list(OPS))
    args = ap.parse_args()
    if args.run:
        f = OPS[args.run[0]]()
        for _ in range(int(args.run[1])):
            f()
        return 0
    for name in args.ops:
        if args.callgrind:
            print(f"{name:26s} {instructions(name, 20000):8,.0f} instructions/op", flush=True)
        else:
            print(f"{name:26s} {wall(name, 200000):8,.0f} ns/op", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
