"""The neutral form of a chat request, an answer and a stream, between wire formats.

A request (`Chat`) is a system prompt (a list of texts), a list of messages
(`role` "user" or "assistant", `content` a list of blocks), tools, a tool choice
and sampling options. Blocks are small dicts, Anthropic-shaped because Anthropic
and Bedrock are block-based and OpenAI maps onto blocks without loss:

    {"type": "text", "text": str}
    {"type": "tool_use", "id": str, "name": str, "input": dict}
    {"type": "tool_result", "tool_use_id": str, "content": str, "is_error": bool}

Consecutive messages of one role are merged (Bedrock requires alternating roles;
OpenAI's several `tool` messages answering one turn become one user turn of
results). Tools are `{"name", "description", "schema"}`; the tool choice is None,
"auto", "any", "none" or `{"name": ...}`.

An answer (`Reply`) has an id, the model that answered, content blocks, a stop
reason and usage. Stop reasons use Anthropic's words: end_turn, max_tokens,
stop_sequence, tool_use, pause_turn, refusal (a content filter).

A stream is a sequence of plain tuples (cheaper than objects per delta):

    ("start", id, model)        the answer began
    ("text", key, text)         text for the content block `key`
    ("tool", key, id, name)     a tool call begins as block `key`
    ("args", key, json_part)    a fragment of that call's JSON arguments
    ("stop", reason)            why generation stopped
    ("usage", Usage)            token counts (possibly more than once: the last wins)
    ("error", type, message)    the provider reported an error inside the stream
    ("done",)                   the provider ended the stream cleanly

`key` identifies a block across deltas; encoders number blocks themselves.

`BadRequest` is the client's fault (400 in the client's API format, no provider
sees the request); `ProviderError` is an answer the gateway cannot read (it
counts as unhealthy).
"""

from __future__ import annotations

from typing import Any

from agproxy.backends.llm.usage import Usage

STOP_REASONS = ("end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn", "refusal")


class BadRequest(ValueError):
    """The client's request cannot be served: status and an error type of the client's API."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request"):
        super().__init__(message)
        self.status = status
        self.kind = kind          # invalid_request | not_found | too_large


class ProviderError(ValueError):
    """A provider's answer is not what its API promises (unparsable, wrong shape)."""


class Chat:
    __slots__ = ("model", "system", "messages", "tools", "tool_choice", "max_tokens", "temperature",
                 "top_p", "stop", "stream", "include_usage")

    def __init__(self, model: str):
        self.model = model
        self.system: list[str] = []
        self.messages: list[dict] = []
        self.tools: list[dict] = []
        self.tool_choice: Any = None
        self.max_tokens: int | None = None
        self.temperature: float | None = None
        self.top_p: float | None = None
        self.stop: list[str] = []
        self.stream = False
        self.include_usage = False      # OpenAI clients: they asked for the usage chunk

    def add(self, role: str, blocks: list[dict]) -> None:
        """Append blocks as a turn of `role`, merged into the previous turn of the same role."""
        if not blocks:
            return
        msgs = self.messages
        if msgs and msgs[-1]["role"] == role:
            msgs[-1]["content"].extend(blocks)
        else:
            msgs.append({"role": role, "content": list(blocks)})


class Reply:
    __slots__ = ("id", "model", "content", "stop_reason", "usage")

    def __init__(self, id: str, model: str, content: list[dict], stop_reason: str, usage: Usage | None):
        self.id = id
        self.model = model
        self.content = content
        self.stop_reason = stop_reason
        self.usage = usage

    def text(self) -> str:
        return "".join(b["text"] for b in self.content if b["type"] == "text")

    def tool_uses(self) -> list[dict]:
        return [b for b in self.content if b["type"] == "tool_use"]


def text_of(content: Any, where: str) -> str:
    """A string, or a list of text parts ({"type": "text", "text"}), as one string."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"{where}: only text content can be translated for this provider")
            out.append(part["text"])
        return "\n".join(out) if len(out) > 1 else (out[0] if out else "")
    raise BadRequest(f"{where}: content must be a string or a list of content parts")


def number(body: dict, key: str, kind: type = float) -> Any:
    v = body.get(key)
    if v is None:
        return None
    if kind is int:
        if type(v) is not int or v < 1:
            raise BadRequest(f"'{key}' must be a positive integer")
        return v
    if type(v) not in (int, float):
        raise BadRequest(f"'{key}' must be a number")
    return v


def array(doc: dict, key: str, where: str) -> list:
    """`doc[key]` when it is a list, [] when absent or null, else BadRequest (400)."""
    v = doc.get(key)
    if v is None:
        return []
    if type(v) is not list:
        raise BadRequest(f"'{where}' must be an array")
    return v


def stop_list(v: Any, key: str) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return list(v)
    raise BadRequest(f"'{key}' must be a string or a list of strings")
