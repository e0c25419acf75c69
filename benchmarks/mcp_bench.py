#!/usr/bin/env python3
"""MCP wall-clock benchmark: `tools/call` through agproxy (and IBM's ContextForge)
against calling the MCP server directly, and `openapi_mcp` against the REST API.

    .venv/bin/python benchmarks/mcp_bench.py            # full: 3 rounds, ~6 min with ContextForge
    .venv/bin/python benchmarks/mcp_bench.py --quick    # 1 short round: checks the harness
    .venv/bin/python benchmarks/mcp_bench.py --no-contextforge
    .venv/bin/python benchmarks/mcp_bench.py --setup-contextforge   # only make its venv

How it works
1. Upstreams on core 1 (with the load generator): an nginx answering every POST to
   /mcp with one fixed JSON-RPC result, and GET /api/pets/1 with a fixed JSON body
   (an upstream that costs nothing: what is left is the gateway's own cost); and
   the official SDK's MCP server (harness/mcp_sdk_server.py: `MCPServer`, stateless,
   JSON answers, uvicorn, one process): what users put behind a gateway.
2. agproxy on core 0, one worker, access log on, routes (agproxy.toml in the work
   dir): `mcp` backends to each server, the same with `mcp_auth` (RS256 JWT) + 3
   `mcp_authorization` rules (tool name, an argument, a claim) + `claims_to_headers`,
   and an `openapi_mcp` backend whose tool `get_pet` is GET /api/pets/{petId} on the
   nginx. ContextForge (when its venv exists, see below) on core 0, in front of the
   SDK server.
3. Every request is the sessionless 2026-07-28 shape: one POST, `Mcp-Method` /
   `Mcp-Name` / `MCP-Protocol-Version` headers, the `_meta` envelope in the body, no
   session, so h2load (stateless) drives it. Before measuring, 20 requests per row
   are read in Python: each must be a 200 with a JSON-RPC result (not an error, not
   `isError`), else the row is FAILED. During load, every answer must be a 2xx
   (`errors`), and the body bytes h2load received must be a whole number of the
   checked answer's size (`bodies`; a JSON-RPC error has another size).
4. Rounds are interleaved (for each round, each row: a closed loop, then a fixed
   rate). Closed loop: h2load --h1, 16 connections, req/s. Fixed rate: h2load --h1
   at RATE req/s (10 connections staggered, as run.py's latency scenario) → p50 /
   p99, and the CPU time (user + system, /proc) of the gateway's processes per
   request: the measure least moved by other load on the machine. A row whose
   closed loop cannot sustain twice the table's rate is measured at half its own
   closed-loop rate (the `rate` column says which).
5. Medians over the rounds; spread = (max − min) / median of req/s; ratios ÷ the
   direct row; +p50/+p99 = the row − direct. Written to
   benchmarks/results/mcp-wallclock.md (--quick: mcp-wallclock-quick.md).

ContextForge (`mcp-contextforge-gateway` on PyPI) runs from its own venv,
benchmarks/.venvs/contextforge, made by `--setup-contextforge` (or by `--contextforge`
when missing); it is used when present unless `--no-contextforge`. Its documented
local run: `mcpgateway` (uvicorn, one process: one worker for one core), secrets from
its `init_secrets`, SQLite in the work dir, no Redis (`CACHE_TYPE=memory`), a JWT made
by its `create_jwt_token` for the platform admin; the SDK server registered as a
gateway (`POST /gateways`), its tool put in a virtual server (`POST /servers`),
called at `/servers/<id>/mcp`. Changed from its defaults: its rate limiter off (100
MCP requests a minute, which would refuse the benchmark), `SSRF_ALLOW_LOCALHOST`
(to register a server on 127.0.0.1), the admin UI off.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import math
import os
import platform
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

from harness import keys, proxies  # noqa: E402
from harness.load import LoadError, LoadGen, Measure  # noqa: E402
from harness.procs import Child, Supervisor, free_ports, raise_on_termination_signals, wait_ready  # noqa: E402
from harness.report import Cell  # noqa: E402

GATEWAY_CORE, LOAD_CORE = 0, 1
CLIENTS = 16
MIN_SAMPLES = 50        # requests of a fixed-rate run, at least
CF_VERSION = "1.1.0"
CF_VENV = HERE / ".venvs" / "contextforge"
CLK_TCK = os.sysconf("SC_CLK_TCK")

VERSION = "2026-07-28"
META = {"io.modelcontextprotocol/protocolVersion": VERSION, "io.modelcontextprotocol/clientCapabilities": {}}
#: what the fixed-answer nginx returns for every POST /mcp (what the SDK server answers, near enough)
FIXED_RESULT = json.dumps({"jsonrpc": "2.0", "id": 1, "result": {
    "content": [{"type": "text", "text": "a" * 99}], "isError": False, "resultType": "complete"}},
    separators=(",", ":"))
PET = '{"id":1,"name":"rex","status":"available"}'


def call_body(tool: str, arguments: dict) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                       "params": {"name": tool, "arguments": arguments, "_meta": META}},
                      separators=(",", ":")).encode()


def mcp_headers(tool: str, token: str | None = None) -> dict[str, str]:
    h = {"content-type": "application/json", "accept": "application/json, text/event-stream",
         "mcp-protocol-version": VERSION, "mcp-method": "tools/call", "mcp-name": tool}
    if token:
        h["authorization"] = f"Bearer {token}"
    return h


@dataclass
class Row:
    label: str
    url: str
    headers: dict[str, str]
    body: bytes | None          # None: a GET
    pids: list[int] = field(default_factory=list)   # whose CPU is counted (empty: none)
    cell: Cell = field(default_factory=Cell)
    rate_runs: list[Measure] = field(default_factory=list)
    rates: list[int] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    body_len: int | None = None
    body_bad: int = 0           # runs whose body bytes were not answers × body_len
    body_file: Path | None = None
    body_seen: str = ""         # the last mismatch
    idle_cpu: float = 0.0       # CPU s/s of `pids` with no load
    seq_s: float = 0.0          # seconds per request, one at a time (the answer check)


@dataclass
class Group:
    key: str
    title: str
    rate: int
    rows: list[Row]


# --- upstreams and gateways ------------------------------------------------------------------

def nginx_fixed(workdir: Path, port: int) -> list[str]:
    http = f"""  access_log off;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location = /mcp {{ default_type application/json; return 200 '{FIXED_RESULT}'; }}
    location /api/pets/ {{ default_type application/json; return 200 '{PET}'; }}
  }}"""
    conf = workdir / "fixed.conf"
    conf.write_text(proxies.nginx_main(workdir, "fixed", http))
    return proxies.nginx_argv(conf, workdir, "fixed")


def openapi_spec() -> str:
    return json.dumps({"openapi": "3.1.0", "info": {"title": "bench", "version": "1"}, "paths": {
        "/pets/{petId}": {"get": {"operationId": "get_pet", "summary": "one pet", "parameters": [
            {"name": "petId", "in": "path", "required": True, "schema": {"type": "integer"}}]}}}})


def agproxy_toml(workdir: Path, port: int, admin: int, fixed: int, sdk: int, jwt_files: keys.JwtFiles) -> str:
    out = f"""# generated by benchmarks/mcp_bench.py
