"""CPU cost per request of the HTTP/2 server side (agproxy/http/h2.py on the
hand-written codec agproxy/http/h2_frames.py), in process.

Theory of operation: a real HTTP/2 client (the h2 library, client side: an
independent encoder, not our codec) encodes N requests up front; the harness
then feeds those bytes to an `H2Connection` (which runs `ServerCodec`) attached
to a fake transport that only counts what is written, on a uvloop loop, in
batches of `--concurrency` requests per `data_received` (what h2load -m does on
a socket). The handler answers each request with a small JSON body (head, one
data chunk, end), like a local reply. Only the server side runs in the timed
section, so the figure is the server's CPU per request: frame parsing and
writing, HPACK (http/hpack_codec.py), stream and flow-control state, request
validation, stream/task creation, the handler's three calls, flushes. The fake
transport's `write` is free, so syscalls are not counted (`--gateway` counts
them). `--http1` runs the same handler through http/h1.py for comparison.

Request shapes: `same` (identical GETs: after the first, every header is an
HPACK index — what h2load sends), `varied` (path and x-request-id change per
request — closer to real agents) and `post` (varied, plus a 1 KB JSON body the
handler reads: DATA frames, flow-control acknowledgement).

Each figure is the best of `--repeat` rounds (CPU `process_time` / requests);
HTTP/2 and HTTP/1.1 rounds are interleaved so a noisy neighbour hurts both alike.
(Until the codec replaced the h2 library on the server side, a `--stage` option
rebuilt the old h2-library adapter before each optimisation; those results are
kept as history in benchmarks/results/h2.md.)

    .venv/bin/python benchmarks/h2_profile.py                   # same, varied, post
    .venv/bin/python benchmarks/h2_profile.py --http1           # + the HTTP/1.1 server
    .venv/bin/python benchmarks/h2_profile.py --profile varied  # cProfile, top 30 by own time
    .venv/bin/python benchmarks/h2_profile.py --breakdown       # shares: codec / HPACK / the rest
    .venv/bin/python benchmarks/h2_profile.py --gateway         # h2load against the real binary

`--breakdown` splits cProfile's time per shape into: codec inbound (frame
parsing, stream state, flow control; `ServerCodec.receive` minus HPACK decoding
and the callbacks into h2.py), HPACK decode, codec outbound (`send_headers`,
`send_data`, `ack`, ... minus HPACK encoding), HPACK encode, and the rest (the
adapter's callbacks and streams, request validation, the handler, the event
loop). cProfile inflates call-heavy code, so read the shares, not the times.

`--gateway` runs the agproxy binary (one worker, a `static` route answering 100
bytes, no upstream, no access log) and drives it with h2load: h2c prior
knowledge (1 connection x 10 streams) and HTTP/1.1 (10 connections, --h1); it
reports the worker's CPU time (utime+stime from /proc) per request, i.e. the
whole gateway path (listener, HTTP/2 server, exchange, filters, local reply)
including its syscalls. It binds two free ephemeral ports.
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

from agproxy.http.h2 import H2Connection  # noqa: E402
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


# -- the run ---------------------------------------------------------------------------------------

async def run_h2(n: int, shape: str, concurrency: int, profile: bool) -> float:
    preface, batches = h2_client_bytes(n, shape, concurrency)
    done = 0
    waiter: asyncio.Future | None = None
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

    limits = Limits(max_concurrent_streams=max(100, concurrency))
    proto = H2Connection(handler, ConnInfo("127.0.0.1", 1, 2, False), limits)
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
from agproxy.cli import main
sys.argv = ["agproxy", "run", "--config", {conf!r}]
sys.exit(main())
"""


def gateway_config(port: int, admin: int) -> str:
    """One worker, a static 100-byte reply on every path, no upstream, no access log."""
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
    return conf


def gateway_run(n: int, repeat: int) -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    port, admin = _free_port(), _free_port()
    conf = gateway_config(port, admin)
    code = _LAUNCH.format(root=root, conf=conf)
    proc = subprocess.Popen([os.path.join(root, ".venv", "bin", "python"), "-c", code],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"# gateway worker CPU µs per request (best of {repeat}), n={n}, static route")
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"gateway exited with {proc.returncode}")
                if time.monotonic() > deadline:
                    raise RuntimeError("gateway did not become ready")
                time.sleep(0.05)   # polling readiness
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        runs = {"h2c  (1 conn x 10 streams)": ["h2load", "-c", "1", "-m", "10"],
                "h1   (10 conns, --h1)     ": ["h2load", "--h1", "-c", "10", "-m", "1"]}
        best: dict = {}
        for _ in range(repeat):
            # Interleaved, so a noisy neighbour hurts both protocols alike.
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


