"""Hostile input against the `llm_group` backend through the real gateway, in front of the
fake providers (tests/support/llm_fakes.py): malformed client bodies that the gateway
translates get the API's 400, never a 500 or a request to a provider."""

from __future__ import annotations

import json

import pytest

from tests.support.gateway import GatewayProcess
from tests.support.llm_fakes import ANTHROPIC_KEY, OPENAI_KEY, FakeProvider
from tests.support.strict_client import request

CONFIG = """
[[route]]
name = "llm"
match = {{ path_prefix = "/v1" }}
backend = "llm"

[backend.llm]
type = "llm_group"
models = ["smart"]

[[backend.llm.provider]]
name = "claude"
kind = "anthropic"
url = "{url}"
api_key_env = "TEST_ANTHROPIC_KEY"
models = {{ smart = "claude-sonnet-4-5" }}

[[route]]
name = "llm-openai"
match = {{ path_prefix = "/oa/v1" }}
backend = "llm_oa"

[backend.llm_oa]
type = "llm_group"
models = ["smart"]

[[backend.llm_oa.provider]]
name = "gpt"
kind = "openai"
url = "{oa_url}"
api_key_env = "TEST_OPENAI_KEY"
models = {{ smart = "gpt-4o-mini" }}
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    fake = FakeProvider("anthropic").start()
    oa = FakeProvider("openai").start()
    gw = GatewayProcess(CONFIG.format(url=fake.url, oa_url=oa.url), tmp_path_factory.mktemp("llm-hostile"),
                        env={"TEST_ANTHROPIC_KEY": ANTHROPIC_KEY, "TEST_OPENAI_KEY": OPENAI_KEY})
    yield gw, fake, oa
    gw.stop()
    fake.stop()
    oa.stop()


HI = [{"role": "user", "content": "hi"}]
BAD = [
    ("/v1/chat/completions", {"model": "smart", "messages": HI, "tools": 1}),
    ("/v1/chat/completions", {"model": "smart", "messages": HI, "tools": {"a": 1}}),
    ("/v1/chat/completions", {"model": "smart", "messages": [{"role": "assistant", "content": "x", "tool_calls": 5}]}),
    ("/v1/chat/completions", {"model": "smart", "messages": HI, "stop": [{"x": 1}]}),
    ("/v1/chat/completions", {"model": "smart", "messages": HI, "tool_choice": {"function": [True]}}),
    # Anthropic Messages translated for an OpenAI provider
    ("/oa/v1/messages", {"model": "smart", "max_tokens": 10, "messages": HI, "tools": -1}),
    ("/oa/v1/messages", {"model": "smart", "max_tokens": 10, "messages": HI, "tools": "abc"}),
]


@pytest.mark.parametrize("path,body", BAD, ids=[f"{p.rsplit('/', 1)[1]}-{i}" for i, (p, _) in enumerate(BAD)])
def test_malformed_body_is_a_400_in_the_clients_api(world, path, body):
    """A body the gateway translates is read by the gateway: a field of the wrong type
    (`tools: 1`, `tool_calls: 5`) raised TypeError inside the translation, a 500 (and the
    exception escaped after a restored provider's probe slot was taken)."""
    gw, fake, oa = world
    before = len(fake.requests) + len(oa.requests)
    r = request(gw.port, path, {"content-type": "application/json"}, "POST", json.dumps(body).encode())
    assert r.status == 400, r
    doc = r.json()
    if path.endswith("/messages"):
        assert doc["type"] == "error" and doc["error"]["type"] == "invalid_request_error"
    else:
        assert doc["error"]["type"] == "invalid_request_error"
    assert len(fake.requests) + len(oa.requests) == before


BROKEN_CONFIG = """
[[route]]
name = "llm"
match = {{ path_prefix = "/v1" }}
backend = "llm"

[backend.llm]
type = "llm_group"
models = ["smart"]

[[backend.llm.provider]]
name = "broken"
kind = "openai_compatible"
url = "{broken}"
priority = 0
models = {{ smart = "m" }}

[[backend.llm.provider]]
name = "gpt"
kind = "openai"
url = "{good}"
api_key_env = "TEST_OPENAI_KEY"
priority = 1
models = {{ smart = "gpt-4o-mini" }}
"""


@pytest.mark.parametrize("event", [b'{"choices": 5}', b'{"choices": [7]}', b'{"choices": [{"delta": {"tool_calls": 3}}]}',
                                   b"x" * (5 * 1024 * 1024)], ids=["choices-int", "choice-int", "tool-calls-int",
                                                                   "event-over-4MB"])
def test_malformed_provider_stream_event_is_a_provider_failure(tmp_path, event):
    """A provider stream event that is JSON but not of the API's shape (`choices: 5`) raised
    TypeError/AttributeError in the decoder, and an event over the SSE splitter's 4 MB bound
    raised SseError: a 500 with no verdict on the provider and no failover. Both are an
    invalid stream: unhealthy, and the next provider answers."""
    from tests.support.strict_http import Conn, Request, StrictHTTPServer

    def answer(req: Request, conn: Conn) -> None:
        conn.start_chunked(200, [("content-type", "text/event-stream")])
        conn.send_chunk(b"data: " + event + b"\n\n")
        conn.end_chunked()

    broken = StrictHTTPServer(answer, name="broken-llm").start()
    good = FakeProvider("openai").start()
    gw = GatewayProcess(BROKEN_CONFIG.format(broken=broken.url, good=good.url), tmp_path,
                        env={"TEST_OPENAI_KEY": OPENAI_KEY})
    try:
        body = {"model": "smart", "messages": HI, "stream": True}
        r = request(gw.port, "/v1/chat/completions", {"content-type": "application/json"}, "POST",
                    json.dumps(body).encode())
        metrics = gw.metrics()
    finally:
        gw.stop()
        good.stop()
        broken.stop()
    assert r.status == 200, r
    assert b"Hello from the fake." in r.body.replace(b'"', b"").replace(b"\\", b"") or b"Hello" in r.body
    assert len(good.requests) == 1
    assert 'agproxy_llm_failovers_total{group="llm",provider="broken"} 1.0' in metrics


TOKENS_CONFIG = """
[[route]]
name = "llm"
match = {{ path_prefix = "/v1" }}
backend = "llm"

[[route.rate_limit.local]]
capacity = 30
refill = {{ tokens = 1, every = "1h" }}
unit = "tokens"

[backend.llm]
type = "llm_group"
models = ["smart"]

[[backend.llm.provider]]
name = "gpt"
kind = "openai"
url = "{url}"
api_key_env = "TEST_OPENAI_KEY"
models = {{ smart = "gpt-4o-mini" }}
"""


def _tokens_gateway(tmp_path, fake) -> GatewayProcess:
    return GatewayProcess(TOKENS_CONFIG.format(url=fake.url), tmp_path, env={"TEST_OPENAI_KEY": OPENAI_KEY})


def test_token_rate_limit_charges_the_llm_groups_usage(tmp_path):
    """`unit = "tokens"` charges the usage the exchange's LLM record reports; the llm_group
    backend never filled that record (`ex.llm`), so every request was charged 0 tokens and
    the limit never refused anything. 20 input + 9 output tokens a request, capacity 30:
    the third request is refused."""
    fake = FakeProvider("openai").start()        # usage: 20 input, 9 output
    gw = _tokens_gateway(tmp_path, fake)
    body = json.dumps({"model": "smart", "messages": HI}).encode()
    try:
        statuses = [request(gw.port, "/v1/chat/completions", {"content-type": "application/json"}, "POST",
                            body).status for _ in range(3)]
    finally:
        gw.stop()
        fake.stop()
    assert statuses == [200, 200, 429]
    assert len(fake.requests) == 2


def test_token_rate_limit_charges_a_stream_the_client_cut(tmp_path):
    """OpenAI streams report usage in their last chunk only: a client that reads the answer
    and disconnects before that chunk was charged nothing, so cutting every stream just
    before its end was a way around any token limit. An unfinished stream is charged
    what the request could have cost (its input and its max_tokens)."""
    import socket
    from tests.support.strict_client import read_response
    fake = FakeProvider("openai", stream_delay=0.2).start()
    gw = _tokens_gateway(tmp_path, fake)
    body = json.dumps({"model": "smart", "messages": HI, "stream": True, "max_tokens": 100}).encode()
    try:
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                      b"content-length: %d\r\n\r\n" % len(body) + body)
            assert s.recv(65536).startswith(b"HTTP/1.1 200")      # the head and the first event
        fake.client_gone.wait(10)
        after = request(gw.port, "/v1/chat/completions", {"content-type": "application/json"}, "POST",
                        json.dumps({"model": "smart", "messages": HI}).encode())
    finally:
        gw.stop()
        fake.stop()
    assert after.status == 429, "a cut stream cost no tokens"
