"""Fake LLM providers for tests and demos: real HTTP/1.1 servers on 127.0.0.1 that speak
OpenAI Chat Completions, Anthropic Messages and Amazon Bedrock Converse byte for byte.

Theory of operation: one StrictHTTPServer per provider (tests/support/strict_http.py:
a thread per connection, keep-alive, llhttp with no leniency, the exact bytes of every
request in `fake.server.received`), refusing what a real API would refuse, so a
gateway that sends a sloppy request fails its test:

- HTTP: refused framing or not exactly one `host` → 400 from the strict server
  (recorded in `fake.errors`); a body that is JSON that parses.
- Credentials: OpenAI wants `authorization: Bearer <api_key>`; Anthropic `x-api-key`
  (or the Bearer form its SDK 2.x sends, never both) and an `anthropic-version`; Bedrock a SigV4 signature (service `bedrock`) that is
  recomputed with botocore from the request as received (identity/aws.py
  `verify_sigv4`). Failures answer 401/403 in the provider's error format.
- Bodies: the fields each API requires (`model`/`messages`; Anthropic `max_tokens`;
  Bedrock alternating roles, one member per content block), every tool result
  answering a tool call of the previous assistant turn, an unknown model → 404.

Answers: a text reply (`reply`), or — when the request offers tools and the last
turn is not a tool result — a call of the first tool with `tool_args`. Usage comes
from `usage` (uncached input, output, cache read, cache write), written in each
API's fields: OpenAI's `prompt_tokens` includes `cached_tokens`; Anthropic's
`input_tokens` and Bedrock's `inputTokens` exclude cached tokens. Streams: OpenAI
`data: {chunk}` lines ending in `data: [DONE]` (the usage chunk with `choices: []`
only under `stream_options.include_usage`, `"usage": null` on the others then),
Anthropic's named events (`message_start`, `content_block_*`, `ping`,
`message_delta`, `message_stop`), Bedrock's AWS event-stream binary frames
(prelude, headers, payload, CRC32s; `encode_event` — botocore's `EventStreamBuffer`
decodes them).

Faults (`fake.faults`, consumed one per request, FIFO; `fake.fault_always` for
every request): `Fault("status", 503)`, `Fault("status", 429, retry_after=7)`,
`Fault("reset")` (RST after reading the request), `Fault("hang", seconds=S)`,
`Fault("stall", seconds=S)` (a 200 head, JSON or a stream as asked, then nothing for S),
`Fault("garbage")` (bytes that are not HTTP), `Fault("garbage_json")` (200, a body
that is not JSON), `Fault("truncate", events=N)` (N stream events, then the
connection drops mid-body). A stream that loses its reader mid-way sets
`fake.client_gone`.

Every request is kept in `fake.requests` (`Seen`: method, target, headers, body,
json); `wait_requests(n)` waits for n with a deadline.

CLI (the demo of conf/llm-failover.toml; `--fail openai` makes the primary answer 503):
    python -m tests.support.llm_fakes --openai 9501 --anthropic 9502 --bedrock 9503 \
        --fail openai --run-gateway conf/llm-failover.toml
"""

from __future__ import annotations

import argparse
import binascii
import json
import socket
import struct
import threading
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from agproxy.identity.aws import verify_sigv4
from tests.support.strict_http import Conn, Request, StrictHTTPServer, StrictPeer

OPENAI_KEY = "sk-test-openai-0123456789abcdef"
ANTHROPIC_KEY = "sk-ant-test-0123456789abcdef"
AWS_ACCESS_KEY = "AKIDLLMFAKETEST00001"
AWS_SECRET_KEY = "llm-fake-secret-key-for-tests-only"
ANTHROPIC_VERSION = "2023-06-01"
CREATED = 1_760_000_000
_PAD = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123"


@dataclass
class Fault:
    kind: str                      # status | reset | hang | stall | garbage | garbage_json | truncate
    status: int = 503
    retry_after: float | None = None
    seconds: float = 30.0
    events: int = 2


