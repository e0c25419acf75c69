"""Is a provider's answer unhealthy? The group's CEL `health` expression decides.

The expression sees `response`: `code` (the status), `headers` (lowercase names,
the first value of each) and `body` (the parsed JSON body of an error answer: a
non-2xx answer with a JSON body; `{}` otherwise, a streamed 2xx body is never
read for this). True means unhealthy. The default is
`response.code >= 500 || response.code == 429` (529, Anthropic's "overloaded",
is ≥ 500). Failures that never produced an answer (connect errors, resets,
timeouts, an answer the gateway cannot parse) are unhealthy whatever the
expression says; the caller does not ask.

An expression that fails to evaluate (say `response.body.error.type == "x"` on a
body without `error`) counts as unhealthy: fail closed, the provider leaves the
rotation rather than keep answering what nobody understood. That is logged once
per `log_interval` per group, not once per request.

The default expression is answered in Python (`status >= 500 or status == 429`)
without CEL: it is asked on every answer, healthy ones included, and an evaluation
(activation, the lazy `response` map, the library call) cost ~5 µs; any other
expression goes through CEL.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from agproxy import cel
from agproxy.http.messages import Headers

log = logging.getLogger("agproxy.llm")

DEFAULT_HEALTH = "response.code >= 500 || response.code == 429"


class HealthCheck:
    __slots__ = ("expr", "group", "log_interval", "clock", "_last_log", "eval_errors", "_default")

    def __init__(self, expr: "cel.Expression", group: str, log_interval: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.expr = expr
        self.group = group
        self.log_interval = log_interval
        self.clock = clock
        self._last_log: float | None = None
        self.eval_errors = 0
        self._default = " ".join(expr.source.split()) == DEFAULT_HEALTH

    @property
    def source(self) -> str:
        return self.expr.source

    def unhealthy(self, status: int, headers: Headers, body: Any = None) -> bool:
        if self._default:
            return status >= 500 or status == 429

        def response() -> dict:
            return {"code": status, "headers": headers.as_dict(), "body": body if isinstance(body, dict) else {}}
        try:
            return self.expr.evaluate_bool(cel.Activation({"response": response}))
        except cel.CelEvalError as exc:
            self.eval_errors += 1
            now = self.clock()
            if self._last_log is None or now - self._last_log >= self.log_interval:
                self._last_log = now
                log.warning("llm group %s: the health expression failed (%s); the answer counts as unhealthy "
                            "(%d such failures so far; logged once per %gs)", self.group, str(exc)[:200],
                            self.eval_errors, self.log_interval)
            return True
