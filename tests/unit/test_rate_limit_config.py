"""`[route.rate_limit]` at load: every mistake reported by its TOML path, nothing built
from a half-valid section; /config shows the limits and no secrets."""

from __future__ import annotations

import tomllib

import pytest

from agproxy.config.model import parse
from agproxy.config.reader import ConfigError
from agproxy.proxy.build import build_runtime

BASE = """
[[listener]]
name = "main"
bind = "127.0.0.1:1"

[[route]]
name = "r"
backend = "b"

[backend.b]
type = "static"
"""


def runtime(text: str):
    # The policy tables belong to the route: put them right after [[route]].
    head, tail = BASE.split("[backend.b]")
    return build_runtime(parse(tomllib.loads(head + text + "\n[backend.b]" + tail)))


def problems(text: str) -> list[str]:
    """The problems, with the CEL library's own syntax message cut after "invalid CEL"."""
    with pytest.raises(ConfigError) as info:
        runtime(text)
    return [p.split(": invalid CEL")[0] + ": invalid CEL" if ": invalid CEL" in p else p
            for p in info.value.problems]


def test_local_limit_problems_by_path():
    assert problems("""
[[route.rate_limit.local]]
key = "jwt.sub +"
capacity = 0
unit = "bytes"
refill = { tokens = 0, every = "soon", extra = 1 }
""") == [
        "route[0].rate_limit.local[0].key: invalid CEL",
        "route[0].rate_limit.local[0].capacity: must be >= 1, got 0",
        "route[0].rate_limit.local[0].unit: must be one of 'requests', 'tokens', got 'bytes'",
        "route[0].rate_limit.local[0].refill.tokens: must be >= 1, got 0",
        'route[0].rate_limit.local[0].refill.every: invalid duration \'soon\' (expected e.g. "250ms", "5s", "10m")',
        "route[0].rate_limit.local[0].refill.extra: unknown key",
    ]


def test_local_limit_required_keys_and_rates():
    assert problems("""
[[route.rate_limit.local]]
key = "jwt.sub"
""") == ["route[0].rate_limit.local[0].capacity: required",
         "route[0].rate_limit.local[0].refill: required"]
    assert problems("""
[[route.rate_limit.local]]
capacity = 5
refill = { tokens = 2000000000, every = "1s" }
""") == ["route[0].rate_limit.local[0].refill: more than 1,000,000,000 tokens per second is not supported"]
    assert problems("""
[[route.rate_limit.local]]
capacity = 1000000000000
refill = { tokens = 1, every = "1h" }
""") == ["route[0].rate_limit.local[0].capacity: capacity / refill rate is over 10 years"]


def test_an_empty_section_and_unknown_keys():
    assert problems("""
[route.rate_limit]
""") == ["route[0].rate_limit: no limits: add [[...local]] entries, a [...redis] or a [...remote] table"]
    assert problems("""
[route.rate_limit]
locals = []
""")[0] == 'route[0].rate_limit.locals: unknown key (did you mean "local"?)'


def test_redis_problems_by_path():
    assert problems("""
[route.rate_limit.redis]
address = "redis://user:pw@127.0.0.1:6379"
timeout = "2m"
failure_mode = "maybe"
limits = [ { capacity = 5, refill = { tokens = 5, every = "1s" }, key = 1 } ]
""") == [
        "route[0].rate_limit.redis.address: put no credentials in the address: use password_env",
        "route[0].rate_limit.redis.timeout: must be more than 0 and at most 60s",
        "route[0].rate_limit.redis.failure_mode: must be one of 'closed', 'open', got 'maybe'",
        "route[0].rate_limit.redis.limits[0].key: expected a CEL expression (a string)",
    ]
    assert problems("""
[route.rate_limit.redis]
address = "tcp://127.0.0.1:6379"
limits = [ { capacity = 5, refill = { tokens = 10000000, every = "1s" } } ]
""") == [
        "route[0].rate_limit.redis.address: invalid Redis address 'tcp://127.0.0.1:6379' "
        "(expected redis://host:port, rediss://... or unix:///path)",
        "route[0].rate_limit.redis.limits[0].refill: more than 1,000,000 tokens per second is not supported",
    ]
    assert problems("""
[route.rate_limit.redis]
address = "unix://relative.sock"
""") == ["route[0].rate_limit.redis.address: invalid unix socket address 'unix://relative.sock' "
         "(expected unix:///absolute/path)",
         "route[0].rate_limit.redis.limits: required"]


def test_remote_problems_by_path():
    assert problems("""
[route.rate_limit.remote]
address = "nowhere"
domain = ""
descriptors = [[ { key = "user", value = "jwt.sub" }, { key = "", value = "nope(" } ], []]
""") == [
        "route[0].rate_limit.remote.address: expected host:port, got 'nowhere'",
        "route[0].rate_limit.remote.domain: must not be empty",
        "route[0].rate_limit.remote.descriptors[0][1].key: must not be empty",
        "route[0].rate_limit.remote.descriptors[0][1].value: invalid CEL",
        "route[0].rate_limit.remote.descriptors[1]: expected a non-empty list of { key = \"...\", value = \"<CEL>\" }",
    ]


def test_describe_shows_the_limits_and_no_password(monkeypatch):
    monkeypatch.setenv("RL_TEST_PASSWORD", "hunter2-secret")
    rt = runtime("""
[[route.rate_limit.local]]
key = "jwt.sub"
capacity = 5
refill = { tokens = 5, every = "1m" }

[route.rate_limit.redis]
address = "redis://127.0.0.1:6379"
password_env = "RL_TEST_PASSWORD"
limits = [ { capacity = 7, refill = { tokens = 7, every = "1h" } } ]

[route.rate_limit.remote]
address = "127.0.0.1:8081"
domain = "agents"
descriptors = [[ { key = "user", value = "jwt.sub" } ]]
""")
    described = rt.describe()
    route = next(r for r in described["routes"] if r["name"] == "r")
    assert route["filters"] == [{
        "type": "rate_limit",
        "local": [{"capacity": 5, "refill": {"tokens": 5, "every_seconds": 60.0}, "unit": "requests",
                   "key": "jwt.sub"}],
        "redis": {"address": "redis://127.0.0.1:6379/0", "timeout_seconds": 0.02, "failure_mode": "closed",
                  "limits": [{"capacity": 7, "refill": {"tokens": 7, "every_seconds": 3600.0},
                              "unit": "requests"}]},
        "remote": {"address": "127.0.0.1:8081", "domain": "agents", "timeout_seconds": 0.02,
                   "failure_mode": "closed", "unit": "requests",
                   "descriptors": [[{"key": "user", "value": "jwt.sub"}]]},
    }]
    assert "hunter2" not in repr(described)