@dataclass
class Usage:
    input: int = 20                # uncached input tokens
    output: int = 9
    cache_read: int = 0
    cache_write: int = 0


@dataclass
class Seen:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    json: Any = None

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


class _BadRequest(Exception):
    def __init__(self, status: int, etype: str, message: str):
        super().__init__(message)
        self.status = status
        self.etype = etype


# -- AWS event-stream framing -----------------------------------------------------------
def _es_header(name: str, value: str) -> bytes:
    n = name.encode()
    v = value.encode()
    return struct.pack("!B", len(n)) + n + b"\x07" + struct.pack("!H", len(v)) + v


def encode_event(headers: dict[str, str], payload: bytes) -> bytes:
    """One AWS event-stream message: prelude (total length, headers length, CRC32 of
    both), headers (string type 7), payload, CRC32 of everything before it."""
    hb = b"".join(_es_header(k, v) for k, v in headers.items())
    total = 12 + len(hb) + len(payload) + 4
    prelude = struct.pack("!II", total, len(hb))
    prelude += struct.pack("!I", binascii.crc32(prelude) & 0xFFFFFFFF)
    msg = prelude + hb + payload
    return msg + struct.pack("!I", binascii.crc32(msg) & 0xFFFFFFFF)


def bedrock_event(event_type: str, body: dict) -> bytes:
    payload = dict(body)
    payload["p"] = _PAD[: 8 + len(event_type)]     # Bedrock pads payloads with "p"
    return encode_event({":event-type": event_type, ":content-type": "application/json",
                         ":message-type": "event"}, json.dumps(payload, separators=(",", ":")).encode())


def bedrock_exception(exc_type: str, message: str) -> bytes:
    return encode_event({":exception-type": exc_type, ":content-type": "application/json",
                         ":message-type": "exception"}, json.dumps({"message": message}).encode())


