"""What an authorization service decided, in one shape for the gRPC and HTTP modes.

Theory of operation: a `Decision` is built once from the service's answer and is
immutable afterwards, so the decision cache can hand the same object to many
requests. It is either

- allowed: header mutations for the upstream request (`request_mutations`,
  `remove`), query parameters to set / remove, mutations for the response on its
  way back (`response_mutations`), and dynamic metadata for later CEL; or
- denied: `reply`, the complete answer for the client (status, headers, body).
  The exchange copies a reply's headers before sending it.

A mutation is a plain tuple `(name, value, op)`; `op` is one of the constants
below, the vocabulary of Envoy's `HeaderValueOption` (see `mutation_op`). Header
names are validated and lowercased when the answer is parsed; names a policy may
never touch (framing, connection management, Host, pseudo-headers) are dropped
there, so applying a decision is only list edits.
"""

from __future__ import annotations

from typing import Any, Iterable
from urllib.parse import parse_qsl, quote

from agproxy.filters import RESERVED_HEADERS, header_value_ok
from agproxy.http.messages import Headers, RequestHead
from agproxy.proxy.contract import LocalReply

__all__ = ["SET", "APPEND", "ADD", "ADD_IF_ABSENT", "SET_IF_EXISTS", "Decision", "BadAnswer",
           "apply_mutations", "mutation_op", "valid_name", "edit_query", "denied_reply"]

SET = 0             # replace every value of the name (add it when absent)
APPEND = 1          # append ",value" to the first value of the name (add it when absent)
ADD = 2             # add one more line of the name
ADD_IF_ABSENT = 3   # add only when the name is absent
SET_IF_EXISTS = 4   # replace only when the name is present

# HeaderValueOption.HeaderAppendAction values (envoy/config/core/v3/base.proto)
_APPEND_IF_EXISTS_OR_ADD, _ADD_IF_ABSENT, _OVERWRITE_IF_EXISTS_OR_ADD, _OVERWRITE_IF_EXISTS = 0, 1, 2, 3


class BadAnswer(Exception):
    """The service's answer cannot be applied (an invalid header, an impossible
    status): counted and handled as a "garbage" failure of the dependency."""

    failure = "garbage"


def mutation_op(append: bool | None, append_action: int, *, response: bool) -> int:
    """The op for one HeaderValueOption, as Envoy (1.40) applies them.

    `append` is the deprecated BoolValue (None when unset): true appends, false
    replaces. Unset, `append_action` decides; its zero value APPEND_IF_EXISTS_OR_ADD
    cannot be told apart from "not set" in proto3, and for the upstream request's
    headers and a denial's headers Envoy (and the servers written for it: OPA,
    Authorino) take that as "set", while for `response_headers_to_add` it appends.
    On the response an appended value goes on a line of its own (`ADD`) where
    Envoy adds one, so a Set-Cookie never gets joined with a comma.
    """
    if append is not None:
        if append:
            return ADD if response else APPEND
        return SET
    if append_action == _ADD_IF_ABSENT:
        return ADD_IF_ABSENT
    if append_action == _OVERWRITE_IF_EXISTS:
        return SET_IF_EXISTS
    if append_action == _OVERWRITE_IF_EXISTS_OR_ADD:
        return SET
    if append_action == _APPEND_IF_EXISTS_OR_ADD:
        return APPEND if response else SET
    raise BadAnswer(f"unknown header append_action {append_action}")


def valid_name(name: str) -> str | None:
    """A header name from the service, lowercased; None for one no policy may touch
    (pseudo-headers, Host, framing); BadAnswer when it is not an HTTP token."""
    if name.startswith(":"):
        return None
    lname = name.lower()
    if lname in RESERVED_HEADERS:
        return None
    if not lname or not _is_token(lname):
        raise BadAnswer(f"invalid header name {name[:64]!r}")
    return lname


def check_value(name: str, value: str) -> str:
    if not header_value_ok(value) or len(value) > 16384:
        raise BadAnswer(f"invalid value for header {name!r}")
    return value


_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")


def _is_token(lname: str) -> bool:
    return all(c in _TCHAR for c in lname)


def apply_mutations(headers: Headers, mutations: Iterable[tuple[str, str, int]]) -> None:
    for name, value, op in mutations:
        if op == SET:
            headers.set(name, value)
        elif op == APPEND:
            items = headers.items
            for i, (k, v) in enumerate(items):
                if k == name:
                    items[i] = (k, f"{v},{value}" if v else value)
                    break
            else:
                items.append((name, value))
        elif op == ADD:
            headers.items.append((name, value))
        elif op == ADD_IF_ABSENT:
            if name not in headers:
                headers.items.append((name, value))
        elif name in headers:       # SET_IF_EXISTS
            headers.set(name, value)


def edit_query(request: RequestHead, to_set: tuple[tuple[str, str], ...], to_remove: frozenset[str]) -> None:
    """Set / remove query parameters of the request target (values percent-encoded;
    the other parameters keep their order and their bytes)."""
    path = request.path
    kept: list[str] = []
    replaced = {k for k, _ in to_set}
    for part in request.query.split("&") if request.query else ():
        key = part.split("=", 1)[0]
        name = _unquote_key(key)
        if name in to_remove or name in replaced:
            continue
        kept.append(part)
    for k, v in to_set:
        kept.append(f"{quote(k, safe='')}={quote(v, safe='')}")
    request.set_target(f"{path}?{'&'.join(kept)}" if kept else path)


def _unquote_key(key: str) -> str:
    if "%" not in key and "+" not in key:
        return key
    pairs = parse_qsl(key + "=", keep_blank_values=True)
    return pairs[0][0] if pairs else key


def denied_reply(status: int, headers: list[tuple[str, str, int]], body: bytes) -> LocalReply:
    """The client's answer to a denial: Envoy's local reply (text/plain when there is
    a body) with the service's header mutations applied."""
    h = Headers([("content-type", "text/plain")] if body else [])
    apply_mutations(h, headers)
    return LocalReply(status, body, h)


class Decision:
    """One answer of the authorization service (see the module docstring)."""

    __slots__ = ("allowed", "reply", "request_mutations", "remove", "response_mutations",
                 "query_set", "query_remove", "metadata")

    def __init__(self, allowed: bool, *, reply: LocalReply | None = None,
                 request_mutations: tuple = (), remove: frozenset[str] = frozenset(),
                 response_mutations: tuple = (), query_set: tuple = (),
                 query_remove: frozenset[str] = frozenset(), metadata: dict[str, Any] | None = None):
        self.allowed = allowed
        self.reply = reply
        self.request_mutations = request_mutations
        self.remove = remove
        self.response_mutations = response_mutations
        self.query_set = query_set
        self.query_remove = query_remove
        self.metadata = metadata

    def apply_to_request(self, request: RequestHead) -> None:
        if self.request_mutations:
            apply_mutations(request.headers, self.request_mutations)
        if self.remove:
            request.headers.remove_many(self.remove)
        if self.query_set or self.query_remove:
            edit_query(request, self.query_set, self.query_remove)

    def __repr__(self) -> str:
        if not self.allowed:
            return f"Decision(denied {self.reply.status})"
        return (f"Decision(allowed, +{len(self.request_mutations)} -{len(self.remove)} "
                f"resp+{len(self.response_mutations)})")


ALLOW = Decision(True)
