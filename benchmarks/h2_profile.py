"""CPU cost per request of the HTTP/2 server adapter (agproxy/http/h2.py), in process.

Theory of operation: a real h2 client (the h2 library, client side) encodes N
requests up front; the harness then feeds those bytes to an `H2Connection`
attached to a fake transport that only counts what is written, on a uvloop
loop, in batches of `--concurrency` requests per `data_received` (what h2load -m
does on a socket). The handler answers each request with a small JSON body
(head, one data chunk, end), like a local reply. Only the server side runs in
the timed section, so the figure is the adapter's CPU per request: h2 parsing,
HPACK, the state machines, stream/task creation, the handler's three calls,
flushes. `--http1` runs the same handler through http/h1.py for comparison.

Two request shapes: `same` (identical requests: after the first, every header
is an HPACK index — what h2load sends) and `varied` (path and x-request-id
change per request — closer to real agents).

`--stage` rebuilds the adapter as it was before each optimisation, to measure
what each change bought (see benchmarks/results/h2.md):
  0  h2 defaults (validation + normalisation on, str headers), a write per frame
     group, stock HPACK
  1  + H2Configuration without validation/normalisation, bytes headers
  2  + one write per data_received / per loop turn (call_soon flush)
  3  + HPACK decode cache and fast encoder (the current code)

    .venv/bin/python benchmarks/h2_profile.py                 # all stages, both shapes
    .venv/bin/python benchmarks/h2_profile.py --stage 3 --profile varied
    .venv/bin/python benchmarks/h2_profile.py --http1
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import h2.config  # noqa: E402
import h2.connection  # noqa: E402
import h2.settings  # noqa: E402
import hpack  # noqa: E402
import uvloop  # noqa: E402

import agproxy.http.h2 as h2mod  # noqa: E402
from agproxy.http.h1 import H1Connection, Limits  # noqa: E402
from agproxy.http.messages import ConnInfo, Headers  # noqa: E402

BODY = b'{"id":"chatcmpl-1","object":"chat.completion","choices":[]}\n'


class FakeTransport:
    def __init__(self):
        self.written = 0
        self.writes = 0
        self.closed = False

    def write(self, data):
        self.written += len(data)
        self.writes += 1

    def is_closing(self):
        return self.closed

    def close(self):
        self.closed = True

    abort = close

    def get_extra_info(self, name, default=None):
        return default

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass


def h2_client_bytes(n: int, shape: str, concurrency: int) -> tuple[bytes, list[bytes]]:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.local_settings = h2.settings.Settings(
        client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
    c.initiate_connection()
    c.increment_flow_control_window(2**31 - 1 - 65535)
    preface = c.data_to_send()
    batches = []
    for b in range(0, n, concurrency):
        for i in range(b, min(n, b + concurrency)):
            sid = c.get_next_available_stream_id()
            path = f"/v1/chat/completions?session={i}" if shape == "varied" else "/v1/chat/completions"
            rid = f"{i:032x}" if shape == "varied" else "0" * 32
            c.send_headers(sid, [
                (":method", "GET"), (":scheme", "http"), (":authority", "gateway.local:8080"),
                (":path", path), ("user-agent", "agent-sdk/1.4 python/3.11"), ("accept", "application/json"),
                ("authorization", "Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhZ2VudCJ9.c2lnbmF0dXJl"),
                ("x-request-id", rid)], end_stream=True)
            # the client never sees responses: forget the stream so h2's bookkeeping stays O(1)
            c.streams.pop(sid)
        batches.append(c.data_to_send())
    return preface, batches


def h1_client_bytes(n: int, shape: str, concurrency: int) -> list[bytes]:
    batches = []
    for b in range(0, n, concurrency):
        parts = []
        for i in range(b, min(n, b + concurrency)):
            path = f"/v1/chat/completions?session={i}" if shape == "varied" else "/v1/chat/completions"
            rid = f"{i:032x}" if shape == "varied" else "0" * 32
            parts.append(
                f"GET {path} HTTP/1.1\r\nhost: gateway.local:8080\r\nuser-agent: agent-sdk/1.4 python/3.11\r\n"
                "accept: application/json\r\nauthorization: Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhZ2VudCJ9."
                f"c2lnbmF0dXJl\r\nx-request-id: {rid}\r\n\r\n".encode())
        batches.append(b"".join(parts))
    return batches


# -- stages ----------------------------------------------------------------------------------------

def apply_stage(stage: int) -> None:
    """Re-create the adapter as it was before the later optimisations."""
    orig = _ORIG
    h2mod.server_config = orig["server_config"]
    h2mod.H2Connection._schedule_flush = orig["_schedule_flush"]
    h2mod.H2Connection._queued = orig["_queued"]
    h2mod.FAST_HPACK = orig["FAST_HPACK"]
    if stage < 3:
        h2mod.FAST_HPACK = False
    if stage < 2:
        def per_call_flush(self):
            self._flush_now()

        h2mod.H2Connection._schedule_flush = per_call_flush
        h2mod.H2Connection._queued = lambda self, n: self._flush_now()
    if stage < 1:
        h2mod.server_config = lambda: h2.config.H2Configuration(client_side=False)


_ORIG = {"server_config": h2mod.server_config, "_schedule_flush": h2mod.H2Connection._schedule_flush,
         "_queued": h2mod.H2Connection._queued, "FAST_HPACK": getattr(h2mod, "FAST_HPACK", True)}


# -- the run ---------------------------------------------------------------------------------------

async def run_h2(n: int, shape: str, concurrency: int, profile: bool) -> float:
    preface, batches = h2_client_bytes(n, shape, concurrency)
    done = 0
    waiter: asyncio.Future | None = None
    headers_out = [("content-type", "application/json"), ("content-length", str(len(BODY)))]

    async def handler(stream):
        nonlocal done, waiter
        stream.send_head(200, Headers(headers_out + [("x-request-id", stream.request.headers.get("x-request-id"))]))
        await stream.send_data(BODY)
        await stream.end()
        done += 1
        if waiter is not None and done >= target:
            waiter.set_result(None)

    limits = Limits(max_concurrent_streams=max(100, concurrency))
    proto = h2mod.H2Connection(handler, ConnInfo("127.0.0.1", 1, 2, False), limits)
    transport = FakeTransport()
    proto.connection_made(transport)
    proto.data_received(preface)
    loop = asyncio.get_running_loop()
    prof = cProfile.Profile() if profile else None
    target = 0
    t0 = time.process_time()
    if prof:
        prof.enable()
    for chunk in batches:
        target = min(n, target + concurrency)
        proto.data_received(chunk)
        waiter = loop.create_future()
        await waiter
        waiter = None
        await asyncio.sleep(0)   # let the scheduled flush run
    if prof:
        prof.disable()
    dt = time.process_time() - t0
    assert done == n, (done, n)
    assert not proto.streams
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    return dt / n * 1e6


async def run_h1(n: int, shape: str, concurrency: int, profile: bool) -> float:
    batches = h1_client_bytes(n, shape, concurrency)
    done = 0
    waiter: asyncio.Future | None = None
    target = 0
    headers_out = [("content-type", "application/json"), ("content-length", str(len(BODY)))]

    async def handler(stream):
        nonlocal done
        stream.send_head(200, Headers(headers_out + [("x-request-id", stream.request.headers.get("x-request-id"))]))
        await stream.send_data(BODY)
        await stream.end()
        done += 1
        if waiter is not None and done >= target:
            waiter.set_result(None)

    proto = H1Connection(handler, ConnInfo("127.0.0.1", 1, 2, False), Limits())
    proto.connection_made(FakeTransport())
    loop = asyncio.get_running_loop()
    prof = cProfile.Profile() if profile else None
    t0 = time.process_time()
    if prof:
        prof.enable()
    for chunk in batches:
        target = min(n, target + concurrency)
        waiter = loop.create_future()
        proto.data_received(chunk)
        await waiter
    if prof:
        prof.disable()
    dt = time.process_time() - t0
    assert done == n
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    return dt / n * 1e6


def measure(fn, n, shape, concurrency, repeat, profile=False) -> float:
    best = None
    for _ in range(repeat):
        v = uvloop.run(fn(n, shape, concurrency, profile))
        best = v if best is None else min(best, v)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shapes", nargs="*", help="same and/or varied (default: both)")
    ap.add_argument("-n", type=int, default=5000, help="requests per run")
    ap.add_argument("-c", "--concurrency", type=int, default=10, help="requests per data_received")
    ap.add_argument("-r", "--repeat", type=int, default=5, help="runs; the best is reported")
    ap.add_argument("--stage", type=int, action="append", help="stage(s) to run (default: all)")
    ap.add_argument("--profile", action="store_true", help="cProfile the last stage, top 30 by own time")
    ap.add_argument("--http1", action="store_true", help="also run the HTTP/1.1 adapter")
    a = ap.parse_args()
    stages = a.stage or [0, 1, 2, 3]
    a.shapes = a.shapes or ["same", "varied"]
    print(f"# CPU µs per request (best of {a.repeat}), n={a.n}, {a.concurrency} requests per read")
    for shape in a.shapes:
        for st in stages:
            apply_stage(st)
            us = measure(run_h2, a.n, shape, a.concurrency, a.repeat)
            print(f"h2   stage {st}  {shape:7s} {us:8.1f}")
        if a.http1:
            us = measure(run_h1, a.n, shape, a.concurrency, a.repeat)
            print(f"h1           {shape:7s} {us:8.1f}")
    if a.profile:
        apply_stage(stages[-1])
        measure(run_h2, a.n, a.shapes[-1], a.concurrency, 1, profile=True)


if __name__ == "__main__":
    main()
