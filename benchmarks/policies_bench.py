#!/usr/bin/env python3
"""Wall-clock cost of agproxy's rate limits and gRPC ext_authz, and Envoy's ext_authz
against the same authorization server: one command, interleaved rounds.

    .venv/bin/python benchmarks/policies_bench.py            # ~6 min; writes results/policies-wallclock.md
    .venv/bin/python benchmarks/policies_bench.py --quick    # harness check (1 round, short runs)

What runs (harness/: the same nginx upstream, configs and load tools as run.py):
- the upstream nginx, a redis-server, the grpcio Envoy rate-limit service (harness/rls.py)
  and the grpcio authorization server (harness/authz.py: allows every Check with one
  header) on core 1, with the load generator;
- agproxy, `workers = 1` on core 0, with its routes: plain, a local limit keyed on a
  header, the same limit in Redis, the rate-limit service, gRPC ext_authz (limits large
  enough never to deny: what is measured is the cost of counting);
- agproxy, `workers = 2` on both cores (the load generator and the peers share them),
  plain and the local limit: the limit is then shared between two processes;
- Envoy (`--concurrency 1`, core 0): a plain listener and one with its ext_authz filter
  against the same authorization server.

Two measures, each in interleaved rounds (round → cell), medians and spread:
1. saturation: wrk, 64 HTTP/1.1 keep-alive connections, req/s;
2. CPU per request at a fixed offered rate below every cell's saturation (h2load
   `--rps`, evenly spaced, HTTP/1.1): the CPU time the proxy's processes (all threads,
   all workers) used, from /proc/<pid>/task/*/schedstat, divided by the requests
   answered; the authorization server's too. When the Python authorization server is
   the bottleneck of both proxies, (1) says little about the proxies and (2) is what
   "≥ Envoy's rate per core" means: requests per CPU-second of the proxy.

Ratios: each scenario ÷ the plain route of the same proxy, and agproxy ext_authz ÷
Envoy ext_authz (req/s; CPU: Envoy's µs ÷ agproxy's, so > 1 means agproxy is cheaper).
Wall-clock numbers on a machine shared with other work are noise: read the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import keys, proxies, report  # noqa: E402
from harness.load import RATE_CLIENTS, WRK_CONNECTIONS, LoadError, LoadGen  # noqa: E402
from harness.procs import Child, Supervisor, free_ports, raise_on_termination_signals, wait_ready  # noqa: E402

PROXY_CORE, LOAD_CORE = 0, 1
HDR = dict(proxies.LIMIT_HEADERS)          # the key of the limits (sent to every route alike)


@dataclass(frozen=True)
class Cell:
    label: str        # row in the tables
    proxy: str        # which running proxy ("agproxy", "agproxy-w2", "envoy")
    path: str
    base: str         # the row this one is divided by ("" for a base row)


CELLS = [
    Cell("agproxy plain", "agproxy", "/", ""),
    Cell("agproxy local limit", "agproxy", proxies.LIMIT_PREFIX + "/", "agproxy plain"),
    Cell("agproxy redis limit", "agproxy", proxies.REDIS_PREFIX + "/", "agproxy plain"),
    Cell("agproxy RLS limit", "agproxy", proxies.RLS_PREFIX + "/", "agproxy plain"),
    Cell("agproxy ext_authz", "agproxy", proxies.EXT_AUTHZ_PREFIX + "/", "agproxy plain"),
    Cell("agproxy w2 plain", "agproxy-w2", "/", ""),
    Cell("agproxy w2 local limit", "agproxy-w2", proxies.LIMIT_PREFIX + "/", "agproxy w2 plain"),
    Cell("envoy plain", "envoy", "/", ""),
    Cell("envoy ext_authz", "envoy", "/", "envoy plain"),
]
PEER_ROWS = {"agproxy ext_authz": "envoy ext_authz"}


@dataclass
class Results:
    rps: dict[str, list[float]] = field(default_factory=dict)
    cpu_us: dict[str, list[float]] = field(default_factory=dict)       # proxy µs per request
    authz_us: dict[str, list[float]] = field(default_factory=dict)     # authz server µs per request
    errors: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)         # did not start / smoke test
    load_errors: dict[str, str] = field(default_factory=dict)    # a run that failed (the last one)


# --- CPU time of a process tree, in nanoseconds ---------------------------------------

def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def cpu_ns(pid: int) -> int:
    """On-CPU nanoseconds of every thread of pid and its descendants (schedstat)."""
    total = 0
    for p in _tree(pid):
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return total


# --- configs -------------------------------------------------------------------------

def envoy_config(workdir: Path, plain_port: int, authz_port: int, up_port: int, authz_server: int) -> dict:
    def listener(name: str, port: int, filters: list) -> dict:
        hcm = proxies._envoy_hcm(workdir, name)
        hcm["typed_config"]["http_filters"] = filters + hcm["typed_config"]["http_filters"]
        return proxies._envoy_listener(name, port, hcm, None)

    ext_authz = {"name": "envoy.filters.http.ext_authz", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        "transport_api_version": "V3", "failure_mode_allow": False,
        "grpc_service": {"envoy_grpc": {"cluster_name": "authz"}, "timeout": "5s"}}}

    def cluster(name: str, port: int, http2: bool = False) -> dict:
        out = {"name": name, "type": "STATIC", "connect_timeout": "5s",
               "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
                   "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}
        if http2:
            out["typed_extension_protocol_options"] = {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}}}
        return out

    return {"static_resources": {
        "listeners": [listener("plain", plain_port, []), listener("extauthz", authz_port, [ext_authz])],
        "clusters": [cluster("up", up_port), cluster("authz", authz_server, http2=True)]}}


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, sup: Supervisor):
        self.args, self.workdir, self.sup = args, workdir, sup
        self.tls = keys.make_tls(workdir)
        free = iter(free_ports(16))
        self.ports = proxies.Ports(next(free), next(free), next(free), agproxy_admin=next(free))
        self.ports.proxy["agproxy"] = {"h1": next(free)}
        self.w2_ports = proxies.Ports(self.ports.up_h1, self.ports.up_tls, self.ports.up_h2c,
                                      agproxy_admin=next(free))
        self.w2_ports.proxy["agproxy"] = {"h1": next(free)}
        self.envoy_ports = (next(free), next(free))
        self.redis_port, self.rls_port, self.authz_port = next(free), next(free), next(free)
        self.load = LoadGen(sup, workdir, LOAD_CORE, args.duration, args.warm_up)
        self.children: dict[str, Child] = {}
        self.urls: dict[str, str] = {}
        self.res = Results()

    # --- processes -----------------------------------------------------------------
    def _python_peer(self, name: str, module: str, port: int) -> Child:
        child = self.sup.start(name, [sys.executable, "-m", module, str(port)], LOAD_CORE,
                               env={**os.environ, "PYTHONPATH": str(HERE)})
        deadline = time.monotonic() + 30
        while "ready" not in child.log_path.read_text(errors="replace"):
            if not child.alive() or time.monotonic() > deadline:
                raise SystemExit(f"{name} did not start:\n{child.log_tail()}")
            time.sleep(0.1)
        return child

    def start(self) -> None:
        up = proxies.upstream_spec(self.workdir, self.ports, self.tls)
        child = self.sup.start(up.name, up.argv, LOAD_CORE)
        if (error := wait_ready(child, up.urls["h1"] + "/", up.ready_timeout)):
            raise SystemExit(f"upstream nginx: {error}")
        self.sup.start("redis", ["redis-server", "--port", str(self.redis_port), "--save", "",
                                 "--appendonly", "no"], LOAD_CORE)
        from instructions import wait_redis
        wait_redis(self.redis_port)
        self._python_peer("rls", "harness.rls", self.rls_port)
        self.children["authz"] = self._python_peer("authz", "harness.authz", self.authz_port)

        common = dict(rate_limits=True, redis_port=self.redis_port, ext_authz=f"127.0.0.1:{self.authz_port}",
                      rls=f"127.0.0.1:{self.rls_port}")
        one = proxies.agproxy_spec(self.workdir, self.ports, self.tls, **common)
        two = proxies.agproxy_spec(self.workdir, self.w2_ports, self.tls, name="agproxy-w2", workers=2,
                                   rate_limits=True)
        conf = self.workdir / "agproxy-w2.toml"
        conf.write_text(conf.read_text().replace("agproxy-access.log", "agproxy-w2-access.log"))
        envoy_conf = self.workdir / "envoy-policies.json"
        envoy_conf.write_text(json.dumps(envoy_config(self.workdir, *self.envoy_ports, self.ports.up_h1,
                                                      self.authz_port), indent=1))
        envoy_argv = [proxies.envoy_binary(), "-c", str(envoy_conf), "--concurrency", "1",
                      "--disable-hot-restart", "--log-level", "warn"]
        starts = [("agproxy", one.argv, PROXY_CORE, one.urls["h1"], one.ready_timeout),
                  ("agproxy-w2", two.argv, f"{PROXY_CORE},{LOAD_CORE}", two.urls["h1"], two.ready_timeout),
                  ("envoy", envoy_argv, PROXY_CORE, f"http://127.0.0.1:{self.envoy_ports[0]}", 30.0)]
        for name, argv, core, url, timeout in starts:
            if not Path(argv[0]).exists() and not shutil.which(argv[0]):
                self.res.failed[name] = f"not installed: {argv[0]}"
                continue
            child = self.sup.start(name, argv, core)
            if (error := wait_ready(child, url + "/", timeout)):
                self.res.failed[name] = f"did not start: {error}\ncommand: {shlex.join(argv)}\n{child.log_tail()}"
                self.sup.stop(child)
                continue
            self.children[name] = child
            self.urls[name] = url
        if "envoy" in self.urls:
            self.urls["envoy ext_authz"] = f"http://127.0.0.1:{self.envoy_ports[1]}"

    def url(self, cell: Cell) -> str | None:
        if cell.label == "envoy ext_authz":
            return self.urls.get("envoy ext_authz")
        base = self.urls.get(cell.proxy)
        return base + cell.path if base else None

    # --- measuring -------------------------------------------------------------------
    def smoke(self) -> None:
        for cell in CELLS:
            url = self.url(cell)
            if url is None:
                self.res.failed.setdefault(cell.label, self.res.failed.get(cell.proxy, "did not start"))
                continue
            error = self.load.smoke(url, http1=True, headers=HDR)
            if error:
                self.res.failed[cell.label] = error

    def cells(self) -> list[Cell]:
        return [c for c in CELLS if c.label not in self.res.failed]

    def saturation_round(self, rnd: int) -> None:
        for cell in self.cells():
            tag = f"[{rnd}/{self.args.rounds}] saturation {cell.label:24s}"
            try:
                m = self.load.wrk(self.url(cell), HDR)
            except LoadError as exc:
                print(f"{tag} load error: {exc}", flush=True)
                self.res.load_errors[cell.label] = str(exc)
                continue
            self.res.rps.setdefault(cell.label, []).append(m.rps)
            self.res.errors[cell.label] = self.res.errors.get(cell.label, 0) + m.errors
            print(f"{tag} {m.rps:9,.0f} req/s  errors {m.errors}", flush=True)

    def cpu_round(self, rnd: int) -> None:
        authz = self.children["authz"].popen.pid
        for cell in self.cells():
            tag = f"[{rnd}/{self.args.rounds}] {self.args.rate} req/s {cell.label:24s}"
            pid = self.children[cell.proxy].popen.pid
            # A warm-up run, then the counters are read around the measured run only.
            warm = LoadGen(self.sup, self.workdir, LOAD_CORE, self.args.warm_up or 1, 0)
            load = LoadGen(self.sup, self.workdir, LOAD_CORE, self.args.cpu_duration, 0)
            try:
                warm.fixed_rate(self.url(cell), HDR, rate=self.args.rate)
                before, before_a = cpu_ns(pid), cpu_ns(authz)
                m = load.fixed_rate(self.url(cell), HDR, rate=self.args.rate)
                after, after_a = cpu_ns(pid), cpu_ns(authz)
            except LoadError as exc:
                print(f"{tag} load error: {exc}", flush=True)
                self.res.load_errors[cell.label] = str(exc)
                continue
            n = int(self.args.rate * self.args.cpu_duration)      # h2load -n: every one answered
            us = (after - before) / 1000 / n
            self.res.cpu_us.setdefault(cell.label, []).append(us)
            if "ext_authz" in cell.label:
                self.res.authz_us.setdefault(cell.label, []).append((after_a - before_a) / 1000 / n)
            self.res.errors[cell.label] = self.res.errors.get(cell.label, 0) + m.errors
            print(f"{tag} {us:8.1f} CPU-µs/request  ({m.rps:,.0f} req/s achieved, errors {m.errors})", flush=True)


# --- report ------------------------------------------------------------------------------

def _med(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


def _spread(values: list[float] | None) -> float | None:
    if not values or len(values) < 2:
        return None
    return 100.0 * (max(values) - min(values)) / statistics.median(values)


def _f(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def tables(res: Results) -> str:
    lines = ["### Saturation (wrk, 64 connections, HTTP/1.1)", "",
             "| scenario | req/s | ÷ plain (same proxy) | ÷ Envoy ext_authz | spread % | errors |",
             "|---|---:|---:|---:|---:|---:|"]
    for cell in CELLS:
        if cell.label in res.failed and cell.label not in res.rps:
            lines.append(f"| {cell.label} | FAILED | – | – | – | – |")
            continue
        rps = _med(res.rps.get(cell.label))
        base = _med(res.rps.get(cell.base)) if cell.base else None
        peer = _med(res.rps.get(PEER_ROWS.get(cell.label, "")))
        lines.append(f"| {cell.label} | {_f(rps, ',.0f')} | {_f(rps / base if rps and base else None, '.3f')} | "
                     f"{_f(rps / peer if rps and peer else None, '.3f')} | {_f(_spread(res.rps.get(cell.label)), '.1f')} | "
                     f"{res.errors.get(cell.label, 0)} |")
    lines += ["", "### CPU per request at a fixed offered rate (HTTP/1.1, evenly spaced)", "",
              "| scenario | proxy CPU-µs / request | ÷ plain (same proxy) | Envoy ext_authz ÷ this | requests per proxy CPU-second | authz server CPU-µs / request | spread % |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for cell in CELLS:
        us = _med(res.cpu_us.get(cell.label))
        if us is None:
            lines.append(f"| {cell.label} | {'FAILED' if cell.label in res.failed else '–'} | – | – | – | – | – |")
            continue
        base = _med(res.cpu_us.get(cell.base)) if cell.base else None
        peer = _med(res.cpu_us.get(PEER_ROWS.get(cell.label, "")))
        lines.append(f"| {cell.label} | {us:,.1f} | {_f(us / base if base else None, '.3f')} | "
                     f"{_f(peer / us if peer else None, '.3f')} | {1e6 / us:,.0f} | "
                     f"{_f(_med(res.authz_us.get(cell.label)), ',.1f')} | {_f(_spread(res.cpu_us.get(cell.label)), '.1f')} |")
    notes = [f"- {label}: {err.strip().splitlines()[0][:300]}"
             for label, err in [*res.failed.items(), *res.load_errors.items()]]
    if notes:
        lines += ["", "Failures:", "", *notes]
    return "\n".join(lines)


def write(path: Path, args: argparse.Namespace, argv: list[str], res: Results, env: dict, load_before: float) -> None:
    quick = ("\n> **Quick run**: a check of the harness, not numbers to cite.\n" if args.quick else "")
    text = f"""# Rate limits and ext_authz: wall clock, agproxy and Envoy

