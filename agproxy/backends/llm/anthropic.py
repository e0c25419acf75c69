"""Anthropic Messages: requests, answers, stream events and errors.

Client side: `parse_request` reads a client's body into a `Chat`, `render_response`
and `Encoder` write an answer or a stream back as Anthropic does (`message_start`,
`content_block_start` / `_delta` / `_stop` per block, `message_delta` with the stop
reason and the cumulative usage, `message_stop`). Provider side: `render_request`,
`parse_response`, `Decoder` (one SSE event at a time, by its `type`).

Usage is written back as Anthropic counts it: `input_tokens` without the cached
tokens, which go in `cache_read_input_tokens` / `cache_creation_input_tokens`.
"""

from __future__ import annotations

from typing import Any

import orjson

from agproxy.backends.llm import chat as c
from agproxy.backends.llm.chat import BadRequest, Chat, ProviderError, Reply
from agproxy.backends.llm.usage import AnthropicTally, Usage, from_anthropic

DEFAULT_MAX_TOKENS = 4096      # Anthropic requires max_tokens; OpenAI clients may omit it


# -- client side ---------------------------------------------------------------------------
def check_request(body: Any) -> str:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model: Field required")
    mt = body.get("max_tokens")
    if type(mt) is not int or mt < 1:
        raise BadRequest("max_tokens: Field required (a positive integer)")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("messages: at least one message is required")
    return model


