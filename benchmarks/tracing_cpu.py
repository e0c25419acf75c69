"""CPU per request at a fixed offered rate: tracing off against tracing on, per thread.

Why: at a fixed rate the load is the same for every build, so the CPU the gateway
process spends per request (user + system, every thread, from the scheduler's own
accounting) is what tracing adds, kernel time and wake-ups included: the part
callgrind (benchmarks/instructions.py) does not see. Closed-loop req/s (run.py)
folds the same cost into a noisier figure.

How: the upstream nginx and two one-worker agproxy processes (the config run.py
generates; the second with `[telemetry].tracing` at `--tracing`, exporting to the
local OTLP sink, harness/otlp_sink.py) are started, both pinned to core 0, the load
generator, the upstream and the sink on core 1. Each round loads each gateway in
turn with h2load at `--rate` req/s in all (HTTP/1.1: 10 connections, their starts
spread over the rate period; h2c: 10 connections x 1 stream) for `--duration`
seconds after a warm-up, and reads /proc/PID/task/*/schedstat (run time, ns) and
the voluntary context switches (the thread blocked: a wait, a GIL hand-off) of every
thread before and after. Printed per gateway:
the median CPU µs per request over rounds, and per thread its run time and wake-ups
per second, and off ÷ traced both of the medians and paired (the median of each round's
ratio). `--idle` seconds with no load are measured the same way first (a thread
that wakes while nothing happens shows there).

    .venv/bin/python benchmarks/tracing_cpu.py --tracing 0.01 --rate 4000 --rounds 5
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import keys, proxies  # noqa: E402
from harness.procs import Supervisor, free_ports, wait_ready  # noqa: E402

HERE = Path(__file__).resolve().parent
CLIENTS = 10


def threads(pid: int) -> dict[int, tuple[str, int, int]]:
    """tid -> (name, run time ns, context switches) of every thread of `pid`; the name is
    "loop" for the main thread, else "thread <tid>" (Python does not name OS threads)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = "loop" if int(task.name) == pid else f"thread {task.name}"
            run_ns = int((task / "schedstat").read_text().split()[0])
            switches = 0     # voluntary only: a thread that blocked (a wait, a GIL hand-off)
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches"):
                    switches = int(line.split()[1])
        except (OSError, ValueError):
            continue        # the thread ended
        out[int(task.name)] = (name, run_ns, switches)
    return out


def delta(before: dict, after: dict) -> dict[str, tuple[int, int]]:
    """thread name -> (run ns, switches) between two `threads` readings (a thread born
    in between counts from zero)."""
    out: dict[str, tuple[int, int]] = {}
    for tid, (name, run, sw) in after.items():
        b = before.get(tid, (name, 0, 0))
        r0, s0 = out.get(name, (0, 0))
        out[name] = (r0 + run - b[1], s0 + sw - b[2])
    return out


