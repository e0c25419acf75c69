"""The llm_group backend through the real gateway, driven by the official openai and
anthropic SDKs (base_url = the gateway), in front of the fake providers."""

from __future__ import annotations

import json
import re
import socket
import time

import anthropic
import httpx
import openai
import pytest

from tests.support.llm_fakes import (ANTHROPIC_KEY, AWS_ACCESS_KEY, AWS_SECRET_KEY, OPENAI_KEY, FakeProvider, Fault,
                                     Usage)

ENV = {"TEST_OPENAI_KEY": OPENAI_KEY, "TEST_ANTHROPIC_KEY": ANTHROPIC_KEY, "AWS_ACCESS_KEY_ID": AWS_ACCESS_KEY,
       "AWS_SECRET_ACCESS_KEY": AWS_SECRET_KEY, "AWS_CONFIG_FILE": "/dev/null",
       "AWS_SHARED_CREDENTIALS_FILE": "/dev/null", "AWS_EC2_METADATA_DISABLED": "true"}
BEDROCK_MODEL = "anthropic.claude-3-5-sonnet-20240620-v1:0"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]

KINDS = {"openai": ("openai", "TEST_OPENAI_KEY", "gpt-4o-mini"),
         "anthropic": ("anthropic", "TEST_ANTHROPIC_KEY", "claude-sonnet-4-5"),
         "bedrock": ("bedrock", None, BEDROCK_MODEL)}


def _config(fakes: list[FakeProvider], *, eviction: str = 'duration = "30s", consecutive_failures = 1, '
                                                          'max_duration = "10m"',
            timeout: str = "2s", extra: str = "") -> str:
    out = [f'''[[route]]
name = "llm"
match = {{ path_prefix = "/v1" }}
backend = "llm"
timeout = "{timeout}"

[backend.llm]
type = "llm_group"
eviction = {{ {eviction} }}
models = ["smart"]
{extra}
''']
    for prio, f in enumerate(fakes):
        kind, env, model = KINDS[f.kind]
        out.append(f'''[[backend.llm.provider]]
name = "{f.name}"
kind = "{kind}"
url = "{f.url}"
priority = {prio}
models = {{ smart = "{model}" }}
''' + (f'api_key_env = "{env}"\n' if env else 'region = "us-east-1"\n'))
    return "\n".join(out)


@pytest.fixture
def fakes():
    started: list[FakeProvider] = []

    def make(kind: str, name: str | None = None, **kw) -> FakeProvider:
        f = FakeProvider(kind, name=name or kind, **kw).start()
        started.append(f)
        return f

    yield make
    for f in started:
        f.stop()


def _oa(gw, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url("/v1"), api_key="caller-token-not-for-providers", max_retries=0, **kw)


def _an(gw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url(""), api_key="caller-token-not-for-providers", max_retries=0)


def _metric(gw, name: str, **labels) -> float:
    total = 0.0
    for line in gw.metrics().splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _wait(cond, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.02)     # polling a condition with a deadline
    raise AssertionError(f"timed out waiting for {what}")


HI = [{"role": "user", "content": "hi"}]