SHAPES = ("same", "varied", "post")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shapes", nargs="*", metavar="shape", help="same, varied and/or post (default: all)")
    ap.add_argument("-n", type=int, default=5000, help="requests per run")
    ap.add_argument("-c", "--concurrency", type=int, default=10, help="requests per data_received")
    ap.add_argument("-r", "--repeat", type=int, default=5, help="rounds; the best is reported")
    ap.add_argument("--profile", action="store_true",
                    help="then cProfile the HTTP/2 server on the last shape, top 30 by own time")
    ap.add_argument("--http1", action="store_true", help="also run the HTTP/1.1 server (http/h1.py)")
    ap.add_argument("--breakdown", action="store_true",
                    help="then split each shape's profiled time into codec / HPACK / the rest (cProfile)")
    ap.add_argument("--gateway", action="store_true", help="h2load against the agproxy binary (see above)")
    a = ap.parse_args()
    if a.gateway:
        gateway_run(a.n, a.repeat)
        return
    for shape in a.shapes:
        if shape not in SHAPES:
            ap.error(f"unknown shape {shape!r} (choose from {', '.join(SHAPES)})")
    a.shapes = a.shapes or list(SHAPES)
    print(f"# CPU µs per request (best of {a.repeat}{', h2/h1 interleaved' if a.http1 else ''}), "
          f"n={a.n}, {a.concurrency} requests per read")
    for shape in a.shapes:
        best: dict = {}
        for _ in range(a.repeat):
            us = measure(run_h2, a.n, shape, a.concurrency)
            best["h2"] = min(best.get("h2", us), us)
            if a.http1:
                us = measure(run_h1, a.n, shape, a.concurrency)
                best["h1"] = min(best.get("h1", us), us)
        print(f"h2   {shape:7s} {best['h2']:8.1f}")
        if a.http1:
            print(f"h1   {shape:7s} {best['h1']:8.1f}")
    if a.profile:
        print(f"\n# cProfile, h2, {a.shapes[-1]}")
        measure(run_h2, a.n, a.shapes[-1], a.concurrency, profile=True)
    if a.breakdown:
        for shape in a.shapes:
            breakdown(a.n, shape, a.concurrency)


#: ServerCodec's callbacks into http/h2.py (called from inside `receive`)
_CALLBACKS = ("on_request", "on_data", "on_end", "on_trailers", "on_reset", "on_stream_error",
              "on_window", "on_goaway")
#: ServerCodec's output methods the server calls (`end_stream` is `send_data`, not added twice)
_OUTPUT = ("send_headers", "send_data", "reset_stream", "ack", "send_window", "data_to_send",
           "close_connection")


def breakdown(n: int, shape: str, concurrency: int) -> None:
    """Shares of the profiled time by component (cProfile inflates all Python calls alike)."""
    global _PROFILE_SINK
    _PROFILE_SINK = []
    try:
        uvloop.run(run_h2(n, shape, concurrency, True))
        st = _PROFILE_SINK[0]
    finally:
        _PROFILE_SINK = None
    total = st.total_tt
    cum: dict = {}
    for (fname, _line, func), (_cc, _nc, _tt, ct, _callers) in st.stats.items():
        key = (os.path.basename(os.path.dirname(fname)) + "/" + os.path.basename(fname), func)
        cum[key] = cum.get(key, 0.0) + ct

    def c(path, *funcs):
        return sum(cum.get((path, f), 0.0) for f in funcs)
    inbound = c("http/h2_frames.py", "receive")
    dec = c("http/hpack_codec.py", "decode")
    callbacks = c("http/h2.py", *_CALLBACKS)
    outbound = c("http/h2_frames.py", *_OUTPUT)
    enc = c("http/hpack_codec.py", "encode")
    assert inbound and outbound, "profile keys not found: was the codec renamed?"
    parts = [
        ("codec inbound (frames, stream state, flow control)", inbound - dec - callbacks),
        ("HPACK decode", dec),
        ("codec outbound (frames, windows)", outbound - enc),
        ("HPACK encode", enc),
        ("h2.py callbacks/streams, handler, event loop (the rest)",
         total - (inbound - callbacks) - outbound),
    ]
    print(f"\n# breakdown, {shape}: share of profiled time")
    for name, t in parts:
        print(f"  {name:56s} {100 * t / total:5.1f} %")


if __name__ == "__main__":
    main()
