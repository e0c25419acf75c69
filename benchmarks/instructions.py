"""CPU instructions per request through agproxy, counted by callgrind.

Why: on a shared 2-vCPU VM, req/s and even CPU-seconds per request move by
±20% between identical runs, which hides the 2-10% effects of most hot-path
changes. Valgrind's callgrind counts the instructions the gateway process
executes in user space; the count for the same workload repeats to within
0.1%. It does not see the kernel (syscalls, ~20-25% of the real cost of a
relayed request) and it inflates code that uses CPU extensions valgrind hides
(SHA, AES), so it ranks Python-level changes; the wall-clock suite
(`run.py`) remains the verdict.

How: the upstream nginx and a one-worker agproxy (the same configs `run.py`
generates, plain route and JWT + 3 rules + claims_to_headers policy route) are
started, agproxy under `valgrind --tool=callgrind --instr-atstart=no`. For each
scenario, h2load sends a warm-up batch, instrumentation is switched on for
exactly `--requests` requests, and the dumped total divided by that number is
printed. Under valgrind the gateway is ~50x slower: 1500 requests take ~15 s.

    .venv/bin/python benchmarks/instructions.py                 # h1 + h2, plain + policy
    .venv/bin/python benchmarks/instructions.py --scenarios h1-plain --requests 3000
    .venv/bin/python benchmarks/instructions.py --tracing 1.0   # [telemetry].tracing on, sampling 1.0,
                                                                # exporting to a local OTLP sink

Scenarios: h1/h2 = the client side (h2load --h1 / h2load over h2c), plain /
policy = the route, and h1-h2up / h2-h2up = a plain route whose upstream is the
same nginx over HTTP/2 (h2c, `http2 = true`): the upstream HTTP/2 client. The MCP
scenarios POST one `tools/call` (harness/proxies.py MCP_CALL): h1-post to the plain
route (the baseline: a relayed POST of the same bytes), h1-mcp through an `mcp`
backend to the nginx (body parsed and checked, forwarded as it came), h1-mcp-policy the
same with mcp_auth + 3 mcp_authorization rules + claims_to_headers, h1-openapi-mcp
to an `openapi_mcp` backend whose tool is a GET of the nginx (the gateway is the MCP
server: validation, the REST call, the tool result).
h1-llm / h1-llm-stream = the fixed 1 KB chat completion (harness/proxies.py
`llm_request`) through an `llm_group` route with one `openai` provider, the mock
provider in the same nginx (a fixed JSON answer, or a fixed SSE stream with a usage
chunk); h1-llm-relay / h1-llm-relay-stream = the same POST relayed by the plain route
(the baseline). The two llm routes are set up only when one of these scenarios runs.
h1-limit / h2-limit = a route with one local rate limit keyed on a header (their
request carries that header: h1-plain-hdr / h2-plain-hdr send it to the plain route, the
baseline that differs only by the limit), and
h1-redis = the same limit kept in Redis (a redis-server is started for it).
h1-extauthz / h2-extauthz = a plain route behind gRPC `[route.ext_authz]`, one
Check call per request to a grpcio server (benchmarks/harness/authz.py, on the
upstream's core, allowing with one header); h1-authzcached = the same with the
decision cache on the request path (every request after the first is a hit).
Those two routes (and the authorization server) are set up only when one of their
scenarios runs: each route ahead of the catch-all `/` costs the plain route ~2.3k
instructions of matching.

With `--tracing`, the export thread's work during the measured window is counted too
(valgrind counts every thread of the process), so the figure is the whole cost of tracing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import keys, proxies  # noqa: E402
from harness.procs import Supervisor, free_ports, wait_ready  # noqa: E402

MCP_HEADERS = {"content-type": "application/json", "accept": "application/json, text/event-stream"}

SCENARIOS = {
    # name: (h2load flags, path, needs the token); an MCP scenario POSTs proxies.MCP_CALL
    "h1-plain": (["--h1", "-c", "16", "-m", "1"], "/", False),
    "h1-policy": (["--h1", "-c", "16", "-m", "1"], proxies.POLICY_PREFIX, True),
    "h2-plain": (["-c", "16", "-m", "10"], "/", False),
    "h2-policy": (["-c", "16", "-m", "10"], proxies.POLICY_PREFIX, True),
    # the same nginx as the upstream, but over HTTP/2 (h2c): the upstream HTTP/2 client
    "h1-h2up": (["--h1", "-c", "16", "-m", "1"], proxies.H2_UPSTREAM_PREFIX + "/", False),
    "h2-h2up": (["-c", "16", "-m", "10"], proxies.H2_UPSTREAM_PREFIX + "/", False),
    "h1-post": (["--h1", "-c", "16", "-m", "1"], "/", False),     # the same POST to the plain route
    "h1-mcp": (["--h1", "-c", "16", "-m", "1"], proxies.MCP_PREFIX, False),
    "h1-mcp-policy": (["--h1", "-c", "16", "-m", "1"], proxies.MCP_POLICY_PREFIX, True),
    "h1-openapi-mcp": (["--h1", "-c", "16", "-m", "1"], proxies.OPENAPI_MCP_PREFIX, False),
    # a local rate limit keyed on a header (one bucket per x-user), and the same limit in Redis
    # the plain route with the limit scenarios' request (one more header): their baseline
    "h1-plain-hdr": (["--h1", "-c", "16", "-m", "1"], "/", "limit"),
    "h2-plain-hdr": (["-c", "16", "-m", "10"], "/", "limit"),
    "h1-limit": (["--h1", "-c", "16", "-m", "1"], proxies.LIMIT_PREFIX + "/", "limit"),
    "h2-limit": (["-c", "16", "-m", "10"], proxies.LIMIT_PREFIX + "/", "limit"),
    "h1-redis": (["--h1", "-c", "16", "-m", "1"], proxies.REDIS_PREFIX + "/", "limit"),
    # one gRPC Check per request (the authorization server runs on the upstream's core)
    "h1-extauthz": (["--h1", "-c", "16", "-m", "1"], proxies.EXT_AUTHZ_PREFIX + "/", False),
    "h2-extauthz": (["-c", "16", "-m", "10"], proxies.EXT_AUTHZ_PREFIX + "/", False),
    "h1-authzcached": (["--h1", "-c", "16", "-m", "1"], proxies.EXT_AUTHZ_CACHED_PREFIX + "/", False),
    # the fixed 1 KB chat completion (proxies.llm_request) to the mock provider in the nginx:
    # relayed by the plain route (the baseline), and through an llm_group route (one openai provider)
    "h1-llm-relay": (["--h1", "-c", "16", "-m", "1"], proxies.LLM_MOCK_JSON + proxies.LLM_PATH, False),
    "h1-llm": (["--h1", "-c", "16", "-m", "1"], proxies.LLM_PREFIX_JSON + proxies.LLM_PATH, False),
    "h1-llm-relay-stream": (["--h1", "-c", "16", "-m", "1"], proxies.LLM_MOCK_SSE + proxies.LLM_PATH, False),
    "h1-llm-stream": (["--h1", "-c", "16", "-m", "1"], proxies.LLM_PREFIX_SSE + proxies.LLM_PATH, False),
}
MCP_SCENARIOS = {"h1-post", "h1-mcp", "h1-mcp-policy", "h1-openapi-mcp"}
LLM_SCENARIOS = {"h1-llm-relay": False, "h1-llm": False, "h1-llm-relay-stream": True, "h1-llm-stream": True}


def wait_redis(port: int, timeout: float = 10.0) -> None:
    import socket
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("redis-server did not start")
        time.sleep(0.05)


def callgrind_control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def h2load(flags: list[str], url: str, headers: dict, n: int) -> None:
    argv = ["h2load", "-n", str(n), *flags, url]
    for k, v in headers.items():
        argv += ["-H", f"{k}: {v}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600).stdout
    if f"{n} succeeded" not in out:
        raise SystemExit(f"h2load did not succeed: {out[-400:]}")


def measure(pid: int, workdir: Path, flags, url, headers, n: int, warm_up: int, keep_as: str = "") -> float:
    h2load(flags, url, headers, warm_up)
    callgrind_control("--zero", str(pid))
    callgrind_control("--instr=on", str(pid))
    h2load(flags, url, headers, n)
    callgrind_control("--instr=off", str(pid))
    before = set(workdir.glob(f"callgrind.out.{pid}.*"))
    callgrind_control("--dump", str(pid))
    deadline = time.monotonic() + 30
    while True:
        new = set(workdir.glob(f"callgrind.out.{pid}.*")) - before
        if new:
            dump = new.pop()
            text = dump.read_text()
            if "\ntotals:" in text:
                break
        if time.monotonic() > deadline:
            raise SystemExit("callgrind did not write a dump")
        time.sleep(0.2)
    total = next(int(line.split()[1]) for line in text.splitlines() if line.startswith("totals:"))
    if keep_as:
        dump.rename(workdir / f"callgrind.{keep_as}")
    else:
        dump.unlink()
    return total / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--warm-up", type=int, default=300)
    ap.add_argument("--tracing", type=float, default=None, metavar="RATIO",
                    help="turn tracing on with this sampling ratio, exporting to a local OTLP sink")
    ap.add_argument("--keep", action="store_true",
                    help="keep the work folder (its callgrind.out.* dumps, for callgrind_annotate)")
    args = ap.parse_args()
    for tool in ("valgrind", "callgrind_control", "h2load", "nginx"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (benchmarks/setup.sh installs h2load and nginx; "
                             f"valgrind is the Debian package 'valgrind')")

    workdir = Path(tempfile.mkdtemp(prefix="agproxy-ir-"))
    sup = Supervisor(workdir)
    try:
        tls = keys.make_tls(workdir)
        jwt_files = keys.make_jwt(workdir)
        free = iter(free_ports(11))
        ports, _ = proxies.start_upstream(sup, workdir, tls, free, 1)
        redis_port = None
        if any(n.endswith("-redis") for n in args.scenarios):
            redis_port = next(free)
            sup.start("redis", ["redis-server", "--port", str(redis_port), "--save", "",
                                "--appendonly", "no"], core=1)
            wait_redis(redis_port)
        authz_address = None
        if any("authz" in n for n in args.scenarios):
            authz_port = next(free)
            authz = sup.start("authz", [sys.executable, "-m", "harness.authz", str(authz_port)], core=1,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent)})
            deadline = time.monotonic() + 30
            while "ready" not in authz.log_path.read_text(errors="replace"):
                if not authz.alive() or time.monotonic() > deadline:
                    raise SystemExit(f"authorization server did not start:\n{authz.log_tail()}")
                time.sleep(0.1)
            authz_address = f"127.0.0.1:{authz_port}"
        llm = any(n in LLM_SCENARIOS for n in args.scenarios)
        spec = proxies.agproxy_spec(workdir, ports, tls, jwt_files, h2_upstream=True, mcp=True,
                                    rate_limits=True, redis_port=redis_port, ext_authz=authz_address, llm=llm)
        os.environ.update(proxies.LLM_ENV)      # the llm provider's key variable (the mock ignores it)
        call = workdir / "mcp-call.json"
        call.write_bytes(proxies.MCP_CALL)
        llm_bodies = {}
        for stream in (False, True):
            llm_bodies[stream] = workdir / f"llm-request-{int(stream)}.json"
            llm_bodies[stream].write_bytes(proxies.llm_request(stream))
        if args.tracing is not None:
            sink_port = next(free)
            sink = sup.start("otlp-sink", [sys.executable, str(Path(__file__).parent / "harness" / "otlp_sink.py"),
                                           str(sink_port)], core=1)
            if (error := wait_ready(sink, f"http://127.0.0.1:{sink_port}/", 30)):
                raise SystemExit(f"otlp sink: {error}")
            conf = Path(spec.argv[spec.argv.index("--config") + 1])
            conf.write_text(conf.read_text() + f'\n[telemetry]\ntracing = {{ otlp_endpoint = '
                            f'"http://127.0.0.1:{sink_port}", sampling = {args.tracing} }}\n')
        python = Path(proxies.agproxy_binary()).parent / "python"
        argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                f"--callgrind-out-file={workdir}/callgrind.out.%p",
                str(python), "-m", "agproxy.cli", *spec.argv[1:]]
        # Under valgrind the gateway runs ~50x slower, so the exporter's timed flush
        # (every OTEL_BSP_SCHEDULE_DELAY, 5 s) would fall on 50x fewer requests than in
        # production and its fixed cost (one POST) would weigh 50x more per request; the
        # delay is scaled by the same factor. Batches sent because they are full (512
        # spans) are counted as they come.
        env = {**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "250000"} if args.tracing is not None else None
        gw = sup.start("agproxy", argv, core=0, env=env)
        if (error := wait_ready(gw, spec.urls["h1"] + "/", 120)):
            raise SystemExit(f"agproxy under valgrind: {error}\n{gw.log_tail()}")
        token = {"authorization": f"Bearer {jwt_files.token}", "x-tenant": keys.JWT_TENANT}
        results = {}
        for name in args.scenarios:
            flags, path, needs = SCENARIOS[name]
            headers = (dict(token) if needs is True else dict(proxies.LIMIT_HEADERS) if needs == "limit"
                       else {})
            if name in MCP_SCENARIOS:
                flags = [*flags, "-d", str(call)]
                headers.update(MCP_HEADERS)
            if name in LLM_SCENARIOS:
                flags = [*flags, "-d", str(llm_bodies[LLM_SCENARIOS[name]])]
                headers["content-type"] = "application/json"
            results[name] = measure(gw.popen.pid, workdir, flags, spec.urls["h1"] + path,
                                    headers, args.requests, args.warm_up, name if args.keep else "")
            print(f"{name:10s} {results[name]:10,.0f} instructions/request", flush=True)
        post = results.get("h1-post")
        for name in sorted((MCP_SCENARIOS - {"h1-post"}) & results.keys()):
            if post:
                print(f"{name} ÷ h1-post (instructions; the req/s ratio if CPU were all): "
                      f"{post / results[name]:.3f}")
        for mode in ("", "-stream"):
            relay, llm_cost = results.get(f"h1-llm-relay{mode}"), results.get(f"h1-llm{mode}")
            if relay and llm_cost:
                print(f"h1-llm{mode} ÷ h1-llm-relay{mode} (the req/s ratio if CPU were all): {relay / llm_cost:.3f}")
        for proto in ("h1", "h2"):
            plain, policy = results.get(f"{proto}-plain"), results.get(f"{proto}-policy")
            if plain and policy:
                print(f"{proto} plain ÷ policy (the req/s ratio if CPU were all): {plain / policy:.3f}")
            for other in ("limit", "redis", "extauthz", "authzcached"):
                cost = results.get(f"{proto}-{other}")
                if plain and cost:
                    print(f"{proto}-{other} ÷ {proto}-plain: {cost / plain:.3f} ({cost - plain:+,.0f})")
            same = results.get(f"{proto}-plain-hdr")
            for other in ("limit", "redis"):
                cost = results.get(f"{proto}-{other}")
                if same and cost:
                    print(f"{proto}-{other} ÷ {proto}-plain-hdr (the same request): {cost / same:.3f} "
                          f"({cost - same:+,.0f})")
    finally:
        sup.stop_all()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