def test_openai_client_served_by_primary_and_credentials_stay_apart(fakes, start_gateway):
    primary = fakes("openai", usage=Usage(input=20, output=9, cache_read=100))
    gw = start_gateway(_config([primary]), env=ENV)
    r = _oa(gw).chat.completions.create(model="smart", messages=HI)
    assert r.choices[0].message.content == "Hello from the fake."
    assert r.model == "gpt-4o-mini-2024-07-18"
    seen = primary.requests[-1]
    assert seen.header("authorization") == f"Bearer {OPENAI_KEY}"      # the gateway's key, not the caller's
    assert seen.json["model"] == "gpt-4o-mini"
    rec = gw.access_log(1)[-1]
    assert rec["llm_provider"] == "openai" and rec["llm_attempts"] == [{"provider": "openai", "status": 200}]
    assert rec["llm_usage"] == {"input": 120, "output": 9, "input_cache_read": 100, "input_cache_write": 0}
    # Streamed as is (same format); the usage chunk the gateway asked for is not the client's.
    chunks = list(_oa(gw).chat.completions.create(model="smart", messages=HI, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello from the fake."
    assert all(c.choices for c in chunks)
    assert primary.requests[-1].json["stream_options"] == {"include_usage": True}
    assert gw.access_log(2)[-1]["llm_usage"]["input_cache_read"] == 100
    logs = gw.logs() + json.dumps(gw.access_log(2)) + gw.admin_get("/config")[1].decode()
    assert OPENAI_KEY not in logs


@pytest.mark.parametrize("fault", [Fault("status", 503), Fault("status", 429, retry_after=60), Fault("reset"),
                                   Fault("hang", seconds=10), Fault("garbage"), Fault("garbage_json")],
                         ids=["503", "429", "reset", "hang", "garbage", "garbage_json"])
def test_primary_failure_falls_back_and_evicts(fakes, start_gateway, fault):
    primary = fakes("openai")
    fallback = fakes("anthropic", usage=Usage(input=20, output=9, cache_read=100, cache_write=30))
    gw = start_gateway(_config([primary, fallback], timeout="1s"), env=ENV)
    primary.faults.append(fault)
    client = _oa(gw)
    r = client.chat.completions.create(model="smart", messages=HI)
    assert r.choices[0].message.content == "Hello from the fake."
    assert r.object == "chat.completion" and r.model == "claude-sonnet-4-5"
    assert (r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens) == (150, 100)
    assert _metric(gw, "agproxy_llm_provider_evictions_total", group="llm", provider="openai") == 1
    assert _metric(gw, "agproxy_llm_failovers_total", group="llm", provider="openai") == 1
    assert _metric(gw, "agproxy_llm_provider_health", group="llm", provider="openai") == 0
    rec = gw.access_log(1)[-1]
    assert rec["llm_provider"] == "anthropic"
    assert [a["provider"] for a in rec["llm_attempts"]] == ["openai", "anthropic"]
    # Evicted: the next request goes to the fallback without trying the primary.
    n = len(primary.requests)
    client.chat.completions.create(model="smart", messages=HI)
    assert len(primary.requests) == n
    assert fallback.requests[-1].header("x-api-key") == ANTHROPIC_KEY
    assert fallback.requests[-1].header("authorization") is None


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_primary_that_stalls_after_its_head_falls_back_within_the_timeout(fakes, start_gateway, stream):
    """The head arrives in time, then nothing: the route's timeout bounds the wait for the
    body (JSON) or the first event (stream); the provider is unhealthy and the fallback answers."""
    primary = fakes("openai")
    fallback = fakes("anthropic")
    gw = start_gateway(_config([primary, fallback], timeout="1s"), env=ENV)
    primary.faults.append(Fault("stall", seconds=10))
    client = _oa(gw, timeout=8)
    t0 = time.monotonic()
    if stream:
        chunks = list(client.chat.completions.create(model="smart", messages=HI, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        text = client.chat.completions.create(model="smart", messages=HI).choices[0].message.content
    elapsed = time.monotonic() - t0
    assert text == "Hello from the fake."
    assert 0.9 <= elapsed < 5, elapsed
    rec = gw.access_log(1)[-1]
    assert rec["llm_provider"] == "anthropic"
    assert rec["llm_attempts"][0] == {"provider": "openai", "status": 200,
                                      "error": "broken stream" if stream else "broken answer"}
    assert _metric(gw, "agproxy_llm_provider_evictions_total", group="llm", provider="openai") == 1


def test_primary_restored_after_the_eviction_and_backoff_doubles(fakes, start_gateway):
    primary = fakes("openai")
    fallback = fakes("bedrock")
    gw = start_gateway(_config([primary, fallback],
                               eviction='duration = "300ms", consecutive_failures = 1, max_duration = "600ms"'),
                       env=ENV)
    client = _oa(gw)
    primary.fault_always = Fault("status", 503)
    r = client.chat.completions.create(model="smart", messages=HI)
    assert r.choices[0].message.content == "Hello from the fake."          # from Bedrock, translated
    # Each restore probes the primary once; it keeps failing: evictions of 0.3, 0.6, 0.6 s.
    for n in (2, 3):
        _wait(lambda: (client.chat.completions.create(model="smart", messages=HI) and
                       _metric(gw, "agproxy_llm_provider_evictions_total", provider="openai") >= n),
              what=f"eviction {n}")
    lengths = [float(x) for x in re.findall(r"provider openai evicted until \+([0-9.]+)s", gw.logs())]
    assert lengths[:3] == [0.3, 0.6, 0.6]
    primary.fault_always = None
    _wait(lambda: client.chat.completions.create(model="smart", messages=HI).model == "gpt-4o-mini-2024-07-18",
          what="the primary serving again")
    assert _metric(gw, "agproxy_llm_provider_health", provider="openai") == 1


def test_streaming_through_failover_with_usage(fakes, start_gateway):
    primary = fakes("openai")
    fallback = fakes("anthropic", usage=Usage(input=20, output=9, cache_read=100, cache_write=30))
    gw = start_gateway(_config([primary, fallback]), env=ENV)
    primary.faults.append(Fault("status", 503))
    chunks = list(_oa(gw).chat.completions.create(model="smart", messages=HI, stream=True,
                                                  stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from the fake."
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 150
    # Without include_usage the client gets no usage chunk, and the gateway still counts.
    primary.faults.append(Fault("status", 503))
    plain = list(_oa(gw).chat.completions.create(model="smart", messages=HI, stream=True))
    assert all(c.choices for c in plain)
    assert _metric(gw, "agproxy_gen_ai_client_token_usage_sum", gen_ai_token_type="input_cache_write",
                   gen_ai_provider_name="anthropic") == 60
    assert _metric(gw, "agproxy_gen_ai_server_time_to_first_token_seconds_count", route="llm") == 2


@pytest.mark.parametrize("kind", ["openai", "anthropic", "bedrock"])
@pytest.mark.parametrize("stream", [False, True])
def test_cache_token_metrics_per_provider_kind(fakes, start_gateway, kind, stream):
    f = fakes(kind, usage=Usage(input=20, output=9, cache_read=100, cache_write=30))
    gw = start_gateway(_config([f]), env=ENV)
    client = _oa(gw)
    if stream:
        list(client.chat.completions.create(model="smart", messages=HI, stream=True))
    else:
        client.chat.completions.create(model="smart", messages=HI)
    sums = {t: _metric(gw, "agproxy_gen_ai_client_token_usage_sum", gen_ai_token_type=t, route="llm",
                       gen_ai_request_model="smart", gen_ai_operation_name="chat")
            for t in ("input", "output", "input_cache_read", "input_cache_write")}
    write = 0 if kind == "openai" else 30           # OpenAI reports no cache writes
    assert sums == {"input": 20 + 100 + write, "output": 9, "input_cache_read": 100, "input_cache_write": write}
    provider = {"openai": "openai", "anthropic": "anthropic", "bedrock": "aws.bedrock"}[kind]
    assert _metric(gw, "agproxy_gen_ai_server_request_duration_seconds_count", gen_ai_provider_name=provider) == 1


def test_token_metrics_with_two_workers(fakes, start_gateway):
    """Several workers (prometheus-client multiprocess mode): the histogram samples the
    group batches reach the aggregated /metrics, whichever worker served each request."""
    f = fakes("openai", usage=Usage(input=20, output=9, cache_read=100))
    gw = start_gateway('[gateway]\nadmin = "127.0.0.1:{admin_port}"\nworkers = 2\n\n' + _config([f]), env=ENV)
    client = _oa(gw)
    for n in range(6):
        if n % 2:
            list(client.chat.completions.create(model="smart", messages=HI, stream=True))
        else:
            client.chat.completions.create(model="smart", messages=HI)
    _wait(lambda: _metric(gw, "agproxy_gen_ai_server_request_duration_seconds_count", route="llm") == 6,
          what="six requests counted")
    assert _metric(gw, "agproxy_gen_ai_client_token_usage_sum", gen_ai_token_type="input", route="llm") == 6 * 120
    assert _metric(gw, "agproxy_gen_ai_client_token_usage_count", gen_ai_token_type="output", route="llm") == 6
    assert _metric(gw, "agproxy_gen_ai_server_time_to_first_token_seconds_count", route="llm") == 3


def test_tool_calls_translated_both_ways(fakes, start_gateway):
    claude = fakes("anthropic")
    gw = start_gateway(_config([claude]), env=ENV)
    client = _oa(gw)
    r = client.chat.completions.create(model="smart", messages=[{"role": "user", "content": "weather?"}], tools=TOOLS)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls"
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    # The tool result goes back; the fake checks it answers the tool_use id it issued.
    r2 = client.chat.completions.create(model="smart", tools=TOOLS, messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
    assert r2.choices[0].message.content == "Hello from the fake."
    assert claude.requests[-1].json["messages"][-1]["content"][0]["type"] == "tool_result"
    # Streamed tool call.
    chunks = list(client.chat.completions.create(model="smart", messages=[{"role": "user", "content": "w?"}],
                                                 tools=TOOLS, stream=True))
    args = "".join(tc.function.arguments or "" for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or [])
    assert json.loads(args) == {"city": "Paris"}


def test_anthropic_client_served_by_openai_and_bedrock(fakes, start_gateway):
    primary = fakes("openai", usage=Usage(input=20, output=9, cache_read=100))
    fallback = fakes("bedrock", usage=Usage(input=20, output=9, cache_read=100, cache_write=30))
    gw = start_gateway(_config([primary, fallback]), env=ENV)
    client = _an(gw)
    m = client.messages.create(model="smart", max_tokens=100, messages=HI)
    assert m.content[0].text == "Hello from the fake."
    assert (m.usage.input_tokens, m.usage.cache_read_input_tokens) == (20, 100)
    assert primary.requests[-1].header("authorization") == f"Bearer {OPENAI_KEY}"
    m = client.messages.create(model="smart", max_tokens=100, messages=[{"role": "user", "content": "weather?"}],
                               tools=[{"name": "get_weather", "input_schema": {"type": "object"}}])
    assert m.stop_reason == "tool_use" and m.content[0].input == {"city": "Paris"}
    primary.faults.append(Fault("status", 500))
    with client.messages.stream(model="smart", max_tokens=100, messages=HI) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "Hello from the fake."
    assert (final.usage.input_tokens, final.usage.cache_creation_input_tokens, final.usage.output_tokens) == (20, 30, 9)
    assert fallback.requests[-1].target == "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse-stream"


def test_bad_input_never_reaches_a_provider(fakes, start_gateway):
    f = fakes("openai")
    gw = start_gateway(_config([f], extra="max_request_body = 2048"), env=ENV)
    with httpx.Client(base_url=gw.url(""), timeout=5) as c:
        r = c.post("/v1/chat/completions", content=b"{not json")
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        r = c.post("/v1/chat/completions", json={"messages": HI})
        assert r.status_code == 400 and "model" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json={"model": "smart"})
        assert r.status_code == 400
        r = c.post("/v1/chat/completions", json={"model": "gpt-unknown", "messages": HI})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = c.post("/v1/chat/completions", json={"model": "smart", "messages": HI, "pad": "x" * 4096})
        assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
        r = c.post("/v1/messages", json={"model": "smart", "messages": HI})          # no max_tokens
        assert r.status_code == 400 and r.json() == {"type": "error", "error": {
            "type": "invalid_request_error", "message": "max_tokens: Field required (a positive integer)"}}
        r = c.post("/v1/messages", json={"model": "nope", "max_tokens": 5, "messages": HI})
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        r = c.get("/v1/chat/completions")
        assert r.status_code == 405
    assert f.requests == []
    with pytest.raises(anthropic.BadRequestError):
        _an(gw).messages.create(model="smart", max_tokens=10, messages=[{"role": "bot", "content": "x"}])
    assert f.requests == []


def test_truncated_stream_is_a_clean_error_and_counts_unhealthy(fakes, start_gateway):
    primary = fakes("anthropic")
    fallback = fakes("openai")
    gw = start_gateway(_config([primary, fallback]), env=ENV)
    primary.faults.append(Fault("truncate", events=3))
    with pytest.raises(openai.APIError):
        for _ in _oa(gw).chat.completions.create(model="smart", messages=HI, stream=True):
            pass
    _wait(lambda: _metric(gw, "agproxy_llm_provider_evictions_total", provider="anthropic") == 1,
          what="the truncating provider evicted")
    # Cut before its first event: the fallback answers instead.
    primary2 = fakes("anthropic", name="a2")
    gw2 = start_gateway(_config([primary2, fallback]), env=ENV)
    primary2.faults.append(Fault("truncate", events=0))
    chunks = list(_oa(gw2).chat.completions.create(model="smart", messages=HI, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from the fake."


def test_all_providers_down_is_503_naming_the_group(fakes, start_gateway):
    a = fakes("openai")
    b = fakes("anthropic")
    gw = start_gateway(_config([a, b]), env=ENV)
    a.fault_always = b.fault_always = Fault("status", 503)
    with pytest.raises(openai.InternalServerError) as e:
        _oa(gw).chat.completions.create(model="smart", messages=HI)
    assert e.value.status_code == 503 and "llm group 'llm'" in e.value.message
    # Every provider evicted: the one whose eviction ends soonest is still tried.
    a.fault_always = None
    r = _oa(gw).chat.completions.create(model="smart", messages=HI)
    assert r.model == "gpt-4o-mini-2024-07-18"


def test_client_disconnect_mid_stream_cancels_the_upstream(fakes, start_gateway):
    slow = fakes("openai", reply=" ".join(["word"] * 200), stream_delay=0.05)
    gw = start_gateway(_config([slow]), env=ENV)
    body = json.dumps({"model": "smart", "messages": HI, "stream": True}).encode()
    s = socket.create_connection(("127.0.0.1", gw.port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
              b"content-length: %d\r\n\r\n%s" % (len(body), body))
    got = b""
    while b"data: " not in got:
        got += s.recv(4096)
    s.close()
    assert slow.client_gone.wait(5), "the provider kept streaming after the client left"


def test_cel_llm_reads_the_answered_call(fakes, start_gateway):
    """CEL's `llm` (the exchange reads the group's record): the group, the provider that
    answered, the models, and the usage once the answer (or its stream) is over; an
    empty map on a route that is not an llm_group."""
    primary = fakes("openai", usage=Usage(input=20, output=9, cache_read=100))
    fields = ('[telemetry]\naccess_log_fields = { g = "llm.group", p = "llm.provider", k = "llm.provider_kind", '
              'm = "llm.model", rm = "llm.response_model", s = "llm.streaming", out = "llm.usage.output", '
              'cached = "llm.usage.input_cache_read", has = \'has(llm.group)\' }\n\n')
    gw = start_gateway(fields + _config([primary]) + f'''
[[route]]
name = "plain"
match = {{ path_prefix = "/" }}
backend = "plain"

[backend.plain]
type = "http"
url = "{primary.url}"
''', env=ENV)
    _oa(gw).chat.completions.create(model="smart", messages=HI)
    list(_oa(gw).chat.completions.create(model="smart", messages=HI, stream=True))
    httpx.get(gw.url("/elsewhere"))
    json_rec, stream_rec, plain_rec = gw.access_log(3)[-3:]
    for rec, streaming in ((json_rec, False), (stream_rec, True)):
        assert (rec["g"], rec["p"], rec["k"], rec["m"], rec["s"]) == ("llm", "openai", "openai", "smart", streaming)
        assert rec["rm"] == "gpt-4o-mini-2024-07-18" and (rec["out"], rec["cached"]) == (9, 100)
        assert rec["has"] is True
    assert plain_rec["route"] == "plain" and plain_rec["has"] is False
