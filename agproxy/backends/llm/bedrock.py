"""Amazon Bedrock Converse / ConverseStream: requests, answers, the event stream.

Clients never speak Bedrock to the gateway; only the provider side is here.
`render_request` gives the path (`/model/{modelId}/converse` or
`/converse-stream`, the model id percent-encoded whole: `:` → `%3A`) and the body
(`messages` with one member per content block, `system`, `inferenceConfig`,
`toolConfig`). Roles must alternate starting with the user: `Chat` merges
consecutive turns of one role, and a conversation that starts with the assistant
is a BadRequest.

`Decoder` turns the AWS event-stream framing into stream events with botocore's
`EventStreamBuffer` (prelude and message CRCs checked; a frame that fails them is a
ProviderError). Each message has `:message-type` event (with `:event-type`
messageStart, contentBlockStart, contentBlockDelta, contentBlockStop, messageStop,
metadata) or exception (`:exception-type`); payloads are JSON (with a padding
member "p", ignored).
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote

import orjson
from botocore.eventstream import EventStreamBuffer, ParserError

from agproxy.backends.llm.chat import BadRequest, Chat, ProviderError, Reply
from agproxy.backends.llm.usage import from_bedrock

_STOP_IN = {"end_turn": "end_turn", "tool_use": "tool_use", "max_tokens": "max_tokens",
            "stop_sequence": "stop_sequence", "guardrail_intervened": "refusal", "content_filtered": "refusal",
            "model_context_window_exceeded": "max_tokens"}


def path(model: str, stream: bool) -> str:
    return f"/model/{quote(model, safe='')}/{'converse-stream' if stream else 'converse'}"


def render_request(ch: Chat, model: str) -> tuple[str, dict]:
    msgs = []
    for m in ch.messages:
        blocks = []
        for b in m["content"]:
            t = b["type"]
            if t == "text":
                blocks.append({"text": b["text"]})
            elif t == "tool_use":
                blocks.append({"toolUse": {"toolUseId": b["id"], "name": b["name"], "input": b["input"]}})
            elif t == "tool_result":
                r = {"toolUseId": b["tool_use_id"], "content": [{"text": b["content"]}]}
                if b.get("is_error"):
                    r["status"] = "error"
                blocks.append({"toolResult": r})
        msgs.append({"role": m["role"], "content": blocks})
    if not msgs or msgs[0]["role"] != "user":
        raise BadRequest("the conversation must start with a user message for this provider")
    body: dict[str, Any] = {"messages": msgs}
    if ch.system:
        body["system"] = [{"text": s} for s in ch.system]
    inf: dict[str, Any] = {}
    if ch.max_tokens is not None:
        inf["maxTokens"] = ch.max_tokens
    if ch.temperature is not None:
        inf["temperature"] = ch.temperature
    if ch.top_p is not None:
        inf["topP"] = ch.top_p
    if ch.stop:
        inf["stopSequences"] = ch.stop
    if inf:
        body["inferenceConfig"] = inf
    if ch.tools:
        tc: dict[str, Any] = {"tools": [{"toolSpec": {"name": t["name"], "description": t["description"] or t["name"],
                                                      "inputSchema": {"json": t["schema"]}}} for t in ch.tools]}
        choice = ch.tool_choice
        if isinstance(choice, dict):
            tc["toolChoice"] = {"tool": {"name": choice["name"]}}
        elif choice in ("auto", "any"):
            tc["toolChoice"] = {choice: {}}
        body["toolConfig"] = tc       # "none": Converse has no such choice; tools stay declared
    return path(model, ch.stream), body


def parse_response(body: Any, model: str) -> Reply:
    try:
        content = []
        for b in body["output"]["message"]["content"]:
            if "text" in b:
                content.append({"type": "text", "text": b["text"]})
            elif "toolUse" in b:
                tu = b["toolUse"]
                content.append({"type": "tool_use", "id": tu["toolUseId"], "name": tu["name"],
                                "input": tu.get("input") or {}})
        return Reply("bedrock-" + os.urandom(12).hex(), model, content,
                     _STOP_IN.get(body.get("stopReason"), "end_turn"), from_bedrock(body.get("usage")))
    except (KeyError, TypeError, AttributeError) as exc:
        raise ProviderError(f"not a Converse answer: {type(exc).__name__}") from None


def error_message(body: Any, error_type: str | None) -> tuple[str, str] | None:
    """(type, message) of a Bedrock error: the type is in `x-amzn-errortype`."""
    if isinstance(body, dict) and isinstance(body.get("message") or body.get("Message"), str):
        return (error_type or "error").split(":")[0], body.get("message") or body["Message"]
    return None


class Decoder:
    """AWS event-stream bytes of ConverseStream → stream events."""

    __slots__ = ("model", "_buf", "_done")

    def __init__(self, model: str):
        self.model = model
        self._buf = EventStreamBuffer()
        self._done = False

    def feed(self, data: bytes) -> list[tuple]:
        self._buf.add_data(data)
        out: list[tuple] = []
        try:
            for msg in self._buf:
                out.extend(self._message(msg.headers, msg.payload))
        except ParserError as exc:
            raise ProviderError(f"a ConverseStream frame is invalid: {type(exc).__name__}") from None
        return out

    def end(self) -> list[tuple]:
        return [("done",)] if self._done else []

    def _message(self, headers: dict, payload: bytes) -> list[tuple]:
        try:
            ev = orjson.loads(payload) if payload else {}
        except orjson.JSONDecodeError:
            raise ProviderError("a ConverseStream event payload is not JSON") from None
        mtype = headers.get(":message-type")
        if mtype != "event":
            etype = headers.get(":exception-type") or headers.get(":error-code") or "error"
            return [("error", str(etype), str(ev.get("message") or headers.get(":error-message") or ""))]
        kind = headers.get(":event-type")
        if kind == "contentBlockDelta":
            d = ev.get("delta") or {}
            key = ev.get("contentBlockIndex")
            if "text" in d:
                return [("text", key, d["text"])]
            if "toolUse" in d:
                return [("args", key, (d["toolUse"] or {}).get("input") or "")]
            return []
        if kind == "contentBlockStart":
            tu = (ev.get("start") or {}).get("toolUse")
            if tu:
                return [("tool", ev.get("contentBlockIndex"), tu.get("toolUseId") or "", tu.get("name") or "")]
            return []
        if kind == "messageStart":
            return [("start", "bedrock-" + os.urandom(12).hex(), self.model)]
        if kind == "messageStop":
            return [("stop", _STOP_IN.get(ev.get("stopReason"), "end_turn"))]
        if kind == "metadata":
            self._done = True
            u = from_bedrock(ev.get("usage"))
            return [("usage", u)] if u is not None else []
        return []
