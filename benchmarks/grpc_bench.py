"""CPU per unary gRPC call: agproxy's client (pooled HTTP/2) vs grpcio's asyncio API.

The call is what ext_authz makes per request: `envoy.service.auth.v3.Authorization/
Check` with a small CheckRequest (method, path, host, four headers), answered OK by a
grpcio server in another process (its CPU is not counted). The client runs on
uvloop with `--concurrency` calls in flight (1: one at a time; 16: as under load).

Two measures of the client process alone:
- `--callgrind`: the client runs under valgrind's callgrind twice, with N and 2N
  calls; (I(2N) - I(N)) / N is the instructions per call, startup and warm-up
  cancelled out. Deterministic to ~0.1 % whatever the machine's load; counts every
  thread (grpcio's core polls in its own threads).
- default: getrusage (user and system CPU of all threads) over N calls after a
  warm-up, repeated; the best repeat is printed (noisy on a shared machine, but it
  sees the kernel work and thread hand-offs that callgrind does not).

    .venv/bin/python benchmarks/grpc_bench.py --callgrind            # both clients, c=1 and 16
    .venv/bin/python benchmarks/grpc_bench.py --calls 5000 --repeats 5

The grpc.aio client here is the candidate that lost (benchmarks/results/grpc.md);
it lives only in this script.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHECK = "/envoy.service.auth.v3.Authorization/Check"
TIMEOUT = 30.0      # generous: under valgrind everything is ~50x slower


def make_request():
    from envoy.service.auth.v3 import external_auth_pb2
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method = "POST"
    http.path = "/agents/support/invocations?x=1"
    http.host = "gateway.example.com"
    http.scheme = "https"
    http.protocol = "HTTP/1.1"
    for k, v in (("authorization", "Bearer abc.def.ghi"), ("x-tenant", "t1"),
                 ("content-type", "application/json"), ("user-agent", "bench")):
        http.headers[k] = v
    req.attributes.source.address.socket_address.address = "10.0.0.1"
    req.attributes.source.address.socket_address.port_value = 40000
    return req


async def native_client(address: str):
    from envoy.service.auth.v3 import external_auth_pb2
    from agproxy.upstream.grpc import GrpcClient
    method = GrpcClient(address).unary(CHECK, external_auth_pb2.CheckResponse)

    async def call(req):
        return await method(req, timeout=TIMEOUT, metadata=(("x-request-id", "r1"),))
    return call, None


async def remote_client(address: str):
    """The native client as the policies will call it: through RemoteDependency (its
    timer is the one deadline; the method's own is skipped)."""
    from envoy.service.auth.v3 import external_auth_pb2
    from agproxy.upstream.grpc import GrpcClient
    from agproxy.upstream.remote import Failed, RemoteDependency, RemoteSettings
    method = GrpcClient(address).unary(CHECK, external_auth_pb2.CheckResponse)
    dep = RemoteDependency("ext_authz", RemoteSettings(TIMEOUT, "closed"), target=address)
    timeout = dep.timeout

    async def call(req):
        out = await dep.call(method(req, timeout=timeout, metadata=(("x-request-id", "r1"),),
                                    local_deadline=False))
        if type(out) is Failed:
            raise SystemExit(f"call failed: {out}")
        return out
    return call, None


async def aio_client(address: str):
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2
    channel = grpc.aio.insecure_channel(address)
    check = channel.unary_unary(CHECK, request_serializer=external_auth_pb2.CheckRequest.SerializeToString,
                                response_deserializer=external_auth_pb2.CheckResponse.FromString)

    async def call(req):
        return await check(req, timeout=TIMEOUT, metadata=(("x-request-id", "r1"),))
    return call, channel


CLIENTS = {"native": native_client, "aio": aio_client, "remote": remote_client}


async def drive(call, req, n: int, concurrency: int) -> None:
    remaining = n

    async def worker():
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            resp = await call(req)
            if resp.status.code != 0:
                raise SystemExit(f"unexpected answer {resp}")
    await asyncio.gather(*[worker() for _ in range(concurrency)])


def client_main(args) -> None:
    """Runs in the measured process."""
    import uvloop

    async def main():
        call, channel = await CLIENTS[args.client](args.address)
        req = make_request()
        await drive(call, req, args.warm_up, args.concurrency)
        if args.mode == "callgrind":
            await drive(call, req, args.calls, args.concurrency)
        else:
            best = None
            for _ in range(args.repeats):
                r0 = resource.getrusage(resource.RUSAGE_SELF)
                await drive(call, req, args.calls, args.concurrency)
                r1 = resource.getrusage(resource.RUSAGE_SELF)
                user = (r1.ru_utime - r0.ru_utime) / args.calls
                system = (r1.ru_stime - r0.ru_stime) / args.calls
                switches = (r1.ru_nvcsw - r0.ru_nvcsw + r1.ru_nivcsw - r0.ru_nivcsw) / args.calls
                if best is None or user + system < best[0] + best[1]:
                    best = (user, system, switches)
            print(f"RESULT {best[0] * 1e6:.1f} {best[1] * 1e6:.1f} {best[2]:.2f}")
        if channel is not None:
            await channel.close()
    uvloop.run(main())


def start_server() -> tuple[subprocess.Popen, str]:
    from tests.support.ports import free_port
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.grpc_peers", str(port)], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "ready" not in line:
        raise SystemExit(f"gRPC server did not start: {line!r}")
    return proc, f"127.0.0.1:{port}"


def run_client(address: str, client: str, concurrency: int, calls: int, extra: list[str]) -> str:
    argv = [sys.executable, __file__, "--as-client", "--address", address, "--client", client,
            "--concurrency", str(concurrency), "--calls", str(calls), *extra]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"client failed: {out.stderr[-2000:]}")
    return out.stdout


