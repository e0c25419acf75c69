#!/usr/bin/env python3
"""Side-by-side benchmark: agproxy against Envoy, nginx and haproxy, and no proxy.

    .venv/bin/python benchmarks/run.py [--quick] [--scenarios h1 h2c ...] [--proxies ...]
                                       [--baseline OTHER_CHECKOUT/.venv/bin/agproxy]

How it works
1. A temp work dir gets a self-signed TLS certificate, an RS256 key with its
   JWKS file and a token, and one config file per program (harness/proxies.py).
2. The upstream, an nginx answering ``return 200`` with a 100-byte body, starts
   on core 1. Each proxy (agproxy, Envoy, nginx, haproxy; one worker each)
   starts on core 0 with ``taskset -c 0`` and must answer 200 through to the
   upstream; one that does not is marked FAILED and the run goes on.
3. A smoke test (20 requests) checks each proxy × scenario; a failing cell is
   marked FAILED with the reason and skipped.
4. Rounds are interleaved: for each round, for each scenario, for each proxy,
   one measured run (after a warm-up) by wrk or h2load on core 1
   (harness/load.py). "direct" is the load tool talking to the upstream itself.
5. Per cell the median of the rounds is kept; ratios are proxy ÷ Envoy, added
   latency is proxy − direct (p50 and p99).
6. The "policy" scenario starts agproxy again with a second route (JWT RS256 +
   3 authorization rules + claims_to_headers) in front of the plain one and
   compares the two routes in that one process (policy ÷ plain). It runs when
   asked for (--scenarios policy), or by default when its preflight passes.
7. `--baseline PATH` adds a proxy `agproxy-base`: another agproxy build (e.g. an
   older commit's worktree, its own `.venv/bin/agproxy`) started exactly like
   `agproxy`, with the same generated config on ports of its own, measured in the
   same interleaved rounds; its ratios ÷ Envoy sit next to agproxy's, and a note
   gives agproxy ÷ agproxy-base per scenario ("must not drop" in one run).
   `--tracing RATIO` adds `agproxy-traced` the same way: this agproxy, the same
   config plus `[telemetry].tracing` at that sampling ratio, exporting to an OTLP
   sink (harness/otlp_sink.py) on the load core; a note gives traced ÷ agproxy.
8. Tables are printed and written to benchmarks/RESULTS.md (RESULTS-quick.md
   with --quick). Every process is stopped at exit, Ctrl-C and errors included
   (harness/procs.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import keys, proxies, report  # noqa: E402
from harness.load import (H2_CLIENTS, H2_STREAMS, RATE_CLIENTS, RATE_TOTAL,  # noqa: E402
                          WRK_CONNECTIONS, LoadError, LoadGen, Measure)
from harness.procs import (Child, Supervisor, free_ports, http_get,  # noqa: E402
                           raise_on_termination_signals, wait_ready)

PROXY_CORE, LOAD_CORE = 0, 1
PROXIES = ["direct", "agproxy", "envoy", "nginx", "haproxy"]
BASELINE = "agproxy-base"   # --baseline: another agproxy binary, same config
TRACED = "agproxy-traced"   # --tracing RATIO: this agproxy, same config + [telemetry].tracing


@dataclass(frozen=True)
class Scenario:
    name: str
    transport: str  # which URL of a proxy: "h1", "tls" or "h2c"
    tool: str       # LoadGen method: "wrk", "h2" or "fixed_rate"
    http1: bool     # for the smoke test
    title: str


SCENARIOS = {s.name: s for s in [
    Scenario("h1", "h1", "wrk", True, "HTTP/1.1 plaintext, keep-alive, wrk 64 connections"),
    Scenario("h1-tls", "tls", "wrk", True, "HTTP/1.1 over TLS, keep-alive, wrk 64 connections"),
    Scenario("h2c", "h2c", "h2", False, "HTTP/2 plaintext (prior knowledge), h2load -c16 -m10"),
    Scenario("h2-tls", "tls", "h2", False, "HTTP/2 over TLS (ALPN h2), h2load -c16 -m10"),
    Scenario("latency", "h1", "fixed_rate", True,
             "HTTP/1.1 plaintext at a fixed 1,000 req/s, evenly spaced (h2load --rps, 10 connections)"),
]}
POLICY = "policy"
POLICY_TITLE = ("agproxy plain route vs policy route (JWT RS256 + 3 authorization rules + "
                "claims_to_headers), HTTP/1.1 plaintext, wrk 64 connections")
POLICY_ROWS = ("plain route", "policy route")
DID_NOT_START = "did not start (see: Proxies that failed)"


@dataclass
class Running:
    """A proxy as the rounds see it: where it listens, or why it is not there."""
    name: str
    urls: dict[str, str]
    child: Child | None = None
    error: str | None = None

    def check_alive(self) -> str | None:
        if self.child and not self.child.alive():
            self.error = f"died (exit {self.child.popen.returncode})\n{self.child.log_tail()}"
        return self.error


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, sup: Supervisor):
        self.args, self.workdir, self.sup = args, workdir, sup
        self.tls = keys.make_tls(workdir)
        self.jwt = keys.make_jwt(workdir)
        self.ports = self._allocate_ports()
        self.load = LoadGen(sup, workdir, LOAD_CORE, args.duration, args.warm_up)
        self.running: dict[str, Running] = {}
        self.tables: list[report.Table] = []
        self.notes: list[str] = []

    def _allocate_ports(self) -> proxies.Ports:
        free = iter(free_ports(22))
        ports = proxies.Ports(next(free), next(free), next(free), agproxy_admin=next(free))
        for name in ("agproxy", "envoy", BASELINE, TRACED):  # one port for h1 and h2c (codec detection)
            port = next(free)
            ports.proxy[name] = {"h1": port, "h2c": port, "tls": next(free)}
        for name in ("agproxy", BASELINE, TRACED):
            ports.proxy[name]["tls"] = ports.proxy[name]["h1"]  # one port, sniffed
        self.baseline_admin = next(free)
        self.traced_admin, self.sink_port = next(free), next(free)
        for name in ("nginx", "haproxy"):
            ports.proxy[name] = {"h1": next(free), "h2c": next(free), "tls": next(free)}
        return ports

    # --- processes -------------------------------------------------------------

    def start_upstream(self) -> None:
        spec = proxies.upstream_spec(self.workdir, self.ports, self.tls)
        child = self.sup.start(spec.name, spec.argv, LOAD_CORE)
        error = wait_ready(child, spec.urls["h1"] + "/", spec.ready_timeout)
        if error:
            raise SystemExit(f"upstream nginx did not start: {error}\n{child.log_tail()}")
        _, body = http_get(spec.urls["h1"] + "/")
        if len(body) != len(proxies.BODY):
            raise SystemExit(f"upstream body is {len(body)} bytes, expected {len(proxies.BODY)}")
        self.running["direct"] = Running("direct", spec.urls, child)

    def start_proxy(self, spec: proxies.Spec, label: str | None = None) -> Running:
        label = label or spec.name
        if not Path(spec.argv[0]).exists() and not shutil.which(spec.argv[0]):
            return Running(label, spec.urls, error=f"not installed: {spec.argv[0]}")
        child = self.sup.start(spec.name, spec.argv, PROXY_CORE)
        error = wait_ready(child, spec.urls["h1"] + "/", spec.ready_timeout)
        if error:
            tail = child.log_tail()
            self.sup.stop(child)
            return Running(label, spec.urls, error=f"failed to start: {error}\n"
                                                   f"command: {shlex.join(spec.argv)}\n{tail}")
        return Running(label, spec.urls, child)

    def proxy_spec(self, name: str) -> proxies.Spec:
        if name == "agproxy":
            return proxies.agproxy_spec(self.workdir, self.ports, self.tls)
        if name == BASELINE:
            return self.baseline_spec()
        if name == TRACED:
            return self.traced_spec()
        return proxies.PEER_SPECS[name](self.workdir, self.ports, self.tls)

    def baseline_spec(self) -> proxies.Spec:
        """agproxy's spec for the --baseline binary: the same generated config, in a
        folder of its own (its access log), on its own ports."""
        workdir = self.workdir / BASELINE
        workdir.mkdir(exist_ok=True)
        ports = dataclasses.replace(self.ports, proxy={**self.ports.proxy, "agproxy": self.ports.proxy[BASELINE]},
                                    agproxy_admin=self.baseline_admin)
        spec = proxies.agproxy_spec(workdir, ports, self.tls, name=BASELINE)
        conf = spec.argv[spec.argv.index("--config") + 1]
        # The same command, another binary; builds before the `--config` flag took the
        # config file as a positional argument.
        binary = str(self.args.baseline)
        flag = ["--config"] if "--config" in _output([binary, "run", "-h"]) else []
        argv = [binary, "run", *flag, conf, *spec.argv[spec.argv.index("--config") + 2:]]
        return proxies.Spec(BASELINE, argv, spec.urls, spec.ready_timeout)

    def traced_spec(self) -> proxies.Spec:
        """agproxy with the same config plus tracing at --tracing's ratio, exporting to an
        OTLP/HTTP sink (harness/otlp_sink.py) on the load core, on its own ports."""
        if not getattr(self, "_sink", None):
            self._sink = self.sup.start("otlp-sink", [sys.executable, str(HERE / "harness" / "otlp_sink.py"),
                                                      str(self.sink_port)], LOAD_CORE)
            error = wait_ready(self._sink, f"http://127.0.0.1:{self.sink_port}/", 30)
            if error:
                raise SystemExit(f"otlp sink did not start: {error}")
        workdir = self.workdir / TRACED
        workdir.mkdir(exist_ok=True)
        ports = dataclasses.replace(self.ports, proxy={**self.ports.proxy, "agproxy": self.ports.proxy[TRACED]},
                                    agproxy_admin=self.traced_admin)
        spec = proxies.agproxy_spec(workdir, ports, self.tls, name=TRACED)
        conf = Path(spec.argv[spec.argv.index("--config") + 1])
        conf.write_text(conf.read_text() + f'\n[telemetry]\ntracing = {{ otlp_endpoint = '
                        f'"http://127.0.0.1:{self.sink_port}", sampling = {self.args.tracing} }}\n')
        return proxies.Spec(TRACED, spec.argv, spec.urls, spec.ready_timeout)

    def start_proxies(self) -> None:
        for name in self.args.proxies:
            if name == "direct":
                continue
            running = self.start_proxy(self.proxy_spec(name))
            self.running[name] = running
            print(f"  {name:8s} {running.error or 'ok'}", flush=True)

    def stop_proxy(self, name: str) -> None:
        running = self.running.get(name)
        if running and running.child:
            self.sup.stop(running.child)
            running.child = None

    # --- measuring -------------------------------------------------------------

    def measure(self, scenario: Scenario, url: str) -> Measure:
        return getattr(self.load, scenario.tool)(url + "/")

    def smoke_cells(self, scenarios: list[Scenario]) -> dict[str, report.Table]:
        tables = {}
        for sc in scenarios:
            cells = {}
            for name in self.args.proxies:
                cell = cells[name] = report.Cell()
                running = self.running[name]
                cell.error = DID_NOT_START if running.error else self.load.smoke(
                    running.urls[sc.transport] + "/", sc.http1)
            tables[sc.name] = report.Table(sc.name, sc.title, cells, ratio_base="envoy")
        return tables

    def run_cell(self, tag: str, cell: report.Cell, running: Running,
                 fn, label: str) -> None:
        if cell.error and not cell.runs:
            return
        if running.check_alive():
            cell.error = running.error
            return
        try:
            result = fn()
        except LoadError as exc:
            cell.error = f"{tag}: {exc}"
            print(f"{tag} {label:12s} load error: {exc}", flush=True)
            return
        cell.runs.append(result)
        print(f"{tag} {label:12s} {result.rps:10,.0f} req/s  p50 {_ms(result.p50_ms)}  "
              f"p99 {_ms(result.p99_ms)}  errors {result.errors}", flush=True)

    def run_main(self, scenarios: list[Scenario]) -> None:
        tables = self.smoke_cells(scenarios)
        self.tables.extend(tables.values())
        for rnd in range(1, self.args.rounds + 1):
            for sc in scenarios:
                for name in self.args.proxies:
                    running = self.running[name]
                    url = running.urls[sc.transport]
                    self.run_cell(f"[{rnd}/{self.args.rounds}] {sc.name:8s}",
                                  tables[sc.name].cells[name], running,
                                  partial(self.measure, sc, url), name)
        for other in (BASELINE, TRACED):
            if other not in self.args.proxies:
                continue
            for sc in scenarios:
                cells = tables[sc.name].cells
                new, old = cells["agproxy"].median("rps"), cells[other].median("rps")
                if new and old:
                    self.notes.append(f"{sc.name}: agproxy ÷ {other} = {new / old:.3f} (req/s medians)"
                                      if other == BASELINE else
                                      f"{sc.name}: {other} (sampling {self.args.tracing}) ÷ agproxy = "
                                      f"{old / new:.3f} (req/s medians)")

    # --- policy scenario ---------------------------------------------------------

    def policy_headers(self, tenant: str = keys.JWT_TENANT) -> dict[str, str]:
        return {"authorization": f"Bearer {self.jwt.token}", "x-tenant": tenant}

    def policy_preflight(self, base: str) -> tuple[str | None, list[str]]:
        """(fatal error or None, warnings): is the policy route doing its job?"""
        try:
            status, body = http_get(base + "/policy/check", self.policy_headers())
            if status != 200:
                return f"valid token → HTTP {status} {body[:200]!r}", []
            warnings = []
            text = body.decode(errors="replace")
            if "user=alice@example.com" not in text:
                warnings.append(f"claims_to_headers: upstream saw {text!r}")
            if "authz=Bearer" in text:
                warnings.append("the validated token was forwarded upstream (forward=false)")
            for what, headers, want in [("no token", {}, 401),
                                        ("wrong tenant", self.policy_headers("other"), 403)]:
                got, _ = http_get(base + "/policy/check", headers)
                if got != want:
                    warnings.append(f"{what} → HTTP {got}, expected {want}")
            return None, warnings
        except OSError as exc:
            return f"{type(exc).__name__}: {exc}", []

    def run_policy(self, explicit: bool) -> None:
        self.stop_proxy("agproxy")  # same ports, new config
        spec = proxies.agproxy_spec(self.workdir, self.ports, self.tls, self.jwt,
                                    name="agproxy-policy")
        running = self.start_proxy(spec, label="agproxy (policy config)")
        if running.error:
            self.running[running.name] = running
            error = DID_NOT_START
        else:
            error, warnings = self.policy_preflight(running.urls["h1"])
            self.notes += [f"policy preflight: {w}" for w in warnings]
        if error and not explicit:
            print(f"  policy scenario skipped (not working yet): {running.error or error}")
            self.notes.append(f"policy scenario skipped: {(running.error or error).splitlines()[0]}")
            if running.child:
                self.sup.stop(running.child)
            return
        cells = {row: report.Cell(error=error) for row in POLICY_ROWS}
        self.tables.append(report.Table(POLICY, POLICY_TITLE, cells, ratio_base="plain route",
                                        latency_base="plain route"))
        base = running.urls["h1"]
        paths = {"plain route": "/bench", "policy route": proxies.POLICY_PREFIX + "/bench"}
        for rnd in range(1, self.args.rounds + 1):
            for row in POLICY_ROWS:
                self.run_cell(f"[{rnd}/{self.args.rounds}] {POLICY:8s}", cells[row], running,
                              partial(self.load.wrk, base + paths[row], self.policy_headers()),
                              row)
        if running.child:
            self.sup.stop(running.child)


def _output(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _ms(value: float | None) -> str:
    return f"{value:8.3f} ms" if value is not None else "       – ms"


# --- report -------------------------------------------------------------------------

def method_text(args: argparse.Namespace) -> str:
    return f"""- Cores: proxy under test pinned to core {PROXY_CORE} (`taskset -c {PROXY_CORE}`,
  one worker/thread: agproxy `workers = 1`, Envoy `--concurrency 1`, nginx
  `worker_processes 1`, haproxy `nbthread 1`); the load generator and the
  upstream share core {LOAD_CORE}. Everything on 127.0.0.1.
