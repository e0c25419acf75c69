"""Policies: one module per route policy key (see proxy/build.py POLICY_MODULES).

Theory of operation: each module's `build(sec, ctx)` validates its section (every
CEL expression compiled here, errors reported with their TOML path) and returns a
`Filter` (proxy/contract.py) or None when the section asks for nothing. This package
module holds the helpers every policy shares: compiling CEL with a path, the
rate-limited "expression failed" log line, and header name / value checks (a value
computed from a claim must never smuggle a CR/LF into the request head).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from agproxy.config.reader import Problems

log = logging.getLogger("agproxy.policy")

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Names a policy may never set or remove: framing and connection management belong
# to the HTTP layer; pseudo-headers do not exist in a Headers list.
RESERVED_HEADERS = frozenset({
    "connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
    "upgrade", "content-length", "host",
})


def compile_cel(problems: Problems, path: str, source: Any) -> Any:
    """Compile one CEL expression; a problem at `path` (and None) when it is invalid."""
    from agproxy.cel import CelCompileError, compile_expression
    if not isinstance(source, str):
        problems.add(path, "expected a CEL expression (a string)")
        return None
    if not source.strip():
        problems.add(path, "empty CEL expression")
        return None
    try:
        return compile_expression(source)
    except CelCompileError as exc:
        problems.add(path, f"invalid CEL: {exc}")
        return None


def check_header_name(problems: Problems, path: str, name: str, *, allow_reserved: bool = False) -> str | None:
    """A header name from the config, lowercased; a problem when it is not an HTTP token."""
    if not _TOKEN.match(name):
        problems.add(path, f"invalid header name {name!r}")
        return None
    lname = name.lower()
    if not allow_reserved and lname in RESERVED_HEADERS:
        problems.add(path, f"header {name!r} cannot be set or removed by a policy")
        return None
    return lname


def header_value_ok(value: str) -> bool:
    """No control characters other than tab (a CR/LF would split the header)."""
    return _BAD_VALUE.search(value) is None


class ErrorLog:
    """Log CEL evaluation failures, at most once per `interval` per expression.

    A misconfigured expression fails on every request; one line per request would
    drown the log, one per interval (with the count of suppressed ones) does not.
    """

    def __init__(self, interval: float = 10.0):
        self.interval = interval
        self._last: dict[str, tuple[float, int]] = {}

    def error(self, where: str, source: str, exc: BaseException, what: str = "failed",
              level: int = logging.WARNING) -> None:
        now = time.monotonic()
        last, suppressed = self._last.get(where, (0.0, 0))
        if last and now - last < self.interval:
            self._last[where] = (last, suppressed + 1)
            return
        self._last[where] = (now, 0)
        extra = f" ({suppressed} similar suppressed)" if suppressed else ""
        log.log(level, "%s: CEL expression %r %s: %s%s", where, source, what, exc, extra)


eval_errors = ErrorLog()
