"""The fake LLM providers speak the real wire formats: the official SDKs (openai,
anthropic, botocore's bedrock-runtime client) talk to them directly and parse what
they answer, JSON, SSE and AWS event-stream alike; faults look like the real ones."""

from __future__ import annotations

import json

import anthropic
import botocore.session
import httpx
import openai
import pytest
from botocore.config import Config
from botocore.eventstream import EventStreamBuffer

from tests.support.llm_fakes import (ANTHROPIC_KEY, AWS_ACCESS_KEY, AWS_SECRET_KEY, OPENAI_KEY, FakeProvider,
                                     Fault, Usage, bedrock_event)

TOOLS_OPENAI = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                  "parameters": {"type": "object",
                                                                 "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture
def fake(request):
    f = FakeProvider(request.param, usage=Usage(input=20, output=9, cache_read=100, cache_write=30)).start()
    yield f
    f.stop()


def _bedrock_client(url: str):
    return botocore.session.get_session().create_client(
        "bedrock-runtime", region_name="us-east-1", endpoint_url=url, aws_access_key_id=AWS_ACCESS_KEY,
        aws_secret_access_key=AWS_SECRET_KEY, config=Config(retries={"total_max_attempts": 1}))


@pytest.mark.parametrize("fake", ["openai"], indirect=True)
def test_openai_sdk_json_stream_and_tools(fake):
    client = openai.OpenAI(base_url=fake.url + "/v1", api_key=OPENAI_KEY, max_retries=0)
    r = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "Hello from the fake."
    assert r.model == "gpt-4o-mini-2024-07-18"
    assert (r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens) == (120, 100)

    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from the fake."
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                                stream=True))
    assert all(c.choices for c in plain)           # no usage chunk unless asked for

    r = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "weather?"}],
                                       tools=TOOLS_OPENAI)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls"
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    # A tool message must answer a preceding tool call, as OpenAI checks.
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gpt-4o-mini", messages=[
            {"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "call_nope", "content": "1"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=fake.url + "/v1", api_key="wrong", max_retries=0).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("fake", ["anthropic"], indirect=True)
def test_anthropic_sdk_json_stream_and_tools(fake):
    client = anthropic.Anthropic(base_url=fake.url, api_key=ANTHROPIC_KEY, max_retries=0)
    m = client.messages.create(model="claude-sonnet-4-5", max_tokens=100, messages=[{"role": "user", "content": "hi"}])
    assert m.content[0].text == "Hello from the fake."
    assert (m.usage.input_tokens, m.usage.cache_read_input_tokens, m.usage.cache_creation_input_tokens) == (20, 100, 30)
    with client.messages.stream(model="claude-sonnet-4-5", max_tokens=100,
                                messages=[{"role": "user", "content": "hi"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "Hello from the fake."
    assert final.usage.output_tokens == 9 and final.stop_reason == "end_turn"
    m = client.messages.create(model="claude-sonnet-4-5", max_tokens=100,
                               messages=[{"role": "user", "content": "weather?"}],
                               tools=[{"name": "get_weather", "input_schema": {"type": "object"}}])
    assert m.stop_reason == "tool_use" and m.content[0].input == {"city": "Paris"}
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=fake.url, api_key="wrong", max_retries=0).messages.create(
            model="claude-sonnet-4-5", max_tokens=10, messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("fake", ["bedrock"], indirect=True)
def test_botocore_converse_and_stream_with_sigv4(fake):
    client = _bedrock_client(fake.url)
    r = client.converse(modelId="anthropic.claude-3-5-sonnet-20240620-v1:0",
                        messages=[{"role": "user", "content": [{"text": "hi"}]}])
    assert r["output"]["message"]["content"][0]["text"] == "Hello from the fake."
    assert r["usage"]["cacheReadInputTokens"] == 100
    # The model id is percent-encoded on the wire (botocore's own request shows it).
    assert fake.requests[-1].target == "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse"
    events = list(client.converse_stream(modelId="m1", messages=[{"role": "user", "content": [{"text": "hi"}]}])["stream"])
    kinds = [next(iter(e)) for e in events]
    assert kinds[0] == "messageStart" and kinds[-2:] == ["messageStop", "metadata"]
    assert "".join(e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e) == \
        "Hello from the fake."
    assert events[-1]["metadata"]["usage"]["cacheWriteInputTokens"] == 30
    r = client.converse(modelId="m1", messages=[{"role": "user", "content": [{"text": "weather?"}]}],
                        toolConfig={"tools": [{"toolSpec": {"name": "get_weather",
                                                            "inputSchema": {"json": {"type": "object"}}}}]})
    assert r["stopReason"] == "tool_use"
    assert r["output"]["message"]["content"][0]["toolUse"]["input"] == {"city": "Paris"}
    bad = botocore.session.get_session().create_client(
        "bedrock-runtime", region_name="us-east-1", endpoint_url=fake.url, aws_access_key_id=AWS_ACCESS_KEY,
        aws_secret_access_key="wrong", config=Config(retries={"total_max_attempts": 1}))
    with pytest.raises(bad.exceptions.ClientError) as e:
        bad.converse(modelId="m1", messages=[{"role": "user", "content": [{"text": "hi"}]}])
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


@pytest.mark.parametrize("fake", ["bedrock"], indirect=True)
def test_event_stream_frames_decode_with_botocore_buffer(fake):
    client = _bedrock_client(fake.url)
    fake.faults.append(Fault("status", 429, retry_after=3))
    with pytest.raises(client.exceptions.ThrottlingException):
        client.converse(modelId="m1", messages=[{"role": "user", "content": [{"text": "hi"}]}])
    # Raw frames, decoded with botocore's EventStreamBuffer (CRCs checked), fed one byte at a time.
    buf = EventStreamBuffer()
    raw = bedrock_event("messageStart", {"role": "assistant"}) + bedrock_event("messageStop", {"stopReason": "end_turn"})
    msgs = []
    for i in range(len(raw)):
        buf.add_data(raw[i:i + 1])
        msgs.extend(buf)
    assert [m.headers[":event-type"] for m in msgs] == ["messageStart", "messageStop"]
    assert json.loads(msgs[1].payload)["stopReason"] == "end_turn"
    assert fake.requests[-1].header("authorization").startswith("AWS4-HMAC-SHA256 Credential=AKIDLLMFAKETEST00001/")


@pytest.mark.parametrize("fake", ["openai", "anthropic", "bedrock"], indirect=True)
def test_faults(fake):
    path = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages", "bedrock": "/model/m/converse"}[fake.kind]
    with httpx.Client(base_url=fake.url, timeout=5) as c:
        fake.faults.append(Fault("status", 429, retry_after=7))
        r = c.post(path, json={})
        assert r.status_code == 429 and r.headers["retry-after"] == "7"
        fake.faults.append(Fault("status", 503))
        r = c.post(path, json={})
        assert r.status_code == 503
        err = r.json()
        if fake.kind == "openai":
            assert set(err["error"]) == {"message", "type", "param", "code"}
        elif fake.kind == "anthropic":
            assert err["type"] == "error" and err["error"]["type"] == "api_error"
        else:
            assert "message" in err and r.headers["x-amzn-errortype"].startswith("ServiceUnavailableException")
        fake.faults.append(Fault("reset"))
        with pytest.raises(httpx.TransportError):
            c.post(path, json={})
        fake.faults.append(Fault("garbage"))
        with pytest.raises(httpx.TransportError):
            c.post(path, json={})
        fake.faults.append(Fault("hang", seconds=5))
        with pytest.raises(httpx.ReadTimeout):
            c.post(path, json={}, timeout=0.3)
