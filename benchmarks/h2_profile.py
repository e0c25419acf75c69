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

Request shapes: `same` (identical GETs: after the first, every header is an
HPACK index — what h2load sends), `varied` (path and x-request-id change per
request — closer to real agents) and `post` (varied, plus a 1 KB JSON body the
handler reads: DATA frames, flow-control acknowledgement).

`--stage` rebuilds the adapter as it was before each optimisation, to measure
what each change bought (see benchmarks/results/h2.md):
  0  h2 defaults (validation + normalisation on, str headers), a write per frame
     group, stock HPACK
  1  + H2Configuration without validation/normalisation, bytes headers
  2  + one write per data_received / per loop turn (call_soon flush)
  3  + agproxy's HPACK coders (byte-wise Huffman decoder, caches, O(1) encoder)
  4  + END_STREAM carried by the last DATA frame (the current code)

    .venv/bin/python benchmarks/h2_profile.py                 # all stages, both shapes
    .venv/bin/python benchmarks/h2_profile.py --stage 3 --profile varied
    .venv/bin/python benchmarks/h2_profile.py --http1
    .venv/bin/python benchmarks/h2_profile.py --gateway    # h2load against the real binary

`--gateway` runs the agproxy binary (one worker, a `static` route answering 100
bytes, no upstream, no access log) and drives it with h2load: h2c prior
knowledge (1 connection x 10 streams) and HTTP/1.1 (10 connections, --h1); it
reports the worker's CPU time (utime+stime from /proc) per request, i.e. the
whole gateway path (listener, adapter, exchange, filters, local reply).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import h2.config  # noqa: E402
import h2.connection  # noqa: E402
import h2.settings  # noqa: E402
import uvloop  # noqa: E402

import agproxy.http.h2 as h2mod  # noqa: E402
from agproxy.http.h1 import H1Connection, Limits  # noqa: E402
from agproxy.http.messages import ConnInfo, Headers  # noqa: E402

BODY = b'{"id":"chatcmpl-1","object":"chat.completion","choices":[]}\n'
POST_BODY = (b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"' + b"x" * 900 + b'"}]}')


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
    # The client never reads the server's WINDOW_UPDATEs here: give it the windows up front
    # (the server grants 1 MiB per stream and acknowledges what the handler reads).
    c.outbound_flow_control_window = 1 << 30
    c.remote_settings = h2.settings.Settings(
        client=False, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
    batches = []
    for b in range(0, n, concurrency):
        for i in range(b, min(n, b + concurrency)):
            sid = c.get_next_available_stream_id()
            path = f"/v1/chat/completions?session={i}" if shape != "same" else "/v1/chat/completions"
            rid = f"{i:032x}" if shape != "same" else "0" * 32
            post = shape == "post"
            hdrs = [(":method", "POST" if post else "GET"), (":scheme", "http"),
                    (":authority", "gateway.local:8080"),
                    (":path", path), ("user-agent", "agent-sdk/1.4 python/3.11"), ("accept", "application/json"),
                    ("authorization", "Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhZ2VudCJ9.c2lnbmF0dXJl"),
                    ("x-request-id", rid)]
            if post:
                hdrs += [("content-type", "application/json"), ("content-length", str(len(POST_BODY)))]
            c.send_headers(sid, hdrs, end_stream=not post)
            if post:
                c.send_data(sid, POST_BODY, end_stream=True)
            # the client never sees responses: forget the stream so h2's bookkeeping stays O(1)
            c.streams.pop(sid)
        batches.append(c.data_to_send())
    return preface, batches


def h1_client_bytes(n: int, shape: str, concurrency: int) -> list[bytes]:
    batches = []
    for b in range(0, n, concurrency):
        parts = []
        for i in range(b, min(n, b + concurrency)):
            path = f"/v1/chat/completions?session={i}" if shape != "same" else "/v1/chat/completions"
            rid = f"{i:032x}" if shape != "same" else "0" * 32
            post = shape == "post"
            extra = (f"content-type: application/json\r\ncontent-length: {len(POST_BODY)}\r\n" if post else "")
            parts.append(
                f"{'POST' if post else 'GET'} {path} HTTP/1.1\r\nhost: gateway.local:8080\r\n"
                "user-agent: agent-sdk/1.4 python/3.11\r\n"
                "accept: application/json\r\nauthorization: Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhZ2VudCJ9."
                f"c2lnbmF0dXJl\r\nx-request-id: {rid}\r\n{extra}\r\n".encode() + (POST_BODY if post else b""))
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
    h2mod.MERGE_END_STREAM = orig["MERGE_END_STREAM"]
    if stage < 4:
        h2mod.MERGE_END_STREAM = False
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
         "_queued": h2mod.H2Connection._queued, "FAST_HPACK": h2mod.FAST_HPACK,
         "MERGE_END_STREAM": h2mod.MERGE_END_STREAM}


