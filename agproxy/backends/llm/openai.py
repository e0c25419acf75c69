"""OpenAI Chat Completions: requests, answers, stream chunks and errors.

Client side: `parse_request` reads a client's body into a `Chat` (system and
developer messages → the system prompt, `tool_calls` → tool_use blocks, `tool`
messages → tool results), `render_response` / `Encoder` write an answer or a
stream back as OpenAI does (`chat.completion`, `chat.completion.chunk` lines,
`data: [DONE]`; the usage chunk with `choices: []` only when the client asked
for it with `stream_options.include_usage`). Provider side: `render_request`,
`parse_response`, `Decoder` (one SSE event's data at a time).

`check_request` is the cheap validation of the pass-through path (an OpenAI
client to an OpenAI provider: the body is forwarded with its model replaced and
is not translated).
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from agproxy.backends.llm import chat as c
from agproxy.backends.llm.chat import BadRequest, Chat, ProviderError, Reply
from agproxy.backends.llm.usage import Usage, from_openai

_FINISH_IN = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
              "content_filter": "refusal"}
_FINISH_OUT = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
               "pause_turn": "stop", "refusal": "content_filter"}


# -- client side ---------------------------------------------------------------------------
def check_request(body: Any) -> str:
    """The model a pass-through body asks for; BadRequest when it is not a chat request."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("you must provide a model parameter")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("'messages' must be a non-empty array")
    return model


def parse_request(body: Any) -> Chat:
    model = check_request(body)
    ch = Chat(model)
    for i, m in enumerate(body["messages"]):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object")
        role = m.get("role")
        where = f"messages[{i}].content"
        if role in ("system", "developer"):
            ch.system.append(c.text_of(m.get("content"), where))
        elif role == "user":
            text = c.text_of(m.get("content"), where)
            ch.add("user", [{"type": "text", "text": text}] if text else [])
        elif role == "assistant":
            blocks: list[dict] = []
            text = c.text_of(m.get("content"), where)
            if text:
                blocks.append({"type": "text", "text": text})
            for j, tc in enumerate(c.array(m, "tool_calls", f"messages[{i}].tool_calls")):
                fn = tc.get("function") if isinstance(tc, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(tc.get("id"), str):
                    raise BadRequest(f"messages[{i}].tool_calls[{j}]: id and function.name are required")
                try:
                    args = orjson.loads(fn.get("arguments") or "{}")
                except orjson.JSONDecodeError:
                    raise BadRequest(f"messages[{i}].tool_calls[{j}].function.arguments is not JSON") from None
                blocks.append({"type": "tool_use", "id": tc["id"], "name": fn["name"],
                               "input": args if isinstance(args, dict) else {"value": args}})
            ch.add("assistant", blocks)
        elif role == "tool":
            tid = m.get("tool_call_id")
            if not isinstance(tid, str):
                raise BadRequest(f"messages[{i}].tool_call_id is required")
            ch.add("user", [{"type": "tool_result", "tool_use_id": tid,
                             "content": c.text_of(m.get("content"), where), "is_error": False}])
        else:
            raise BadRequest(f"messages[{i}].role {role!r} is not one of system, developer, user, assistant, tool")
    for j, t in enumerate(c.array(body, "tools", "tools")):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise BadRequest(f"tools[{j}]: only function tools with a name can be translated")
        ch.tools.append({"name": fn["name"], "description": fn.get("description") or "",
                         "schema": fn.get("parameters") or {"type": "object", "properties": {}}})
    tc = body.get("tool_choice")
    if isinstance(tc, str):
        ch.tool_choice = {"auto": "auto", "none": "none", "required": "any"}.get(tc)
        if ch.tool_choice is None:
            raise BadRequest("tool_choice must be auto, none, required or a function")
    elif isinstance(tc, dict):
        fn = tc.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise BadRequest("tool_choice.function.name is required")
        ch.tool_choice = {"name": name}
    ch.max_tokens = c.number(body, "max_completion_tokens", int) or c.number(body, "max_tokens", int)
    ch.temperature = c.number(body, "temperature")
    ch.top_p = c.number(body, "top_p")
    ch.stop = c.stop_list(body.get("stop"), "stop")
    ch.stream = bool(body.get("stream"))
    so = body.get("stream_options")
    ch.include_usage = bool(isinstance(so, dict) and so.get("include_usage"))
    return ch


def usage_json(u: Usage) -> dict:
    return {"prompt_tokens": u.input, "completion_tokens": u.output, "total_tokens": u.input + u.output,
            "prompt_tokens_details": {"cached_tokens": u.cache_read}}


def _chat_id(rid: str) -> str:
    return rid if rid.startswith("chatcmpl-") else "chatcmpl-" + rid


def render_response(r: Reply) -> dict:
    text = r.text()
    msg: dict[str, Any] = {"role": "assistant", "content": text or None, "refusal": None}
    uses = r.tool_uses()
    if uses:
        msg["tool_calls"] = [{"id": b["id"], "type": "function",
                              "function": {"name": b["name"], "arguments": orjson.dumps(b["input"]).decode()}}
                             for b in uses]
    out = {"id": _chat_id(r.id), "object": "chat.completion", "created": int(time.time()), "model": r.model,
           "choices": [{"index": 0, "message": msg, "logprobs": None,
                        "finish_reason": _FINISH_OUT.get(r.stop_reason, "stop")}]}
    if r.usage is not None:
        out["usage"] = usage_json(r.usage)
    return out


_ERROR_TYPES = {"invalid_request": "invalid_request_error", "not_found": "invalid_request_error",
                "too_large": "invalid_request_error", "unavailable": "server_error", "upstream": "server_error",
                "rate_limit": "rate_limit_exceeded", "auth": "invalid_request_error"}


def error_body(kind: str, message: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(kind, "server_error"), "param": None,
                      "code": code if code is not None else ("model_not_found" if kind == "not_found" else None)}}


