"""The remote-call helper (agproxy/upstream/remote.py): outcomes under failure_mode
open and closed, counting, logging once per interval (injected clock), config."""

from __future__ import annotations

import asyncio
import logging

import pytest
import uvloop

from agproxy.config.reader import Problems, Section
from agproxy.upstream.errors import UpstreamError, UpstreamTimeout
from agproxy.upstream.grpc import GrpcError, Status
from agproxy.upstream.remote import (Failed, RemoteDependency, RemoteSettings, classify, outcome_counts,
                                     remote_settings)

_names = iter(range(10**6))


def fresh(mode: str = "closed", timeout: float = 0.5, **kw) -> RemoteDependency:
    """A dependency with a name of its own: the count table is per process."""
    return RemoteDependency(f"dep{next(_names)}", RemoteSettings(timeout, mode), target="10.0.0.9:81", **kw)


def run(coro):
    return uvloop.run(coro)


async def returns(value):
    return value


async def raises(exc):
    raise exc


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- outcomes --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["closed", "open"])
def test_ok_returns_the_result_itself_and_counts(mode):
    dep = fresh(mode)
    marker = object()
    assert run(dep.call(returns(marker))) is marker
    assert outcome_counts()[dep.name] == {"ok": 1, "timeout": 0, "unreachable": 0, "error": 0, "garbage": 0}


@pytest.mark.parametrize("mode, allowed", [("closed", False), ("open", True)])
@pytest.mark.parametrize("exc, failure", [
    (GrpcError(Status.PERMISSION_DENIED, "no", "error"), "error"),
    (GrpcError(Status.UNAVAILABLE, "refused", "unreachable"), "unreachable"),
    (GrpcError(Status.DEADLINE_EXCEEDED, "late", "timeout"), "timeout"),
    (GrpcError(Status.INTERNAL, "bad frame", "garbage"), "garbage"),
    (UpstreamError("connect", "refused"), "unreachable"),
    (UpstreamError("reset", "lost"), "unreachable"),
    (UpstreamError("protocol", "not HTTP"), "garbage"),
    (UpstreamTimeout(), "timeout"),
    (ConnectionRefusedError(111, "refused"), "unreachable"),
    (TimeoutError(), "timeout"),
    (KeyError("surprise"), "error"),
], ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v))
def test_failures_are_classified_and_follow_failure_mode(mode, allowed, exc, failure):
    dep = fresh(mode)
    out = run(dep.call(raises(exc)))
    assert type(out) is Failed
    assert (out.dependency, out.failure, out.allowed, out.error) == (dep.name, failure, allowed, exc)
    counts = outcome_counts()[dep.name]
    assert counts[failure] == 1 and sum(counts.values()) == 1


@pytest.mark.parametrize("mode, allowed", [("closed", False), ("open", True)])
def test_timeout_is_enforced_here_whatever_the_call_does(mode, allowed):
    dep = fresh(mode, timeout=0.05)
    cancelled = asyncio.Event()

    async def never():
        try:
            await asyncio.get_running_loop().create_future()     # no answer, ever
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def main():
        loop = asyncio.get_running_loop()
        start = loop.time()
        out = await dep.call(never())
        return out, loop.time() - start, cancelled.is_set()
    out, elapsed, was_cancelled = run(main())
    assert type(out) is Failed and out.failure == "timeout" and out.allowed is allowed
    assert str(out.error) == "no answer within 0.05s"
    assert 0.045 <= elapsed < 1.0                # (uvloop timers tick in milliseconds)
    assert was_cancelled                       # the call itself was stopped, not left running


def test_cancellation_of_the_caller_propagates_and_is_not_counted():
    dep = fresh()

    async def main():
        started = asyncio.Event()

        async def wait():
            started.set()
            await asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(dep.call(wait()))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    run(main())
    assert sum(outcome_counts()[dep.name].values()) == 0


def test_classify_hook_for_library_exceptions():
    class RedisConnectionError(Exception):
        pass

    class RedisResponseError(Exception):
        pass

    def hook(exc):
        return {RedisConnectionError: "unreachable", RedisResponseError: "error"}.get(type(exc))
    dep = fresh("open", classify=hook)
    assert run(dep.call(raises(RedisConnectionError("down")))).failure == "unreachable"
    assert run(dep.call(raises(RedisResponseError("NOSCRIPT")))).failure == "error"
    assert run(dep.call(raises(ValueError("odd")))).failure == "error"
    assert classify(RedisConnectionError(), hook) == "unreachable"


