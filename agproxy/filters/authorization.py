"""`[route.authorization]`: allow / deny / require rules in CEL.

Theory of operation
===================

Rules are compiled at load (a bad rule is a config error at
`route[N].authorization.rules[M]`). Per request, with the semantics of CONFIG.md:

1. any `deny` rule that matches → 403;
2. any `require` rule that does not match → 403;
3. if there are `allow` rules (a plain string is an allow rule), one must match,
   else → 403;
4. otherwise allow (no rules at all: the filter is not even built).

An evaluation error is never an allow: a `deny` rule that fails to evaluate
denies, a `require` or `allow` rule that fails does not match. So a rule on a
claim the token lacks (`"admin" in jwt.groups` without `groups`) denies. Errors
are logged (rate limited) on `agproxy.policy` with the rule's path and source.

Everything is synchronous: CEL evaluation does no I/O.
The 403 body is `{"error": "forbidden", "message": ...}`; the message does not
reveal the rule (the access log's `error` field and the debug log name it).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from agproxy.cel import ExpressionGroup
from agproxy.config.reader import Section
from agproxy.filters import compile_cel, eval_errors
from agproxy.proxy.contract import Filter, FilterResult, LocalReply
from agproxy.proxy.registry import AUTHORIZATION

KEY = "authorization"
STAGE = AUTHORIZATION

log = logging.getLogger("agproxy.policy")

KINDS = ("allow", "deny", "require")

# `jwt.role == "x"` is false, not an error, when the token carries `role` as a list
# (CEL's heterogeneous equality), so a deny rule written that way never fires for
# list-valued claims (and `!=` in an allow/require rule always matches). Found in
# the source text at load and warned about; `iss`, `sub`, `jti` are always strings.
_STR = r"""(?:"[^"\\]*"|'[^'\\]*')"""
_CLAIM = (r"(?:\bjwt\.(?!(?:iss|sub|jti)\b)([A-Za-z_]\w*)(?![\w.(\[])"
          r"|\bdefault\(\s*jwt\.(?!(?:iss|sub|jti)\b)([A-Za-z_]\w*)\s*,\s*" + _STR + r"\s*\))")
_COMPARE = {op: re.compile(rf"{_CLAIM}\s*{op}\s*{_STR}|{_STR}\s*{op}\s*{_CLAIM}") for op in ("==", "!=")}


def _list_claim_pitfall(kind: str, source: str) -> str | None:
    """The claim a rule compares to a string in the way that fails open for a list claim."""
    m = _COMPARE["==" if kind == "deny" else "!="].search(source)
    if m is None:
        return None
    return next(g for g in m.groups() if g)


class AuthorizationFilter(Filter):
    name = "authorization"

    def __init__(self, deny: list, require: list, allow: list, path: str):
        # each list: [(rule path, Expression)]
        self.deny = tuple(deny)
        self.require = tuple(require)
        self.allow = tuple(allow)
        self.path = path
        self.group = ExpressionGroup([e for _, e in self.deny + self.require + self.allow])

    def _forbid(self, ex: Any, why: str) -> LocalReply:
        ex.error = f"authorization: {why}"
        log.debug("%s: request %s denied: %s", self.path, getattr(ex, "request_id", "?"), why)
        return LocalReply.error(403, "forbidden", "the request is not allowed by the route's authorization policy")

    def on_request(self, ex: Any) -> FilterResult:
        # One library call evaluates every rule (ExpressionGroup); each rule keeps its own
        # result or error, so the semantics are those of evaluating the rules one by one.
        results = self.group.evaluate_bools(ex.activation, getattr(ex.jwt_claims, "memo", None))
        i = 0
        for where, expr in self.deny:
            hit = results[i]
            i += 1
            if hit is True:
                return self._forbid(ex, f"{where} matched")
            if hit is not False:
                eval_errors.error(where, expr.source, hit, "failed (deny rule: denying)")
                return self._forbid(ex, f"{where} could not be evaluated")
        for where, expr in self.require:
            ok = results[i]
            i += 1
            if ok is False:
                return self._forbid(ex, f"{where} not satisfied")
            if ok is not True:
                eval_errors.error(where, expr.source, ok, "failed (require rule: denying)")
                return self._forbid(ex, f"{where} could not be evaluated")
        if self.allow:
            for where, expr in self.allow:
                hit = results[i]
                i += 1
                if hit is True:
                    return None
                if hit is not False:
                    eval_errors.error(where, expr.source, hit, "failed (allow rule: no match)",
                                      level=logging.INFO)
            return self._forbid(ex, "no allow rule matched")
        return None

    def describe(self) -> dict:
        return {
            "type": self.name,
            "deny": [e.source for _, e in self.deny],
            "require": [e.source for _, e in self.require],
            "allow": [e.source for _, e in self.allow],
        }


def build(sec: Section, ctx: Any) -> AuthorizationFilter | None:
    problems = sec.problems
    rules = sec.raw("rules", [])
    sec.done()
    if not isinstance(rules, list):
        sec.error("rules", "expected a list of rules")
        return None
    buckets: dict[str, list] = {k: [] for k in KINDS}
    ok = True
    for i, rule in enumerate(rules):
        path = f"{sec.sub('rules')}[{i}]"
        if isinstance(rule, str):
            kind, source = "allow", rule
        elif isinstance(rule, dict):
            kinds = [k for k in KINDS if k in rule]
            extra = [k for k in rule if k not in KINDS]
            if extra:
                problems.add(f"{path}.{extra[0]}", "unknown key (a rule is { allow = ... }, "
                                                   "{ deny = ... } or { require = ... })")
                ok = False
                continue
            if len(kinds) != 1:
                problems.add(path, "a rule has exactly one of allow, deny or require")
                ok = False
                continue
            kind = kinds[0]
            source = rule[kind]
            path = f"{path}.{kind}"
        else:
            problems.add(path, "expected a CEL string or a table { allow | deny | require = \"...\" }")
            ok = False
            continue
        expr = compile_cel(problems, path, source)
        if expr is None:
            ok = False
            continue
        claim = _list_claim_pitfall(kind, source)
        if claim is not None:
            log.warning('%s: compares jwt.%s with a string; if tokens carry %s as a list '
                        '(["x"]), the comparison is false, not an error, and this %s rule %s. '
                        'For a list claim write \'"x" in jwt.%s\'; for a string or a list, '
                        '\'"x" in (type(jwt.%s) == list ? jwt.%s : [jwt.%s])\' '
                        '(docs/configuration.md, [route.authorization])',
                        path, claim, claim, kind,
                        "never matches it" if kind == "deny" else "always matches it",
                        claim, claim, claim, claim)
        buckets[kind].append((path, expr))
    if not ok or not rules:
        return None
    return AuthorizationFilter(buckets["deny"], buckets["require"], buckets["allow"], sec.path)
