"""Response body hooks: the chain the exchange feeds, and an SSE-event hook.

Theory of operation: the response filters of a route run in reverse order (the
one nearest the backend first) and each may return a `BodyHook`; the hooks are
chained in that same order, so each sees what the previous one let through and
the client sees what the last one returned. `HookChain.transforms` is true when
any hook may change bytes: the exchange then drops `content-length` and the
server adapter re-frames (chunked on HTTP/1.1, plain DATA frames on HTTP/2).
When every hook only observes, chunks reach the client as the same objects the
upstream delivered and the length stays.

Content coding: hooks read the body as sent, so a route whose filters declare
`reads_response_body` asks the upstream for `accept-encoding: identity`, and a
response that arrives encoded anyway while a hook wants it is refused (502): the
gateway does not decode. Decoding would cost CPU on every byte, need a budget
against decompression bombs, and either send the client a body bigger than it
asked for or re-encode it; identity costs the upstream nothing, and the streams
hooks care about (SSE from agents, MCP servers and LLM providers) are seldom
compressed.
"""

from __future__ import annotations

from typing import Callable

from agproxy.http.messages import Headers
from agproxy.http.sse import MAX_EVENT, SseSplitter
from agproxy.proxy.contract import BodyHook


class HookChain:
    __slots__ = ("hooks", "transforms")

    def __init__(self, hooks: list[BodyHook]):
        self.hooks = tuple(hooks)
        self.transforms = any(h.transforms for h in hooks)

    def feed(self, chunk: bytes) -> bytes:
        data = chunk
        for h in self.hooks:
            if h.transforms:
                data = h.feed(data) or b""
                if not data:
                    break
            else:
                h.feed(data)
        return data

    def end(self) -> bytes:
        out = b""
        for h in self.hooks:
            if h.transforms:
                if out:
                    out = h.feed(out) or b""
                tail = h.end()
                if tail:
                    out = out + tail if out else tail
            else:
                if out:
                    h.feed(out)
                h.end()
        return out


def content_coding(headers: Headers) -> str | None:
    """The response's content coding when it is not identity, else None."""
    enc = headers.get("content-encoding")
    if enc is None:
        return None
    enc = enc.strip().lower()
    return None if enc in ("", "identity") else enc


class SseHook(BodyHook):
    """A transforming hook that works per server-sent event.

    `on_event(raw)` gets each complete event as raw bytes (http/sse.py: `parse` /
    `format_event` read and write one) and returns what to send instead: the same
    bytes to keep it, b"" to drop it. An unterminated last event is passed on as it
    came (a client discards it); an event over `max_event` bytes fails the stream.
    """

    __slots__ = ("_split", "_on_event")

    transforms = True

    def __init__(self, on_event: Callable[[bytes], bytes], max_event: int = MAX_EVENT):
        self._split = SseSplitter(max_event)
        self._on_event = on_event

    def feed(self, chunk: bytes) -> bytes:
        events = self._split.feed(chunk)
        if not events:
            return b""
        on_event = self._on_event
        if len(events) == 1:
            return on_event(events[0])
        return b"".join([on_event(e) for e in events])

    def end(self) -> bytes:
        return self._split.end()
