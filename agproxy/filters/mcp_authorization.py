"""`[route.mcp_authorization]`: per-tool, per-prompt, per-resource and per-argument rules.

Theory of operation
===================

The rules are those of `[route.authorization]` (allow / deny / require, compiled
at load by filters/authorization.py) evaluated with one more CEL variable, `mcp`
(agproxy/mcp/call.py): `mcp.method`, `mcp.id`, and for a call of one named item
`mcp.tool.name` / `mcp.tool.arguments` (tools/call), `mcp.prompt.name` /
`mcp.prompt.arguments` (prompts/get) or `mcp.resource.uri` (resources/read),
besides `jwt`, `request` and `source`. The filter reads the JSON-RPC body (it
declares `body_limit`, so the exchange buffers it after authentication) and:

- a body that is not JSON-RPC, or whose routing headers disagree with it, is
  answered here with its JSON-RPC error (-32700 / -32600 / -32020, HTTP 400):
  a rule cannot be evaluated on a body it cannot read, and a header that lies
  must not steer anything behind the gateway;
- each call of a named item is decided by the rules, a notification too (a
  `tools/call` without an id is still a call a server may run: denied, it is
  answered 403 with a JSON-RPC error without id); a denied call never
  reaches the server: it is answered with a JSON-RPC error carrying the
  request's id (code -32003, HTTP 200, as JSON or as one SSE event when the
  client accepts only SSE), counted in `<prefix>_mcp_denied_total{route,method}`,
  and the access log's `error` names the rule. In a batch, one denied call
  fails the batch: every request in it gets an error (the denied ones say why);
- a batch of more than `max_batch` (32) messages is refused whole (-32600,
  HTTP 400): its calls are decided synchronously, and one request must not
  hold the event loop for long;
- other methods (initialize, server/discover, ping, notifications, client
  responses, lists) pass: the rules are about what may be used, and lists are
  filtered instead;
- the results of `tools/list`, `prompts/list` and `resources/list` are
  filtered to the items the caller may use (each item decided as a call of it:
  `mcp.method` "tools/call" and `mcp.tool.name` for a tool), whether the answer
  is one JSON document or arrives inside SSE events, page by page (each page of
  a `nextCursor` walk is its own response). A 2026-07-28 list result filtered
  per caller gets `cacheScope: "private"`.
  A list result is recognised by its shape (a `tools`, `prompts` or
  `resources` array at the top of a `result`), never by matching its id to a
  list request of this body: ids are the client's, so a batch reusing one id, a
  second in-flight request with the list's id (the SDK's server delivers a
  response on the stream registered for its id) or a GET resuming a stream
  (`Last-Event-ID`) would otherwise carry an unfiltered list. So the answer of
  a POST that asks for a list or belongs to a session (`Mcp-Session-Id`: the
  requests of a session share the server's routing by id) and every GET stream
  are inspected; an event or document that cannot hold a list (no such key in
  its bytes) is passed without being parsed. A sessionless POST that asks for
  no list (a 2026-07-28 tools/call) pays nothing.

A rule that fails to evaluate denies (as in `[route.authorization]`). One
exception when filtering lists: a rule that reads the arguments cannot be
decided before the call, so its evaluation error leaves the item listed (the
call itself is still decided, with its arguments, and fails closed).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from agproxy.config.reader import Section
from agproxy.filters import eval_errors
from agproxy.http.sse import SseSplitter, format_event, parse
from agproxy.filters.mcp_common import batch_reply, error_reply, jsonrpc_reply, mcp_request
from agproxy.mcp.call import LISTS, McpCall, item_call
from agproxy.mcp.jsonrpc import INTERNAL_ERROR, INVALID_REQUEST, REQUEST, RESPONSE, RpcError, error_body
from agproxy.proxy.contract import Filter, FilterResult
from agproxy.proxy.registry import AUTHORIZATION

KEY = "mcp_authorization"
STAGE = AUTHORIZATION + 1

log = logging.getLogger("agproxy.policy")

DENIED = -32003          # implementation-defined band (-32000..-32019): a policy refused the call
DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024
DEFAULT_MAX_LIST = 16 * 1024 * 1024
_DENIED_HELP = "MCP calls denied by [route.mcp_authorization], by route and method"


class Rules:
    """allow / deny / require over an activation, with list-mode leniency for
    rules that read arguments."""

    def __init__(self, authz: Any):
        self.deny = authz.deny
        self.require = authz.require
        self.allow = authz.allow
        self.group = authz.group
        every = self.deny + self.require + self.allow
        self.reads_arguments = tuple("arguments" in e.source for _, e in every)

    def decide(self, act: Any, memo: Any = None, listing: bool = False) -> str | None:
        """None when allowed, else why not (a rule's path)."""
        results = self.group.evaluate_bools(act, memo)
        args = self.reads_arguments
        i = 0
        for where, expr in self.deny:
            hit = results[i]
            lenient = listing and args[i]
            i += 1
            if hit is True:
                return f"{where} matched"
            if hit is not False and not lenient:
                eval_errors.error(where, expr.source, hit, "failed (deny rule: denying)")
                return f"{where} could not be evaluated"
        for where, expr in self.require:
            ok = results[i]
            lenient = listing and args[i]
            i += 1
            if ok is False:
                return f"{where} not satisfied"
            if ok is not True and not lenient:
                eval_errors.error(where, expr.source, ok, "failed (require rule: denying)")
                return f"{where} could not be evaluated"
        if self.allow:
            for where, expr in self.allow:
                hit = results[i]
                lenient = listing and args[i]
                i += 1
                if hit is True or (lenient and hit is not False):
                    return None
                if hit is not False:
                    eval_errors.error(where, expr.source, hit, "failed (allow rule: no match)",
                                      level=logging.INFO)
            return "no allow rule matched"
        return None


class McpAuthorizationFilter(Filter):
    name = "mcp_authorization"
    reads_response_body = True

    def __init__(self, rules: Rules, path: str, max_message: int, max_list: int, counter: Any,
                 max_batch: int = 32):
        self.rules = rules
        self.max_batch = max_batch
        self.path = path
        self.body_limit = max_message
        self.max_list = max_list
        self.counter = counter

    # -- request phase ------------------------------------------------------------------
    def on_request(self, ex: Any) -> FilterResult:
        if ex.request.method != "POST":
            return None
        req = mcp_request(ex)
        if req.error is not None:
            ex.error = f"mcp: {req.error.message}"
            return error_reply(ex, req.error)
        if len(req.calls) > self.max_batch:
            # Each call is decided synchronously on the event loop: a budget per request.
            ex.error = f"mcp_authorization: a batch of {len(req.calls)} messages"
            return error_reply(ex, RpcError(INVALID_REQUEST, f"Invalid Request: a batch holds at most "
                                                             f"{self.max_batch} messages here", status=400))
        # Notifications too: `tools/call` without an id is still a call a server may run.
        targets = [c for c in req.calls if c.targets and c.kind != RESPONSE]
        if not targets:
            return None
        act = ex.activation
        memo = getattr(ex.jwt_claims, "memo", None)
        denied: dict[int, str] = {}
        for c in targets:
            if len(req.calls) > 1:
                act.set_provider("mcp", c.cel)
            why = self.rules.decide(act, memo)
            if why is not None:
                denied[id(c)] = why
        if len(req.calls) > 1:
            act.set_provider("mcp", req.cel)
        if not denied:
            return None
        for c in targets:
            if id(c) in denied:
                self._count(ex, c)
        first = next(c for c in targets if id(c) in denied)
        ex.error = f"mcp_authorization: {first.method} {first.name!r} denied: {denied[id(first)]}"
        log.debug("%s: request %s: %s", self.path, ex.request_id, ex.error)
        if not any(c.kind == REQUEST for c in req.calls):
            # Nothing to answer with an id: streamable HTTP's "an HTTP error, a JSON-RPC
            # error without id" for input the server will not accept.
            return jsonrpc_reply(ex, 403, error_body(None, DENIED, _message(first)))
        if not req.body.batch:
            return jsonrpc_reply(ex, 200, error_body(first.id, DENIED, _message(first)))
        docs = []
        for c in req.calls:
            if c.kind != REQUEST:
                continue
            if id(c) in denied:
                docs.append(orjson.loads(error_body(c.id, DENIED, _message(c))))
            else:
                docs.append(orjson.loads(error_body(c.id, DENIED, "not sent: another call in this batch was "
                                                                  "denied by the gateway's policy")))
        return batch_reply(ex, docs)

    def _count(self, ex: Any, call: McpCall) -> None:
        if self.counter is not None:
            route = ex.route.name if ex.route is not None else ""
            self.counter.labels(route, call.method or "").inc()

    # -- response phase (list filtering) -------------------------------------------------
    def on_response(self, ex: Any, resp: Any) -> Any:
        if getattr(resp, "status", 0) != 200:
            return None
        method = ex.request.method
        if method == "POST":
            req = mcp_request(ex)
            listed = False
            for c in req.calls:
                if c.kind == REQUEST and c.method in LISTS:
                    listed = True
                    break
            if not listed and (req.session is None or req.body is None or not req.body.requests):
                # No session: no other request shares this one's routing on the server,
                # so only its own list requests can be answered with a list.
                return None
        elif method == "GET":
            listed = False
        else:
            return None
        ctype = (resp.headers.get("content-type") or "").split(";")[0].strip().lower()
        if ctype == "text/event-stream":
            return _SseListHook(self, ex)
        if ctype == "application/json" and method == "POST":
            return _JsonListHook(self, ex, listed)
        return None

    def filter_result(self, ex: Any, list_method: str, result: Any) -> bool:
        """Drop the items the caller may not use, in place; True when the result changed."""
        if type(result) is not dict:
            return False
        key = LISTS[list_method][0]
        items = result.get(key)
        if type(items) is not list:
            return False
        act = ex.activation
        memo = getattr(ex.jwt_claims, "memo", None)
        kept = []
        for item in items:
            call = item_call(list_method, item)
            if call is None:
                continue        # an entry without a name cannot be decided: never shown
            act.set_provider("mcp", call.cel)
            if self.rules.decide(act, memo, listing=True) is None:
                kept.append(item)
        act.set_provider("mcp", mcp_request(ex).cel)
        result[key] = kept
        if "cacheScope" in result:
            result["cacheScope"] = "private"
        return True

    def filter_message(self, ex: Any, doc: Any) -> bytes | None:
        """A JSON-RPC document (a response or a batch of them) with its list results
        filtered, or None when nothing in it is a list."""
        changed = False
        for msg in doc if type(doc) is list else [doc]:
            if type(msg) is dict and "method" not in msg and type(result := msg.get("result")) is dict:
                for list_method, (key, _) in LISTS.items():
                    if key in result:
                        changed = self.filter_result(ex, list_method, result) or changed
        return orjson.dumps(doc) if changed else None

    def describe(self) -> dict:
        r = self.rules
        return {"type": self.name, "deny": [e.source for _, e in r.deny],
                "require": [e.source for _, e in r.require], "allow": [e.source for _, e in r.allow]}


def _may_hold_list(raw: bytes) -> bool:
    """Cheap pre-check: bytes without any list key cannot carry a list result."""
    return b'"tools"' in raw or b'"prompts"' in raw or b'"resources"' in raw


def _message(call: McpCall) -> str:
    what = {"tools/call": "tool", "prompts/get": "prompt", "resources/read": "resource"}.get(call.method or "", "item")
    return f"the gateway's policy does not allow this {what}: {call.name}"


class _JsonListHook:
    """Buffers a JSON list answer (bounded) and sends it filtered at the end."""

    __slots__ = ("f", "ex", "listed", "parts", "size")
    transforms = True

    def __init__(self, f: McpAuthorizationFilter, ex: Any, listed: bool):
        self.f = f
        self.ex = ex
        self.listed = listed            # the body asked for a list (an unreadable answer fails)
        self.parts: list[bytes] = []
        self.size = 0

    def feed(self, chunk: bytes) -> bytes:
        self.size += len(chunk)
        if self.size > self.f.max_list:
            raise ValueError(f"a list answer over {self.f.max_list} bytes cannot be filtered")
        self.parts.append(chunk)
        return b""

    def end(self) -> bytes:
        raw = b"".join(self.parts)
        if not self.listed and not _may_hold_list(raw):
            return raw
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            # Unreadable: a list in it could not be filtered, so it is not sent (fail closed).
            self.ex.error = "mcp_authorization: unreadable list answer"
            req = mcp_request(self.ex)
            rid = next((c.id for c in req.calls if c.kind == REQUEST), None)
            return error_body(rid, INTERNAL_ERROR, "the gateway could not read the server's list to filter it")
        out = self.f.filter_message(self.ex, doc)
        return raw if out is None else out


class _SseListHook:
    """Filters list results inside SSE events, event by event, whatever the chunking."""

    __slots__ = ("f", "ex", "splitter")
    transforms = True

    def __init__(self, f: McpAuthorizationFilter, ex: Any):
        self.f = f
        self.ex = ex
        self.splitter = SseSplitter()

    def feed(self, chunk: bytes) -> bytes:
        out = []
        for raw in self.splitter.feed(chunk):
            out.append(self._event(raw))
        return b"".join(out)

    def end(self) -> bytes:
        rest = self.splitter.end()
        return self._event(rest) if rest else b""

    def _event(self, raw: bytes) -> bytes:
        if not _may_hold_list(raw):
            return raw
        ev = parse(raw)
        if ev is None or ev.type != "message":
            return raw
        try:
            doc = orjson.loads(ev.data)
        except orjson.JSONDecodeError:
            return raw
        out = self.f.filter_message(self.ex, doc)
        if out is None:
            return raw
        ev.data = out.decode()
        return format_event(ev)


def build(sec: Section, ctx: Any) -> McpAuthorizationFilter | None:
    from agproxy.filters import authorization
    max_message = sec.int("max_message_bytes", DEFAULT_MAX_MESSAGE, min=1024)
    max_list = sec.int("max_list_bytes", DEFAULT_MAX_LIST, min=1024)
    max_batch = sec.int("max_batch", 32, min=1, max=10000)
    rules_raw = sec.raw("rules", [])
    sec.done()
    view = Section(sec.path, {"rules": rules_raw}, sec.problems)
    authz = authorization.build(view, ctx)
    if authz is None:
        if isinstance(rules_raw, list) and not rules_raw:
            sec.error("rules", "at least one rule is required")
        return None
    return McpAuthorizationFilter(Rules(authz), sec.path, max_message, max_list,
                                  _denied_counter(getattr(ctx, "metrics", None)),
                                  max_batch if isinstance(max_batch, int) else 32)


_counters: dict[int, Any] = {}


def _denied_counter(metrics: Any) -> Any:
    """`<prefix>_mcp_denied_total{route, method}`: made once per registry (a reload builds
    the filter again and gets the same counter). `method` is one of the three methods
    rules decide (a fixed set), `route` a config name."""
    family = getattr(metrics, "family", None)
    from prometheus_client import Counter
    if family is not None:
        return family(Counter, "mcp_denied", _DENIED_HELP, ["route", "method"])
    reg = getattr(metrics, "registry", None)
    if reg is None:
        return None
    c = _counters.get(id(reg))
    if c is None:
        c = _counters[id(reg)] = Counter(f"{getattr(metrics, 'prefix', 'agproxy')}_mcp_denied", _DENIED_HELP,
                                         ["route", "method"], registry=reg)
    return c
