"""`[route.transform]`: set / add / remove request and response headers with CEL values.

Theory of operation
===================

```toml
[route.transform.request]
set = { "x-user" = "jwt.sub" }       # replace (or create) the header
add = { "x-via" = '"agproxy"' }      # append another value
remove = ["x-debug"]
[route.transform.response]
set = { "x-status" = "string(response.code)" }
```

Every value is a CEL expression compiled at load (errors at
`route[N].transform.request.set."x-user"`). Header names must be HTTP tokens and
may not be framing/connection headers (`content-length`, `transfer-encoding`,
`host`, ...), which belong to the HTTP layer.

Request side (`on_request`, synchronous): all values are evaluated first, against
the request as it arrived; then `remove`, then `set`, then `add` are applied (a
`set` header is always removed first, so a client cannot supply it). A value
whose expression references `jwt` is skipped on a request without a verified
token (anonymous caller on an optional/permissive route), as in
claims_to_headers: the header is simply absent. If any other value fails to evaluate (missing claim, wrong type, a list where a string is
needed) or contains a control character (CR/LF would split the header), the
request fails with 500 and a log line naming the expression; nothing is applied
and nothing reaches the backend. Use `default(jwt.x, "")` or `has(...)` for
values that may legitimately be absent.

Values are text (a claim, a percent-decoded query value): each is sent as its
UTF-8 octets (`text_field_value`). A value read from a request header is the
latin-1 reading of its octets, so copying an ASCII header is exact; a non-ASCII
octet in it is re-encoded (é as 0xC3 0xA9).

Response side (`on_response`): `response` (`code`, `headers`) is available to CEL
besides `request`, `jwt`, `source`. The response head is already decided by the
backend at this point and its body follows, so a value that fails to evaluate is
not turned into a 500 (that would relabel the backend's body): the header is
left unset and the failure is logged at ERROR, naming the expression.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from agproxy.config.reader import Section
from agproxy.filters import check_header_name, compile_cel, eval_errors, header_value_ok
from agproxy.http.messages import text_field_value
from agproxy.proxy.contract import Filter, FilterResult, LocalReply
from agproxy.proxy.registry import TRANSFORMATION

KEY = "transform"
STAGE = TRANSFORMATION

log = logging.getLogger("agproxy.policy")
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def key_path(base: str, key: str) -> str:
    """A TOML path segment for a table key (quoted when it is not a bare key)."""
    return f"{base}.{key}" if _BARE_KEY.match(key) else f'{base}."{key}"'


class _Side:
    __slots__ = ("set", "add", "remove", "uses_response")

    def __init__(self, set_: list, add: list, remove: frozenset[str]):
        self.set = tuple((n, e, p, "jwt" in e.variables) for n, e, p in set_)   # (name, expr, path, uses_jwt)
        self.add = tuple((n, e, p, "jwt" in e.variables) for n, e, p in add)
        self.remove = remove | frozenset(name for name, _, _ in set_)
        self.uses_response = any("response" in e.variables for _, e, _ in set_ + add)

    def empty(self) -> bool:
        return not (self.set or self.add or self.remove)

    def describe(self) -> dict:
        out: dict[str, Any] = {}
        if self.set:
            out["set"] = {n: e.source for n, e, _, _ in self.set}
        if self.add:
            out["add"] = {n: e.source for n, e, _, _ in self.add}
        removed = self.remove - {n for n, _, _, _ in self.set}
        if removed:
            out["remove"] = sorted(removed)
        return out


def _internal_error(ex: Any, why: str) -> LocalReply:
    ex.error = why
    return LocalReply.error(500, "internal_error", "the gateway could not compute a request header")


class TransformFilter(Filter):
    name = "transform"

    def __init__(self, request: _Side | None, response: _Side | None):
        self.request = request
        self.response = response
        if request is not None:
            self.sets_request_headers = frozenset(n for n, _, _, _ in request.set + request.add)

    def on_request(self, ex: Any) -> FilterResult:
        side = self.request
        if side is None:
            return None
        computed_set = []
        computed_add = []
        if side.set or side.add:
            act = ex.activation
            anonymous = ex.jwt_claims is None
            for out, entries in ((computed_set, side.set), (computed_add, side.add)):
                for name, expr, where, uses_jwt in entries:
                    if uses_jwt and anonymous:
                        continue
                    try:
                        value = expr.evaluate_str(act)
                    except Exception as exc:
                        eval_errors.error(where, expr.source, exc, "failed (request header: 500)",
                                          level=logging.ERROR)
                        return _internal_error(ex, f"transform: {where} could not be evaluated")
                    if not header_value_ok(value):
                        eval_errors.error(where, expr.source, ValueError("control character in the value"),
                                          "produced an invalid header value (500)", level=logging.ERROR)
                        return _internal_error(ex, f"transform: {where} produced an invalid header value")
                    out.append((name, text_field_value(value)))
        headers = ex.request.headers
        if side.remove:
            headers.remove_many(side.remove)
        if computed_set or computed_add:
            headers.items.extend(computed_set)
            headers.items.extend(computed_add)
        return None

    def describe(self) -> dict:
        out: dict[str, Any] = {"type": self.name}
        if self.request is not None:
            out["request"] = self.request.describe()
        if self.response is not None:
            out["response"] = self.response.describe()
        return out


class ResponseTransformFilter(TransformFilter):
    """A transform with a response side (a separate class: routes only call
    on_response on filters whose class overrides it)."""

    def on_response(self, ex: Any, head: Any) -> None:
        side = self.response
        if side is None:
            return None
        if side.uses_response:
            ex.add_cel_variable("response", lambda: {"code": head.status,
                                                     "headers": head.headers.as_dict()})
        computed = []
        if side.set or side.add:
            act = ex.activation
            anonymous = ex.jwt_claims is None
            for entries in (side.set, side.add):
                for name, expr, where, uses_jwt in entries:
                    if uses_jwt and anonymous:
                        continue
                    try:
                        value = expr.evaluate_str(act)
                    except Exception as exc:
                        eval_errors.error(where, expr.source, exc, "failed (response header left unset)",
                                          level=logging.ERROR)
                        continue
                    if not header_value_ok(value):
                        eval_errors.error(where, expr.source, ValueError("control character in the value"),
                                          "produced an invalid header value (left unset)", level=logging.ERROR)
                        continue
                    computed.append((name, text_field_value(value)))
        headers = head.headers
        if side.remove:
            headers.remove_many(side.remove)
        headers.items.extend(computed)
        return None


def _side(sec: Section) -> _Side | None:
    problems = sec.problems
    out: dict[str, list] = {"set": [], "add": []}
    ok = True
    for kind in ("set", "add"):
        table = sec.raw(kind, {})
        if not isinstance(table, dict):
            sec.error(kind, "expected a table of header name = CEL expression")
            ok = False
            continue
        for name, source in table.items():
            path = key_path(sec.sub(kind), name)
            lname = check_header_name(problems, path, name)
            expr = compile_cel(problems, path, source)
            if lname is None or expr is None:
                ok = False
                continue
            out[kind].append((lname, expr, path))
    remove = sec.str_list("remove", [])
    names: set[str] = set()
    if isinstance(remove, list):
        for i, name in enumerate(remove):
            lname = check_header_name(problems, f"{sec.sub('remove')}[{i}]", name)
            if lname is None:
                ok = False
            else:
                names.add(lname)
    sets = [n for n, _, _ in out["set"]]
    for n in set(sets):
        if sets.count(n) > 1:
            sec.error("set", f"header {n!r} is set twice (names are case-insensitive)")
            ok = False
    sec.done()
    if not ok:
        return None
    side = _Side(out["set"], out["add"], frozenset(names))
    return None if side.empty() else side


def build(sec: Section, ctx: Any) -> TransformFilter | None:
    request = response = None
    before = len(sec.problems.items)
    rsec = sec.section("request")
    if rsec is not None:
        request = _side(rsec)
    psec = sec.section("response")
    if psec is not None:
        response = _side(psec)
    sec.done()
    if len(sec.problems.items) > before or (request is None and response is None):
        return None
    cls = ResponseTransformFilter if response is not None else TransformFilter
    return cls(request, response)
