"""The exchange's LLM record (`ex.llm`) for an llm_group request: what policies read.

Theory of operation: `[route.rate_limit]` limits with `unit = "tokens"` charge the
usage of `ex.llm` (input + output tokens) from a completion hook that the filter
registered before the backend ran, so it runs before the group's own completion
hook. `UsageRecord` is therefore a live view of the group's call, not a copy: its
token counts are read from the call (the JSON answer's usage, or the stream
translator's) at the moment a policy asks.

A stream that did not finish (the client went away before the provider's last
event, which is where OpenAI reports usage, or the provider broke it) has no
complete usage, and counting what is known would make "cut every stream just
before its end" a way around any token limit. Such a call counts what it could
have cost: at least its input (the body's size / 4, the usual bytes-per-token
estimate) and at least its `max_tokens` / `max_completion_tokens` of output.

It is also CEL's `llm` (the exchange's provider calls `cel()`, only when an
expression reads it), and its other fields are read off the call when asked: made
per request, it sets two slots (the eager copy cost ~3k instructions a request).
"""

from __future__ import annotations

from typing import Any, Callable

from agproxy.proxy.facts import LlmCall


class UsageRecord(LlmCall):
    __slots__ = ("_call", "_body_bytes", "_view")

    def __init__(self, call: Any, body_bytes: int, view: Callable[[Any], dict]):
        self._call = call
        self._body_bytes = body_bytes
        self._view = view       # the group's CEL view of a call

    def cel(self) -> dict:
        return self._view(self._call)

    @property
    def provider(self) -> str:                     # type: ignore[override]
        p = self._call.provider
        return p.name if p is not None else ""

    @property
    def model(self) -> str:                        # type: ignore[override]
        return self._call.creq.model

    @property
    def response_model(self) -> str | None:        # type: ignore[override]
        return self._call.response_model

    @property
    def streaming(self) -> bool:                   # type: ignore[override]
        return self._call.creq.stream

    def _counts(self) -> tuple[int, int, int, int]:
        call = self._call
        tr = call.tr
        u = tr.usage if tr is not None else call.usage
        counts = (u.input, u.output, u.cache_read, u.cache_write) if u is not None else (0, 0, 0, 0)
        if tr is None or tr.complete:
            return counts
        body = call.creq.body
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        most = limit if type(limit) is int and limit > 0 else 0
        return (max(counts[0], self._body_bytes // 4), max(counts[1], most), counts[2], counts[3])

    @property
    def input_tokens(self) -> int | None:          # type: ignore[override]
        return self._counts()[0] if self._call.provider is not None else None

    @property
    def output_tokens(self) -> int | None:         # type: ignore[override]
        return self._counts()[1] if self._call.provider is not None else None

    @property
    def cache_read_tokens(self) -> int | None:     # type: ignore[override]
        return self._counts()[2] if self._call.provider is not None else None

    @property
    def cache_write_tokens(self) -> int | None:    # type: ignore[override]
        return self._counts()[3] if self._call.provider is not None else None
