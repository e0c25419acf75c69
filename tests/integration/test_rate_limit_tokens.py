"""`unit = "tokens"`: a request starts with a token left, and the LLM usage reported on
the exchange is charged when it is done (local buckets, Redis, the rate-limit service).

Nothing in the gateway reports LLM usage yet, so a test-only filter does what the LLM
work will: it reads the upstream's (the test's) usage headers and fills `ex.llm`. The
gateway runs in process (tests/support/inproc.py) to carry that filter; the upstream,
Redis and the rate-limit service are real peers on sockets.
"""

from __future__ import annotations

import asyncio
import time

from agproxy.proxy.contract import Filter
from agproxy.proxy.facts import LlmCall

from tests.support.inproc import InProcessGateway, ScriptedUpstream, h1_request
from tests.support.redis_server import RedisServer
from tests.support.rls_peer import rls_peer

ROUTE = '''
[[route]]
name = "llm"
match = { path_prefix = "/" }
backend = "up"
{limits}

[backend.up]
type = "http"
url = "{upstream}"
'''


class ReportsUsage(Filter):
    """Test-only: the usage an LLM backend would report, taken from response headers."""

    name = "reports_usage"

    def on_response(self, ex, resp):
        if resp.headers.get("x-usage-input") is not None:
            ex.llm = LlmCall("test", "test-model")
            ex.llm.input_tokens = int(resp.headers.get("x-usage-input"))
            ex.llm.output_tokens = int(resp.headers.get("x-usage-output"))
        return None


def answering(usages: list[tuple[int, int]]):
    """An upstream script: the n-th request reports usages[n] (input, output)."""
    seen = []

    async def script(req, writer):
        i = len(seen)
        seen.append(req.target)
        inp, out = usages[i]
        writer.write(f"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-usage-input: {inp}\r\n"
                     f"x-usage-output: {out}\r\n\r\nok".encode())
        await writer.drain()
    script.seen = seen
    return script


async def started(tmp_path, limits: str, usages):
    script = answering(usages)
    up = await ScriptedUpstream(script).start()
    gw = InProcessGateway(ROUTE, tmp_path, upstream=up.url, limits=limits)
    gw.replace_route("llm", add_filters=[ReportsUsage()])
    await gw.start()
    return up, gw, script


LOCAL = '''
[[route.rate_limit.local]]
capacity = 100
unit = "tokens"
refill = { tokens = 100, every = "1h" }
'''


def test_local_tokens_are_charged_after_the_response(tmp_path):
    async def run():
        up, gw, script = await started(tmp_path, LOCAL, [(40, 30), (20, 30)])
        try:
            r1 = await h1_request(gw.port, "GET", "/one")
            r2 = await h1_request(gw.port, "GET", "/two")
            r3 = await h1_request(gw.port, "GET", "/three")
        finally:
            await gw.close()
            await up.close()
        return r1, r2, r3, script.seen

    r1, r2, r3, seen = asyncio.run(run())
    # Before the first answer the bucket was full; its 70 tokens were charged when it was done.
    assert (r1.status, r1.header("x-ratelimit-limit"), r1.header("x-ratelimit-remaining")) == (200, "100", "100")
    assert (r2.status, r2.header("x-ratelimit-remaining")) == (200, "30")
    # 30 - 50 = 20 tokens of debt: refused until 21 tokens are back (36 s each).
    assert (r3.status, r3.header("x-ratelimit-remaining"), r3.header("retry-after")) == (429, "0", "756")
    assert seen == ["/one", "/two"]


def test_redis_tokens_are_charged_after_the_response(tmp_path):
    redis = RedisServer(tmp_path)
    try:
        limits = f'''
[route.rate_limit.redis]
address = "{redis.address}"
timeout = "2s"
limits = [ {{ capacity = 100, unit = "tokens", refill = {{ tokens = 100, every = "1h" }} }} ]
'''
        key = "agproxy:rl:llm:0:100/100/3600:tokens"

        async def run():
            up, gw, script = await started(tmp_path, limits, [(60, 10), (0, 0)])
            try:
                r1 = await h1_request(gw.port, "GET", "/one")
                deadline = time.monotonic() + 10
                while await asyncio.to_thread(redis.cli, "EXISTS", key) != "1\n":
                    assert time.monotonic() < deadline, "the usage was never charged to Redis"
                    await asyncio.sleep(0.02)     # polling Redis for the charge (a condition)
                r2 = await h1_request(gw.port, "GET", "/two")
            finally:
                await gw.close()
                await up.close()
            return r1, r2

        r1, r2 = asyncio.run(run())
        assert (r1.status, r1.header("x-ratelimit-remaining")) == (200, "100")
        assert (r2.status, r2.header("x-ratelimit-remaining")) == (200, "30")
    finally:
        redis.stop()


def test_the_rate_limit_service_gets_the_usage_as_hits_addend(tmp_path):
    peer, rls = rls_peer({(("user", None),): (1000, 86400)})
    with peer:
        limits = f'''
[route.rate_limit.remote]
address = "{peer.address}"
domain = "llm"
unit = "tokens"
timeout = "2s"
descriptors = [[ {{ key = "user", value = 'request.headers["x-user"]' }} ]]
'''

        async def run():
            up, gw, script = await started(tmp_path, limits, [(50, 20)])
            try:
                r = await h1_request(gw.port, "GET", "/one", [("x-user", "alice")])
                await asyncio.to_thread(rls.wait_for, lambda: len(rls.calls) == 2)
            finally:
                await gw.close()
                await up.close()
            return r

        r = asyncio.run(run())
        assert r.status == 200
        first, second = rls.calls[0][0], rls.calls[1][0]
        assert first.hits_addend == 1 and second.hits_addend == 69       # 70 used, 1 counted at the start
        assert [(e.key, e.value) for e in second.descriptors[0].entries] == [("user", "alice")]
