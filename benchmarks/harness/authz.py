"""A grpcio `envoy.service.auth.v3.Authorization` server for the ext_authz scenarios.

Run as `python -m harness.authz PORT` (from benchmarks/): it answers every Check with
OK and one header for the upstream (`x-user: bench`), which is what a typical policy
server (OPA-Envoy, Authorino) does on an allowed request. It prints `ready` once
serving and runs until it is signalled. The benchmark pins it to the
upstream's core: its CPU is not the gateway's (callgrind counts the gateway alone).
"""

from __future__ import annotations

import sys
from concurrent import futures


def main(port: int) -> None:
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.auth.v3 import external_auth_pb2 as ext
    from envoy.service.auth.v3 import external_auth_pb2_grpc
    from google.rpc import status_pb2

    answer = ext.CheckResponse(status=status_pb2.Status(code=0), ok_response=ext.OkHttpResponse(
        headers=[base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key="x-user", value="bench"))]))

    class Servicer(external_auth_pb2_grpc.AuthorizationServicer):
        def Check(self, request, context):
            return answer

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)])
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(Servicer(), server)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise SystemExit(f"cannot bind 127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main(int(sys.argv[1]))