def error_message(body: Any) -> tuple[str, str] | None:
    """(type, message) of a provider's error body, or None when it is not one."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        e = body["error"]
        return str(e.get("type") or e.get("code") or "error"), str(e.get("message") or "")
    return None


class Encoder:
    """Stream events → OpenAI `chat.completion.chunk` SSE lines, as the client expects."""

    __slots__ = ("id", "model", "created", "include_usage", "usage", "_tools", "_started")

    def __init__(self, model: str, include_usage: bool):
        self.id = "chatcmpl-"
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage
        self.usage: Usage | None = None
        self._tools: dict[Any, int] = {}
        self._started = False

    def _chunk(self, delta: dict, finish: str | None = None) -> bytes:
        c = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
             "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if self.include_usage:
            c["usage"] = None
        return b"data: " + orjson.dumps(c) + b"\n\n"

    def feed(self, ev: tuple) -> bytes:
        kind = ev[0]
        if kind == "text":
            return self._chunk({"content": ev[2]})
        if kind == "args":
            n = self._tools.get(ev[1])
            if n is None:
                return b""
            return self._chunk({"tool_calls": [{"index": n, "function": {"arguments": ev[2]}}]})
        if kind == "start":
            if self._started:
                return b""
            self._started = True
            if ev[1]:
                self.id = _chat_id(ev[1])
            if ev[2]:
                self.model = ev[2]
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "tool":
            n = self._tools[ev[1]] = len(self._tools)
            return self._chunk({"tool_calls": [{"index": n, "id": ev[2], "type": "function",
                                                "function": {"name": ev[3], "arguments": ""}}]})
        if kind == "stop":
            return self._chunk({}, _FINISH_OUT.get(ev[1], "stop"))
        if kind == "usage":
            self.usage = ev[1]
            return b""
        if kind == "error":
            return b"data: " + orjson.dumps(error_body("upstream", ev[2], ev[1])) + b"\n\n"
        return b""

    def finish(self) -> bytes:
        out = b""
        if self.include_usage and self.usage is not None:
            out = b"data: " + orjson.dumps({"id": self.id, "object": "chat.completion.chunk",
                                            "created": self.created, "model": self.model, "choices": [],
                                            "usage": usage_json(self.usage)}) + b"\n\n"
        return out + b"data: [DONE]\n\n"


# -- provider side -------------------------------------------------------------------------
def render_request(ch: Chat, model: str, *, compatible: bool = False) -> dict:
    msgs: list[dict] = []
    if ch.system:
        msgs.append({"role": "system", "content": "\n\n".join(ch.system)})
    for m in ch.messages:
        blocks = m["content"]
        if m["role"] == "user":
            for b in blocks:
                if b["type"] == "tool_result":
                    msgs.append({"role": "tool", "tool_call_id": b["tool_use_id"], "content": b["content"]})
            texts = [b["text"] for b in blocks if b["type"] == "text"]
            if texts:
                msgs.append({"role": "user", "content": texts[0] if len(texts) == 1 else
                             [{"type": "text", "text": t} for t in texts]})
        else:
            texts = [b["text"] for b in blocks if b["type"] == "text"]
            out: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts) if texts else None}
            calls = [{"id": b["id"], "type": "function",
                      "function": {"name": b["name"], "arguments": orjson.dumps(b["input"]).decode()}}
                     for b in blocks if b["type"] == "tool_use"]
            if calls:
                out["tool_calls"] = calls
            msgs.append(out)
    body: dict[str, Any] = {"model": model, "messages": msgs}
    if ch.tools:
        body["tools"] = [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                                           "parameters": t["schema"]}} for t in ch.tools]
    tc = ch.tool_choice
    if tc is not None:
        body["tool_choice"] = ({"type": "function", "function": {"name": tc["name"]}} if isinstance(tc, dict)
                               else {"any": "required"}.get(tc, tc))
    if ch.max_tokens is not None:
        body["max_tokens" if compatible else "max_completion_tokens"] = ch.max_tokens
    if ch.temperature is not None:
        body["temperature"] = ch.temperature
    if ch.top_p is not None:
        body["top_p"] = ch.top_p
    if ch.stop:
        body["stop"] = ch.stop
    if ch.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def parse_response(body: Any) -> Reply:
    try:
        choice = body["choices"][0]
        msg = choice["message"]
        content: list[dict] = []
        if msg.get("content"):
            content.append({"type": "text", "text": str(msg["content"])})
        for tc in msg.get("tool_calls") or []:
            fn = tc["function"]
            try:
                args = orjson.loads(fn.get("arguments") or "{}")
            except orjson.JSONDecodeError:
                args = {"arguments": fn.get("arguments")}
            content.append({"type": "tool_use", "id": tc["id"], "name": fn["name"],
                            "input": args if isinstance(args, dict) else {"value": args}})
        return Reply(str(body.get("id") or ""), str(body.get("model") or ""), content,
                     _FINISH_IN.get(choice.get("finish_reason") or "stop", "end_turn"), from_openai(body.get("usage")))
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise ProviderError(f"not an OpenAI chat completion: {type(exc).__name__}") from None


def check_response(body: Any) -> tuple[str, Usage | None]:
    """(model, usage) of an answer passed on as it came: what `parse_response` reads and
    checks of it (the same ProviderError for the same garbage), without building the
    neutral Reply a translation needs (~1 µs a request)."""
    try:
        choice = body["choices"][0]
        msg = choice["message"]
        msg.get("content")
        for tc in msg.get("tool_calls") or []:
            tc["function"]["name"]
            tc["id"]
        _FINISH_IN.get(choice.get("finish_reason") or "stop")
        return str(body.get("model") or ""), from_openai(body.get("usage"))
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise ProviderError(f"not an OpenAI chat completion: {type(exc).__name__}") from None


def load_chunk(data: str | bytes) -> dict:
    """One stream event's data as a chunk object; ProviderError when it is not one."""
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ProviderError("an OpenAI stream event is not JSON") from None
    if not isinstance(chunk, dict):
        raise ProviderError("an OpenAI stream event is not an object")
    return chunk


class Decoder:
    """One SSE event's `data` of an OpenAI stream → stream events."""

    __slots__ = ("_started",)

    def __init__(self) -> None:
        self._started = False

    def feed(self, data: str) -> list[tuple]:
        if data == "[DONE]":
            return [("done",)]
        chunk = load_chunk(data)
        out: list[tuple] = []
        err = error_message(chunk)
        if err is not None:
            return [("error", err[0], err[1])]
        if not self._started:
            self._started = True
            out.append(("start", str(chunk.get("id") or ""), str(chunk.get("model") or "")))
        for choice in chunk.get("choices") or ():
            d = choice.get("delta") or {}
            text = d.get("content")
            if text:
                out.append(("text", 0, text))
            for tc in d.get("tool_calls") or ():
                key = 1 + int(tc.get("index") or 0)
                fn = tc.get("function") or {}
                if tc.get("id"):
                    out.append(("tool", key, tc["id"], fn.get("name") or ""))
                if fn.get("arguments"):
                    out.append(("args", key, fn["arguments"]))
            fr = choice.get("finish_reason")
            if fr:
                out.append(("stop", _FINISH_IN.get(fr, "end_turn")))
        u = chunk.get("usage")
        if u:
            out.append(("usage", from_openai(u)))
        return out