Generated by `{shlex.join(['benchmarks/policies_bench.py', *argv])}` on {env['date']}
(load average at start {load_before:.2f}; near 0 on a quiet machine).
{quick}
| | |
|---|---|
{chr(10).join(f'| {k} | {v} |' for k, v in env.items() if k in ('cpu', 'kernel', 'envoy', 'nginx', 'python', 'agproxy', 'wrk', 'h2load'))}

## Method

- Core {PROXY_CORE}: the proxy under test (agproxy `workers = 1`, Envoy `--concurrency 1`). Core
  {LOAD_CORE}: the upstream nginx (`return 200`, 100 bytes), redis-server, the grpcio rate-limit
  service (`harness/rls.py`), the grpcio authorization server (`harness/authz.py`, allows every
  Check with one header, `x-user: bench`; the same server for both proxies) and the load
  generator. `agproxy w2`: `workers = 2` on both cores, sharing them with all of the above.
- Routes (one agproxy process, so the ratios are within one process): plain; a local limit
  keyed on `request.headers["x-user"]` (capacity 1e9, never denies); the same limit in Redis
  (`[route.rate_limit.redis]`, pipelined); `[route.rate_limit.remote]` (one ShouldRateLimit per
  request); `[route.ext_authz]` gRPC (one Check per request). Every request carries `x-user`,
  the plain ones too. Envoy: a plain listener and one with `envoy.filters.http.ext_authz`
  (gRPC, `failure_mode_allow: false`) in front of its router.