# -- the run ---------------------------------------------------------------------------------------

async def run_h2(n: int, shape: str, concurrency: int, profile: bool) -> float:
    preface, batches = h2_client_bytes(n, shape, concurrency)
    done = 0
    waiter: asyncio.Future | None = None
    headers_out = [("content-type", "application/json"), ("content-length", str(len(BODY)))]

    async def handler(stream):
        nonlocal done, waiter
        if stream.request.method == "POST":
            while await stream.body.read():
                pass
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
        stats = pstats.Stats(prof)
        if _PROFILE_SINK is not None:
            _PROFILE_SINK.append(stats)
        else:
            stats.sort_stats("tottime").print_stats(30)
    return dt / n * 1e6


_PROFILE_SINK: list | None = None


async def run_h1(n: int, shape: str, concurrency: int, profile: bool) -> float:
    batches = h1_client_bytes(n, shape, concurrency)
    done = 0
    waiter: asyncio.Future | None = None
    target = 0
    headers_out = [("content-type", "application/json"), ("content-length", str(len(BODY)))]

    async def handler(stream):
        nonlocal done
        if stream.request.method == "POST":
            while await stream.body.read():
                pass
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


def measure(fn, n, shape, concurrency, profile=False) -> float:
    return uvloop.run(fn(n, shape, concurrency, profile))


# -- the real binary under h2load ------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_LAUNCH = """
import sys
sys.path.insert(0, {root!r})
sys.path.insert(0, {bench!r})
import h2_profile
h2_profile.apply_stage({stage})
from agproxy.cli import main
sys.argv = ["agproxy", "run", "--config", {conf!r}]
sys.exit(main())
"""


def gateway_run(n: int, repeat: int, stages: list[int]) -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    print(f"# gateway worker CPU µs per request (best of {repeat}), n={n}, static route")
    for stage in stages:
        port, admin = _free_port(), _free_port()
        tmp = tempfile.mkdtemp(prefix="h2prof-")
        conf = os.path.join(tmp, "gw.toml")
        with open(conf, "w") as f:
            f.write(f"""[gateway]
workers = 1
admin = "127.0.0.1:{admin}"

[[listener]]
name = "main"
bind = "127.0.0.1:{port}"

[[route]]
name = "static"
match = {{ path_prefix = "/" }}
backend = "local"

