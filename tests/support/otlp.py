"""A real OTLP/HTTP trace receiver for tests: what a collector on :4318 would see.

`OtlpReceiver().start()` listens on 127.0.0.1; the gateway's exporter POSTs to
`receiver.url` (`http://127.0.0.1:PORT`, the exporter appends nothing: pass
`receiver.traces_url` or the base URL to `otlp_endpoint`). The HTTP framing is
StrictHTTPServer's (llhttp, no leniency; a refused request is answered 400 and listed
in `errors`), and the request is checked strictly: POST, path `/v1/traces`, `content-type:
application/x-protobuf`, a body that decodes as `ExportTraceServiceRequest` with the
`opentelemetry-proto` messages (gzip/deflate undone when announced). Anything else is
recorded in `errors` and answered 400; tests assert `errors == []`.

Decoded spans are kept as `ReceivedSpan`s (hex ids, attributes as plain values, the
resource's attributes); `wait_for(predicate, timeout)` blocks on a condition until the
spans received satisfy it (a deadline, never a fixed sleep). `delay` makes each answer
wait that long (a slow collector); `status` answers with another status (503, ...).
"""

from __future__ import annotations

import gzip
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable

from tests.support.strict_http import Conn, Request, StrictHTTPServer, StrictPeer


@dataclass
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: str
    attributes: dict
    status_code: str
    status_message: str
    resource: dict
    scope: str
    start_ns: int
    end_ns: int
    trace_state: str = ""
    flags: int = 0


def _value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


def _attrs(kvs) -> dict:
    return {kv.key: _value(kv.value) for kv in kvs}


@dataclass
class _Request:
    method: str = ""
    url: str = ""
    headers: dict = field(default_factory=dict)
    body: bytes = b""
    done: bool = False


class OtlpReceiver(StrictPeer):
    def __init__(self, delay: float = 0.0, status: int = 200):
        self.server = StrictHTTPServer(self._handle, name="otlp-receiver")
        self.delay = delay
        self.status = status
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self._problems: list[str] = []

    @property
    def errors(self) -> list[str]:
        """What was wrong with the exports received (HTTP refused by the strict server too)."""
        with self.cond:
            return [f"bad HTTP from the exporter: {r.error}" for r in self.server.rejected] + self._problems

    @property
    def traces_url(self) -> str:
        return self.url + "/v1/traces"

    def wait_for(self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float = 10.0) -> list[ReceivedSpan]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate(self.spans):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"OTLP receiver: condition not met in {timeout}s; "
                                         f"got {len(self.spans)} spans: {[s.name for s in self.spans]}; "
                                         f"errors {self.errors}")
                self.cond.wait(left)
            return list(self.spans)

    def wait_requests(self, n: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.requests < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"OTLP receiver: {self.requests} export requests, wanted {n}")
                self.cond.wait(left)

    # -- decoding ---------------------------------------------------------------------
    def accept(self, req: _Request) -> tuple[int, bytes]:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest, ExportTraceServiceResponse)
        problems = []
        if req.method != "POST":
            problems.append(f"method {req.method}")
        if req.url != "/v1/traces":
            problems.append(f"path {req.url}")
        if req.headers.get("content-type") != "application/x-protobuf":
            problems.append(f"content-type {req.headers.get('content-type')!r}")
        body = req.body
        coding = req.headers.get("content-encoding", "")
        try:
            if coding == "gzip":
                body = gzip.decompress(body)
            elif coding == "deflate":
                body = zlib.decompress(body)
            elif coding:
                problems.append(f"content-encoding {coding!r}")
            msg = ExportTraceServiceRequest.FromString(body)
        except Exception as exc:
            problems.append(f"undecodable body: {exc}")
            msg = None
        with self.cond:
            self.requests += 1
            if problems:
                self._problems.extend(problems)
                self.cond.notify_all()
                return 400, b""
            for rs in msg.resource_spans:
                resource = _attrs(rs.resource.attributes)
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self.spans.append(ReceivedSpan(
                            name=s.name, trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(), kind=type(s).SpanKind.Name(s.kind),
                            attributes=_attrs(s.attributes),
                            status_code=type(s.status).StatusCode.Name(s.status.code),
                            status_message=s.status.message, resource=resource, scope=ss.scope.name,
                            start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano,
                            trace_state=s.trace_state, flags=s.flags))
            self.cond.notify_all()
        return self.status, ExportTraceServiceResponse().SerializeToString()


    def _handle(self, r: Request, conn: Conn) -> None:
        status, body = self.accept(_Request(r.method, r.target, dict(r.headers), r.body, True))
        if self.delay:
            conn.server.stopping.wait(self.delay)   # a slow collector (the peer's behaviour under test)
        conn.respond(status, [("content-type", "application/x-protobuf")], body)
