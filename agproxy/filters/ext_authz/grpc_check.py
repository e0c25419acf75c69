"""gRPC mode: `envoy.service.auth.v3.Authorization/Check`, the request and the answer.

Theory of operation: `check_request()` builds the CheckRequest an Envoy in front of
the route would send, so that servers written for Envoy (OPA-Envoy, Authorino,
custom ones) work unchanged (checked against Envoy 1.40 with the same server,
tests/integration/test_ext_authz_envoy_parity.py):

- `attributes.source` / `destination`: the client's and the gateway's socket
  addresses (address and port);
- `attributes.request.time`: now; `request.http`: `id` (the request id), `method`,
  `path` (the normalised path with its query, what the upstream will get),
  `host` (the authority, with its port), `scheme`, `protocol` ("HTTP/1.1",
  "HTTP/2"), `size` (the content-length, the buffered body's length, or -1 when
  unknown) and `headers`: a map of lowercase names, repeated headers joined with
  ",". With no `include_headers`, every request header but the hop-by-hop ones,
  plus the pseudo-headers `:authority`, `:method`, `:path`, `:scheme` and the
  `x-request-id` / `x-forwarded-proto` the upstream will see; with
  `include_headers`, only those names (as Envoy's `allowed_headers`);
- with `include_body`: `body` (a UTF-8 string field; a body that is not valid
  UTF-8 goes in `raw_body` instead, since Go servers reject invalid UTF-8 in a
  string) or `raw_body` (`raw_body = true`), and the header
  `x-envoy-auth-partial-body: true|false` (a client's own is never passed on);
- `attributes.context_extensions`: the route's configured map;
- `attributes.metadata_context`, with `metadata_context = { jwt_payload = KEY }`: the
  verified JWT claims of the request (`ex.jwt_claims`, from `jwt` or `mcp_auth`) as a
  Struct under `filter_metadata[namespace][KEY]`, namespace `envoy.filters.http.jwt_authn`
  by default: what Envoy sends when its jwt_authn filter has `payload_in_metadata: KEY`
  and ext_authz `metadata_context_namespaces` names that namespace (OPA-Envoy policies
  read `input.attributes.metadataContext.filterMetadata[...]`). No verified token, no
  metadata, as in Envoy. Numbers become doubles (a Struct), as in Envoy.

`decide()` turns a CheckResponse into a `Decision` (decision.py): status OK
allows with `ok_response`'s mutations and `dynamic_metadata` (the response's, or
the deprecated `ok_response.dynamic_metadata` which wins, as in Envoy); another
status with `error_response` is an error answer (`ErrorAnswer`: failure_mode
applies, its status / headers / body are the closed answer); any other status
denies with `denied_response` (status default 403, headers, body).
"""

from __future__ import annotations

import time
from typing import Any

from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import json_format

from agproxy.filters.ext_authz.decision import (BadAnswer, Decision, check_value, denied_reply,
                                                mutation_op, valid_name)
from agproxy.http.messages import HOP_BY_HOP

CheckRequest = external_auth_pb2.CheckRequest
CheckResponse = external_auth_pb2.CheckResponse
CHECK = "/envoy.service.auth.v3.Authorization/Check"

PARTIAL_BODY = "x-envoy-auth-partial-body"
# Not passed to the service: connection-level headers, the ones the gateway sets itself,
# and Host (it is `:authority`, as in Envoy, where an HTTP/1.1 Host becomes :authority).
_SKIP = HOP_BY_HOP | {PARTIAL_BODY, "x-request-id", "x-forwarded-proto", "host"}


class ErrorAnswer(Exception):
    """The service answered with `error_response`: a failure (failure_mode decides),
    whose closed answer is `reply` (or status_on_error when it has no status)."""

    failure = "error"

    def __init__(self, code: int, status: int, headers: list, body: bytes):
        super().__init__(f"the authorization service answered an error (gRPC status {code})")
        self.status = status
        self.headers = headers
        self.body = body


def check_request(ex: Any, include: frozenset[str] | None, body: bytes | None, partial: bool,
                  raw_body: bool, context: dict[str, str] | None,
                  jwt_meta: tuple[str, str] | None = None) -> bytes:
    """The serialised CheckRequest for this exchange."""
    req = ex.request
    conn = ex.conn
    msg = CheckRequest()
    attrs = msg.attributes
    src = attrs.source.address.socket_address
    src.address = conn.peer_host
    src.port_value = conn.peer_port
    dst = attrs.destination.address.socket_address
    dst.address = conn.local_host
    dst.port_value = conn.local_port
    r = attrs.request
    ns = time.time_ns()
    stamp = r.time
    stamp.seconds = ns // 1_000_000_000     # (Timestamp.FromNanoseconds is Python code: slower)
    stamp.nanos = ns % 1_000_000_000
    http = r.http
    http.id = ex.request_id
    http.method = req.method
    http.path = req.target
    http.host = req.authority
    http.scheme = req.scheme
    http.protocol = req.protocol
    headers: dict[str, str] = {}
    if include is None:
        headers[":authority"] = req.authority
        headers[":method"] = req.method
        headers[":path"] = req.target
        headers[":scheme"] = req.scheme
        for k, v in req.headers.items:
            if k in _SKIP:
                continue
            old = headers.get(k)
            headers[k] = v if old is None else f"{old},{v}"
        headers["x-forwarded-proto"] = req.scheme
        headers["x-request-id"] = ex.request_id
    else:
        for k, v in req.headers.items:
            if k in include and k != PARTIAL_BODY:
                old = headers.get(k)
                headers[k] = v if old is None else f"{old},{v}"
    size = ex.body_size()
    if size == -1 and body is not None and not partial:
        size = len(body)            # the whole body, peeked
    if size:
        http.size = size
    if body is not None:
        headers[PARTIAL_BODY] = "true" if partial else "false"
        if raw_body:
            http.raw_body = body
        else:
            try:
                http.body = body.decode("utf-8")
            except UnicodeDecodeError:
                http.raw_body = body
    hmap = http.headers
    for k, v in headers.items():          # (map.update is the generic Python MutableMapping one)
        hmap[k] = v
    if context:
        attrs.context_extensions.update(context)
    if jwt_meta is not None:
        claims = ex.jwt_claims
        if claims:
            attrs.metadata_context.filter_metadata[jwt_meta[0]][jwt_meta[1]] = claims
    return msg.SerializeToString()