def load(url: str, rate: int, seconds: float, h2: bool) -> int:
    n = max(CLIENTS, int(rate * seconds))
    per = max(1, rate // CLIENTS)
    flags = ["-c", str(CLIENTS), f"--rps={per}", "-n", str(n)]
    flags += ["-m", "1"] if h2 else ["--h1", "-r1", f"--rate-period={max(1, round(1000 / rate))}ms"]   # (whole ms only)
    done = subprocess.run(["taskset", "-c", "1", "h2load", "-t1", *flags, url],
                          capture_output=True, text=True, timeout=seconds * 3 + 60)
    if f"{n} succeeded" not in done.stdout:
        raise SystemExit(f"h2load did not succeed: {done.stdout[-400:]}{done.stderr[-400:]}")
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tracing", type=float, default=0.01, metavar="RATIO")
    ap.add_argument("--rate", type=int, default=4000, help="req/s in all")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warm-up", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--idle", type=float, default=10.0, help="seconds measured with no load first")
    ap.add_argument("--h2", action="store_true", help="h2c (prior knowledge) instead of HTTP/1.1")
    ap.add_argument("--control", action="store_true",
                    help="the second gateway without tracing too: the method's own bias and noise")
    ap.add_argument("--strace", type=float, default=0, metavar="SECONDS",
                    help="then load each gateway this long under `strace -c -f` and print its "
                         "system calls per request (strace slows it: counts only)")
    args = ap.parse_args()
    for tool in ("h2load", "nginx"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (benchmarks/setup.sh installs it)")

    workdir = Path(tempfile.mkdtemp(prefix="agproxy-cpu-"))
    sup = Supervisor(workdir)
    try:
        tls = keys.make_tls(workdir)
        free = iter(free_ports(9))
        ports, _ = proxies.start_upstream(sup, workdir, tls, free, 1)
        sink_port = next(free)
        sink = sup.start("otlp-sink", [sys.executable, str(HERE / "harness" / "otlp_sink.py"), str(sink_port)], core=1)
        if (error := wait_ready(sink, f"http://127.0.0.1:{sink_port}/", 30)):
            raise SystemExit(f"otlp sink: {error}")
        gateways = {}
        second = "off, again" if args.control else f"tracing {args.tracing}"
        for label in ("off", second):
            sub = workdir / label.replace(" ", "-").replace(",", "")
            sub.mkdir()
            if label != "off":
                ports = dataclasses.replace(ports, proxy={}, agproxy_admin=next(free))
                ports.proxy["agproxy"] = {"h1": next(free)}
            spec = proxies.agproxy_spec(sub, ports, tls)
            if label.startswith("tracing"):
                conf = Path(spec.argv[spec.argv.index("--config") + 1])
                conf.write_text(conf.read_text() + f'\n[telemetry]\ntracing = {{ otlp_endpoint = '
                                f'"http://127.0.0.1:{sink_port}", sampling = {args.tracing} }}\n')
            gw = sup.start(label, spec.argv, core=0)
            if (error := wait_ready(gw, spec.urls["h1"] + "/", 60)):
                raise SystemExit(f"{label}: {error}\n{gw.log_tail()}")
            gateways[label] = (gw.popen.pid, spec.urls["h1"] + "/")

        if args.idle:
            before = {label: threads(pid) for label, (pid, _) in gateways.items()}
            time.sleep(args.idle)       # (the measured interval itself, not a synchronisation)
            for label, (pid, _) in gateways.items():
                d = delta(before[label], threads(pid))
                print(f"idle {args.idle:g} s, {label}: " + ", ".join(
                    f"{name} {run / 1e3 / args.idle:.0f} µs/s {sw / args.idle:.1f} blocking waits/s"
                    for name, (run, sw) in sorted(d.items())))

        per_request: dict[str, list[float]] = {label: [] for label in gateways}
        per_thread: dict[str, dict[str, list[tuple[float, float]]]] = {label: {} for label in gateways}
        for r in range(args.rounds):
            order = list(gateways.items())
            for label, (pid, url) in order if r % 2 == 0 else order[::-1]:   # (no first-mover bias)
                load(url, args.rate, args.warm_up, args.h2)
                before = threads(pid)
                started = time.monotonic()
                n = load(url, args.rate, args.duration, args.h2)
                elapsed = time.monotonic() - started
                d = delta(before, threads(pid))
                us = sum(run for run, _ in d.values()) / 1e3 / n
                per_request[label].append(us)
                for name, (run, sw) in d.items():
                    per_thread[label].setdefault(name, []).append((run / 1e3 / n, sw / elapsed))
                print(f"round {r + 1} {label}: {us:.2f} CPU µs/request over {n} requests "
                      f"({n / elapsed:.0f} req/s)", flush=True)
        off = statistics.median(per_request["off"])
        for label, values in per_request.items():
            med = statistics.median(values)
            # Paired: each round's off ÷ this, measured seconds apart (the machine's speed
            # drifts between rounds more than within one).
            paired = statistics.median(a / b for a, b in zip(per_request["off"], values))
            print(f"{label}: median {med:.2f} CPU µs/request (rounds {', '.join(f'{v:.2f}' for v in values)}); "
                  f"off ÷ this {off / med:.3f}, paired {paired:.3f}")
            for name, samples in sorted(per_thread[label].items()):
                print(f"    thread {name}: {statistics.median(s[0] for s in samples):.3f} µs/request, "
                      f"{statistics.median(s[1] for s in samples):.1f} blocking waits/s")
        if args.strace and shutil.which("strace"):
            for label, (pid, url) in gateways.items():
                out = workdir / "strace.txt"
                tracer = subprocess.Popen(["strace", "-c", "-f", "-o", str(out), "-p", str(pid)],
                                          stderr=subprocess.DEVNULL)
                time.sleep(0.5)        # (strace attaching; the counts are per request anyway)
                n = load(url, max(1, args.rate // 4), args.strace, args.h2)
                tracer.send_signal(signal.SIGINT)
                tracer.wait(30)
                calls = []
                for line in out.read_text().splitlines():
                    parts = line.split()
                    if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                        calls.append((int(parts[3]), parts[-1]))
                print(f"strace {label}, {n} requests: " + ", ".join(
                    f"{name} {c / n:.3f}" for c, name in sorted(calls, reverse=True)) + " per request")
    finally:
        sup.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
