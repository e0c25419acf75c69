"""Typed facts an exchange collects: what policies and backends learn about a request.

Theory of operation: the Exchange holds these in typed slots (`ex.attempts`,
`ex.mcp`, `ex.llm`; the verified identity is `ex.jwt_claims` / `ex.jwt_token` /
`ex.jwt_provider`, the exchanged token `ex.obo_token`) instead of a string-keyed
dict, so a reader finds who writes a fact by its name and a typo is an
AttributeError, not a silent miss. A module that fills `ex.mcp` or `ex.llm` also
hands CEL its view (`ex.add_cel_variable("mcp", call.cel)`), since only then does
a request pay for building it.
"""

from __future__ import annotations

import time


class Attempt:
    """One call to an upstream: recorded by `backends/relay.py` (or any backend that
    calls out), read by accounting (the access log's `upstream` / `upstream_ms`, the
    upstream duration histogram) and by failover logic. `seconds` is the time to the
    response head, or to the failure."""

    __slots__ = ("backend", "upstream", "provider", "start", "status", "seconds", "error")

    def __init__(self, backend: str, upstream: str, provider: str | None = None):
        self.backend = backend          # the backend's config name (metric label)
        self.upstream = upstream        # host:port called
        self.provider = provider        # LLM provider within a group, when there is one
        self.start = time.monotonic()
        self.status = 0                 # the upstream's status, 0 if no head arrived
        self.seconds: float | None = None
        self.error: str | None = None

    def answered(self, status: int) -> None:
        self.status = status
        self.seconds = time.monotonic() - self.start

    def failed(self, error: str) -> None:
        self.error = error
        self.seconds = time.monotonic() - self.start


class McpCall:
    """The MCP JSON-RPC call of a request (filled by the MCP policies and backends)."""

    __slots__ = ("method", "id", "tool", "session")

    def __init__(self, method: str, id: object = None, tool: str | None = None, session: str | None = None):
        self.method = method
        self.id = id
        self.tool = tool
        self.session = session

    def cel(self) -> dict:
        return {"method": self.method, "tool": {"name": self.tool or ""}, "session": self.session or ""}


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