[backend.local]
type = "static"
body = "{'x' * 100}"
""")
        code = _LAUNCH.format(root=root, bench=os.path.join(root, "benchmarks"), stage=stage, conf=conf)
        proc = subprocess.Popen([os.path.join(root, ".venv", "bin", "python"), "-c", code],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("gateway did not become ready")
                    time.sleep(0.05)   # polling readiness
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            runs = {f"h2c  stage {stage} (1 conn x 10 streams)": ["h2load", "-c", "1", "-m", "10"]}
            if stage == stages[-1]:
                runs["h1            (10 conns, --h1)    "] = ["h2load", "--h1", "-c", "10", "-m", "1"]
            best: dict = {}
            for _ in range(repeat):
                for name, cmd in runs.items():
                    subprocess.run(cmd + ["-n", str(max(100, n // 10)), url], capture_output=True, check=True)
                    before = _cpu_seconds(proc.pid)
                    out = subprocess.run(cmd + ["-n", str(n), url], capture_output=True, text=True,
                                         check=True).stdout
                    cpu = _cpu_seconds(proc.pid) - before
                    ok = [line for line in out.splitlines() if line.startswith("requests:")]
                    assert ok and f"{n} succeeded" in ok[0], out
                    us = cpu / n * 1e6
                    best[name] = min(best.get(name, us), us)
            for name, us in best.items():
                print(f"{name} {us:8.1f}")
        finally:
            proc.terminate()
            proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shapes", nargs="*", help="same, varied and/or post (default: all)")
    ap.add_argument("-n", type=int, default=5000, help="requests per run")
    ap.add_argument("-c", "--concurrency", type=int, default=10, help="requests per data_received")
    ap.add_argument("-r", "--repeat", type=int, default=5, help="runs; the best is reported")
    ap.add_argument("--stage", type=int, action="append", help="stage(s) to run (default: all)")
    ap.add_argument("--profile", action="store_true", help="cProfile the last stage, top 30 by own time")
    ap.add_argument("--http1", action="store_true", help="also run the HTTP/1.1 adapter")
    ap.add_argument("--gateway", action="store_true", help="h2load against the agproxy binary (see above)")
    ap.add_argument("--breakdown", action="store_true",
                    help="split the last stage's time into h2 / HPACK / adapter shares (cProfile)")
    a = ap.parse_args()
    if a.gateway:
        gateway_run(a.n, a.repeat, a.stage or [0, 4])
        return
    stages = a.stage or [0, 1, 2, 3, 4]
    a.shapes = a.shapes or ["same", "varied", "post"]
    print(f"# CPU µs per request (best of {a.repeat}, stages interleaved), n={a.n}, "
          f"{a.concurrency} requests per read")
    for shape in a.shapes:
        best: dict = {}
        for _ in range(a.repeat):
            # Interleaved, so a noisy neighbour hurts every stage alike; the minimum is reported.
            for st in stages:
                apply_stage(st)
                us = measure(run_h2, a.n, shape, a.concurrency)
                best[st] = min(best.get(st, us), us)
            if a.http1:
                us = measure(run_h1, a.n, shape, a.concurrency)
                best["h1"] = min(best.get("h1", us), us)
        for st in stages:
            print(f"h2   stage {st}  {shape:7s} {best[st]:8.1f}")
        if a.http1:
            print(f"h1           {shape:7s} {best['h1']:8.1f}")
    if a.profile:
        apply_stage(stages[-1])
        measure(run_h2, a.n, a.shapes[-1], a.concurrency, profile=True)
    if a.breakdown:
        apply_stage(stages[-1])
        for shape in a.shapes:
            breakdown(a.n, shape, a.concurrency)


def breakdown(n: int, shape: str, concurrency: int) -> None:
    """Shares of the profiled time by component (cProfile inflates all Python calls alike)."""
    global _PROFILE_SINK
    _PROFILE_SINK = []
    uvloop.run(run_h2(n, shape, concurrency, True))
    st = _PROFILE_SINK[0]
    total = st.total_tt
    cum = {}
    for (fname, _line, func), (_cc, _nc, _tt, ct, _callers) in st.stats.items():
        key = (os.path.basename(os.path.dirname(fname)) + "/" + os.path.basename(fname), func)
        cum[key] = cum.get(key, 0.0) + ct

    def c(path, func):
        return cum.get((path, func), 0.0)
    h2_in = c("h2/connection.py", "receive_data")
    dec = c("http/h2.py", "decode")
    h2_out = (c("h2/connection.py", "send_headers") + c("h2/connection.py", "send_data")
              + c("h2/connection.py", "end_stream") + c("h2/connection.py", "data_to_send")
              + c("h2/connection.py", "acknowledge_received_data"))
    enc = c("http/h2.py", "encode")
    parts = [
        ("h2 inbound (frames, state machines, events)", h2_in - dec),
        ("HPACK decode", dec),
        ("h2 outbound (frames, state machines)", h2_out - enc),
        ("HPACK encode", enc),
        ("adapter + handler + event loop (the rest)", total - h2_in - h2_out),
    ]
    print(f"\n# breakdown, {shape}: share of profiled time")
    for name, t in parts:
        print(f"  {name:48s} {100 * t / total:5.1f} %")


if __name__ == "__main__":
    main()
