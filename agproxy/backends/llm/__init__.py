"""LLM provider groups: one route, several providers, failover, usage metrics.

Theory of operation: a client speaks one of two APIs to the gateway, OpenAI Chat
Completions (`/v1/chat/completions`) or Anthropic Messages (`/v1/messages`); a
group's providers speak OpenAI, Anthropic or Bedrock Converse. The modules:

- `chat`: the neutral form a request, an answer and a stream event take between
  two wire formats (blocks of text / tool use / tool result, stop reasons in
  Anthropic's vocabulary) and the errors of translation;
- `usage`: token counts per provider kind, `input` including cached tokens
  (OpenTelemetry GenAI conventions);
- `openai`, `anthropic`, `bedrock`: one module per wire format, each parsing and
  writing requests, answers and stream events of its API (pure functions and small
  stateful stream decoders/encoders, no I/O);
- `translate`: which of those a client API and a provider kind need; when both
  speak the same format the body passes through with only the model replaced,
  and a stream is observed for usage, not re-encoded;
- `eviction`: per-process provider health (consecutive failures, eviction with
  doubling backoff, probe on restore) and the selection order for one request;
- `health`: the CEL `health` expression over a provider's answer;
- `providers`: how a request reaches each provider kind (URL, API key from the
  environment, Anthropic headers, Bedrock SigV4) through the upstream pool;
- `group`: the `llm_group` backend tying them together.
"""
