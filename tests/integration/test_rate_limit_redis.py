"""`[route.rate_limit.redis]` against a real redis-server: exact across three gateway
processes, unix socket + password, key expiry, and faults (not listening, silent,
garbage, error replies, dying and coming back) under failure_mode closed and open."""

from __future__ import annotations

import time

import pytest

from tests.support.gateway import metric
from tests.support.ports import free_port
from tests.support.recorder import RecordingUpstream
from tests.support.redis_server import GarbagePeer, RedisServer, SilentPeer
from tests.support.strict_client import concurrently, request


@pytest.fixture
def upstream():
    server = RecordingUpstream()
    yield server
    server.close()


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.stop()


def config(upstream_url: str, address: str, *, capacity: int = 5, timeout: str = "1s",
           failure_mode: str = "closed", extra: str = "", key: str | None = None,
           gateway: str = "") -> str:
    key_line = f"key = '{key}', " if key else ""
    return f'''
[gateway]
admin = "127.0.0.1:{{admin_port}}"
access_log = "off"
drain_timeout = "5s"
{gateway}

[[listener]]
name = "main"
bind = "127.0.0.1:{{port}}"

[[route]]
name = "shared"
match = {{ path_prefix = "/" }}
backend = "app"

[route.rate_limit.redis]
address = "{address}"
timeout = "{timeout}"
failure_mode = "{failure_mode}"
limits = [ {{ {key_line}capacity = {capacity}, refill = {{ tokens = {capacity}, every = "1h" }} }} ]
{extra}

[backend.app]
type = "http"
url = "{upstream_url}"
'''




ERROR_500 = {"error": "rate_limit_error", "message": "the rate limit service is unavailable"}


def test_three_gateways_share_one_limit_exactly(start_gateway, upstream, redis):
    text = config(upstream.url, redis.address, capacity=20, gateway="workers = 2")
    gateways = [start_gateway(text) for _ in range(3)]

    def one(i: int):
        return request(gateways[i % 3].port, f"/r{i}")

    responses = concurrently(60, one)
    statuses = [r.status for r in responses]
    assert statuses.count(200) == 20 and statuses.count(429) == 40, statuses
    assert len(upstream.wait_for(20)) == 20
    # Each gateway let some through and refused some: the limit is the sum, not per process.
    for g in range(3):
        mine = statuses[g::3]
        assert mine.count(200) + mine.count(429) == 20
    allowed = sorted(int(r.header("x-ratelimit-remaining")) for r in responses if r.status == 200)
    assert allowed == list(range(20))
    refused = next(r for r in responses if r.status == 429)
    assert refused.json()["error"] == "rate_limited"
    assert (refused.header("x-ratelimit-limit"), refused.header("x-ratelimit-remaining"),
            refused.header("retry-after")) == ("20", "0", "180")
    total_allowed = sum(metric(g.metrics(), "agproxy_rate_limit_decisions_total", kind="redis",
                               result="allowed") for g in gateways)
    assert total_allowed == 20
    # The bucket's key expires when it would be full again: at most an hour from now.
    keys = redis.cli("KEYS", "agproxy:rl:*").split()
    assert keys == ["agproxy:rl:shared:0:20/20/3600:requests"]
    assert 3_500_000 < int(redis.cli("PTTL", keys[0])) <= 3_600_000


def test_concurrent_requests_share_connections_and_one_script_load(start_gateway, upstream, redis):
    def stats(section: str) -> dict[str, str]:
        return dict(l.split(":", 1) for l in redis.cli("INFO", section).splitlines() if ":" in l)

    def calls(command: str) -> int:
        line = stats("commandstats").get(f"cmdstat_{command}", "calls=0,")
        return int(line.split(",")[0].split("=")[1])

    gw = start_gateway(config(upstream.url, redis.address, capacity=1000))
    # The first burst meets an empty script cache: one SCRIPT LOAD for all of them.
    assert [r.status for r in concurrently(20, lambda i: request(gw.port, f"/a{i}"))] == [200] * 20
    assert calls("script|load") == 1
    redis.cli("CONFIG", "RESETSTAT")
    before = int(stats("stats")["total_connections_received"])
    assert [r.status for r in concurrently(40, lambda i: request(gw.port, f"/b{i}"))] == [200] * 40
    assert calls("evalsha") == 40 and calls("script|load") == 0      # one call per request
    # ... on the connections the first burst opened (at most MAX_IN_FLIGHT + 1); the
    # INFO calls of this test are the only new ones.
    assert int(stats("stats")["total_connections_received"]) - before <= 3
    clients = [l for l in redis.cli("CLIENT", "LIST").splitlines() if "cmd=client" not in l]
    assert 1 <= len(clients) <= 5, clients


