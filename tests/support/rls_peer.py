"""A real Envoy rate-limit service (RLS v3) for tests: a grpcio servicer on Envoy's protos.

`RateLimitPeer(limits)` counts hits per (domain, descriptor) in fixed windows the
way envoyproxy/ratelimit does: `limits` maps a descriptor's entries, as a tuple of
(key, value) pairs (a value of None matches any value), to (requests_per_unit,
unit seconds). Each call is recorded (`calls`: the request, and the time left before
the deadline the server was given) under a Condition;
`hold()` / `release()` keep calls waiting (a deadline test); `fail_with` makes
every call end with that gRPC status. `rls_peer(...)` wraps it in a GrpcPeer
(tests/support/grpc_peers.py) that can be stopped and started again on its port.
"""

from __future__ import annotations

import time

import grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf.duration_pb2 import Duration

from tests.support.grpc_peers import GrpcPeer, HoldablePeer

Response = rls_pb2.RateLimitResponse
UNITS = {1: Response.RateLimit.SECOND, 60: Response.RateLimit.MINUTE, 3600: Response.RateLimit.HOUR,
         86400: Response.RateLimit.DAY}


class RateLimitPeer(HoldablePeer, rls_pb2_grpc.RateLimitServiceServicer):
    what = "the rate limit service"

    def __init__(self, limits: dict, response_headers: list[tuple[str, str]] | None = None):
        self.limits = limits
        self.response_headers = response_headers or []
        self.counts: dict[tuple, int] = {}
        self.calls: list = []
        self.metadata: list[list[tuple[str, str]]] = []    # each call's invocation metadata
        self.fail_with: grpc.StatusCode | None = None
        self._init_hold()

    def _limit_for(self, entries: tuple):
        for pattern, limit in self.limits.items():
            if len(pattern) == len(entries) and all(
                    pk == ek and (pv is None or pv == ev) for (pk, pv), (ek, ev) in zip(pattern, entries)):
                return limit
        return None

    def ShouldRateLimit(self, request, context):
        with self.cond:
            self.calls.append((request, context.time_remaining()))
            self.metadata.append(list(context.invocation_metadata()))
            self.cond.notify_all()
        if self._held:
            self._release.wait(30)
        if self.fail_with is not None:
            context.abort(self.fail_with, "the rate limit service is failing (test)")
        hits = request.hits_addend or 1
        now = time.time()
        out = Response(overall_code=Response.OK)
        for d in request.descriptors:
            entries = tuple((e.key, e.value) for e in d.entries)
            limit = self._limit_for(entries)
            if limit is None:
                out.statuses.add(code=Response.OK)
                continue
            per_unit, seconds = limit
            window = int(now // seconds)
            key = (request.domain, entries, window)
            with self.cond:
                used = self.counts.get(key, 0) + hits
                self.counts[key] = used
            reset = (window + 1) * seconds - now
            status = out.statuses.add(
                code=Response.OVER_LIMIT if used > per_unit else Response.OK,
                current_limit=Response.RateLimit(requests_per_unit=per_unit, unit=UNITS[seconds]),
                limit_remaining=max(0, per_unit - used),
                duration_until_reset=Duration(seconds=int(reset), nanos=int((reset % 1) * 1e9)))
            if status.code == Response.OVER_LIMIT:
                out.overall_code = Response.OVER_LIMIT
        for k, v in self.response_headers:
            out.response_headers_to_add.add(key=k, value=v)
        return out


def rls_peer(limits: dict, port: int = 0, **kw) -> tuple[GrpcPeer, RateLimitPeer]:
    servicer = RateLimitPeer(limits, **kw)
    return GrpcPeer((rls_pb2_grpc.add_RateLimitServiceServicer_to_server, servicer), port=port), servicer
