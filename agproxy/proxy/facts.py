"""Typed facts an exchange collects: what policies and backends learn about a request.

Theory of operation: the Exchange holds these in typed slots (`ex.mcp`, an
`agproxy.mcp.call.McpRequest`: the parsed JSON-RPC body and its calls, set by the MCP
policies and backends; `ex.llm`, and `ex.attempts`; the verified identity is `ex.jwt_claims` / `ex.jwt_token` /
`ex.jwt_provider`, the exchanged token `ex.obo_token`) instead of a string-keyed
dict, so a reader finds who writes a fact by its name and a typo is an
AttributeError, not a silent miss. A module that fills `ex.mcp` also hands CEL its
view (`ex.add_cel_variable("mcp", call.cel)`), since only then does a request pay for
building it; CEL's `llm` is the exchange's own, `ex.llm.cel()` (an empty map
without one).
"""

from __future__ import annotations

from typing import NamedTuple


class Attempt(NamedTuple):
    """One call to an upstream, recorded once its head arrived or it failed.

    Recorded with `ex.add_attempt(...)` by `backends/relay.py` (or any backend that
    calls out), read by accounting (the access log's `upstream` / `upstream_ms`,
    the upstream duration histogram by `backend`) and by failover logic through
    `ex.attempts`. The exchange keeps the plain tuples (fields in this order) and
    builds these only for readers: a per-request object cost ~1,000 instructions
    more than the tuple (callgrind), a record of what happened has no reason to
    change, and most exchanges are only ever read by accounting.
    """

    backend: str                # the backend's config name (metric label)
    upstream: str               # host:port called
    provider: str | None        # the LLM provider within a group, when there is one
    start: float                # time.monotonic() when the call began
    status: int                 # the upstream's status, 0 if no head arrived
    seconds: float              # time to the response head, or to the failure
    error: str | None           # why it failed, or None


class LlmCall:
    """The LLM call of a request: what was asked, who answered, what it cost."""

    __slots__ = ("provider", "model", "response_model", "streaming", "input_tokens", "output_tokens",
                 "cache_read_tokens", "cache_write_tokens")

    def __init__(self, provider: str = "", model: str = "", streaming: bool = False):
        self.provider = provider
        self.model = model
        self.response_model: str | None = None
        self.streaming = streaming
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.cache_read_tokens: int | None = None
        self.cache_write_tokens: int | None = None

    def cel(self) -> dict:
        return {"provider": self.provider, "model": self.model, "streaming": self.streaming}
