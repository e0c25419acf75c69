#!/usr/bin/env python3
"""LLM gateway benchmark: agproxy's llm_group route against its plain relay and LiteLLM.

    .venv/bin/python benchmarks/llm_bench.py            # full run (~5 min), writes benchmarks/results/llm.md
    .venv/bin/python benchmarks/llm_bench.py --quick    # a harness check (~1.5 min), results/llm-quick.md
    .venv/bin/python benchmarks/llm_bench.py --setup    # only create the LiteLLM venv

What runs (harness/proxies.py has the configs):
- the mock provider: the suite's upstream nginx on core 1, with two locations that
  answer a POST to `…/v1/chat/completions` with a fixed OpenAI answer: JSON (usage with
  `prompt_tokens_details.cached_tokens`) or an SSE stream (word chunks, a finish chunk,
  the usage chunk, `data: [DONE]`). It costs next to nothing, so what is measured is the
  proxy.
- on core 0, each alone on it (`taskset -c 0`), one process tree per column:
  "agproxy relay": an `http` route to the mock (the ceiling: bytes relayed as they come);
  "agproxy llm": an `llm_group` route, one `openai` provider pointing at the mock (body
  parsed, model mapped, `stream_options.include_usage` added to a stream and the usage
  chunk taken out again, usage parsed as the answer passes, token metrics, access log);
  "litellm": the LiteLLM proxy (`litellm[proxy]`, pinned below, in its own venv under
  benchmarks/.venvs/litellm made by `--setup` or the first run), one `openai/…` model per
  mock endpoint, master key, no database, `LITELLM_LOCAL_MODEL_COST_MAP=True` (offline).
  Its workers: LiteLLM's docs size `--num_workers` to the CPUs the proxy has (the CLI's
  default is the logical CPU count); it has one core here, so one worker (more on one
  core only add context switches; `--litellm-workers` to try).
  "direct" is the load tool talking to the mock itself (the latency baseline).
- the load (h2load, HTTP/1.1 keep-alive) on core 1 POSTs the same fixed 1 KB request
  (harness/proxies.py `llm_request`), streaming or not, with `authorization: Bearer
  <master key>` (agproxy ignores it).

Per round, per mode (json, stream), per column, interleaved:
1. closed loop, 64 connections: req/s;
   and the CPU time of the column's process tree per request (the sum of
   /proc/<pid>/task/*/schedstat run times of every process in its session, before and
   after; far less sensitive to the other load on the machine than req/s);
2. fixed rate (`--rate` 40 req/s for JSON, `--rate-stream` 10 req/s for streams, evenly
   spaced over 10 connections: LiteLLM on one core must keep up with it): p50/p99,
   added latency = column − direct, and CPU per request as above.
Every answer is checked: h2load counts non-2xx and failed requests; for the
deterministic columns the body bytes h2load received must equal answers × the expected
body (the mock's bytes; for the llm stream, the mock's stream without the usage chunk,
checked once at start), and every cell also sends 5 requests of its own and checks the
body in full (LiteLLM rewrites ids and fields: there a valid completion with the mock's
text, and for a stream `data:` chunks carrying that text and `data: [DONE]`).
Medians over rounds; spread = (max − min) / median of req/s. Ratios in the same run:
llm ÷ relay (target ≥ 0.6) and agproxy llm ÷ LiteLLM per core (target ≥ 20×), by req/s
and by CPU per request.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import keys, proxies, report  # noqa: E402
from harness.load import LoadError, Measure, parse_h2load, percentiles_from_log  # noqa: E402
from harness.procs import Supervisor, free_ports, raise_on_termination_signals, wait_ready  # noqa: E402

PROXY_CORE, LOAD_CORE = 0, 1
#: a release of the 1.106 line, published 2026-10-18, before 1.107.0 (the compromised one,
#: whose release candidates came out from 2026-10-18 on); the later releases this machine's
#: registry serves need companion packages (litellm-proxy, newer -extras) it does not have.
LITELLM_PIN = "1.106.0"
LITELLM_VENV = HERE / ".venvs" / "litellm"
MASTER_KEY = "sk-bench-master-key-0001"
CONNECTIONS = 64
RATE_CONNECTIONS = 10
CHECKS_PER_CELL = 5
ROWS = ["direct", "agproxy relay", "agproxy llm", "litellm"]
MODES = {"json": False, "stream": True}


# --- setup ---------------------------------------------------------------------

def litellm_binary(setup: bool) -> str:
    """The pinned LiteLLM in its own venv, created when missing or at another version."""
    python = LITELLM_VENV / "bin" / "python"
    binary = LITELLM_VENV / "bin" / "litellm"
    if binary.exists():
        out = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                             capture_output=True, text=True)
        if out.stdout.strip() == LITELLM_PIN:
            return str(binary)
    if not setup:
        print(f"creating {LITELLM_VENV} with litellm[proxy]=={LITELLM_PIN} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
    subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", f"litellm[proxy]=={LITELLM_PIN}"],
                   check=True)
    return str(binary)


# --- measuring -----------------------------------------------------------------

@dataclass
class Result:
    """One (mode, column) across rounds."""
    load: report.Cell = field(default_factory=report.Cell)      # closed loop
    rate: report.Cell = field(default_factory=report.Cell)      # fixed rate
    cpu_us: list[float] = field(default_factory=list)           # per request, at the fixed rate
    cpu_load_us: list[float] = field(default_factory=list)      # per request, closed loop
    errors: int = 0
    notes: list[str] = field(default_factory=list)


def session_cpu_ns(sid: int) -> int:
    """Run time (ns) so far of every thread of every process in session `sid`."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
            if int(stat.rsplit(")", 1)[1].split()[3]) != sid:     # field 6: session
                continue
            for task in os.scandir(f"/proc/{entry.name}/task"):
                with open(f"/proc/{entry.name}/task/{task.name}/schedstat") as f:
                    total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


