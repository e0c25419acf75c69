"""Token usage in one shape, whichever provider reported it.

`Usage.input` counts every input token, cached ones included, as the OpenTelemetry
GenAI conventions count `gen_ai.token.type = input`; `cache_read` and
`cache_write` are the parts of it read from / written to a prompt cache. The
providers disagree on that:

- OpenAI: `prompt_tokens` already includes `prompt_tokens_details.cached_tokens`
  (there is no cache-write count);
- Anthropic: `input_tokens` excludes `cache_read_input_tokens` and
  `cache_creation_input_tokens`: they are added. In a stream, `message_start`
  carries the first counts and each `message_delta` the cumulative ones (a field
  it carries replaces the earlier value; one it omits keeps it): `AnthropicTally`;
- Bedrock Converse: `inputTokens` excludes `cacheReadInputTokens` and
  `cacheWriteInputTokens` (`totalTokens` is the sum of all four): they are added.

Malformed counts (negative, not integers) read as 0: usage feeds metrics, and a
provider's typo must not fail an answer the client already has.
"""

from __future__ import annotations


class Usage:
    __slots__ = ("input", "output", "cache_read", "cache_write")

    def __init__(self, input: int = 0, output: int = 0, cache_read: int = 0, cache_write: int = 0):
        self.input = input
        self.output = output
        self.cache_read = cache_read
        self.cache_write = cache_write

    @property
    def uncached_input(self) -> int:
        return max(0, self.input - self.cache_read - self.cache_write)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Usage) and (self.input, self.output, self.cache_read, self.cache_write) == \
            (other.input, other.output, other.cache_read, other.cache_write)

    def __repr__(self) -> str:
        return (f"Usage(input={self.input}, output={self.output}, cache_read={self.cache_read}, "
                f"cache_write={self.cache_write})")


def _n(v: object) -> int:
    return v if type(v) is int and v >= 0 else 0


def from_openai(u: object) -> Usage | None:
    if not isinstance(u, dict):
        return None
    details = u.get("prompt_tokens_details")
    cached = _n(details.get("cached_tokens")) if isinstance(details, dict) else 0
    return Usage(_n(u.get("prompt_tokens")), _n(u.get("completion_tokens")), cached, 0)


def from_anthropic(u: object) -> Usage | None:
    if not isinstance(u, dict):
        return None
    cr = _n(u.get("cache_read_input_tokens"))
    cw = _n(u.get("cache_creation_input_tokens"))
    return Usage(_n(u.get("input_tokens")) + cr + cw, _n(u.get("output_tokens")), cr, cw)


def from_bedrock(u: object) -> Usage | None:
    if not isinstance(u, dict):
        return None
    cr = _n(u.get("cacheReadInputTokens"))
    cw = _n(u.get("cacheWriteInputTokens"))
    return Usage(_n(u.get("inputTokens")) + cr + cw, _n(u.get("outputTokens")), cr, cw)


_ANTHROPIC_FIELDS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")


class AnthropicTally:
    """Anthropic stream usage: `message_start`'s counts, then each `message_delta`'s
    cumulative ones (fields present replace, absent ones stay)."""

    __slots__ = ("raw",)

    def __init__(self) -> None:
        self.raw: dict[str, object] = {}

    def update(self, u: object) -> None:
        if isinstance(u, dict):
            raw = self.raw
            for k in _ANTHROPIC_FIELDS:
                v = u.get(k)
                if v is not None:
                    raw[k] = v

    def usage(self) -> Usage | None:
        return from_anthropic(self.raw) if self.raw else None
