"""`[[route.rate_limit.local]]` through the real gateway: exact across worker processes,
per-key buckets, the answers' headers, fail-closed keys, reload, evictions, metrics."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.support.gateway import metric
from tests.support.recorder import RecordingUpstream
from tests.support.strict_client import concurrently, request


@pytest.fixture
def upstream():
    server = RecordingUpstream()
    yield server
    server.close()


def config(upstream_url: str, limits: str, gateway: str = "", route_extra: str = "") -> str:
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
name = "limited"
match = {{ path_prefix = "/" }}
backend = "app"
{route_extra}
{limits}

[backend.app]
type = "http"
url = "{upstream_url}"
'''




def workers_of(gateway_pid: int) -> list[int]:
    children = Path(f"/proc/{gateway_pid}/task/{gateway_pid}/children").read_text().split()
    return [int(c) for c in children]


def established_by_pid(pids: list[int], port: int, peers: set[int]) -> dict[int, int]:
    """How many established TCP connections on local `port` from one of the client ports
    `peers` each process holds (not another client's, e.g. the readiness probe's)."""
    inodes: dict[str, int] = {}
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            m = re.fullmatch(r"socket:\[(\d+)\]", target)
            if m:
                inodes[m.group(1)] = pid
    counts = dict.fromkeys(pids, 0)
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        local_port = int(f[1].split(":")[1], 16)
        remote_port = int(f[2].split(":")[1], 16)
        if local_port == port and remote_port in peers and f[3] == "01" and f[9] in inodes:  # 01 = ESTABLISHED
            counts[inodes[f[9]]] += 1
    return counts


ONE_BUCKET = '''
[[route.rate_limit.local]]
capacity = 10
refill = { tokens = 10, every = "1h" }
'''


def test_two_workers_let_exactly_capacity_through(start_gateway, upstream):
    gw = start_gateway(config(upstream.url, ONE_BUCKET, gateway="workers = 2"))
    workers = workers_of(gw.proc.pid)
    assert len(workers) == 2
    held = []

    def one(i: int):
        resp, sock = request(gw.port, f"/r{i}", keep=True)
        held.append(sock)
        return resp

    responses = concurrently(50, one)
    try:
        # Both workers answered some of the 50 (per-worker buckets would have let 20 through).
        owners = established_by_pid(workers, gw.port, {s.getsockname()[1] for s in held})
        assert all(n > 0 for n in owners.values()), owners
        assert sum(owners.values()) == 50
    finally:
        for s in held:
            s.close()
    statuses = [r.status for r in responses]
    assert statuses.count(200) == 10 and statuses.count(429) == 40, statuses
    assert len(upstream.wait_for(10)) == 10
    refused = next(r for r in responses if r.status == 429)
    assert refused.json() == {"error": "rate_limited",
                              "message": "too many requests: the route's rate limit is reached"}
    assert refused.header("x-ratelimit-limit") == "10"
    assert refused.header("x-ratelimit-remaining") == "0"
    assert refused.header("x-ratelimit-reset") == "3600"     # full again in one hour
    assert refused.header("retry-after") == "360"             # one token per 6 minutes
    allowed = sorted(int(r.header("x-ratelimit-remaining")) for r in responses if r.status == 200)
    assert allowed == list(range(10))                         # 9, 8, ... 0: each exactly once
    assert all(r.header("x-ratelimit-limit") == "10" for r in responses)
    assert all(r.header("retry-after") is None for r in responses if r.status == 200)
    text = gw.metrics()
    assert metric(text, "agproxy_rate_limit_decisions_total", route="limited", kind="local",
                  result="allowed") == 10
    assert metric(text, "agproxy_rate_limit_decisions_total", route="limited", kind="local",
                  result="limited") == 40
    assert len(upstream.targets()) == 10


def test_buckets_per_key_and_the_most_constrained_limit_in_the_headers(start_gateway, upstream):
    # The route-wide limit first: it has taken its token when the user's limit refuses.
    limits = '''
[[route.rate_limit.local]]
capacity = 7
refill = { tokens = 7, every = "1h" }

[[route.rate_limit.local]]
key = 'request.headers["x-user"]'
capacity = 3
refill = { tokens = 3, every = "1h" }
'''
    gw = start_gateway(config(upstream.url, limits))
    seen = []
    for user in ("alice", "bob"):
        for _ in range(4):
            r = request(gw.port, "/x", {"x-user": user})
            seen.append((user, r.status, r.header("x-ratelimit-limit"), r.header("x-ratelimit-remaining")))
    # Headers: the limit with the fewest tokens left (the user's, until the route's is lower).
    assert seen == [
        ("alice", 200, "3", "2"), ("alice", 200, "3", "1"), ("alice", 200, "3", "0"), ("alice", 429, "3", "0"),
        ("bob", 200, "3", "2"), ("bob", 200, "3", "1"), ("bob", 200, "3", "0"), ("bob", 429, "3", "0"),
    ]
    # The route-wide limit (7) let 6 through: what a refused request took was given back,
    # so there is one left for carol, then none.
    r = request(gw.port, "/x", {"x-user": "carol"})
    assert (r.status, r.header("x-ratelimit-limit"), r.header("x-ratelimit-remaining")) == (200, "7", "0")
    r = request(gw.port, "/x", {"x-user": "dave"})
    assert (r.status, r.header("x-ratelimit-limit"), r.header("retry-after")) == (429, "7", "515")
    assert len(upstream.targets()) == 7
    text = gw.metrics()
    assert metric(text, "agproxy_rate_limit_decisions_total", result="limited") == 3
    # No label takes the key's value.
    assert "alice" not in text


def test_a_key_that_cannot_be_computed_fails_closed(start_gateway, upstream):
    limits = '''
[[route.rate_limit.local]]
key = 'request.headers["x-user"]'
capacity = 5
refill = { tokens = 5, every = "1h" }
'''
    gw = start_gateway(config(upstream.url, limits))
    r = request(gw.port, "/nobody")
    assert r.status == 500
    assert r.json() == {"error": "rate_limit_error",
                        "message": "the rate limit key could not be computed for this request"}
    assert upstream.targets() == []
    assert request(gw.port, "/somebody", {"x-user": "a"}).status == 200
    assert metric(gw.metrics(), "agproxy_rate_limit_decisions_total", result="error_denied") == 1
    assert "rate limit key: refusing" in gw.logs()


def test_reload_keeps_the_same_limits_buckets_and_resets_changed_ones(start_gateway, upstream):
    gw = start_gateway(config(upstream.url, ONE_BUCKET.replace("10", "3")))
    assert [request(gw.port, "/").status for _ in range(4)] == [200, 200, 200, 429]

    def reload_and_wait(text: str, count: int) -> None:
        gw.config_path.write_text(text)
        gw.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while metric(gw.metrics(), "agproxy_config_reloads_total", result="ok") < count:
            assert time.monotonic() < deadline, gw.logs()
            time.sleep(0.05)      # polling the reload counter (a condition), bounded

    same = gw.config_text
    reload_and_wait(same, 1)
    assert request(gw.port, "/").status == 429       # same route and limit: same bucket
    changed = same.replace("capacity = 3", "capacity = 4")
    reload_and_wait(changed, 2)
    assert [request(gw.port, "/").status for _ in range(5)] == [200, 200, 200, 200, 429]


def test_a_flood_of_keys_stays_in_the_table_and_counts_evictions(start_gateway, upstream):
    limits = '''
[[route.rate_limit.local]]
key = 'request.headers["x-user"]'
capacity = 1
refill = { tokens = 1, every = "1h" }
'''
    gw = start_gateway(config(upstream.url, limits, gateway="rate_limit_buckets = 64"))
    for i in range(200):
        assert request(gw.port, "/", {"x-user": f"u{i}"}).status == 200
    evictions = metric(gw.metrics(), "agproxy_rate_limit_evictions_total")
    assert 200 - 64 <= evictions < 200
    # The last key's bucket is still there: refused.
    assert request(gw.port, "/", {"x-user": "u199"}).status == 429


def test_a_limit_added_by_a_reload_is_still_shared_by_the_workers(start_gateway, upstream):
    # The first config has no rate limit, so loading it created no table: the
    # supervisor creates it before forking all the same.
    gw = start_gateway(config(upstream.url, "", gateway="workers = 2"))
    gw.config_path.write_text(gw.config_text.replace("\n\n[backend.app]", ONE_BUCKET + "\n[backend.app]"))
    gw.signal(signal.SIGHUP)
    limited_answers: list = []       # answers from workers already on the new config
    deadline = time.monotonic() + 15
    while len(limited_answers) < 60:
        assert time.monotonic() < deadline, gw.logs()
        batch = concurrently(10, lambda i: request(gw.port, f"/r{i}"))
        limited_answers += [r for r in batch if r.header("x-ratelimit-limit") is not None]
    statuses = [r.status for r in limited_answers]
    assert statuses.count(200) == 10, statuses


def test_over_http2_a_refused_stream_leaves_the_connection_serving(start_gateway, upstream):
    import asyncio

    import httpx

    gw = start_gateway(config(upstream.url, ONE_BUCKET.replace("10", "3")))

    async def run():
        async with httpx.AsyncClient(http1=False, http2=True, timeout=20) as client:
            first = await asyncio.gather(*(client.get(gw.url(f"/s{i}")) for i in range(5)))
            after = await client.get(gw.url("/after"))
            return first, after

    first, after = asyncio.run(run())
    assert all(r.http_version == "HTTP/2" for r in first)
    assert sorted(r.status_code for r in first) == [200, 200, 200, 429, 429]
    refused = next(r for r in first if r.status_code == 429)
    assert (refused.headers["x-ratelimit-limit"], refused.headers["x-ratelimit-remaining"],
            refused.headers["retry-after"]) == ("3", "0", "1200")
    assert refused.json()["error"] == "rate_limited"
    # The same connection goes on serving (a 429 is an answer, not a stream error).
    assert after.status_code == 429 and after.http_version == "HTTP/2"
    assert len(upstream.targets()) == 3


def test_the_gateways_headers_replace_a_backends_own(start_gateway):
    gw = start_gateway('''
[[route]]
name = "static"
match = { path_prefix = "/" }
backend = "fixed"

[[route.rate_limit.local]]
capacity = 5
refill = { tokens = 5, every = "1h" }

[backend.fixed]
type = "static"
status = 200
body = "ok"
headers = { "x-ratelimit-limit" = "999", "x-ratelimit-remaining" = "999", "x-other" = "kept" }
''')
    r = request(gw.port, "/")
    assert r.status == 200 and r.body == b"ok"
    assert (r.header("x-ratelimit-limit"), r.header("x-ratelimit-remaining"), r.header("x-ratelimit-reset"),
            r.header("x-other")) == ("5", "4", "720", "kept")


@pytest.mark.parametrize("key", ['request.headers["x-api-key"]',                       # read directly
                                 'request.headers["x-api-key"] + "/" + request.path'])  # through CEL
def test_a_repeated_header_a_key_reads_is_refused_not_a_fresh_bucket(start_gateway, upstream, key):
    # x-api-key: K plus x-api-key: <random> joined into one key would be a new bucket per
    # request while the upstream (Go, Starlette: the first value) still reads K.
    limits = f'''
[[route.rate_limit.local]]
key = '{key}'
capacity = 2
refill = {{ tokens = 2, every = "1h" }}
'''
    gw = start_gateway(config(upstream.url, limits))
    assert [request(gw.port, "/k", {"x-api-key": "K"}).status for _ in range(3)] == [200, 200, 429]
    for i in range(3):
        r = request(gw.port, "/k", [("x-api-key", "K"), ("x-api-key", f"random-{i}")])
        assert r.status == 400, (r.status, r.body)
        assert r.json() == {"error": "bad_request",
                            "message": "header 'x-api-key' is repeated and a rate limit key reads it"}
    assert len(upstream.targets()) == 2
    # Another header repeated is nobody's business here: the limit still answers for K.
    r = request(gw.port, "/k", [("x-api-key", "K"), ("accept", "a"), ("accept", "b")])
    assert r.status == 429
