"""The MCP view of a JSON-RPC body: what a call targets, and headers that must agree.

Theory of operation: `McpCall.of(message)` reads what policies decide on: the
method, the request id, and for the three methods that target one named item
(`tools/call` → a tool name and its arguments, `prompts/get` → a prompt name
and its arguments, `resources/read` → a resource URI) that target. `cel()` is the
`mcp` variable CEL rules see: `method`, `id`, and only the part that applies
(`tool {name, arguments}`, `prompt {name, arguments}`, `resource {uri}`), so a
rule about tools that meets a prompt call is an evaluation error, which denies
(the project's rule: a rule that cannot be evaluated never allows).

`check_headers(body, headers)` enforces the 2026-07-28 rule that the routing
headers an intermediary may act on say what the body says (else -32020,
HTTP 400), so no rule can be bypassed by a header that lies:

- `Mcp-Method`, `Mcp-Name` and `MCP-Protocol-Version` appear at most once;
- where `Mcp-Method` is present it equals the method of every request and
  notification in the body (and a body of responses has no method at all);
- where `Mcp-Name` is present it equals (after the SDKs' `=?base64?...?=`
  decoding) the name or URI the body targets, and a body that targets nothing
  must not carry one;
- when `MCP-Protocol-Version` names a sessionless revision (2026-07-28), a
  request must carry `Mcp-Method`, and a request that targets a name must carry
  `Mcp-Name` (the specification's "required standard headers").

Earlier revisions never send these headers; when such a client sends them anyway
they must still agree. The check runs per request and keeps no state, so a bad
request fails alone and never poisons a session or later requests.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from agproxy.mcp.jsonrpc import HEADER_MISMATCH, NOTIFICATION, REQUEST, RESPONSE, Body, Message, RpcError, parse

PROTOCOL_VERSION_HEADER = "mcp-protocol-version"
METHOD_HEADER = "mcp-method"
NAME_HEADER = "mcp-name"
SESSION_HEADER = "mcp-session-id"

HANDSHAKE_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
MODERN_VERSIONS = ("2026-07-28",)
KNOWN_VERSIONS = HANDSHAKE_VERSIONS + MODERN_VERSIONS
DEFAULT_VERSION = "2025-03-26"      # a request without the header (streamable HTTP's rule)

# Method → the params key naming its target (the SDKs' NAME_BEARING_METHODS).
NAME_PARAM = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
# List method → (the result's array key, the call method one item of it is for).
LISTS = {"tools/list": ("tools", "tools/call"), "prompts/list": ("prompts", "prompts/get"),
         "resources/list": ("resources", "resources/read")}
ITEM_KEY = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}

_B64 = re.compile(r"^=\?base64\?(.*)\?=$")


class McpCall:
    """What one JSON-RPC message asks for, as far as policies need."""

    __slots__ = ("method", "id", "kind", "name", "arguments", "session", "version")

    def __init__(self, method: str | None, id: Any = None, kind: str = REQUEST, name: str | None = None,
                 arguments: Any = None, session: str | None = None, version: str | None = None):
        self.method = method
        self.id = id
        self.kind = kind
        self.name = name            # tool / prompt name, resource URI (NAME_PARAM methods)
        self.arguments = arguments
        self.session = session
        self.version = version

    @classmethod
    def of(cls, msg: Message, session: str | None = None, version: str | None = None) -> "McpCall":
        method = msg.method
        name = arguments = None
        key = NAME_PARAM.get(method) if method is not None else None
        params = msg.params
        if key is not None and type(params) is dict:
            value = params.get(key)
            if type(value) is str:
                name = value
            if method != "resources/read":
                arguments = params.get("arguments")
        return cls(method, msg.id, msg.kind, name, arguments, session, version)

    @property
    def tool(self) -> str | None:
        return self.name if self.method == "tools/call" else None

    @property
    def targets(self) -> bool:
        """A call of one named item (the methods item rules decide on)."""
        return self.method in NAME_PARAM

    def cel(self) -> dict:
        """The `mcp` variable of CEL rules."""
        out: dict[str, Any] = {"method": self.method or "", "id": self.id if self.id is not None else ""}
        if self.session:
            out["session"] = self.session
        m = self.method
        if m == "tools/call":
            out["tool"] = {"name": self.name, "arguments": self.arguments if type(self.arguments) is dict
                           else {}} if self.name is not None else {}
        elif m == "prompts/get":
            out["prompt"] = {"name": self.name, "arguments": self.arguments if type(self.arguments) is dict
                             else {}} if self.name is not None else {}
        elif m == "resources/read":
            out["resource"] = {"uri": self.name} if self.name is not None else {}
        return out

    def __repr__(self) -> str:
        return f"McpCall({self.method!r}, id={self.id!r}, name={self.name!r})"


def item_call(list_method: str, item: Any) -> McpCall | None:
    """The call one entry of a list result stands for (a tool of tools/list → tools/call of it)."""
    spec = LISTS.get(list_method)
    if spec is None or type(item) is not dict:
        return None
    method = spec[1]
    name = item.get(ITEM_KEY[method])
    if type(name) is not str:
        return None
    return McpCall(method, None, REQUEST, name, None)


def decode_header_value(value: str | None) -> str | None:
    """`=?base64?<b64>?=` → its UTF-8 text (None when malformed: it then matches nothing)."""
    if value is None:
        return None
    m = _B64.match(value)
    if m is None:
        return value
    payload = m.group(1)
    try:
        raw = base64.b64decode(payload, validate=True)
        if base64.b64encode(raw).decode("ascii") != payload:
            return None
        return raw.decode("utf-8")
    except (binascii.Error, ValueError):
        return None


def is_modern(version: str | None) -> bool:
    return version in MODERN_VERSIONS


_ROUTING = {METHOD_HEADER: 0, NAME_HEADER: 1, PROTOCOL_VERSION_HEADER: 2, SESSION_HEADER: 3}
_NONE: tuple = ()


def routing_headers(headers: Any) -> list:
    """[Mcp-Method values, Mcp-Name values, MCP-Protocol-Version values, Mcp-Session-Id
    values] in one pass over the headers (four get_all scans cost ~1 µs more per request)."""
    found: list = [_NONE, _NONE, _NONE, _NONE]
    get = _ROUTING.get
    for k, v in headers.items:
        i = get(k)
        if i is not None:
            found[i] = found[i] + (v,)
    return found


def check_headers(body: Body, headers: Any, routing: list | None = None) -> RpcError | None:
    """The -32020 error when the routing headers disagree with the body, else None.

    `headers` is an agproxy Headers (lowercase names, repeats kept); `routing` what
    routing_headers() found in them, when the caller has it already."""
    methods, names, versions, _ = routing if routing is not None else routing_headers(headers)
    if not methods and not names and not versions:
        return None             # the handshake era's usual request: nothing to agree with
    first = next((m.id for m in body.messages if m.kind == REQUEST), None)
    for what, values in (("Mcp-Method", methods), ("Mcp-Name", names), ("MCP-Protocol-Version", versions)):
        if len(values) > 1:
            return _mismatch(f"the {what} header appears more than once", first)
    method_h = methods[0].strip() if methods else None
    name_h = decode_header_value(names[0].strip()) if names else None
    if names and name_h is None:
        return _mismatch("the Mcp-Name header is not valid (bad base64 encoding)", first)
    modern = bool(versions) and is_modern(versions[0].strip())
    for msg in body.messages:
        rid = msg.id if msg.kind == REQUEST else first
        if msg.kind == RESPONSE:
            if method_h is not None:
                return _mismatch("the Mcp-Method header does not match the body (a response has no method)", rid)
            continue
        if method_h is None:
            if modern and msg.kind == REQUEST:
                return _mismatch("the Mcp-Method header is required", rid)
        elif method_h != msg.method:
            return _mismatch("the Mcp-Method header does not match the body's method", rid)
        key = NAME_PARAM.get(msg.method or "")
        target = msg.params.get(key) if key is not None and type(msg.params) is dict else None
        if name_h is None:
            if modern and msg.kind == REQUEST and target is not None:
                return _mismatch("the Mcp-Name header is required for " + (msg.method or ""), rid)
        elif key is None or target != name_h:
            where = f"params.{key}" if key else "a target name"
            return _mismatch(f"the Mcp-Name header does not match the body's {where}", rid)
    return None


def _mismatch(message: str, rid: Any) -> RpcError:
    return RpcError(HEADER_MISMATCH, message, rid)


__all__ = ["McpCall", "check_headers", "decode_header_value", "item_call", "is_modern", "NAME_PARAM",
           "LISTS", "NOTIFICATION", "REQUEST", "RESPONSE"]


class McpRequest:
    """One HTTP request to an MCP endpoint: its parsed body (or the error to answer
    with), the calls in it, the protocol version and session headers.

    `method`, `id`, `tool`, `session` and `cel()` describe the first call (the only
    one, except in a batch): the typed `ex.mcp` fact the access log and CEL read."""

    __slots__ = ("body", "error", "calls", "version", "session")

    def __init__(self, body: Body | None, error: RpcError | None, calls: list[McpCall],
                 version: str | None, session: str | None):
        self.body = body
        self.error = error
        self.calls = calls
        self.version = version
        self.session = session

    @classmethod
    def parse(cls, headers: Any, raw: bytes) -> "McpRequest":
        routing = routing_headers(headers)
        version = routing[2][0] if routing[2] else None
        session = routing[3][0] if routing[3] else None
        try:
            body = parse(raw)
        except RpcError as exc:
            return cls(None, exc, [], version, session)
        calls = [McpCall.of(m, session, version) for m in body.messages]
        return cls(body, check_headers(body, headers, routing), calls, version, session)

    @property
    def first(self) -> McpCall | None:
        return self.calls[0] if self.calls else None

    @property
    def method(self) -> str | None:
        return self.calls[0].method if self.calls else None

    @property
    def id(self) -> Any:
        return self.calls[0].id if self.calls else None

    @property
    def tool(self) -> str | None:
        return self.calls[0].tool if self.calls else None

    def cel(self) -> dict:
        c = self.first
        out = c.cel() if c is not None else {"method": "", "id": ""}
        if self.session and "session" not in out:
            out["session"] = self.session
        return out