def test_unix_socket_password_and_per_key_buckets(start_gateway, upstream, tmp_path):
    server = RedisServer(tmp_path, unix=True, password="s3cret", name="redis-unix")
    try:
        text = config(upstream.url, server.address, capacity=2, key='request.headers["x-user"]',
                      extra='password_env = "RL_REDIS_PASSWORD"')
        gw = start_gateway(text, env={"RL_REDIS_PASSWORD": "s3cret"})
        got = [(u, request(gw.port, "/", {"x-user": u}).status) for u in ("a", "a", "a", "b", "b", "b")]
        assert got == [("a", 200), ("a", 200), ("a", 429), ("b", 200), ("b", 200), ("b", 429)]
        # A key over 128 bytes is stored as its digest.
        assert request(gw.port, "/", {"x-user": "x" * 500}).status == 200
        keys = sorted(server.cli("KEYS", "*").split())
        base = "agproxy:rl:shared:0:2/2/3600:requests:"
        assert len(keys) == 3 and keys[1:] == [base + "a", base + "b"]
        assert keys[0].startswith(base + "#") and len(keys[0]) == len(base) + 33
        # The password never shows in /config.
        status, body = gw.admin_get("/config")
        assert status == 200 and b"s3cret" not in body
        # The wrong password: the limiter fails, and fails closed.
        bad = start_gateway(text, env={"RL_REDIS_PASSWORD": "wrong"})
        r = request(bad.port, "/", {"x-user": "c"})
        assert (r.status, r.json()) == (500, ERROR_500)
    finally:
        server.stop()


def test_tls_to_redis_verifies_the_server(start_gateway, upstream, tmp_path, certs):
    server = RedisServer(tmp_path, tls=certs, name="redis-tls")
    try:
        assert server.address.startswith("rediss://")
        ok = config(upstream.url, server.address, capacity=2, extra=f'tls_ca_file = "{certs["ca"]}"')
        gw = start_gateway(ok)
        assert [request(gw.port, "/").status for _ in range(3)] == [200, 200, 429]
        # Without the CA that signed the server's certificate: verification fails, closed.
        untrusted = start_gateway(config(upstream.url, server.address, capacity=2))
        r = request(untrusted.port, "/")
        assert (r.status, r.json()) == (500, ERROR_500)
        assert "CERTIFICATE_VERIFY_FAILED" in untrusted.logs()
    finally:
        server.stop()


def test_password_env_must_be_set(tmp_path):
    import subprocess
    from tests.support.gateway import agproxy_cmd
    cfg = tmp_path / "c.toml"
    cfg.write_text(config("http://127.0.0.1:9", "redis://127.0.0.1:6379",
                          extra='password_env = "RL_NOT_SET_ANYWHERE"'))
    out = subprocess.run(agproxy_cmd() + ["validate", str(cfg)], capture_output=True, text=True)
    assert out.returncode == 1
    assert "route[0].rate_limit.redis.password_env: environment variable RL_NOT_SET_ANYWHERE is not set" in out.stderr


# -- faults --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["closed", "open"])
def test_redis_not_listening(start_gateway, upstream, mode):
    gw = start_gateway(config(upstream.url, f"redis://127.0.0.1:{free_port()}", failure_mode=mode))
    r = request(gw.port, "/x")
    if mode == "closed":
        assert (r.status, r.json()) == (500, ERROR_500)
        assert upstream.targets() == []
        assert metric(gw.metrics(), "agproxy_rate_limit_decisions_total", result="error_denied") == 1
    else:
        assert r.status == 200 and r.header("x-ratelimit-limit") is None
        assert upstream.targets() == ["/x"]
        assert metric(gw.metrics(), "agproxy_rate_limit_decisions_total", result="error_allowed") == 1
    assert "rate_limit_redis" in gw.logs() and "unreachable" in gw.logs()


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_redis_that_never_answers_times_out(start_gateway, upstream, mode):
    peer = SilentPeer()
    try:
        gw = start_gateway(config(upstream.url, peer.address, timeout="300ms", failure_mode=mode))
        start = time.monotonic()
        statuses = [r.status for r in concurrently(5, lambda i: request(gw.port, f"/t{i}"))]
        took = time.monotonic() - start
        assert took < 5
        if mode == "closed":
            assert statuses == [500] * 5 and upstream.targets() == []
        else:
            assert statuses == [200] * 5 and len(upstream.wait_for(5)) == 5
        assert "timeout" in gw.logs()
    finally:
        peer.close()


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_redis_answering_garbage(start_gateway, upstream, mode):
    peer = GarbagePeer()
    try:
        gw = start_gateway(config(upstream.url, peer.address, failure_mode=mode))
        r = request(gw.port, "/g")
        if mode == "closed":
            assert (r.status, r.json()) == (500, ERROR_500) and upstream.targets() == []
        else:
            assert r.status == 200 and upstream.targets() == ["/g"]
        assert peer.connections >= 1
    finally:
        peer.close()


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_redis_answering_an_error(start_gateway, upstream, redis, mode):
    # The bucket's key holds a hash: GET inside the script fails with WRONGTYPE.
    redis.cli("HSET", "agproxy:rl:shared:0:5/5/3600:requests", "f", "v")
    gw = start_gateway(config(upstream.url, redis.address, failure_mode=mode))
    r = request(gw.port, "/e")
    if mode == "closed":
        assert (r.status, r.json()) == (500, ERROR_500) and upstream.targets() == []
    else:
        assert r.status == 200 and upstream.targets() == ["/e"]
    assert "WRONGTYPE" in gw.logs()
    # Fixed on the Redis side: the next request is counted normally.
    redis.cli("DEL", "agproxy:rl:shared:0:5/5/3600:requests")
    r = request(gw.port, "/e2")
    assert (r.status, r.header("x-ratelimit-remaining")) == (200, "4")


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_redis_dying_and_coming_back(start_gateway, upstream, redis, mode):
    gw = start_gateway(config(upstream.url, redis.address, capacity=100, failure_mode=mode))
    assert request(gw.port, "/before").header("x-ratelimit-remaining") == "99"
    redis.stop()
    r = request(gw.port, "/down")
    assert r.status == (500 if mode == "closed" else 200)
    assert ("/down" in upstream.targets()) == (mode == "open")
    redis.start()            # same port, empty: the bucket starts full again
    deadline = time.monotonic() + 10
    while True:
        r = request(gw.port, "/after")
        if r.status == 200 and r.header("x-ratelimit-remaining") is not None:
            break
        assert time.monotonic() < deadline, gw.logs()
        time.sleep(0.05)     # polling for the recovery (a condition), bounded
    assert r.header("x-ratelimit-remaining") == "99"


