"""Provider clients against the fake providers over real sockets: each kind's URL,
credentials and headers are accepted (the fakes check keys and recompute SigV4), the
caller's headers never travel, and answers translate back to the client's API."""

from __future__ import annotations

import asyncio
import json

import orjson
import pytest

from agproxy.backends.llm.translate import StreamTranslator, client_reply, parse_client, parse_provider_reply, \
    provider_request
from agproxy.backends.llm.providers import Provider, build_provider
from agproxy.backends.llm.usage import Usage
from agproxy.config.reader import Problems, Section
from agproxy.identity.aws import AwsCredentials
from agproxy.upstream.errors import UpstreamError
from agproxy.upstream.origin import Origin
from agproxy.upstream.pool import get_pool
from tests.support.llm_fakes import ANTHROPIC_KEY, AWS_ACCESS_KEY, AWS_SECRET_KEY, OPENAI_KEY, FakeProvider, Usage as FU

USAGE = FU(input=20, output=9, cache_read=100, cache_write=30)


def _provider(fake: FakeProvider, **kw) -> Provider:
    creds = None
    if fake.kind == "bedrock":
        creds = AwsCredentials()
        creds.set_static(AWS_ACCESS_KEY, AWS_SECRET_KEY)
    key = {"openai": OPENAI_KEY, "anthropic": ANTHROPIC_KEY}.get(fake.kind)
    return Provider(fake.kind, fake.kind, Origin.from_url(fake.url), api_key=key, credentials=creds,
                    region="us-east-1", url=fake.url, **kw)


async def _call(p: Provider, api: str, body: dict, model: str):
    req = parse_client(api, orjson.dumps(body))
    path, raw = provider_request(req, p.kind, model)
    resp = await p.request(path, raw, req.stream, timeout=5)
    data = b""
    while True:
        chunk = await resp.body.read()
        if not chunk:
            break
        data += chunk
    await get_pool().close()
    return req, resp, data


def _run(coro):
    return asyncio.run(coro)


OPENAI_BODY = {"model": "smart", "messages": [{"role": "system", "content": "brief"}, {"role": "user", "content": "hi"}]}
ANTHROPIC_BODY = {"model": "smart", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("kind", ["openai", "anthropic", "bedrock"])
@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_each_kind_accepts_the_gateway_request_json(kind, api):
    with FakeProvider(kind, usage=USAGE) as fake:
        p = _provider(fake)
        body = OPENAI_BODY if api == "openai" else ANTHROPIC_BODY
        req, resp, data = _run(_call(p, api, body, "model-x:1"))
        assert resp.status == 200, data
        parsed, reply = parse_provider_reply(kind, data, "model-x:1")
        out = json.loads(client_reply(req, kind, parsed, reply))
        if api == "openai":
            assert out["choices"][0]["message"]["content"] == "Hello from the fake."
            assert out["usage"]["prompt_tokens"] == (120 if kind == "openai" else 150)
        else:
            assert out["content"][0]["text"] == "Hello from the fake."
            # Anthropic's input_tokens excludes cached tokens, whoever counted them.
            assert (out["usage"]["input_tokens"], out["usage"]["cache_read_input_tokens"]) == (20, 100)
        seen = fake.requests[-1]
        names = {k for k, _ in seen.headers}
        expected = {"host", "content-type", "accept", "content-length"}
        expected |= {"openai": {"authorization"}, "anthropic": {"x-api-key", "anthropic-version"},
                     "bedrock": {"authorization", "x-amz-date"}}[kind]
        assert names == expected
        assert fake.errors == []


@pytest.mark.parametrize("kind", ["openai", "anthropic", "bedrock"])
def test_each_kind_streams_and_usage_is_counted(kind):
    with FakeProvider(kind, usage=USAGE) as fake:
        p = _provider(fake)
        body = dict(OPENAI_BODY, stream=True)
        req, resp, data = _run(_call(p, "openai", body, "m"))
        assert resp.status == 200
        tr = StreamTranslator(req, kind, "m")
        out = tr.feed(data) + tr.end()
        assert tr.complete and out.endswith(b"data: [DONE]\n\n")
        assert tr.usage == {"openai": Usage(120, 9, 100, 0), "anthropic": Usage(150, 9, 100, 30),
                            "bedrock": Usage(150, 9, 100, 30)}[kind]
        assert fake.requests[-1].header("accept") == ("application/vnd.amazon.eventstream" if kind == "bedrock"
                                                      else "text/event-stream")


def test_model_mapping():
    origin = Origin.from_url("http://127.0.0.1:1")
    p = Provider("p", "openai", origin, models={"smart": "gpt-4o"})
    assert p.model_for("smart") == "gpt-4o" and p.model_for("fast") is None
    assert Provider("p", "openai", origin, model="gpt-4o-mini").model_for("anything") == "gpt-4o-mini"
    assert Provider("p", "openai", origin).model_for("gpt-4.1") == "gpt-4.1"
    both = Provider("p", "openai", origin, model="default-m", models={"smart": "gpt-4o"})
    assert (both.model_for("smart"), both.model_for("other")) == ("gpt-4o", "default-m")


class _Ctx:
    def __init__(self):
        self.started = []
        self.readiness = {}

    def path(self, p):
        return p

    def on_start(self, fn):
        self.started.append(fn)

    def on_stop(self, fn):
        pass

    def add_readiness(self, name, fn):
        self.readiness[name] = fn


def test_config_keys_and_secrets(monkeypatch):
    problems = Problems()
    monkeypatch.setenv("T_KEY", "sk-secret-value-1")
    p = build_provider(Section("backend.llm.provider[0]", {"name": "a", "kind": "openai", "api_key_env": "T_KEY"},
                               problems), _Ctx(), {})
    assert not problems and p.url == "https://api.openai.com"
    assert "sk-secret-value-1" not in json.dumps(p.describe())
    problems = Problems()
    monkeypatch.delenv("T_MISSING", raising=False)
    ctx = _Ctx()
    b = build_provider(Section("backend.llm.provider[1]", {"name": "b", "kind": "anthropic", "api_key_env": "T_MISSING",
                                                           "region": "us-east-1"}, problems), ctx, {})
    # A missing secret is not a config problem: the gateway is not ready, the provider unusable.
    assert ctx.readiness["llm_api_key[b]"]() == "environment variable T_MISSING is not set"
    with pytest.raises(UpstreamError):
        b.headers("/v1/messages", b"{}", False)
    build_provider(Section("backend.llm.provider[2]", {"name": "c", "kind": "openai"}, problems), _Ctx(), {})
    build_provider(Section("backend.llm.provider[3]", {"name": "d", "kind": "bedrock"}, problems), _Ctx(), {})
    build_provider(Section("backend.llm.provider[4]", {"name": "e", "kind": "gemini"}, problems), _Ctx(), {})
    text = "\n".join(problems.items)
    assert "backend.llm.provider[1].region: only with kind = \"bedrock\"" in text
    assert "backend.llm.provider[2].api_key_env: required" in text
    assert "backend.llm.provider[3].region: required" in text
    assert "backend.llm.provider[4].kind: must be one of" in text