# -- the server -------------------------------------------------------------------------
class FakeProvider(StrictPeer):
    """kind: openai | anthropic | bedrock. Start with start() or as a context manager."""

    def __init__(self, kind: str, *, models: set[str] | None = None, reply: str = "Hello from the fake.",
                 tool_args: dict | None = None, usage: Usage | None = None, stream_delay: float = 0.0,
                 api_key: str | None = None, region: str = "us-east-1", name: str | None = None,
                 port: int = 0):
        assert kind in ("openai", "anthropic", "bedrock")
        self.kind = kind
        self.name = name or kind
        self.models = models
        self.reply = reply
        self.tool_args = tool_args if tool_args is not None else {"city": "Paris"}
        self.usage = usage or Usage()
        self.stream_delay = stream_delay
        self.api_key = api_key or {"openai": OPENAI_KEY, "anthropic": ANTHROPIC_KEY}.get(kind)
        self.region = region
        self.faults: list[Fault] = []
        self.fault_always: Fault | None = None
        self.requests: list[Seen] = []
        self.client_gone = threading.Event()
        self.server = StrictHTTPServer(self._handle, port=port, name=f"fake-{self.name}")

    # -- lifecycle (start, stop, with, port, url, cond: StrictPeer) ---------------------
    @property
    def sock(self) -> socket.socket:
        """The listening socket."""
        return self.server.listener

    @property
    def errors(self) -> list[str]:
        """Requests the strict server refused (framing, Host), as `unparsable request: why`."""
        with self.cond:
            return [f"unparsable request: {r.error}" for r in self.server.rejected]

    def wait_requests(self, n: int, timeout: float = 5.0) -> list[Seen]:
        try:
            self.server.wait_until(lambda: len(self.requests) >= n, timeout)
        except AssertionError:
            raise AssertionError(f"{self.name} saw {len(self.requests)} requests, expected {n}") from None
        with self.cond:
            return list(self.requests)

    # -- one request -------------------------------------------------------------------------
    def _handle(self, req: Request, conn: Conn) -> None:
        if not self._respond(conn, req):
            conn.close_after = True

    def _respond(self, conn: Conn, req: Request) -> bool:
        """Answer one request; False when the connection must close."""
        seen = Seen(req.method, req.target, list(req.headers), req.body)
        keep = req.keep_alive
        if req.body:
            try:
                seen.json = json.loads(req.body)
            except ValueError:
                self._record(seen)
                self._send_error(conn, 400, "invalid_request_error", "the body is not valid JSON")
                return False
        self._record(seen)
        with self.cond:
            fault = self.faults.pop(0) if self.faults else self.fault_always
        if fault is not None and fault.kind != "truncate":
            return self._fault(conn, fault, isinstance(seen.json, dict) and bool(seen.json.get("stream")))
        try:
            auth = self._check_auth(seen)
            if auth is not None:
                return self._send_error(conn, *auth) and keep
            if self.kind == "openai":
                return self._openai(conn, seen, fault, keep)
            if self.kind == "anthropic":
                return self._anthropic(conn, seen, fault, keep)
            return self._bedrock(conn, seen, fault, keep)
        except _BadRequest as bad:
            return self._send_error(conn, bad.status, bad.etype, str(bad)) and keep

    def _record(self, seen: Seen) -> None:
        with self.cond:
            self.requests.append(seen)
            self.cond.notify_all()

    def _fault(self, conn: Conn, fault: Fault, stream: bool = False) -> bool:
        if fault.kind == "status":
            extra = []
            if fault.retry_after is not None:
                extra.append(("retry-after", _fmt_seconds(fault.retry_after)))
            etype = _ERROR_TYPES[self.kind].get(fault.status, "api_error")
            return self._send_error(conn, fault.status, etype, _ERROR_MESSAGES.get(fault.status, "error"), extra)
        if fault.kind == "reset":
            conn.reset()
            return False
        if fault.kind == "hang":
            conn.hang(fault.seconds)
            return False
        if fault.kind == "stall":
            if stream:
                conn.start_chunked(200, [("content-type", "application/vnd.amazon.eventstream" if self.kind == "bedrock"
                                          else "text/event-stream; charset=utf-8")])
            else:
                conn.respond(200, [("content-type", "application/json")], b"x" * 400, head_only=True)
            conn.hang(fault.seconds)
            return False
        if fault.kind == "garbage":
            conn.send(b"\x00\x17\xffnot an HTTP response at all\r\n\r\n")
            return False
        if fault.kind == "garbage_json":
            return self._send(conn, 200, [("content-type", "application/json")], b"<html>upstream proxy error</html>")
        raise AssertionError(f"unknown fault {fault.kind}")

    # -- credentials ---------------------------------------------------------------------------
    def _check_auth(self, seen: Seen):
        if self.kind == "openai":
            if seen.header("authorization") != f"Bearer {self.api_key}":
                return (401, "invalid_api_key", "Incorrect API key provided.")
            return None
        if self.kind == "anthropic":
            # The API takes the key as x-api-key, or (what SDK 2.x sends) as a Bearer token.
            given = seen.header("x-api-key")
            bearer = seen.header("authorization")
            if given is None and bearer is not None and bearer.startswith("Bearer "):
                given = bearer[7:]
            elif given is not None and bearer is not None:
                return (401, "authentication_error", "both x-api-key and Authorization were sent")
            if given != self.api_key:
                return (401, "authentication_error", "invalid x-api-key")
            if not seen.header("anthropic-version"):
                return (400, "invalid_request_error", "anthropic-version: header is required")
            return None
        url = f"http://{seen.header('host')}{seen.target}"
        why = verify_sigv4(seen.method, url, seen.headers, seen.body, {AWS_ACCESS_KEY: AWS_SECRET_KEY}, "bedrock")
        if why is not None:
            return (403, "InvalidSignatureException", why)
        scope = seen.header("authorization").split("Credential=")[1].split(",")[0].split("/")
        if scope[2] != self.region:
            return (403, "InvalidSignatureException", f"credential scope region {scope[2]!r}, expected {self.region!r}")
        return None

    # -- the wire ----------------------------------------------------------------------------
    def _send(self, conn: Conn, status: int, headers: list[tuple[str, str]], body: bytes,
              fault: Fault | None = None) -> bool:
        """A whole response; with a truncate fault, half the promised body, then a reset."""
        if fault is not None and fault.kind == "truncate":
            conn.respond(status, headers, body, head_only=True)
            conn.send(body[: len(body) // 2])
            conn.reset()
            return False
        return self._sent(conn.respond(status, headers, body))

    def _start_stream(self, conn: Conn, content_type: str, extra: list[tuple[str, str]]) -> bool:
        return self._sent(conn.start_chunked(200, [("content-type", content_type), *extra]))

    def _stream(self, conn: Conn, events: list[bytes], fault: Fault | None) -> bool:
        for i, ev in enumerate(events):
            if fault is not None and i >= fault.events:
                conn.reset()
                return False       # the connection drops mid-body: no terminating chunk
            if i and self.stream_delay and conn.server.stopping.wait(self.stream_delay):
                return False
            if not self._sent(conn.send_chunk(ev)):
                return False
        return self._sent(conn.end_chunked())

    def _sent(self, ok: bool) -> bool:
        if not ok:
            self.client_gone.set()     # the reader went away mid-answer
        return ok

    def _send_error(self, conn: socket.socket, status: int, etype: str, message: str,
                    extra: list[tuple[str, str]] | None = None) -> bool:
        extra = list(extra or [])
        if self.kind == "openai":
            body = {"error": {"message": message, "type": etype if status != 401 else "invalid_request_error",
                              "param": None, "code": etype if status in (401, 404) else None}}
            extra.append(("x-request-id", "req_" + uuid.uuid4().hex))
        elif self.kind == "anthropic":
            body = {"type": "error", "error": {"type": etype, "message": message},
                    "request_id": "req_" + uuid.uuid4().hex[:24]}
            extra.append(("request-id", body["request_id"]))
        else:
            body = {"message": message}
            extra.append(("x-amzn-errortype", f"{etype}:http://internal.amazon.com/coral/com.amazon.bedrock/"))
            extra.append(("x-amzn-requestid", str(uuid.uuid4())))
        return self._send(conn, status, [("content-type", "application/json"), *extra], json.dumps(body).encode())

    def _model_ok(self, model: str) -> bool:
        return self.models is None or model in self.models

    # -- OpenAI Chat Completions -------------------------------------------------------------
    def _openai(self, conn, seen: Seen, fault: Fault | None, keep: bool) -> bool:
        if seen.method != "POST" or seen.target != "/v1/chat/completions":
            raise _BadRequest(404, "not_found", f"Invalid URL ({seen.method} {seen.target})")
        req = seen.json
        if not isinstance(req, dict) or not isinstance(req.get("model"), str):
            raise _BadRequest(400, "invalid_request_error", "you must provide a model parameter")
        msgs = req.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise _BadRequest(400, "invalid_request_error", "'messages' must be a non-empty array")
        if not self._model_ok(req["model"]):
            raise _BadRequest(404, "model_not_found", f"The model `{req['model']}` does not exist")
        pending: set[str] = set()
        for m in msgs:
            role = m.get("role")
            if role not in ("system", "developer", "user", "assistant", "tool"):
                raise _BadRequest(400, "invalid_request_error", f"invalid role {role!r}")
            if role == "tool":
                if m.get("tool_call_id") not in pending:
                    raise _BadRequest(400, "invalid_request_error",
                                      "messages with role 'tool' must be a response to a preceding message with 'tool_calls'")
                pending.discard(m["tool_call_id"])
            else:
                if pending:
                    raise _BadRequest(400, "invalid_request_error",
                                      "an assistant message with 'tool_calls' must be followed by tool messages")
                for tc in m.get("tool_calls") or []:
                    json.loads(tc["function"]["arguments"])
                    pending.add(tc["id"])
        tools = req.get("tools") or []
        call = tools and msgs[-1].get("role") != "tool"
        model = req["model"] + "-2024-07-18" if not req["model"].endswith("-2024-07-18") else req["model"]
        cid = "chatcmpl-" + uuid.uuid4().hex[:24]
        u = self.usage
        usage = {"prompt_tokens": u.input + u.cache_read, "completion_tokens": u.output,
                 "total_tokens": u.input + u.cache_read + u.output,
                 "prompt_tokens_details": {"cached_tokens": u.cache_read, "audio_tokens": 0},
                 "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                               "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}
        tool_id = "call_" + uuid.uuid4().hex[:24]
        fn = tools[0]["function"]["name"] if call else None
        args = json.dumps(self.tool_args, separators=(",", ":"))
        hdrs = [("openai-processing-ms", "12"), ("x-request-id", "req_" + uuid.uuid4().hex),
                ("openai-version", "2020-10-01")]
        if not req.get("stream"):
            msg: dict[str, Any] = {"role": "assistant", "content": None if call else self.reply, "refusal": None,
                                   "annotations": []}
            if call:
                msg["tool_calls"] = [{"id": tool_id, "type": "function", "function": {"name": fn, "arguments": args}}]
            body = {"id": cid, "object": "chat.completion", "created": CREATED, "model": model,
                    "choices": [{"index": 0, "message": msg, "logprobs": None,
                                 "finish_reason": "tool_calls" if call else "stop"}],
                    "usage": usage, "service_tier": "default", "system_fingerprint": "fp_fake0001"}
            return self._send(conn, 200, [("content-type", "application/json"), *hdrs], _dumps(body), fault) and keep
        include = bool((req.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict, finish: str | None = None) -> bytes:
            c: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": CREATED, "model": model,
                                 "service_tier": "default", "system_fingerprint": "fp_fake0001",
                                 "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            if include:
                c["usage"] = None
            return b"data: " + _dumps(c) + b"\n\n"

        events = [chunk({"role": "assistant", "content": None if call else "", "refusal": None})]
        if call:
            events.append(chunk({"tool_calls": [{"index": 0, "id": tool_id, "type": "function",
                                                 "function": {"name": fn, "arguments": ""}}]}))
            for part in _pieces(args, 3):
                events.append(chunk({"tool_calls": [{"index": 0, "function": {"arguments": part}}]}))
        else:
            for part in _words(self.reply):
                events.append(chunk({"content": part}))
        events.append(chunk({}, "tool_calls" if call else "stop"))
        if include:
            events.append(b"data: " + _dumps({"id": cid, "object": "chat.completion.chunk", "created": CREATED,
                                              "model": model, "service_tier": "default",
                                              "system_fingerprint": "fp_fake0001", "choices": [],
                                              "usage": usage}) + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        return (self._start_stream(conn, "text/event-stream; charset=utf-8", hdrs)
                and self._stream(conn, events, fault) and keep)

    # -- Anthropic Messages ------------------------------------------------------------------
    def _anthropic(self, conn, seen: Seen, fault: Fault | None, keep: bool) -> bool:
        if seen.method != "POST" or seen.target != "/v1/messages":
            raise _BadRequest(404, "not_found_error", "Not Found")
        req = seen.json
        if not isinstance(req, dict) or not isinstance(req.get("model"), str):
            raise _BadRequest(400, "invalid_request_error", "model: Field required")
        if not isinstance(req.get("max_tokens"), int):
            raise _BadRequest(400, "invalid_request_error", "max_tokens: Field required")
        msgs = req.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise _BadRequest(400, "invalid_request_error", "messages: at least one message is required")
        if not self._model_ok(req["model"]):
            raise _BadRequest(404, "not_found_error", f"model: {req['model']}")
        pending: set[str] = set()
        for i, m in enumerate(msgs):
            if m.get("role") not in ("user", "assistant"):
                raise _BadRequest(400, "invalid_request_error", f"messages.{i}.role: Input should be 'user' or 'assistant'")
            content = m.get("content")
            blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(blocks, list):
                raise _BadRequest(400, "invalid_request_error", f"messages.{i}.content: invalid")
            results = {b.get("tool_use_id") for b in blocks if b.get("type") == "tool_result"}
            if pending and results != pending:
                raise _BadRequest(400, "invalid_request_error",
                                  f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after")
            if results - pending:
                raise _BadRequest(400, "invalid_request_error",
                                  f"messages.{i}: unexpected `tool_use_id` found in `tool_result` blocks")
            pending = {b["id"] for b in blocks if b.get("type") == "tool_use"}
            for b in blocks:
                if b.get("type") not in ("text", "tool_use", "tool_result", "image", "thinking"):
                    raise _BadRequest(400, "invalid_request_error", f"messages.{i}: unknown block type")
        tools = req.get("tools") or []
        last = msgs[-1]["content"]
        last_is_result = isinstance(last, list) and any(b.get("type") == "tool_result" for b in last)
        call = bool(tools) and not last_is_result
        mid = "msg_01" + uuid.uuid4().hex[:22]
        tool_id = "toolu_01" + uuid.uuid4().hex[:22]
        u = self.usage
        usage = {"input_tokens": u.input, "cache_creation_input_tokens": u.cache_write,
                 "cache_read_input_tokens": u.cache_read,
                 "cache_creation": {"ephemeral_5m_input_tokens": u.cache_write, "ephemeral_1h_input_tokens": 0},
                 "output_tokens": u.output, "service_tier": "standard"}
        stop = "tool_use" if call else "end_turn"
        hdrs = [("request-id", "req_01" + uuid.uuid4().hex[:22]), ("anthropic-organization-id", "fake-org")]
        if not req.get("stream"):
            content = ([{"type": "tool_use", "id": tool_id, "name": tools[0]["name"], "input": self.tool_args}]
                       if call else [{"type": "text", "text": self.reply}])
            body = {"id": mid, "type": "message", "role": "assistant", "model": req["model"], "content": content,
                    "stop_reason": stop, "stop_sequence": None, "usage": usage}
            return self._send(conn, 200, [("content-type", "application/json"), *hdrs], _dumps(body), fault) and keep

        def ev(name: str, data: dict) -> bytes:
            return b"event: " + name.encode() + b"\ndata: " + _dumps(data) + b"\n\n"

        start_usage = dict(usage, output_tokens=1)
        events = [ev("message_start", {"type": "message_start", "message": {
            "id": mid, "type": "message", "role": "assistant", "model": req["model"], "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": start_usage}})]
        if call:
            events.append(ev("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {
                "type": "tool_use", "id": tool_id, "name": tools[0]["name"], "input": {}}}))
            for part in _pieces(json.dumps(self.tool_args, separators=(",", ":")), 3):
                events.append(ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                         "delta": {"type": "input_json_delta", "partial_json": part}}))
        else:
            events.append(ev("content_block_start", {"type": "content_block_start", "index": 0,
                                                     "content_block": {"type": "text", "text": ""}}))
            events.append(ev("ping", {"type": "ping"}))
            for part in _words(self.reply):
                events.append(ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                         "delta": {"type": "text_delta", "text": part}}))
        events.append(ev("content_block_stop", {"type": "content_block_stop", "index": 0}))
        events.append(ev("message_delta", {"type": "message_delta",
                                           "delta": {"stop_reason": stop, "stop_sequence": None},
                                           "usage": {"input_tokens": u.input, "cache_creation_input_tokens": u.cache_write,
                                                     "cache_read_input_tokens": u.cache_read,
                                                     "output_tokens": u.output}}))
        events.append(ev("message_stop", {"type": "message_stop"}))
        return (self._start_stream(conn, "text/event-stream; charset=utf-8", [("cache-control", "no-cache"), *hdrs])
                and self._stream(conn, events, fault) and keep)

    # -- Bedrock Converse ----------------------------------------------------------------------
    def _bedrock(self, conn, seen: Seen, fault: Fault | None, keep: bool) -> bool:
        path = seen.target.split("?")[0]
        parts = path.split("/")
        if seen.method != "POST" or len(parts) != 4 or parts[1] != "model" or parts[3] not in ("converse", "converse-stream"):
            raise _BadRequest(404, "UnknownOperationException", "Unknown operation")
        model = unquote(parts[2])
        if "/" in parts[2] or ":" in parts[2]:
            raise _BadRequest(400, "ValidationException", "the model id must be percent-encoded in the path")
        req = seen.json
        if not isinstance(req, dict):
            raise _BadRequest(400, "ValidationException", "body required")
        if not self._model_ok(model):
            raise _BadRequest(400, "ValidationException", "The provided model identifier is invalid.")
        msgs = req.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise _BadRequest(400, "ValidationException", "messages: at least one message is required")
        pending: set[str] = set()
        for i, m in enumerate(msgs):
            want = "user" if i % 2 == 0 else "assistant"
            if m.get("role") != want:
                raise _BadRequest(400, "ValidationException",
                                  "A conversation must alternate between user and assistant roles, starting with user")
            results = set()
            uses = set()
            for b in m.get("content") or []:
                if len(b) != 1 or next(iter(b)) not in ("text", "toolUse", "toolResult", "image", "document",
                                                       "cachePoint", "reasoningContent"):
                    raise _BadRequest(400, "ValidationException", f"messages.{i}: a content block has one member")
                if "toolResult" in b:
                    results.add(b["toolResult"]["toolUseId"])
                if "toolUse" in b:
                    uses.add(b["toolUse"]["toolUseId"])
            if results != pending:
                raise _BadRequest(400, "ValidationException",
                                  "The number of toolResult blocks exceeds or misses the toolUse blocks of the previous turn")
            pending = uses
        if pending:
            raise _BadRequest(400, "ValidationException", "the last turn has toolUse blocks without results")
        tools = (req.get("toolConfig") or {}).get("tools") or []
        if any("toolUse" in b for m in msgs for b in m["content"]) and not tools:
            raise _BadRequest(400, "ValidationException", "toolConfig field must be defined when using toolUse")
        last_is_result = any("toolResult" in b for b in msgs[-1]["content"])
        call = bool(tools) and not last_is_result
        tool_id = "tooluse_" + uuid.uuid4().hex[:22]
        u = self.usage
        usage = {"inputTokens": u.input, "outputTokens": u.output,
                 "totalTokens": u.input + u.output + u.cache_read + u.cache_write}
        if u.cache_read or u.cache_write:
            usage["cacheReadInputTokens"] = u.cache_read
            usage["cacheWriteInputTokens"] = u.cache_write
        stop = "tool_use" if call else "end_turn"
        rid = str(uuid.uuid4())
        name = tools[0]["toolSpec"]["name"] if call else None
        if parts[3] == "converse":
            content = ([{"toolUse": {"toolUseId": tool_id, "name": name, "input": self.tool_args}}]
                       if call else [{"text": self.reply}])
            body = {"metrics": {"latencyMs": 321}, "output": {"message": {"content": content, "role": "assistant"}},
                    "stopReason": stop, "usage": usage}
            return self._send(conn, 200, [("content-type", "application/json"), ("x-amzn-requestid", rid)],
                              _dumps(body), fault) and keep
        events = [bedrock_event("messageStart", {"role": "assistant"})]
        if call:
            events.append(bedrock_event("contentBlockStart", {"contentBlockIndex": 0, "start": {
                "toolUse": {"toolUseId": tool_id, "name": name}}}))
            for part in _pieces(json.dumps(self.tool_args, separators=(",", ":")), 3):
                events.append(bedrock_event("contentBlockDelta", {"contentBlockIndex": 0,
                                                                  "delta": {"toolUse": {"input": part}}}))
        else:
            for part in _words(self.reply):
                events.append(bedrock_event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": part}}))
        events.append(bedrock_event("contentBlockStop", {"contentBlockIndex": 0}))
        events.append(bedrock_event("messageStop", {"stopReason": stop}))
        events.append(bedrock_event("metadata", {"usage": usage, "metrics": {"latencyMs": 321}}))
        return (self._start_stream(conn, "application/vnd.amazon.eventstream", [("x-amzn-requestid", rid)])
                and self._stream(conn, events, fault) and keep)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _words(text: str) -> list[str]:
    out = []
    for i, w in enumerate(text.split(" ")):
        out.append(w if i == 0 else " " + w)
    return out


def _pieces(text: str, n: int) -> list[str]:
    step = max(1, -(-len(text) // n))
    return [text[i:i + step] for i in range(0, len(text), step)]


def _fmt_seconds(s: float) -> str:
    return str(int(s)) if float(s).is_integer() else str(s)


_ERROR_TYPES = {
    "openai": {429: "rate_limit_exceeded", 500: "server_error", 503: "server_error", 400: "invalid_request_error"},
    "anthropic": {429: "rate_limit_error", 500: "api_error", 503: "api_error", 529: "overloaded_error",
                  400: "invalid_request_error"},
    "bedrock": {429: "ThrottlingException", 500: "InternalServerException", 503: "ServiceUnavailableException",
                400: "ValidationException", 424: "ModelErrorException"},
}
_ERROR_MESSAGES = {429: "Rate limit reached, please try again later.", 503: "The service is temporarily unavailable.",
                   529: "Overloaded", 500: "The server had an error while processing your request."}


DEMO_ENV = {"LLM_DEMO_OPENAI_KEY": OPENAI_KEY, "LLM_DEMO_ANTHROPIC_KEY": ANTHROPIC_KEY,
            "AWS_ACCESS_KEY_ID": AWS_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": AWS_SECRET_KEY,
            "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
            "AWS_EC2_METADATA_DISABLED": "true"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--openai", type=int, default=None, help="port of a fake OpenAI")
    ap.add_argument("--anthropic", type=int, default=None, help="port of a fake Anthropic")
    ap.add_argument("--bedrock", type=int, default=None, help="port of a fake Bedrock")
    ap.add_argument("--fail", default="", help="comma-separated kinds that answer 503 to every request")
    ap.add_argument("--run-gateway", metavar="CONFIG", default=None,
                    help="then run `agproxy run --config CONFIG` with the fakes' keys and AWS test credentials "
                         "in its environment; stop everything when it exits (Ctrl-C)")
    args = ap.parse_args()
    fakes = []
    for kind in ("openai", "anthropic", "bedrock"):
        port = getattr(args, kind)
        if port is None:
            continue
        f = FakeProvider(kind, port=port)
        if kind in args.fail.split(","):
            f.fault_always = Fault("status", 503)
        fakes.append(f.start())
        print(f"fake {kind} on {f.url}", flush=True)
    try:
        if args.run_gateway:
            import os
            import subprocess
            import sys
            exe = os.path.join(os.path.dirname(sys.executable), "agproxy")
            cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "agproxy.cli"]
            subprocess.run(cmd + ["run", "--config", args.run_gateway], env={**os.environ, **DEMO_ENV})
        else:
            threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        for f in fakes:
            f.stop()


if __name__ == "__main__":
    main()