def test_the_shipped_examples_validate_and_the_rate_limits_example_limits(tmp_path, start_gateway, redis):
    import re
    import subprocess
    from tests.support.gateway import ROOT, agproxy_cmd
    yaml = (ROOT / "conf" / "k8s-replicas.yaml").read_text()
    block = re.search(r"  agproxy.toml: \|\n((?:    .*\n|\n)+)", yaml).group(1)
    embedded = tmp_path / "k8s-replicas.toml"
    embedded.write_text("\n".join(line[4:] for line in block.splitlines()) + "\n")
    for path, env in ((embedded, {"REDIS_PASSWORD": "x"}), (ROOT / "conf" / "rate-limits.toml", {})):
        out = subprocess.run(agproxy_cmd() + ["validate", str(path)], capture_output=True, text=True,
                             env={**__import__("os").environ, **env})
        assert out.returncode == 0, (path, out.stderr)
    # conf/rate-limits.toml as written, on test ports and this test's Redis.
    text = (ROOT / "conf" / "rate-limits.toml").read_text()
    text = text.replace('bind = "0.0.0.0:8080"', 'bind = "127.0.0.1:{port}"')
    text = text.replace('admin = "127.0.0.1:15000"', 'admin = "127.0.0.1:{admin_port}"')
    text = text.replace('workers = 0 ', 'workers = 2 ').replace('access_log = "stdout"', 'access_log = "off"')
    text = text.replace('redis://127.0.0.1:6379', redis.address)
    gw = start_gateway(text)
    statuses = [request(gw.port, "/demo", {"x-user": "alice"}).status for _ in range(12)]
    assert statuses == [200] * 10 + [429] * 2
    assert request(gw.port, "/demo").status == 200                 # the anonymous bucket
    assert request(gw.port, "/demo", {"x-user": "bob"}).header("x-ratelimit-remaining") == "9"


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_a_key_that_cannot_be_computed_follows_failure_mode(start_gateway, upstream, redis, mode):
    gw = start_gateway(config(upstream.url, redis.address, key='request.headers["x-user"]', failure_mode=mode))
    r = request(gw.port, "/nobody")
    if mode == "closed":
        assert (r.status, r.json()) == (500, {
            "error": "rate_limit_error", "message": "the rate limit key could not be computed for this request"})
        assert upstream.targets() == []
    else:
        assert r.status == 200 and upstream.targets() == ["/nobody"]
    assert redis.cli("KEYS", "*").split() == []          # Redis was not asked about a partial key
    assert "route[0].rate_limit.redis.limits[0].key" in gw.logs()


def test_a_repeated_key_header_is_refused_even_failing_open(start_gateway, upstream):
    # Not a failure of the limiter (which failure_mode = "open" would let through): the
    # client's own doing, refused before Redis is asked, here one that is not even there.
    gw = start_gateway(config(upstream.url, f"redis://127.0.0.1:{free_port()}", failure_mode="open",
                              key='request.headers["x-user"]'))
    r = request(gw.port, "/", [("x-user", "a"), ("x-user", "b")])
    assert r.status == 400 and r.json()["error"] == "bad_request"
    assert request(gw.port, "/", {"x-user": "a"}).status == 200     # failing open, as configured
    assert len(upstream.targets()) == 1
