"""A real OTLP/HTTP trace receiver for tests: what a collector on :4318 would see.

`OtlpReceiver().start()` listens on 127.0.0.1; the gateway's exporter POSTs to
`receiver.url` (`http://127.0.0.1:PORT`, the exporter appends nothing: pass
`receiver.traces_url` or the base URL to `otlp_endpoint`). The HTTP framing is parsed by
httptools (llhttp) and checked strictly: POST, path `/v1/traces`, `content-type:
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
import socket
import socketserver
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable

import httptools


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


class OtlpReceiver(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, delay: float = 0.0, status: int = 200):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.delay = delay
        self.status = status
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self.errors: list[str] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def traces_url(self) -> str:
        return self.url + "/v1/traces"

    def start(self) -> "OtlpReceiver":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

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
                self.errors.extend(problems)
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


class _Handler(socketserver.BaseRequestHandler):
    server: OtlpReceiver

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(30)
        while True:
            req = _Request()
            parser = httptools.HttpRequestParser(_Callbacks(req))
            try:
                while not req.done:
                    data = sock.recv(65536)
                    if not data:
                        return
                    parser.feed_data(data)
            except httptools.HttpParserError as exc:
                self.server.errors.append(f"bad HTTP from the exporter: {exc}")
                return
            except OSError:
                return
            req.method = parser.get_method().decode()
            status, body = self.server.accept(req)
            if self.server.delay:
                time.sleep(self.server.delay)   # a slow collector (the peer's behaviour under test)
            head = (f"HTTP/1.1 {status} X\r\ncontent-type: application/x-protobuf\r\n"
                    f"content-length: {len(body)}\r\n\r\n").encode()
            try:
                sock.sendall(head + body)
            except OSError:
                return
            if not parser.should_keep_alive():
                return


class _Callbacks:
    def __init__(self, req: _Request):
        self.req = req
        self._body: list[bytes] = []

    def on_url(self, url: bytes) -> None:
        self.req.url += url.decode()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.req.headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.req.body = b"".join(self._body)
        self.req.done = True
