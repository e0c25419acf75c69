"""Calling a remote dependency per request: one deadline, one failure mode, counted.

Theory of operation: ext_authz, the rate-limit service, Redis and the token
exchange are services a request waits on. Each policy that uses one builds a
`RemoteDependency` at load time (a name from a fixed set such as `ext_authz`,
the target for logs, the `timeout` and `failure_mode` from its config section
via `remote_settings()`), and per request does

    result = await dep.call(client_call(...))
    if type(result) is Failed:
        if not result.allowed: answer the configured error (status_on_error, 500, ...)
        else: go on as if allowed (the failure is counted)

`call()` awaits the call under one deadline (`timeout`, enforced here with a
timer whatever the awaited code does, `upstream/deadline.py`; a gRPC method can
skip its own timer with `local_deadline=False`), and returns the call's result as is, or a `Failed` saying
what went wrong (`failure`: timeout, unreachable, error, garbage) and whether
the request may go on (`allowed`: failure_mode = "open"). The caller never sees
an exception from the dependency; cancellation (the client went away) still
propagates and is not counted.

Failures are classified by the exception: an exception carrying `failure` (e.g.
`GrpcError`) says so itself; `TimeoutError` is a timeout; `UpstreamError` by its
kind (connect/reset → unreachable, protocol → garbage); `OSError` → unreachable;
a dependency-specific `classify(exc)` (Redis's exceptions) is asked before
those; anything else is "error" and logged with its traceback.

Every outcome (ok and each failure) is counted per dependency name in a
process-wide table (`outcome_counts()`), which survives config reloads (counters
must not go down) and whose label values are config names, never request data.
A failing dependency is logged at most once per `log_interval` per dependency
(the first failure at once, then a summary of the failures in between), and its
recovery likewise: a dead ext_authz at 5k req/s is one line every 10 s, not 5k.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar

from agproxy.config.reader import Section
from agproxy.upstream.deadline import within
from agproxy.upstream.errors import UpstreamError

__all__ = ["Failed", "RemoteDependency", "RemoteSettings", "FAILURES", "OUTCOMES", "classify",
           "outcome_counts", "remote_settings"]

T = TypeVar("T")
log = logging.getLogger("agproxy.remote")

FAILURES = ("timeout", "unreachable", "error", "garbage")
OUTCOMES = ("ok",) + FAILURES
FAILURE_MODES = ("closed", "open")

#: dependency name → outcome → count, for this process (read by the metrics exposition)
_COUNTS: dict[str, dict[str, int]] = {}


def outcome_counts() -> dict[str, dict[str, int]]:
    """A snapshot: {dependency name: {outcome: calls}}, every outcome present."""
    return {name: dict(counts) for name, counts in _COUNTS.items()}


def _counts_for(name: str) -> dict[str, int]:
    counts = _COUNTS.get(name)
    if counts is None:
        counts = _COUNTS[name] = dict.fromkeys(OUTCOMES, 0)
    return counts


# -- configuration -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RemoteSettings:
    timeout: float
    failure_mode: str = "closed"


def remote_settings(sec: Section, *, default_timeout: str | float,
                    max_timeout: float = 300.0) -> RemoteSettings:
    """`timeout` and `failure_mode` from a policy's section (problems by TOML path;
    the caller still owns `sec.done()`). `failure_mode` defaults to closed."""
    timeout = sec.duration("timeout", default_timeout)
    if timeout is not None and not 0 < timeout <= max_timeout:
        sec.error("timeout", f"must be more than 0 and at most {max_timeout:g}s")
        timeout = None
    mode = sec.str("failure_mode", "closed", choices=FAILURE_MODES)
    if timeout is None:    # already reported: a placeholder so the caller can go on checking
        timeout = float(default_timeout) if isinstance(default_timeout, (int, float)) else 1.0
    return RemoteSettings(timeout, mode or "closed")


# -- outcomes ------------------------------------------------------------------------------

class Failed:
    """The dependency did not give a usable answer. `allowed`: the request goes on
    (failure_mode open) or must get the caller's configured error (closed). `error`
    is the exception, for logs and tests; never show it to the client."""

    __slots__ = ("dependency", "failure", "allowed", "error")

    def __init__(self, dependency: str, failure: str, allowed: bool, error: BaseException):
        self.dependency = dependency
        self.failure = failure
        self.allowed = allowed
        self.error = error

    def __repr__(self) -> str:
        return (f"Failed({self.dependency}: {self.failure}, "
                f"{'allowed' if self.allowed else 'denied'}: {_describe(self.error)})")


def classify(exc: BaseException, hook: Callable[[BaseException], str | None] | None = None) -> str:
    """Which kind of failure an exception from a dependency call is."""
    return _classify(exc, hook)[0]


def _classify(exc: BaseException, hook) -> tuple[str, bool]:
    """(failure, known): known is false for an exception nobody expected (a bug?)."""
    if hook is not None:
        failure = hook(exc)
        if failure in FAILURES:
            return failure, True
    failure = getattr(exc, "failure", None)
    if failure in FAILURES:
        return failure, True
    if isinstance(exc, TimeoutError):
        return "timeout", True
    if isinstance(exc, UpstreamError):
        return _UPSTREAM_KINDS.get(exc.kind, "unreachable"), True
    if isinstance(exc, OSError):
        return "unreachable", True
    return "error", False


_UPSTREAM_KINDS = {"timeout": "timeout", "protocol": "garbage", "connect": "unreachable", "reset": "unreachable"}


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "..."    # a server's message: bounded


# -- the helper ----------------------------------------------------------------------------

class RemoteDependency:
    """One remote dependency of one policy (built at load, used per request)."""

    __slots__ = ("name", "target", "timeout", "failure_mode", "allow_on_failure", "classify_hook",
                 "log_interval", "_clock", "_counts", "_failing", "_next_log", "_since_log")

    def __init__(self, name: str, settings: RemoteSettings, *, target: str = "",
                 classify: Callable[[BaseException], str | None] | None = None,
                 log_interval: float = 10.0, clock: Callable[[], float] = time.monotonic):
        if settings.failure_mode not in FAILURE_MODES:
            raise ValueError(f"failure_mode must be one of {FAILURE_MODES}, got {settings.failure_mode!r}")
        self.name = name
        self.target = target
        self.timeout = settings.timeout
        self.failure_mode = settings.failure_mode
        self.allow_on_failure = settings.failure_mode == "open"
        self.classify_hook = classify
        self.log_interval = log_interval
        self._clock = clock
        self._counts = _counts_for(name)
        self._failing = False       # failures seen since the last recovery message
        self._next_log = 0.0        # no message (failure or recovery) before this time
        self._since_log: dict[str, int] = {}

    async def call(self, awaitable: Awaitable[T], span: Any = None) -> "T | Failed":
        """The call's result, or Failed; never raises for the dependency's sake.
        `span`, the call's CLIENT span when the request is sampled
        (telemetry/tracing.py `client_span`), is ended here: a failure sets its
        `error.type` to the failure's kind (timeout, unreachable, error, garbage)."""
        try:
            result = await within(self.timeout, awaitable)
        except Exception as exc:      # CancelledError is a BaseException: it propagates
            failed = self.failed(exc)
            if span is not None:
                span.fail(failed.failure, f"{self.name}: {failed.failure}: {_describe(exc)}")
            return failed
        except BaseException:
            if span is not None:
                span.fail("cancelled")
            raise
        self._counts["ok"] += 1
        if self._failing:
            self._maybe_log_recovery()
        if span is not None:
            span.end()
        return result

    def failed(self, exc: BaseException) -> Failed:
        """Count and log a failure (also for callers that ran the call themselves)."""
        failure, known = _classify(exc, self.classify_hook)
        self._counts[failure] += 1
        self._failing = True
        since = self._since_log
        since[failure] = since.get(failure, 0) + 1
        now = self._clock()
        if now >= self._next_log:
            self._next_log = now + self.log_interval
            others = sum(since.values()) - 1
            since.clear()
            more = f" ({others} more failures since the last message)" if others > 0 else ""
            action = "requests are let through" if self.allow_on_failure else "requests are refused"
            log.warning("%s %s failed: %s: %s; failure_mode %s: %s%s", self.name, self.target or "-",
                        failure, _describe(exc), self.failure_mode, action, more,
                        exc_info=None if known else exc)
        return Failed(self.name, failure, self.allow_on_failure, exc)

    def _maybe_log_recovery(self) -> None:
        now = self._clock()
        if now < self._next_log:
            return          # said something recently; a later success will tell
        self._next_log = now + self.log_interval
        self._failing = False
        since = self._since_log
        n = sum(since.values())
        since.clear()
        more = f" ({n} failures since the last message)" if n else ""
        log.warning("%s %s answers again%s", self.name, self.target or "-", more)

    def __repr__(self) -> str:
        return f"RemoteDependency({self.name} {self.target}, {self.timeout:g}s, {self.failure_mode})"