[gateway]
workers = 1
admin = "127.0.0.1:{admin}"
access_log = "{workdir}/agproxy-access.log"
drain_timeout = "1s"

[[listener]]
name = "main"
bind = "127.0.0.1:{port}"

"""
    for name, up in (("fixed", fixed), ("sdk", sdk)):
        out += f"""[[route]]
name = "{name}"
match = {{ path = "/{name}/mcp" }}
backend = "{name}"

""" + proxies.mcp_policy_route(f"{name}-policy", f"/{name}/mcp-policy", name, jwt_files) + f"""[backend.{name}]
type = "mcp"
url = "http://127.0.0.1:{up}/mcp"

"""
    return out + f"""[[route]]
name = "openapi"
match = {{ path = "/openapi/mcp" }}
backend = "openapi"

[backend.openapi]
type = "openapi_mcp"
spec_inline = {json.dumps(openapi_spec())}
base_url = "http://127.0.0.1:{fixed}/api"
"""


def process_tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{tid}/children").read_text().split()]
        except OSError:
            pass
    return out


def cpu_seconds(pids: list[int]) -> float:
    """user + system CPU of these processes and all their descendants, now."""
    total = 0
    for root in pids:
        for p in process_tree(root):
            try:
                fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])     # utime, stime (fields 14, 15)
    return total / CLK_TCK


# --- ContextForge ------------------------------------------------------------------------------

def cf_python() -> str:
    """A Python ContextForge supports (>= 3.12, < 3.14): on PATH, or a pyenv install whose
    shim is not active in this directory."""
    candidates = [shutil.which(n) for n in ("python3.12", "python3.13")]
    candidates += sorted(str(p) for p in Path.home().glob(".pyenv/versions/3.1[23]*/bin/python3"))
    for found in candidates:
        if found and subprocess.run([found, "-c", "import sys; assert (3, 12) <= sys.version_info < (3, 14)"],
                                    capture_output=True).returncode == 0:
            return found
    return sys._base_executable  # type: ignore[attr-defined]


def setup_contextforge() -> str | None:
    """Make benchmarks/.venvs/contextforge; None when done, else why not."""
    if (CF_VENV / "bin" / "mcpgateway").exists():
        return None
    print(f"making {CF_VENV} (mcp-contextforge-gateway=={CF_VERSION}) ...", flush=True)
    CF_VENV.parent.mkdir(parents=True, exist_ok=True)
    for argv in ([cf_python(), "-m", "venv", str(CF_VENV)],
                 [str(CF_VENV / "bin" / "pip"), "install", "-q", f"mcp-contextforge-gateway=={CF_VERSION}"]):
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            return f"{' '.join(argv[:3])} failed: {(proc.stdout + proc.stderr)[-800:]}"
    return None


def _json_call(method: str, port: int, path: str, token: str, body: dict | None = None,
               timeout: float = 60) -> object:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"authorization": f"Bearer {token}",
                                                       "content-type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        if resp.status >= 300:
            raise RuntimeError(f"ContextForge {method} {path}: HTTP {resp.status}: {raw[:300]!r}")
        return json.loads(raw)
    finally:
        conn.close()


def start_contextforge(sup: Supervisor, workdir: Path, port: int, sdk_port: int) -> tuple[Child, str, str, str]:
    """Start it, register the SDK server; (child, MCP URL path, tool name, token)."""
    cfdir = workdir / "contextforge"
    cfdir.mkdir()
    py = str(CF_VENV / "bin" / "python")
    proc = subprocess.run([py, "-m", "mcpgateway.scripts.init_secrets"], cwd=cfdir, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError("init_secrets failed: " + proc.stderr[-500:])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    for line in (cfdir / ".env.secrets").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, _, v = line.partition("=")
            env[k.strip()] = v.strip()
    env.update({
        "DATABASE_URL": f"sqlite:///{cfdir}/mcp.db", "CACHE_TYPE": "memory",
        "PLATFORM_ADMIN_EMAIL": "admin@example.com", "MCPGATEWAY_UI_ENABLED": "false",
        "RATE_LIMITING_ENABLED": "false", "SSRF_ALLOW_LOCALHOST": "true", "LOG_LEVEL": "ERROR",
        "HOST": "127.0.0.1", "PORT": str(port),
    })
    child = sup.start("contextforge", [str(CF_VENV / "bin" / "mcpgateway"), "--host", "127.0.0.1",
                                       "--port", str(port), "--workers", "1"], GATEWAY_CORE, env=env)
    why = wait_ready(child, f"http://127.0.0.1:{port}/health", timeout=120)
    if why:
        raise RuntimeError(f"ContextForge did not start: {why}\n{child.log_tail()}")
    proc = subprocess.run([py, "-m", "mcpgateway.utils.create_jwt_token", "--username", "admin@example.com",
                           "--exp", "600", "--secret=" + env["JWT_SECRET_KEY"]],   # it may start with "-"
                          cwd=cfdir, capture_output=True, text=True, env=env)
    token = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() else ""
    if not token:
        raise RuntimeError("create_jwt_token failed: " + proc.stderr[-500:])
    _json_call("POST", port, "/gateways", token, {"name": "bench", "url": f"http://127.0.0.1:{sdk_port}/mcp",
                                                  "transport": "STREAMABLEHTTP"})
    tools = _json_call("GET", port, "/tools", token)
    tool = next(t for t in tools if t.get("originalName") == "get_root")
    server = _json_call("POST", port, "/servers", token, {"server": {
        "name": "bench", "description": "bench", "associated_tools": [tool["id"]]}})
    return child, f"/servers/{server['id']}/mcp", tool["name"], token


# --- checking and measuring ----------------------------------------------------------------

def check_answers(row: Row, n: int = 20) -> str | None:
    """n requests; None when every one is a 200 with a JSON-RPC result (and keeps the body size)."""
    host_port = row.url.split("://", 1)[1].split("/", 1)[0]
    path = "/" + row.url.split("://", 1)[1].split("/", 1)[1]
    host, _, port = host_port.partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    sizes = set()
    t0 = time.monotonic()
    try:
        for _ in range(n):
            conn.request("POST" if row.body is not None else "GET", path, body=row.body, headers=row.headers)
            resp = conn.getresponse()
            raw = resp.read()
            if resp.status != 200:
                return f"HTTP {resp.status}: {raw[:300]!r}"
            if row.body is not None:
                if resp.getheader("content-type", "").startswith("text/event-stream"):
                    raw = b"".join(l[5:] for l in raw.splitlines() if l.startswith(b"data:"))
                doc = json.loads(raw)
                result = doc.get("result") if isinstance(doc, dict) else None
                if not isinstance(result, dict) or result.get("isError"):
                    return f"not a JSON-RPC result: {raw[:300]!r}"
            sizes.add(len(raw) if not resp.getheader("content-type", "").startswith("text/event-stream")
                      else None)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    row.body_len = sizes.pop() if len(sizes) == 1 else None
    row.seq_s = (time.monotonic() - t0) / n
    return None


def _extra(row: Row) -> tuple[str, ...]:
    return ("-d", str(row.body_file)) if row.body_file else ()


#: fixed rates whose period (1000 / rate ms) and per-connection rate h2load takes as integers
RATES = (1000, 500, 200, 100, 50, 20, 10, 5, 2, 1)


def check_bodies(row: Row, m: Measure) -> None:
    """Every answer had the checked answer's size. h2load counts the bytes of the
    warm-up's answers too (not their number): so the bytes must be a whole number of
    answers, at least as many as it counted."""
    if row.body_len and (m.data_bytes % row.body_len or m.data_bytes // row.body_len < m.done):
        row.body_bad += 1
        row.body_seen = f"{m.done} answers, {m.data_bytes} bytes = {m.data_bytes / row.body_len:.1f} × {row.body_len}"


def measure(row: Row, load: LoadGen, rate: int) -> None:
    # A slow row (ContextForge) answers each of the 16 connections in 16 × its time per
    # request: run long enough (and warm up long enough) to count whole cycles.
    cycle = CLIENTS * row.seq_s
    closed = load if 4 * cycle <= load.duration else LoadGen(
        load.sup, load.workdir, load.core, float(math.ceil(min(4 * cycle, 20.0))),
        max(load.warm_up, min(cycle, 5.0)))    # h2load -D takes whole seconds
    m = closed.h1_closed(row.url, row.headers, CLIENTS, _extra(row))
    row.cell.runs.append(m)
    check_bodies(row, m)
    if m.rps < 2 * rate:
        rate = next((r for r in RATES if r <= m.rps / 2), 1)
    if rate * load.duration < MIN_SAMPLES:     # a slow row: enough requests for a p99
        load = LoadGen(load.sup, load.workdir, load.core, min(MIN_SAMPLES / rate, 10.0), load.warm_up)
    before, t0 = (cpu_seconds(row.pids) if row.pids else 0.0), time.monotonic()
    f = load.fixed_rate(row.url, row.headers, rate, _extra(row))
    after, t1 = (cpu_seconds(row.pids) if row.pids else 0.0), time.monotonic()
    check_bodies(row, f)
    row.rate_runs.append(f)
    row.rates.append(rate)
    if row.pids and f.done:
        # The warm-up run is outside [before, after]: only the measured requests count;
        # what the gateway burns when idle (timers, health checks) is taken off.
        row.cpu_us.append(max(0.0, after - before - row.idle_cpu * (t1 - t0)) * 1e6 / f.done)


def idle_cpu(pids: list[int], seconds: float = 3.0) -> float:
    """CPU seconds per second these processes use with no request (measured over `seconds`)."""
    before, t0 = cpu_seconds(pids), time.monotonic()
    time.sleep(seconds)      # a measuring interval, not a wait for something
    return (cpu_seconds(pids) - before) / (time.monotonic() - t0)


# --- the report -----------------------------------------------------------------------------

def _f(v: float | None, spec: str, signed: bool = False) -> str:
    return "–" if v is None else format(v, ("+" if signed else "") + spec)


def _med(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def group_table(g: Group) -> str:
    base = g.rows[0]
    base_rps = base.cell.median("rps")
    base50 = _med([m.p50_ms for m in base.rate_runs])
    base99 = _med([m.p99_ms for m in base.rate_runs])
    head = ["", "req/s", f"÷ {base.label}", "spread %", "rate req/s", "p50 ms", "p99 ms", "+p50 ms",
            "+p99 ms", "CPU µs/req", "errors", "bodies"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    notes = []
    for r in g.rows:
        if r.cell.error and not r.cell.runs:
            lines.append(f"| {r.label} | FAILED |" + " – |" * (len(head) - 2))
            notes.append(f"- {r.label}: {r.cell.error.strip()[:1500]}")
            continue
        rps = r.cell.median("rps")
        p50 = _med([m.p50_ms for m in r.rate_runs])
        p99 = _med([m.p99_ms for m in r.rate_runs])
        own = r is base
        star = " *" if _med(r.rates) != _med(base.rates) else ""   # latency at another rate than the base
        errors = r.cell.errors() + sum(m.errors for m in r.rate_runs)
        lines.append("| " + " | ".join([
            r.label, _f(rps, ",.0f"), _f(rps / base_rps if rps and base_rps else None, ".3f"),
            _f(r.cell.spread(), ".1f"), _f(_med(r.rates), ".0f"), _f(p50, ".3f"), _f(p99, ".3f"),
            "" if own else _f(p50 - base50 if p50 is not None and base50 is not None else None, ".3f", True) + star,
            "" if own else _f(p99 - base99 if p99 is not None and base99 is not None else None, ".3f", True) + star,
            _f(_med(r.cpu_us), ",.0f"), str(errors),
            "–" if not r.body_len else ("ok" if not r.body_bad else f"{r.body_bad} runs differ"),
        ]) + " |")
        if r.cell.error:
            notes.append(f"- {r.label}: {r.cell.error.strip()[:500]}")
        if r.body_bad:
            notes.append(f"- {r.label}: body bytes not answers × the checked size: {r.body_seen}")
    return "\n".join(lines + ([""] + notes if notes else []))


def write_report(path: Path, groups: list[Group], args: argparse.Namespace, notes: list[str], load1: float,
                 sdk_note: str) -> None:
    env = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "kernel": platform.release(), "python": sys.version.split()[0],
        "agproxy": subprocess.run([proxies.agproxy_binary(), "version"], capture_output=True,
                                  text=True).stdout.strip() or "?",
        "h2load": subprocess.run(["h2load", "--version"], capture_output=True, text=True).stdout.strip(),
        "load average at start": f"{load1:.2f}",
    }
    cmd = "python benchmarks/mcp_bench.py" + (" --quick" if args.quick else "")
    out = [f"## MCP wall-clock: `tools/call` through agproxy{' and ContextForge' if args.cf_used else ''}",
           "", f"`{cmd}` ({args.rounds} round(s) × {args.duration:g} s closed loop + {args.duration:g} s at a "
           f"fixed rate per row, {args.warm_up:g} s warm-up each, interleaved).", "",
           "Environment: " + "; ".join(f"{k} {v}" for k, v in env.items()) + ".", ""]
    if args.quick:
        out += ["**--quick: one short round on a shared machine: these numbers check the harness, "
                "they are not results.**", ""]
    for g in groups:
        out += [f"### {g.title}", "", group_table(g), ""]
    out += ["Columns: req/s, closed loop (h2load --h1, 16 connections), median of the rounds, and its "
            "ratio to the first row; spread = (max − min) / median of req/s; latency at the fixed `rate` "
            "(10 connections staggered; a row that cannot sustain twice the table's rate runs at half its "
            "own), +p50/+p99 against the first row (*: at another rate than the first row's); CPU µs/req = user + system time of the gateway's "
            "processes (all of them, /proc) during the fixed-rate run ÷ its requests; errors = non-2xx "
            "and failed requests; bodies = whether every answer had the size of the checked JSON-RPC "
            "result.", "", sdk_note, ""]
    out += notes
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out).rstrip() + "\n")


# --- main ------------------------------------------------------------------------------------

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 round of 2 s: checks the harness")
    p.add_argument("--rounds", type=int)
    p.add_argument("--duration", type=float)
    p.add_argument("--warm-up", type=float)
    cf = p.add_mutually_exclusive_group()
    cf.add_argument("--contextforge", action="store_true", help="require ContextForge (set its venv up if missing)")
    cf.add_argument("--no-contextforge", action="store_true")
    p.add_argument("--setup-contextforge", action="store_true", help="make its venv, then exit")
    p.add_argument("--output", type=Path)
    p.add_argument("--keep-workdir", action="store_true")
    args = p.parse_args()
    if args.setup_contextforge:
        why = setup_contextforge()
        print(why or f"ready: {CF_VENV}")
        return 1 if why else 0
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.duration = args.duration or (2.0 if args.quick else 3.0)
    args.warm_up = args.warm_up if args.warm_up is not None else (0.5 if args.quick else 1.0)
    output = args.output or HERE / "results" / ("mcp-wallclock-quick.md" if args.quick else "mcp-wallclock.md")
    for tool in ("nginx", "h2load", "taskset"):
        if not shutil.which(tool) and not Path("/usr/sbin/" + tool).exists():
            print(f"{tool} is missing: run benchmarks/setup.sh", file=sys.stderr)
            return 2
    notes: list[str] = []
    use_cf = not args.no_contextforge and (args.contextforge or (CF_VENV / "bin" / "mcpgateway").exists())
    if args.contextforge:
        why = setup_contextforge()
        if why:
            notes.append(f"- ContextForge: its venv could not be made: {why}")
            use_cf = False
    args.cf_used = False
    load1 = os.getloadavg()[0]
    if load1 > 0.5:
        print(f"warning: load average {load1:.2f}: wall-clock numbers will be noise", file=sys.stderr)

    raise_on_termination_signals()
    workdir = Path(tempfile.mkdtemp(prefix="agproxy-mcpbench-"))
    sup = Supervisor(workdir)
    try:
        fixed, sdk, gw, admin, cfp = free_ports(5)
        jwt_files = keys.make_jwt(workdir)
        up = sup.start("fixed", nginx_fixed(workdir, fixed), LOAD_CORE)
        srv = sup.start("sdk", [sys.executable, str(HERE / "harness" / "mcp_sdk_server.py"), "--port", str(sdk)],
                        LOAD_CORE)
        conf = workdir / "agproxy.toml"
        conf.write_text(agproxy_toml(workdir, gw, admin, fixed, sdk, jwt_files))
        agp = sup.start("agproxy", [proxies.agproxy_binary(), "run", "--config", str(conf)], GATEWAY_CORE)
        for child, url in ((up, f"http://127.0.0.1:{fixed}/api/pets/1"), (agp, f"http://127.0.0.1:{admin}/readyz")):
            why = wait_ready(child, url, 30)
            if why:
                raise SystemExit(f"{child.name} did not start: {why}\n{child.log_tail()}")
        # the SDK server answers 405/406 to a GET: wait for its port with a real call
        deadline = time.monotonic() + 30
        probe = Row("probe", f"http://127.0.0.1:{sdk}/mcp", mcp_headers("get_root"),
                    call_body("get_root", {"database": "reporting"}))
        while check_answers(probe, 1) is not None:
            if time.monotonic() > deadline or not srv.alive():
                raise SystemExit(f"the SDK MCP server did not start\n{srv.log_tail()}")
            time.sleep(0.2)

        token = jwt_files.token
        call = call_body("get_root", {"database": "reporting"})
        g = f"http://127.0.0.1:{gw}"
        agp_pids = [agp.popen.pid]
        groups = [
            Group("fixed", "Against a fixed-answer MCP server (nginx): the gateway's own cost", 1000, [
                Row("direct", f"http://127.0.0.1:{fixed}/mcp", mcp_headers("get_root"), call),
                Row("agproxy mcp", f"{g}/fixed/mcp", mcp_headers("get_root"), call, agp_pids),
                Row("agproxy mcp + auth + rules", f"{g}/fixed/mcp-policy", mcp_headers("get_root", token),
                    call, agp_pids),
            ]),
            Group("sdk", "Against the SDK's MCP server (Python, one process): what users see", 200, [
                Row("direct", f"http://127.0.0.1:{sdk}/mcp", mcp_headers("get_root"), call),
                Row("agproxy mcp", f"{g}/sdk/mcp", mcp_headers("get_root"), call, agp_pids),
                Row("agproxy mcp + auth + rules", f"{g}/sdk/mcp-policy", mcp_headers("get_root", token),
                    call, agp_pids),
            ]),
            Group("openapi", "`openapi_mcp` against calling the REST API (nginx) directly", 1000, [
                Row("REST GET direct", f"http://127.0.0.1:{fixed}/api/pets/1", {}, None),
                Row("agproxy openapi_mcp", f"{g}/openapi/mcp", mcp_headers("get_pet"),
                    call_body("get_pet", {"petId": 1}), agp_pids),
            ]),
        ]
        if use_cf:
            try:
                cfc, cf_path, cf_tool, cf_token = start_contextforge(sup, workdir, cfp, sdk)
                groups[1].rows.append(Row("ContextForge", f"http://127.0.0.1:{cfp}{cf_path}",
                                          mcp_headers(cf_tool, cf_token),
                                          call_body(cf_tool, {"database": "reporting"}), [cfc.popen.pid]))
                args.cf_used = True
            except (RuntimeError, StopIteration, OSError, KeyError) as exc:
                notes.append(f"- ContextForge: not measured: {exc}")
        elif not args.no_contextforge:
            notes.append("- ContextForge: not measured (no venv: `python benchmarks/mcp_bench.py "
                         "--setup-contextforge` makes it)")
        for grp in groups:
            for i, row in enumerate(grp.rows):
                if row.body is not None:
                    row.body_file = workdir / f"body-{grp.key}-{i}.json"
                    row.body_file.write_bytes(row.body)
                why = check_answers(row)
                if why:
                    row.cell.error = "answer check: " + why

        idle: dict[tuple, float] = {}
        for grp in groups:
            for row in grp.rows:
                if row.pids and not row.cell.error:
                    key = tuple(row.pids)
                    if key not in idle:
                        idle[key] = idle_cpu(row.pids)
                        notes.append(f"- idle CPU of {row.label.split()[0]}'s processes: "
                                     f"{idle[key] * 1e3:.1f} ms per second, taken off its CPU µs/req")
                    row.idle_cpu = idle[key]
        load = LoadGen(sup, workdir, LOAD_CORE, args.duration, args.warm_up)
        for rnd in range(args.rounds):
            for grp in groups:
                for row in grp.rows:
                    if row.cell.error and not row.cell.runs:
                        continue
                    try:
                        measure(row, load, grp.rate)
                    except LoadError as exc:
                        row.cell.error = str(exc)
                    m = row.cell.runs[-1] if row.cell.runs else None
                    print(f"round {rnd + 1}/{args.rounds} {grp.key:8} {row.label:28} "
                          f"{m.rps if m else 0:10,.0f} req/s"
                          + (f"  p50 {row.rate_runs[-1].p50_ms} ms @ {row.rates[-1]}/s" if row.rate_runs else "")
                          + (f"  cpu {row.cpu_us[-1]:,.0f} µs/req" if row.cpu_us else ""),
                          flush=True)
        sdk_note = ("The SDK server: `mcp` " + _pkg_version("mcp") + " `MCPServer.streamable_http_app"
                    "(json_response=True, stateless_http=True)` under uvicorn " + _pkg_version("uvicorn")
                    + ", one process on the load generator's core; its direct req/s above is its own ceiling.")
        if args.cf_used:
            sdk_note += (f" ContextForge: mcp-contextforge-gateway {CF_VERSION}, `mcpgateway --workers 1` "
                         "(uvicorn, one process, on the gateway's core), SQLite, CACHE_TYPE=memory, no Redis, "
                         "its rate limiter off, JWT auth (a token from its create_jwt_token), the SDK server "
                         "registered as a gateway and called through a virtual server. Its Rust MCP "
                         "runtime sidecar (`x-contextforge-mcp-runtime: rust`) is not in the PyPI package: "
                         "the Python runtime answers.")
        write_report(output, groups, args, notes, load1, sdk_note)
        print(f"\nwritten: {output}")
        print(output.read_text())
        return 0
    finally:
        sup.stop_all()
        if args.keep_workdir:
            print(f"work dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _pkg_version(name: str) -> str:
    import importlib.metadata
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