def _mutations(options, *, response: bool) -> tuple[tuple[str, str, int], ...]:
    out = []
    for opt in options:
        name = valid_name(opt.header.key)
        if name is None:
            continue
        value = opt.header.value if opt.header.value or not opt.header.raw_value else \
            opt.header.raw_value.decode("latin-1")
        append = opt.append.value if opt.HasField("append") else None
        out.append((name, check_value(name, value), mutation_op(append, opt.append_action,
                                                                response=response)))
    return tuple(out)


def _status(code: int) -> int:
    if code == 0:
        return 403
    if not 200 <= code <= 599:
        raise BadAnswer(f"the authorization service asked for HTTP status {code}")
    return code


class Answer:
    """The response type the gRPC client parses the answer with: its bytes → the
    Decision (or, returned rather than raised so the client does not take it for an
    unparsable message, the BadAnswer / ErrorAnswer), memoised by those bytes.

    A service answers the same bytes for the same verdict (an allow without changes,
    the same user's headers), and a Decision is immutable, so the parse and the
    checks are done once per distinct answer: measured, `decide()` of a one-header
    allow is ~6 µs, a dict lookup of its 40 bytes ~0.1 µs. Bounded: at most
    `MEMO_ENTRIES` answers of at most `MEMO_BYTES` bytes are remembered (answers
    that differ per request, a timestamp in the metadata, fill it and then are
    decided each time)."""

    MEMO_ENTRIES = 1024
    MEMO_BYTES = 4096
    _memo: dict[bytes, Decision] = {}

    @staticmethod
    def FromString(data: bytes) -> "Decision | BadAnswer | ErrorAnswer":
        memo = Answer._memo
        decision = memo.get(data)
        if decision is not None:
            return decision
        resp = CheckResponse.FromString(data)       # DecodeError: the client's "garbage"
        try:
            decision = decide(resp)
        except (BadAnswer, ErrorAnswer) as exc:
            return exc
        if len(data) <= Answer.MEMO_BYTES and len(memo) < Answer.MEMO_ENTRIES:
            memo[data] = decision
        return decision


Answer.__name__ = "CheckResponse"     # what the client's "not a ..." message names


def decide(resp: CheckResponse) -> Decision:
    """The Decision a CheckResponse says (BadAnswer / ErrorAnswer when it is neither)."""
    code = resp.status.code
    if code == 0:
        if not resp.HasField("ok_response"):
            meta = _metadata(resp, None)
            return Decision(True, metadata=meta) if meta else _ALLOW
        ok = resp.ok_response
        remove = frozenset(n for n in (valid_name(h) for h in ok.headers_to_remove) if n is not None)
        return Decision(
            True,
            request_mutations=_mutations(ok.headers, response=False),
            remove=remove,
            response_mutations=_mutations(ok.response_headers_to_add, response=True),
            query_set=tuple((q.key, q.value) for q in ok.query_parameters_to_set if q.key),
            query_remove=frozenset(ok.query_parameters_to_remove),
            metadata=_metadata(resp, ok))
    if resp.HasField("error_response"):
        err = resp.error_response
        status = err.status.code
        if status and not 200 <= status <= 599:
            raise BadAnswer(f"the authorization service asked for HTTP status {status}")
        raise ErrorAnswer(code, status, list(_mutations(err.headers, response=False)),
                          err.body.encode("utf-8"))
    if not resp.HasField("denied_response"):
        return _DENIED
    denied = resp.denied_response
    return Decision(False, reply=denied_reply(_status(denied.status.code),
                                              list(_mutations(denied.headers, response=False)),
                                              denied.body.encode("utf-8")))


def _metadata(resp: CheckResponse, ok) -> dict[str, Any] | None:
    if ok is not None and ok.HasField("dynamic_metadata"):
        struct = ok.dynamic_metadata
    elif resp.HasField("dynamic_metadata"):
        struct = resp.dynamic_metadata
    else:
        return None
    return json_format.MessageToDict(struct) or None


_ALLOW = Decision(True)
_DENIED = Decision(False, reply=denied_reply(403, [], b""))
