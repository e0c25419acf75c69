"""`[route.claims_to_headers]`: headers computed from the verified identity (CEL per header).

Theory of operation
===================

```toml
[route.claims_to_headers]
"X-Amzn-Bedrock-AgentCore-Runtime-Custom-User" = "jwt.sub"
"X-Amzn-Bedrock-AgentCore-Runtime-Custom-Roles" = 'jwt.roles.join(",")'
```

These headers are assertions the gateway makes to the backend, so a client must
never be able to supply them: every incoming header with one of these names is
removed first, on every request, before anything is evaluated and whether or not
a value can be computed.

Then each value is evaluated (synchronously) and set:

- an expression that references `jwt` on a request without a verified token (an
  anonymous caller on an `optional`/`permissive` route, or a route without
  `[route.jwt]`) is skipped: the header is simply absent, which is the honest
  statement "no verified user";
- any other evaluation failure (a claim the token lacks, a list where a string is
  needed) fails the request with 500 and a log line naming the expression, as
  for every CEL header value (CONFIG.md): a silently missing identity header
  would let the backend mistake an authenticated user for an anonymous one or
  fall back to a default. Write `default(jwt.roles, []).join(",")` or
  `has(jwt.x) ? jwt.x : ""` when a claim is optional;
- a value containing a control character (CR/LF) is a 500 as well;
- a value is text: it is sent as its UTF-8 octets (`text_field_value`), so a
  claim `"user-日本"` reaches the backend as UTF-8, never as an encoding error.
"""

from __future__ import annotations

import logging
from typing import Any

from agproxy.cel import ExpressionGroup
from agproxy.config.reader import Section
from agproxy.filters import check_header_name, compile_cel, eval_errors, header_value_ok
from agproxy.filters.transform import key_path
from agproxy.http.messages import text_field_value
from agproxy.proxy.contract import Filter, FilterResult, LocalReply
from agproxy.proxy.registry import TRANSFORMATION

KEY = "claims_to_headers"
STAGE = TRANSFORMATION + 1    # after transform: a transform cannot remove what it asserts


class ClaimsHeadersFilter(Filter):
    name = "claims_to_headers"

    def __init__(self, entries: list):
        self.entries = tuple(entries)                  # (name, Expression, path, uses_jwt)
        self.names = frozenset(e[0] for e in entries)
        self.sets_request_headers = self.names
        # Headers whose value needs `jwt` are skipped for an anonymous caller.
        self.anonymous_entries = tuple(e for e in self.entries if not e[3])
        self.group = ExpressionGroup([e[1] for e in self.entries])
        self.anonymous_group = ExpressionGroup([e[1] for e in self.anonymous_entries])
        # Every value a function of the verified claims alone: the finished header list
        # is computed once per token and kept in the token's memo.
        self.jwt_only = all(e[1].variables <= {"jwt"} for e in self.entries)

    def on_request(self, ex: Any) -> FilterResult:
        headers = ex.request.headers
        headers.remove_many(self.names)
        claims = ex.jwt_claims
        if claims is None:
            entries, group = self.anonymous_entries, self.anonymous_group
            memo = None
        else:
            entries, group = self.entries, self.group
            memo = getattr(claims, "memo", None)
            if memo is not None and self.jwt_only:
                cached = memo.get(self)
                if cached is not None:
                    headers.items.extend(cached)
                    return None
        if not entries:
            return None
        computed = []
        for (name, expr, where, _), value in zip(entries, group.evaluate_strs(ex.activation, memo)):
            if type(value) is not str:
                eval_errors.error(where, expr.source, value, "failed (identity header: 500)", level=logging.ERROR)
                ex.error = f"claims_to_headers: {where} could not be evaluated"
                return LocalReply.error(500, "internal_error", "the gateway could not compute an identity header")
            if not header_value_ok(value):
                eval_errors.error(where, expr.source, ValueError("control character in the value"),
                                  "produced an invalid header value (500)", level=logging.ERROR)
                ex.error = f"claims_to_headers: {where} produced an invalid header value"
                return LocalReply.error(500, "internal_error", "the gateway could not compute an identity header")
            computed.append((name, text_field_value(value)))
        headers.items.extend(computed)
        if memo is not None and self.jwt_only:
            memo[self] = tuple(computed)
        return None

    def describe(self) -> dict:
        return {"type": self.name, "headers": {n: e.source for n, e, _, _ in self.entries}}


def build(sec: Section, ctx: Any) -> ClaimsHeadersFilter | None:
    problems = sec.problems
    entries = []
    ok = True
    seen: set[str] = set()
    for name in sec.keys():
        source = sec.raw(name)
        path = key_path(sec.path, name)
        lname = check_header_name(problems, path, name)
        expr = compile_cel(problems, path, source)
        if lname is None or expr is None:
            ok = False
            continue
        if lname in seen:
            problems.add(path, f"header {name!r} is listed twice (names are case-insensitive)")
            ok = False
            continue
        seen.add(lname)
        entries.append((lname, expr, path, "jwt" in expr.variables))
    sec.done()
    if not ok or not entries:
        return None
    return ClaimsHeadersFilter(entries)
