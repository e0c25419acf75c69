"""The [route.obo] and [route.forward_token] filters, in process."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest

from agproxy.filters.forward_token import ForwardTokenFilter
from agproxy.filters.obo import OboFilter
from agproxy.http.messages import Headers
from agproxy.identity.actor import TokenFileActor
from agproxy.proxy.contract import LocalReply
from tests.support.tokens import AGENT_SA, POLICY, k8s_token, make_world, service, user_token


@pytest.fixture(scope="module")
def world():
    return make_world()


class FakeEx:
    def __init__(self, token: str | None):
        self.jwt_token = token
        self.obo_token: str | None = None
        self.span = None          # the Exchange's trace span: tracing off
        self.request = type("R", (), {})()
        self.request.headers = Headers([("authorization", f"Bearer {token}")] if token else [])


def _resolve(result):
    if result is None or isinstance(result, LocalReply):
        return result
    return asyncio.get_event_loop().run_until_complete(result)


def test_obo_filter_caches_and_follows_rotation(world, tmp_path):
    idp, k8s, *_ = world
    svc = service(world)
    path = tmp_path / "agent-token"
    path.write_text(k8s_token(k8s))
    actor = TokenFileActor(str(path), "kubernetes", recheck=0)
    actor.load()
    f = OboFilter(svc, actor, "support-agent", POLICY, None, 30.0, 100)
    subject = user_token(idp)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        ex1 = FakeEx(subject)
        assert _resolve(f.on_request(ex1)) is None
        tok1 = ex1.obo_token
        assert ex1.request.headers.get("authorization") == "Bearer " + tok1
        ex2 = FakeEx(subject)
        assert f.on_request(ex2) is None                      # cache hit: synchronous
        assert ex2.obo_token == tok1 and f.hits == 1
        # rotate the actor token file (atomic rename, as kubelet does)
        new = tmp_path / "agent-token.new"
        new.write_text(k8s_token(k8s, jti="second"))
        os.replace(new, path)
        ex3 = FakeEx(subject)
        assert _resolve(f.on_request(ex3)) is None
        assert ex3.obo_token != tok1 and actor.reloads == 2
        # refusals
        r = _resolve(f.on_request(FakeEx(user_token(idp, exp=int(time.time()) - 100))))
        assert r.status == 401
        r = _resolve(f.on_request(FakeEx(None)))
        assert r.status == 401
    finally:
        loop.close()
        asyncio.set_event_loop(None)


def test_obo_filter_coalesces_concurrent_misses(world, tmp_path):
    idp, k8s, *_ = world
    svc = service(world)
    path = tmp_path / "agent-token"
    path.write_text(k8s_token(k8s))
    actor = TokenFileActor(str(path), "kubernetes")
    actor.load()
    f = OboFilter(svc, actor, "support-agent", POLICY, None, 30.0, 100)
    subject = user_token(idp)
    exs = [FakeEx(subject) for _ in range(5)]

    async def go():
        return await asyncio.gather(*[f.on_request(ex) for ex in exs])

    assert asyncio.run(go()) == [None] * 5
    assert svc.issued == 1 and len({ex.obo_token for ex in exs}) == 1


def test_obo_filter_actor_not_trusted(world, tmp_path):
    idp, _, _, rogue, _ = world
    path = tmp_path / "agent-token"
    path.write_text(rogue.token(sub=AGENT_SA, aud="gateway"))
    actor = TokenFileActor(str(path), "kubernetes")
    actor.load()
    f = OboFilter(service(world), actor, "support-agent", POLICY, None, 30.0, 100)
    loop = asyncio.new_event_loop()
    try:
        r = loop.run_until_complete(f.on_request(FakeEx(user_token(idp))))
    finally:
        loop.close()
    assert r.status == 403 and json.loads(r.body)["error"] == "unauthorized_client"


def test_forward_token_limits_and_strips():
    f = ForwardTokenFilter("X-Amzn-Bedrock-AgentCore-Runtime-Custom-User-Token", "subject", "", 4096)
    ex = FakeEx("a.b.c")
    ex.request.headers.add("x-amzn-bedrock-agentcore-runtime-custom-user-token", "spoofed")
    assert f.on_request(ex) is None
    assert ex.request.headers.get_all("x-amzn-bedrock-agentcore-runtime-custom-user-token") == ["a.b.c"]
    big = FakeEx("a." + "x" * 5000 + ".c")
    r = f.on_request(big)
    assert r.status == 431 and b"4096" in r.body
    obo = ForwardTokenFilter("X-Custom", "obo", "", 4096)
    r = obo.on_request(FakeEx("a.b.c"))
    assert r.status == 401



def test_obo_audience_outside_token_exchange_audiences_is_a_config_error(tmp_path):
    import subprocess
    from tests.support.gateway import ROOT, agproxy_cmd
    text = (ROOT / "conf" / "agentcore-obo.toml").read_text()
    text = text.replace('subject_issuers = ["idp"]', 'subject_issuers = ["idp"]\naudiences = ["other-agent"]')
    cfg = ROOT / "conf" / f".test-{tmp_path.name}.toml"     # beside the demo files it names
    cfg.write_text(text)
    try:
        r = subprocess.run(agproxy_cmd() + ["validate", str(cfg)], capture_output=True, text=True, timeout=60)
    finally:
        cfg.unlink()
    assert r.returncode == 1
    assert "route[0].obo.audience: 'support-agent' is not in [token_exchange].audiences" in r.stderr