def _blocks(content: Any, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise BadRequest(f"{where}: content must be a string or a list of blocks")
    out = []
    for j, b in enumerate(content):
        t = b.get("type") if isinstance(b, dict) else None
        if t == "text" and isinstance(b.get("text"), str):
            out.append({"type": "text", "text": b["text"]})
        elif t == "tool_use" and isinstance(b.get("id"), str) and isinstance(b.get("name"), str):
            out.append({"type": "tool_use", "id": b["id"], "name": b["name"],
                        "input": b.get("input") if isinstance(b.get("input"), dict) else {}})
        elif t == "tool_result" and isinstance(b.get("tool_use_id"), str):
            out.append({"type": "tool_result", "tool_use_id": b["tool_use_id"],
                        "content": c.text_of(b.get("content"), f"{where}[{j}].content"),
                        "is_error": bool(b.get("is_error"))})
        else:
            raise BadRequest(f"{where}[{j}]: a {t or 'malformed'} block cannot be translated for this provider")
    return out


def parse_request(body: Any) -> Chat:
    model = check_request(body)
    ch = Chat(model)
    sys = body.get("system")
    if sys:
        ch.system.append(c.text_of(sys, "system"))
    for i, m in enumerate(body["messages"]):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("user", "assistant"):
            raise BadRequest(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        ch.add(role, _blocks(m.get("content"), f"messages.{i}.content"))
    for j, t in enumerate(c.array(body, "tools", "tools")):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or t.get("type") not in (None, "custom"):
            raise BadRequest(f"tools.{j}: only custom tools with a name can be translated")
        ch.tools.append({"name": t["name"], "description": t.get("description") or "",
                         "schema": t.get("input_schema") or {"type": "object", "properties": {}}})
    tc = body.get("tool_choice")
    if isinstance(tc, dict):
        kind = tc.get("type")
        if kind == "tool":
            if not isinstance(tc.get("name"), str):
                raise BadRequest("tool_choice.name is required")
            ch.tool_choice = {"name": tc["name"]}
        elif kind in ("auto", "any", "none"):
            ch.tool_choice = kind
        else:
            raise BadRequest("tool_choice.type must be auto, any, tool or none")
    ch.max_tokens = body["max_tokens"]
    ch.temperature = c.number(body, "temperature")
    ch.top_p = c.number(body, "top_p")
    ch.stop = c.stop_list(body.get("stop_sequences"), "stop_sequences")
    ch.stream = bool(body.get("stream"))
    return ch


def usage_json(u: Usage) -> dict:
    return {"input_tokens": u.uncached_input, "cache_creation_input_tokens": u.cache_write,
            "cache_read_input_tokens": u.cache_read, "output_tokens": u.output}


def _msg_id(rid: str) -> str:
    return rid if rid.startswith("msg_") else "msg_" + rid


def _content_json(blocks: list[dict]) -> list[dict]:
    out = []
    for b in blocks:
        if b["type"] == "text":
            out.append({"type": "text", "text": b["text"]})
        elif b["type"] == "tool_use":
            out.append({"type": "tool_use", "id": b["id"], "name": b["name"], "input": b["input"]})
    return out


def render_response(r: Reply) -> dict:
    return {"id": _msg_id(r.id), "type": "message", "role": "assistant", "model": r.model,
            "content": _content_json(r.content), "stop_reason": r.stop_reason, "stop_sequence": None,
            "usage": usage_json(r.usage or Usage())}


_ERROR_TYPES = {"invalid_request": "invalid_request_error", "not_found": "not_found_error",
                "too_large": "request_too_large", "unavailable": "overloaded_error", "upstream": "api_error",
                "rate_limit": "rate_limit_error", "auth": "authentication_error"}


def error_body(kind: str, message: str) -> dict:
    return {"type": "error", "error": {"type": _ERROR_TYPES.get(kind, "api_error"), "message": message}}


def error_message(body: Any) -> tuple[str, str] | None:
    if isinstance(body, dict) and body.get("type") == "error" and isinstance(body.get("error"), dict):
        e = body["error"]
        return str(e.get("type") or "error"), str(e.get("message") or "")
    return None


def _event(name: str, data: dict) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class Encoder:
    """Stream events → Anthropic SSE events. Blocks are numbered in order; a block is
    closed before the next one opens; `message_delta` (stop reason, cumulative usage)
    and `message_stop` are written at the end, when the usage is known."""

    __slots__ = ("id", "model", "usage", "stop", "_open", "_index", "_started")

    def __init__(self, model: str):
        self.id = ""
        self.model = model
        self.usage: Usage | None = None
        self.stop = "end_turn"
        self._open: Any = None        # key of the open block
        self._index = -1
        self._started = False

    def _start(self, rid: str = "", model: str = "") -> bytes:
        self._started = True
        if rid:
            self.id = _msg_id(rid)
        elif not self.id:
            import os
            self.id = "msg_" + os.urandom(12).hex()
        if model:
            self.model = model
        return _event("message_start", {"type": "message_start", "message": {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": usage_json(self.usage or Usage())}})

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        self._open = None
        return _event("content_block_stop", {"type": "content_block_stop", "index": self._index})

    def _open_block(self, key: Any, block: dict) -> bytes:
        out = self._close()
        self._open = key
        self._index += 1
        return out + _event("content_block_start", {"type": "content_block_start", "index": self._index,
                                                    "content_block": block})

    def feed(self, ev: tuple) -> bytes:
        kind = ev[0]
        out = b"" if self._started or kind in ("start", "error") else self._start()
        if kind == "text":
            if self._open != ev[1]:
                out += self._open_block(ev[1], {"type": "text", "text": ""})
            return out + _event("content_block_delta", {"type": "content_block_delta", "index": self._index,
                                                        "delta": {"type": "text_delta", "text": ev[2]}})
        if kind == "args":
            if self._open != ev[1]:
                return out
            return out + _event("content_block_delta", {"type": "content_block_delta", "index": self._index,
                                                        "delta": {"type": "input_json_delta", "partial_json": ev[2]}})
        if kind == "start":
            return b"" if self._started else self._start(ev[1], ev[2])
        if kind == "tool":
            return out + self._open_block(ev[1], {"type": "tool_use", "id": ev[2], "name": ev[3], "input": {}})
        if kind == "stop":
            self.stop = ev[1]
            return out
        if kind == "usage":
            self.usage = ev[1]
            return out
        if kind == "error":
            return out + _event("error", {"type": "error", "error": {"type": ev[1], "message": ev[2]}})
        return out

    def finish(self) -> bytes:
        out = b"" if self._started else self._start()
        out += self._close()
        out += _event("message_delta", {"type": "message_delta",
                                        "delta": {"stop_reason": self.stop, "stop_sequence": None},
                                        "usage": usage_json(self.usage or Usage())})
        return out + _event("message_stop", {"type": "message_stop"})


# -- provider side -------------------------------------------------------------------------
def render_request(ch: Chat, model: str) -> dict:
    msgs = []
    for m in ch.messages:
        blocks = []
        for b in m["content"]:
            if b["type"] == "tool_result":
                r = {"type": "tool_result", "tool_use_id": b["tool_use_id"], "content": b["content"]}
                if b.get("is_error"):
                    r["is_error"] = True
                blocks.append(r)
            else:
                blocks.append(b)
        msgs.append({"role": m["role"], "content": blocks})
    body: dict[str, Any] = {"model": model, "max_tokens": ch.max_tokens or DEFAULT_MAX_TOKENS, "messages": msgs}
    if ch.system:
        body["system"] = "\n\n".join(ch.system)
    if ch.tools:
        body["tools"] = [{"name": t["name"], "description": t["description"], "input_schema": t["schema"]}
                         for t in ch.tools]
    tc = ch.tool_choice
    if tc is not None:
        body["tool_choice"] = {"type": "tool", "name": tc["name"]} if isinstance(tc, dict) else {"type": tc}
    if ch.temperature is not None:
        body["temperature"] = ch.temperature
    if ch.top_p is not None:
        body["top_p"] = ch.top_p
    if ch.stop:
        body["stop_sequences"] = ch.stop
    if ch.stream:
        body["stream"] = True
    return body


def parse_response(body: Any) -> Reply:
    try:
        if body.get("type") != "message":
            raise KeyError("type")
        content = []
        for b in body["content"]:
            if b["type"] == "text":
                content.append({"type": "text", "text": b["text"]})
            elif b["type"] == "tool_use":
                content.append({"type": "tool_use", "id": b["id"], "name": b["name"], "input": b.get("input") or {}})
        return Reply(str(body.get("id") or ""), str(body.get("model") or ""), content,
                     body.get("stop_reason") or "end_turn", from_anthropic(body.get("usage")))
    except (KeyError, TypeError, AttributeError) as exc:
        raise ProviderError(f"not an Anthropic message: {type(exc).__name__}") from None


class Decoder:
    """One SSE event of an Anthropic stream (its data) → stream events."""

    __slots__ = ("tally", "_done")

    def __init__(self) -> None:
        self.tally = AnthropicTally()
        self._done = False

    def feed(self, data: str) -> list[tuple]:
        try:
            ev = orjson.loads(data)
            kind = ev["type"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise ProviderError("an Anthropic stream event is not a JSON object with a type") from None
        if kind == "content_block_delta":
            d = ev.get("delta") or {}
            dt = d.get("type")
            if dt == "text_delta":
                return [("text", ev.get("index"), d.get("text") or "")]
            if dt == "input_json_delta":
                return [("args", ev.get("index"), d.get("partial_json") or "")]
            return []
        if kind == "content_block_start":
            b = ev.get("content_block") or {}
            if b.get("type") == "tool_use":
                return [("tool", ev.get("index"), b.get("id") or "", b.get("name") or "")]
            if b.get("type") == "text" and b.get("text"):
                return [("text", ev.get("index"), b["text"])]
            return []
        if kind == "message_start":
            m = ev.get("message") or {}
            self.tally.update(m.get("usage"))
            return [("start", str(m.get("id") or ""), str(m.get("model") or ""))]
        if kind == "message_delta":
            self.tally.update(ev.get("usage"))
            reason = (ev.get("delta") or {}).get("stop_reason")
            out = [("stop", reason)] if reason else []
            u = self.tally.usage()
            if u is not None:
                out.append(("usage", u))
            return out
        if kind == "message_stop":
            self._done = True
            return [("done",)]
        if kind == "error":
            e = ev.get("error") or {}
            return [("error", str(e.get("type") or "error"), str(e.get("message") or ""))]
        return []      # ping, content_block_stop, unknown future events
