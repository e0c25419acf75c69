"""A grpcio Envoy rate-limit service (RLS v3) for the benchmarks: every call is under the limit.

Run as `python -m harness.rls PORT` (from benchmarks/): it answers every
`ShouldRateLimit` with `overall_code = OK` and one OK status per descriptor, with a
limit (1e9 per second) and what remains, as envoyproxy/ratelimit does for a request
under its limit, so what is measured is the call, not a denial. It prints `ready` once
serving and runs until signalled. Like harness/authz.py it runs on the upstream's core.
"""

from __future__ import annotations

import sys
from concurrent import futures


def main(port: int) -> None:
    import grpc
    from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

    Response = rls_pb2.RateLimitResponse
    limit = Response.RateLimit(requests_per_unit=1_000_000_000, unit=Response.RateLimit.SECOND)

    class Servicer(rls_pb2_grpc.RateLimitServiceServicer):
        def ShouldRateLimit(self, request, context):
            out = Response(overall_code=Response.OK)
            for _ in request.descriptors:
                out.statuses.add(code=Response.OK, current_limit=limit, limit_remaining=999_999_999)
            return out

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)])
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(Servicer(), server)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise SystemExit(f"cannot bind 127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main(int(sys.argv[1]))