_DATA = re.compile(r"traffic: .*?, .*?\((\d+)\) data")


class Runner:
    def __init__(self, args, workdir: Path, sup: Supervisor):
        self.args, self.workdir, self.sup = args, workdir, sup
        self.bodies = {mode: workdir / f"request-{mode}.json" for mode in MODES}
        for mode, stream in MODES.items():
            self.bodies[mode].write_bytes(proxies.llm_request(stream))
        self.headers = {"content-type": "application/json", "authorization": f"Bearer {MASTER_KEY}"}
        self.expected: dict[tuple[str, str], bytes | None] = {}

    def h2load(self, flags: list[str], url: str, mode: str, run_for: float) -> tuple[Measure, int]:
        log = self.workdir / "h2load-requests.log"
        log.unlink(missing_ok=True)
        argv = ["h2load", "--h1", "-t1", *flags, "-d", str(self.bodies[mode]), "--log-file", str(log)]
        for k, v in self.headers.items():
            argv += ["-H", f"{k}: {v}"]
        code, out = self.sup.run("load", [*argv, url], LOAD_CORE, timeout=run_for + 60)
        if code != 0:
            raise LoadError(f"h2load exited {code}: {out[-300:]}")
        measure = parse_h2load(out)
        measure.p50_ms, measure.p99_ms = percentiles_from_log(log)
        data = _DATA.search(out)
        succeeded = int(re.search(r"(\d+) succeeded", out).group(1))
        log.unlink(missing_ok=True)
        measure.succeeded = succeeded  # type: ignore[attr-defined]
        return measure, int(data.group(1)) if data else -1

    def closed_loop(self, url: str, mode: str, sid: int | None, last_rps: float | None
                    ) -> tuple[Measure, int, float | None]:
        """Counted runs (-n), not timed ones: a timed run ends with requests in flight that
        a server may go on working on (LiteLLM does) into the next run, and h2load's byte
        total would include them. The warm-up sets the count: as many requests as its rate
        (or the previous round's) gives in `--duration` seconds."""
        a = self.args
        flags = [f"-c{CONNECTIONS}", "-m1"]
        warm = max(3 * CONNECTIONS, int((last_rps or 0) * a.warm_up))
        w, _ = self.h2load([*flags, f"-n{warm}"], url, mode, 60)
        n = max(2 * CONNECTIONS, int((last_rps or w.rps) * a.duration))
        before = session_cpu_ns(sid) if sid else 0
        measure, data = self.h2load([*flags, f"-n{n}"], url, mode, 10 * a.duration + 60)
        cpu = (session_cpu_ns(sid) - before) / 1e3 / n if sid else None
        return measure, data, cpu

    def fixed_rate(self, url: str, mode: str, sid: int | None) -> tuple[Measure, int, float | None]:
        """CPU per request above idle: the tree's idle run time over one second (timers,
        housekeeping) is measured first and taken off, pro rata of the run's length."""
        a = self.args
        rate = a.rate_stream if MODES[mode] else a.rate
        per_conn = max(1, rate // RATE_CONNECTIONS)
        flags = [f"-c{RATE_CONNECTIONS}", f"--rps={per_conn}", "-r1",
                 f"--rate-period={1000 / (per_conn * RATE_CONNECTIONS):g}ms"]
        if a.warm_up > 0:
            self.h2load([*flags, f"-n{max(RATE_CONNECTIONS, int(rate * a.warm_up))}"], url, mode, a.warm_up)
        idle = 0.0
        if sid:
            t0, c0 = time.monotonic(), session_cpu_ns(sid)
            time.sleep(1.0)             # a measurement window, not synchronisation
            idle = (session_cpu_ns(sid) - c0) / (time.monotonic() - t0)
        n = int(rate * a.duration)
        t0, before = time.monotonic(), session_cpu_ns(sid) if sid else 0
        measure, data = self.h2load([*flags, f"-n{n}"], url, mode, a.duration)
        elapsed = time.monotonic() - t0
        cpu = (session_cpu_ns(sid) - before - idle * elapsed) / 1e3 / n if sid else None
        return measure, data, cpu


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    scheme, rest = url.split("://", 1)
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", "/" + path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def check_answer(status: int, body: bytes, stream: bool, expected: bytes | None) -> str | None:
    """None when the answer is right; else what is wrong."""
    if status != 200:
        return f"HTTP {status}: {body[:200]!r}"
    if expected is not None:
        return None if body == expected else f"body differs from the expected bytes: {body[:300]!r}"
    text = proxies.LLM_TEXT
    try:
        if not stream:
            doc = json.loads(body)
            if doc.get("object") != "chat.completion" or doc["choices"][0]["message"]["content"] != text:
                return f"not the mock's completion: {body[:300]!r}"
            return None
        events = [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return f"the stream does not end with data: [DONE]: {body[-200:]!r}"
        got = ""
        for ev in events[:-1]:
            doc = json.loads(ev)
            if doc.get("object") != "chat.completion.chunk":
                return f"not a completion chunk: {ev[:200]}"
            for choice in doc.get("choices") or []:
                got += (choice.get("delta") or {}).get("content") or ""
        return None if got == text else f"the stream's text is {got!r}, not {text!r}"
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        return f"unparsable answer ({exc}): {body[:300]!r}"


def strip_usage_chunk(sse: bytes) -> bytes:
    """The mock's stream as a client that did not ask for usage must see it."""
    events = sse.split(b"\n\n")
    return b"\n\n".join(e for e in events if b'"choices":[]' not in e)


# --- the run -------------------------------------------------------------------

def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round of 2 s: a harness check, numbers are noise")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--duration", type=float, default=None, help="seconds per measured run")
    ap.add_argument("--warm-up", type=float, default=None)
    ap.add_argument("--rate", type=int, default=40, help="req/s of the JSON fixed-rate runs (LiteLLM must keep up)")
    ap.add_argument("--rate-stream", type=int, default=10, help="req/s of the streaming fixed-rate runs")
    ap.add_argument("--litellm-workers", type=int, default=1)
    ap.add_argument("--no-litellm", action="store_true")
    ap.add_argument("--setup", action="store_true", help="only create the LiteLLM venv")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.setup:
        print(litellm_binary(True))
        return 0
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.duration = args.duration or (2.0 if args.quick else 5.0)
    args.warm_up = args.warm_up if args.warm_up is not None else (0.5 if args.quick else 1.0)
    args.out = args.out or HERE / "results" / ("llm-quick.md" if args.quick else "llm.md")
    for tool in ("h2load", "nginx", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (benchmarks/setup.sh installs h2load and nginx)")
    rows = [r for r in ROWS if not (args.no_litellm and r == "litellm")]
    litellm_bin = None if args.no_litellm else litellm_binary(False)
    raise_on_termination_signals()
    workdir = Path(tempfile.mkdtemp(prefix="agproxy-llm-"))
    sup = Supervisor(workdir)
    started = time.monotonic()
    try:
        results, env = run(args, rows, workdir, sup, litellm_bin)
    finally:
        sup.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    text = render(args, rows, results, env, time.monotonic() - started, argv)
    args.out.write_text(text)
    print(text)
    print(f"wrote {args.out}")
    return 0


def run(args, rows: list[str], workdir: Path, sup: Supervisor, litellm_bin: str | None):
    tls = keys.make_tls(workdir)
    free = iter(free_ports(8))
    ports, up = proxies.start_upstream(sup, workdir, tls, free, LOAD_CORE, "the mock (nginx)")
    litellm_port = next(free)
    spec = proxies.agproxy_spec(workdir, ports, tls, llm=True)
    gw = sup.start(spec.name, spec.argv, PROXY_CORE, env={**os.environ, **proxies.LLM_ENV})
    if (error := wait_ready(gw, spec.urls["h1"] + "/", spec.ready_timeout)):
        raise SystemExit(f"agproxy: {error}\n{gw.log_tail()}")
    sids = {"direct": None, "agproxy relay": gw.popen.pid, "agproxy llm": gw.popen.pid}
    base = {"direct": up.urls["h1"], "agproxy relay": spec.urls["h1"], "agproxy llm": spec.urls["h1"]}
    if litellm_bin:
        lspec, lenv = proxies.litellm_spec(workdir, litellm_port, ports, litellm_bin, args.litellm_workers,
                                           MASTER_KEY)
        ll = sup.start(lspec.name, lspec.argv, PROXY_CORE, env=lenv)
        if (error := wait_ready(ll, lspec.urls["h1"] + "/health/liveliness", lspec.ready_timeout)):
            raise SystemExit(f"litellm: {error}\n{ll.log_tail(30)}")
        sids["litellm"], base["litellm"] = ll.popen.pid, lspec.urls["h1"]

    def url(row: str, mode: str) -> str:
        stream = MODES[mode]
        if row in ("direct", "agproxy relay"):
            return base[row] + (proxies.LLM_MOCK_SSE if stream else proxies.LLM_MOCK_JSON) + proxies.LLM_PATH
        if row == "agproxy llm":
            return base[row] + (proxies.LLM_PREFIX_SSE if stream else proxies.LLM_PREFIX_JSON) + proxies.LLM_PATH
        return base[row] + "/v1/chat/completions"

    runner = Runner(args, workdir, sup)
    mock = {"json": proxies.llm_mock_json(), "stream": proxies.llm_mock_sse()}
    for mode in MODES:
        runner.expected[("direct", mode)] = mock[mode]
        runner.expected[("agproxy relay", mode)] = mock[mode]
        runner.expected[("agproxy llm", mode)] = mock[mode] if mode == "json" else strip_usage_chunk(mock[mode])
        runner.expected[("litellm", mode)] = None
    results = {(mode, row): Result() for mode in MODES for row in rows}

    def spot_check(row: str, mode: str) -> None:
        res = results[(mode, row)]
        for _ in range(CHECKS_PER_CELL):
            status, body = post(url(row, mode), runner.bodies[mode].read_bytes(), runner.headers)
            why = check_answer(status, body, MODES[mode], runner.expected[(row, mode)])
            if why:
                res.errors += 1
                if len(res.notes) < 3:
                    res.notes.append(why)

    # Preflight: every column answers right before anything is measured.
    for mode in MODES:
        for row in rows:
            spot_check(row, mode)
            if results[(mode, row)].errors:
                raise SystemExit(f"{row} ({mode}) does not answer right: {results[(mode, row)].notes[0]}")

    for rnd in range(args.rounds):
        for mode in MODES:
            for row in rows:
                res = results[(mode, row)]
                expected = runner.expected[(row, mode)]
                try:
                    m, data, cpu = runner.closed_loop(url(row, mode), mode, sids[row], res.load.median("rps"))
                    res.load.runs.append(m)
                    res.errors += m.errors + _bytes_errors(m, data, expected, res)
                    if cpu is not None:
                        res.cpu_load_us.append(cpu)
                    m, data, cpu = runner.fixed_rate(url(row, mode), mode, sids[row])
                    res.rate.runs.append(m)
                    res.errors += m.errors + _bytes_errors(m, data, expected, res)
                    if cpu is not None:
                        res.cpu_us.append(cpu)
                    spot_check(row, mode)
                except LoadError as exc:
                    res.errors += 1
                    res.notes.append(str(exc)[:300])
                print(f"round {rnd + 1}/{args.rounds} {mode:6s} {row:14s} "
                      f"{res.load.runs[-1].rps if res.load.runs else 0:9,.0f} req/s  "
                      f"cpu {res.cpu_load_us[-1] if res.cpu_load_us else 0:8,.0f} / "
                      f"{res.cpu_us[-1] if res.cpu_us else 0:8,.0f} µs/req  errors {res.errors}", flush=True)
    metrics = _metric_lines(ports.agproxy_admin)
    env = report.environment("envoy", proxies.agproxy_binary())
    env["litellm"] = LITELLM_PIN if litellm_bin else "not run"
    env["token metrics seen"] = metrics
    return results, env


def _bytes_errors(m: Measure, data: int, expected: bytes | None, res: Result) -> int:
    """Answers whose body was not the expected bytes, from h2load's total of body bytes."""
    if expected is None or data < 0:
        return 0
    want = m.succeeded * len(expected)  # type: ignore[attr-defined]
    if data == want:
        return 0
    if len(res.notes) < 3:
        res.notes.append(f"body bytes {data:,} for {m.succeeded} answers, expected {want:,}")  # type: ignore
    return max(1, round(abs(data - want) / len(expected)))


def _metric_lines(admin: int) -> str:
    """The llm route's token histogram counts, to show usage parsing and metrics were on."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=5)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
    except OSError as exc:
        return f"unavailable ({exc})"
    counts = {}
    for line in text.splitlines():
        if line.startswith("agproxy_gen_ai_client_token_usage_count{"):
            kind = re.search(r'gen_ai_token_type="(\w+)"', line).group(1)
            route = re.search(r'route="([\w-]+)"', line).group(1)
            counts[f"{route}/{kind}"] = int(float(line.rsplit(" ", 1)[1]))
    return ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items())) or "none"


# --- the report ----------------------------------------------------------------

def _f(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def render(args, rows, results, env, elapsed: float, argv: list[str]) -> str:
    out = ["# LLM route: agproxy relay vs llm_group vs LiteLLM", "",
           f"Command: `.venv/bin/python benchmarks/llm_bench.py {' '.join(argv)}`".replace(" `", "`").rstrip(), "",
           f"{args.rounds} round(s), interleaved; closed loop {CONNECTIONS} connections for {args.duration:g} s "
           f"(+{args.warm_up:g} s warm-up); fixed rate {args.rate} req/s (JSON), {args.rate_stream} req/s (stream) "
           f"over {RATE_CONNECTIONS} connections for "
           f"{args.duration:g} s; the fixed 1 KB request; every proxy pinned to core 0, the mock and the load on "
           f"core 1. LiteLLM {env['litellm']}, {args.litellm_workers} worker(s). Run took {elapsed / 60:.1f} min.",
           ""]
    if args.quick:
        out += ["**--quick: a harness check on a shared machine; the numbers are noise.**", ""]
    summary = []
    for mode in MODES:
        direct = results.get((mode, "direct"))
        d50 = direct.rate.median("p50_ms") if direct else None
        d99 = direct.rate.median("p99_ms") if direct else None
        relay_rps = results[(mode, "agproxy relay")].load.median("rps")
        out += [f"## {mode}: {'streamed (SSE)' if MODES[mode] else 'JSON'} answer", "",
                "| column | req/s | ÷ relay | spread % | CPU µs/req | p50 ms @rate | p99 ms @rate | +p50 ms "
                "| +p99 ms | CPU µs/req @rate | errors |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in rows:
            r = results[(mode, row)]
            rps = r.load.median("rps")
            p50, p99 = r.rate.median("p50_ms"), r.rate.median("p99_ms")
            cpu = statistics.median(r.cpu_us) if r.cpu_us else None
            cpu_load = statistics.median(r.cpu_load_us) if r.cpu_load_us else None
            add50 = p50 - d50 if row != "direct" and p50 is not None and d50 is not None else None
            add99 = p99 - d99 if row != "direct" and p99 is not None and d99 is not None else None
            out.append(f"| {row} | {_f(rps, ',.0f')} | {_f(rps / relay_rps if rps and relay_rps else None, '.2f')} "
                       f"| {_f(r.load.spread(), '.1f')} | {_f(cpu_load, ',.0f')} | {_f(p50, '.3f')} | {_f(p99, '.3f')} "
                       f"| {_f(add50, '+.3f')} | {_f(add99, '+.3f')} | {_f(cpu, ',.0f')} | {r.errors} |")
        notes = [f"- {row}: {n}" for row in rows for n in results[(mode, row)].notes]
        out += ([""] + notes if notes else []) + [""]
        llm, relay = results[(mode, "agproxy llm")], results[(mode, "agproxy relay")]
        llm_rps, relay_rps = llm.load.median("rps"), relay.load.median("rps")

        def cpu_ratio(a: Result, b: Result, attr: str) -> float | None:
            x, y = getattr(a, attr), getattr(b, attr)
            return statistics.median(x) / statistics.median(y) if x and y else None
        line = (f"{mode}: llm ÷ relay {_f(llm_rps / relay_rps if llm_rps and relay_rps else None, '.2f')} by req/s, "
                f"{_f(cpu_ratio(relay, llm, 'cpu_load_us'), '.2f')} by CPU/request closed loop, "
                f"{_f(cpu_ratio(relay, llm, 'cpu_us'), '.2f')} at the fixed rate (target ≥ 0.6)")
        if (mode, "litellm") in results:
            ll = results[(mode, "litellm")]
            ll_rps = ll.load.median("rps")
            line += (f"; agproxy llm ÷ LiteLLM per core {_f(llm_rps / ll_rps if llm_rps and ll_rps else None, '.1f')}× "
                     f"by req/s, {_f(cpu_ratio(ll, llm, 'cpu_load_us'), '.1f')}× by CPU/request closed loop, "
                     f"{_f(cpu_ratio(ll, llm, 'cpu_us'), '.1f')}× at the fixed rate (target ≥ 20×)")
        summary.append("- " + line)
    out += ["## Ratios (same run)", ""] + summary + [""]
    out += ["## How to read it", "",
            "- req/s: closed loop; the proxy has one core, so this is per core. ÷ relay: against agproxy's plain "
            "`http` route to the same mock (the ceiling).",
            "- p50/p99 @rate: at the fixed rate, where every column keeps up; +p50/+p99: minus `direct` (the load "
            "tool talking to the mock itself).",
            "- CPU µs/req (closed loop) and CPU µs/req @rate: the run time of the proxy's whole process tree "
            "(every thread of every process in its session, /proc/…/schedstat) during the measured run, divided "
            "by its requests; at the fixed rate, less the tree's idle run time (timers, housekeeping: measured "
            "over 1 s just before, pro rata). The least load-sensitive columns on a shared machine; the "
            "closed-loop one is the cost of a request at full load, the other at a low rate (no batching).",
            "- errors: non-2xx and failed requests, answers whose body bytes were not the expected ones (h2load's "
            "body byte total; agproxy's columns are byte-exact), and spot checks that failed (5 full answers per "
            "cell, parsed; LiteLLM's must be a valid completion carrying the mock's text).",
            "- The llm route's token metrics during the run (`agproxy_gen_ai_client_token_usage` counts): "
            f"{env['token metrics seen']}.", "",
            "## Environment", ""]
    for k in ("date", "cpu", "kernel", "python", "uvloop", "agproxy", "nginx", "h2load", "litellm"):
        out.append(f"- {k}: {env.get(k)}")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