def test_counts_are_per_name_and_survive_a_new_dependency_of_that_name():
    first = fresh()
    run(first.call(returns(1)))
    again = RemoteDependency(first.name, RemoteSettings(1.0, "open"))       # e.g. after a reload
    run(again.call(raises(UpstreamError("connect", "refused"))))
    counts = outcome_counts()[first.name]
    assert counts["ok"] == 1 and counts["unreachable"] == 1


def test_bad_failure_mode_is_refused():
    with pytest.raises(ValueError):
        RemoteDependency("x", RemoteSettings(1.0, "sometimes"))


# -- logging -----------------------------------------------------------------------------------

def test_a_failing_dependency_is_logged_once_per_interval_then_its_recovery(caplog):
    clock = Clock()
    dep = fresh("closed", log_interval=10.0, clock=clock)
    caplog.set_level(logging.INFO, logger="agproxy.remote")

    def messages():
        return [r.getMessage() for r in caplog.records if r.name == "agproxy.remote"]

    async def main():
        for _ in range(500):                             # a burst of failures: one line
            await dep.call(raises(UpstreamError("connect", "connect to 10.0.0.9:81 failed: refused")))
        assert len(messages()) == 1
        clock.now += 3
        await dep.call(returns("ok"))                    # recovered, but inside the interval: quiet
        await dep.call(raises(UpstreamTimeout()))
        assert len(messages()) == 1
        clock.now += 10                                   # the next interval: one summary line
        await dep.call(raises(UpstreamTimeout()))
        assert len(messages()) == 2
        clock.now += 10
        await dep.call(returns("ok"))                     # recovery, said once
        await dep.call(returns("ok"))
        clock.now += 100
        await dep.call(returns("ok"))
    run(main())
    first, summary, recovered = messages()
    assert first == (f"{dep.name} 10.0.0.9:81 failed: unreachable: connect to 10.0.0.9:81 failed: refused; "
                     "failure_mode closed: requests are refused")
    assert summary.startswith(f"{dep.name} 10.0.0.9:81 failed: timeout: ")
    assert summary.endswith("(500 more failures since the last message)")   # 499 + 1 timeout in between
    assert recovered == f"{dep.name} 10.0.0.9:81 answers again"
    assert all(r.exc_info is None for r in caplog.records if r.name == "agproxy.remote")


def test_an_unexpected_exception_is_logged_with_its_traceback(caplog):
    dep = fresh("open")
    caplog.set_level(logging.WARNING, logger="agproxy.remote")
    out = run(dep.call(raises(ZeroDivisionError("division by zero"))))
    assert out.failure == "error" and out.allowed
    (record,) = [r for r in caplog.records if r.name == "agproxy.remote"]
    assert "requests are let through" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is ZeroDivisionError


def test_a_long_server_message_is_cut_in_the_log(caplog):
    dep = fresh()
    caplog.set_level(logging.WARNING, logger="agproxy.remote")
    run(dep.call(raises(GrpcError(Status.INTERNAL, "x" * 5000, "error"))))
    (record,) = [r for r in caplog.records if r.name == "agproxy.remote"]
    assert len(record.getMessage()) < 500


# -- config ------------------------------------------------------------------------------------

def read(table: dict, **kw) -> tuple[RemoteSettings, list[str]]:
    problems = Problems()
    sec = Section("route[0].ext_authz", table, problems)
    settings = remote_settings(sec, **kw)
    sec.done()
    return settings, problems.items


def test_settings_defaults_and_values():
    assert read({}, default_timeout="2s") == (RemoteSettings(2.0, "closed"), [])
    assert read({"timeout": "20ms", "failure_mode": "open"}, default_timeout="2s") == \
        (RemoteSettings(0.02, "open"), [])


@pytest.mark.parametrize("table, problem", [
    ({"timeout": "0s"}, "route[0].ext_authz.timeout: must be more than 0 and at most 300s"),
    ({"timeout": "1h"}, "route[0].ext_authz.timeout: must be more than 0 and at most 300s"),
    ({"timeout": 5}, 'route[0].ext_authz.timeout: expected a duration string such as "5s", got an integer'),
    ({"timeout": "soon"}, 'route[0].ext_authz.timeout: invalid duration \'soon\' (expected e.g. "250ms", "5s", "10m")'),
    ({"failure_mode": "maybe"}, "route[0].ext_authz.failure_mode: must be one of 'closed', 'open', got 'maybe'"),
    ({"failure_mode": True}, "route[0].ext_authz.failure_mode: expected a string, got a boolean"),
    ({"failure_mod": "open"}, 'route[0].ext_authz.failure_mod: unknown key (did you mean "failure_mode"?)'),
])
def test_settings_problems_by_toml_path(table, problem):
    settings, problems = read(table, default_timeout="2s")
    assert problems == [problem]
    assert settings.failure_mode == "closed"             # a bad value never turns into "open"