def callgrind_total(address: str, client: str, concurrency: int, calls: int, warm_up: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        outfile = os.path.join(tmp, "cg.out")
        argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={outfile}", "--dump-instr=no",
                sys.executable, __file__, "--as-client", "--mode", "callgrind", "--address", address,
                "--client", client, "--concurrency", str(concurrency), "--calls", str(calls),
                "--warm-up", str(warm_up)]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=3600, cwd=ROOT)
        if out.returncode != 0:
            raise SystemExit(f"client under callgrind failed: {out.stderr[-2000:]}")
        total = 0
        for path in Path(tmp).glob("cg.out*"):          # one file per thread with --separate-threads
            m = re.search(r"^totals:\s+(\d+)", path.read_text(), re.M)
            if m:
                total += int(m.group(1))
        return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--as-client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="time", help=argparse.SUPPRESS)
    p.add_argument("--address", help=argparse.SUPPRESS)
    p.add_argument("--client", choices=list(CLIENTS), action="append")
    p.add_argument("--concurrency", type=int, action="append")
    p.add_argument("--calls", type=int, default=None)
    p.add_argument("--warm-up", type=int, default=300)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--callgrind", action="store_true", help="count instructions (deterministic)")
    args = p.parse_args()
    if args.as_client:
        args.client = args.client[0]
        args.concurrency = args.concurrency[0]
        client_main(args)
        return
    clients = args.client or ["native", "aio"]
    concurrencies = args.concurrency or [1, 16]
    proc, address = start_server()
    try:
        for conc in concurrencies:
            for client in clients:
                if args.callgrind:
                    n = args.calls or 1000
                    i1 = callgrind_total(address, client, conc, n, args.warm_up)
                    i2 = callgrind_total(address, client, conc, 2 * n, args.warm_up)
                    print(f"{client:7s} concurrency {conc:3d}: {(i2 - i1) / n:,.0f} instructions per call",
                          flush=True)
                else:
                    n = args.calls or 3000
                    out = run_client(address, client, conc, n,
                                     ["--warm-up", str(args.warm_up), "--repeats", str(args.repeats)])
                    m = re.search(r"RESULT (\S+) (\S+) (\S+)", out)
                    user, system, switches = float(m.group(1)), float(m.group(2)), float(m.group(3))
                    print(f"{client:7s} concurrency {conc:3d}: {user + system:.1f} µs CPU per call "
                          f"(user {user:.1f} + system {system:.1f}; {switches:.2f} context switches; "
                          f"best of {args.repeats} × {n})", flush=True)
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    main()