- Saturation: wrk 1 thread × {WRK_CONNECTIONS} connections, {args.warm_up:g} s warm-up, {args.duration:g} s
  measured, {args.rounds} round(s) interleaved (round → scenario); medians; spread = (max − min) / median.
- CPU: h2load `--h1 -c{RATE_CLIENTS}` at {args.rate} req/s evenly spaced (below every scenario's
  saturation), a {args.warm_up or 1:g} s warm-up run then {args.cpu_duration:g} s measured; the proxy's on-CPU time over the
  measured run (every thread of every process of it: `/proc/<pid>/task/*/schedstat`) ÷ the
  requests. For ext_authz the authorization server's CPU per request too. When the Python
  authorization server is the bottleneck, the saturation rows of both ext_authz scenarios say
  more about it than about the proxies; "requests per proxy CPU-second" is the rate per core.
- Ratios: ÷ plain = the scenario over the plain route of the same proxy (req/s; CPU µs).
  agproxy ext_authz ÷ Envoy ext_authz (req/s), and Envoy's CPU-µs ÷ agproxy's (> 1: agproxy
  spends less CPU per request than Envoy).

## Results

{tables(res)}
"""
    path.write_text(text)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 round, short runs: checks the harness")
    ap.add_argument("--rounds", type=int, help="default 3 (--quick: 1)")
    ap.add_argument("--duration", type=int, help="saturation seconds per run (default 5, --quick 2)")
    ap.add_argument("--warm-up", type=int, help="seconds before each run (default 1)")
    ap.add_argument("--rate", type=int, default=500, help="offered req/s of the CPU runs (default 500)")
    ap.add_argument("--cpu-duration", type=float, help="measured seconds per CPU run (default 3, --quick 2)")
    ap.add_argument("--output", type=Path, help="default results/policies-wallclock.md "
                                                "(--quick: results/policies-wallclock-quick.md)")
    ap.add_argument("--keep-workdir", action="store_true")
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.duration = args.duration or (2 if args.quick else 5)
    args.warm_up = args.warm_up if args.warm_up is not None else 1
    args.cpu_duration = args.cpu_duration or (2.0 if args.quick else 3.0)
    args.output = args.output or HERE / "results" / (
        "policies-wallclock-quick.md" if args.quick else "policies-wallclock.md")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    missing = [t for t in ("taskset", "nginx", "wrk", "h2load", "redis-server") if not shutil.which(t)]
    if missing:
        raise SystemExit(f"missing tools: {', '.join(missing)} (benchmarks/setup.sh)")
    raise_on_termination_signals()
    load_before = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="agproxy-policies-"))
    sup = Supervisor(workdir)
    started = time.monotonic()
    try:
        bench = Bench(args, workdir, sup)
        bench.start()
        bench.smoke()
        for rnd in range(1, args.rounds + 1):       # interleaved: every cell once per round
            bench.saturation_round(rnd)
            bench.cpu_round(rnd)
    finally:
        sup.stop_all()
        if args.keep_workdir:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(tables(bench.res))
    env = report.environment(proxies.envoy_binary(), proxies.agproxy_binary())
    write(args.output, args, argv, bench.res, env, load_before)
    print(f"\nwrote {args.output} ({(time.monotonic() - started) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