- Upstream: nginx `return 200` with a 100-byte body, keep-alive, no access log.
  "direct" = the load generator talking to that nginx without a proxy.
- Proxies: keep-alive to the upstream over HTTP/1.1, access log to a file
  (agproxy as configured, Envoy file logger and nginx `buffer=64k flush=1s`
  buffered, haproxy one line per request to stdout → file), metrics on (agproxy's
  admin port, Envoy's built-in stats). TLS: ECDSA P-256 self-signed certificate,
  ALPN h2 + http/1.1; agproxy serves plaintext and TLS on one port, peers on
  separate ports.
- Load: wrk 1 thread × {WRK_CONNECTIONS} connections (HTTP/1.1); h2load 1 thread ×
  {H2_CLIENTS} connections × {H2_STREAMS} streams (h2c prior knowledge, and h2 over TLS);
  latency: h2load `--h1 -c{RATE_CLIENTS} --rps={RATE_TOTAL // RATE_CLIENTS} -r1
  --rate-period={1000 / RATE_TOTAL:g}ms` = {RATE_TOTAL:,} req/s in all, the connections
  started {1000 / RATE_TOTAL:g} ms apart so that requests are evenly spaced (plain
  `--rps` sends them in bursts of {RATE_CLIENTS}). Each run: {args.warm_up:g} s warm-up, then
  {args.duration:g} s measured.
- {args.rounds} round(s), interleaved (round → scenario → proxy); each number is
  the median over rounds. "spread" = (max − min) / median of req/s over rounds.
- "÷ Envoy" = req/s ÷ Envoy's req/s. "+p50/+p99" = latency minus direct's
  (policy table: minus the plain route's). Latency percentiles come from wrk's
  `--latency` or h2load's per-request log; under closed-loop saturation they are
  mostly queueing (≈ connections ÷ req/s); the fixed-rate scenario is the one that
  shows what a proxy adds to one request.
- errors = failed requests + non-2xx answers, summed over rounds."""


def write_markdown(path: Path, bench: Bench, env: dict[str, str], argv: list[str]) -> None:
    args = bench.args
    quick = ("\n> **Quick run** (1 round, short durations): a smoke test of the harness, "
             "not numbers to cite.\n" if args.quick else "")
    lines = [
        "# agproxy side-by-side benchmark", "",
        f"Generated by `{shlex.join(['benchmarks/run.py', *argv])}` on {env['date']}.", quick,
        "## Machine and versions", "", "| | |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in env.items() if k != "date"], "",
        "## Method", "", method_text(args), "",
        "## Results", "",
    ]
    for table in bench.tables:
        lines += [f"### {table.scenario}: {table.title}", "", report.markdown_table(table), ""]
    if bench.notes:
        lines += ["## Notes", "", *[f"- {n}" for n in bench.notes], ""]
    failures = {n: r.error for n, r in bench.running.items() if r.error}
    if failures:
        lines += ["## Proxies that failed", ""]
        for name, error in failures.items():
            lines += [f"**{name}**", "", "```", error.strip()[-3000:], "```", ""]
    # Hand-kept sections carried into every report: the other suites' ratios
    # (mcp_bench, llm_bench, policies_bench, tracing) and the data-path choices.
    for name in ("suites.md", "choices.md"):
        part = HERE / "results" / name
        if part.exists():
            lines += [part.read_text().strip(), ""]
    lines += ["## Component benchmarks", "",
              *[f"- [`results/{f.name}`](results/{f.name})" for f in sorted((HERE / "results").glob("*.md"))], ""]
    path.write_text("\n".join(lines))


# --- command line ---------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="1 round, 3 s runs, 1 s warm-up: checks the harness")
    parser.add_argument("--scenarios", nargs="+", choices=[*SCENARIOS, POLICY],
                        help="default: all (policy only if its preflight passes)")
    parser.add_argument("--proxies", nargs="+", choices=PROXIES[1:],
                        help="default: all (direct always runs)")
    parser.add_argument("--rounds", type=int, help="default 5 (--quick: 1)")
    parser.add_argument("--duration", type=float, help="seconds per run (default 10, --quick 3)")
    parser.add_argument("--warm-up", type=float, help="seconds before each run (default 2, --quick 1)")
    parser.add_argument("--output", type=Path,
                        help="default benchmarks/RESULTS.md (--quick: RESULTS-quick.md)")
    parser.add_argument("--keep-workdir", action="store_true",
                        help="keep configs and logs (the path is printed)")
    parser.add_argument("--baseline", type=Path, metavar="AGPROXY_BIN",
                        help=f"also run this agproxy binary as '{BASELINE}' (same config, same rounds)")
    parser.add_argument("--tracing", type=float, metavar="RATIO",
                        help=f"also run agproxy with [telemetry].tracing at this sampling ratio as '{TRACED}', "
                             "exporting to a local OTLP sink")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.warm_up = args.warm_up if args.warm_up is not None else (1.0 if args.quick else 2.0)
    args.output = args.output or HERE / ("RESULTS-quick.md" if args.quick else "RESULTS.md")
    args.policy_explicit = bool(args.scenarios and POLICY in args.scenarios)
    args.scenarios = args.scenarios or [*SCENARIOS, POLICY]
    args.proxies = ["direct", *[p for p in PROXIES[1:] if p in (args.proxies or PROXIES)]]
    if args.baseline is not None:
        if not os.access(args.baseline, os.X_OK):
            parser.error(f"--baseline: not an executable: {args.baseline}")
        args.baseline = args.baseline.absolute()
        args.proxies.insert(args.proxies.index("agproxy") + 1 if "agproxy" in args.proxies else 1, BASELINE)
    if args.tracing is not None:
        args.proxies.insert(args.proxies.index("agproxy") + 1 if "agproxy" in args.proxies else 1, TRACED)
    return args


def check_tools() -> None:
    missing = [t for t in ("taskset", "nginx", "wrk", "h2load") if not shutil.which(t)]
    if missing:
        raise SystemExit(f"missing tools: {', '.join(missing)}; run benchmarks/setup.sh")


def estimate_minutes(args: argparse.Namespace) -> float:
    main = [s for s in args.scenarios if s in SCENARIOS]
    per_run = args.duration + args.warm_up + 1.0
    runs = args.rounds * (len(main) * len(args.proxies) + (2 if POLICY in args.scenarios else 0))
    return runs * per_run / 60


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    check_tools()
    raise_on_termination_signals()
    workdir = Path(tempfile.mkdtemp(prefix="agproxy-bench-"))
    sup = Supervisor(workdir)
    print(f"work dir {workdir}; about {estimate_minutes(args):.0f} min", flush=True)
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        print(f"warning: load average {load_before:.2f}: something else is running; "
              "the numbers will be low and noisy", flush=True)
    bench = None
    try:
        bench = Bench(args, workdir, sup)
        bench.start_upstream()
        started = time.monotonic()
        main_scenarios = [SCENARIOS[s] for s in args.scenarios if s in SCENARIOS]
        if main_scenarios:
            print("starting proxies:", flush=True)
            bench.start_proxies()
            bench.run_main(main_scenarios)
        if args.policy_explicit or (POLICY in args.scenarios and "agproxy" in args.proxies):
            bench.run_policy(explicit=args.policy_explicit)
    except KeyboardInterrupt:
        print("\ninterrupted: partial results below, no report written")
        for table in bench.tables if bench else []:
            print(report.console_table(table))
        return 130
    finally:
        sup.stop_all()
        if args.keep_workdir:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    for table in bench.tables:
        print(report.console_table(table))
    env = report.environment(proxies.envoy_binary(), proxies.agproxy_binary())
    env["load average at start"] = f"{load_before:.2f} (1-minute; should be near 0)"
    if args.baseline is not None:
        commit = _output(["git", "-C", str(args.baseline.parent), "log", "-1", "--format=%h %s"]).strip()
        env[BASELINE] = (f"{_output([str(args.baseline), 'version']).strip()} — {args.baseline}"
                         + (f" (commit {commit[:80]})" if commit else ""))
    write_markdown(args.output, bench, env, argv)
    print(f"\nwrote {args.output} ({(time.monotonic() - started) / 60:.1f} min of runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
