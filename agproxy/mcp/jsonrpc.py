"""JSON-RPC 2.0 messages as MCP carries them over HTTP: parse a POST body, build replies.

Theory of operation: `parse(body)` decodes one POST body (orjson, the whole body:
MCP messages are small and policies need the arguments) into `Message`s, each a
request (method + id), a notification (method, no id) or a response (result or
error + id, what a client sends back to a server-initiated request). A batch (a
JSON array) gives several messages and `batch=True`. The original bytes are not
re-encoded: callers forward `body` itself when nothing rewrites it.

Errors are `RpcError`s carrying the JSON-RPC code, the request id when one is
known, and the HTTP status to answer with (the MCP SDKs' table: parse / invalid
request / invalid params / header mismatch → 400, method not found → 404):

- not UTF-8 JSON at all (or nested past orjson's limit, a number out of range)
  → -32700 Parse error;
- JSON that is not a JSON-RPC message (not an object, `jsonrpc` not "2.0", a
  method that is not a string, an id that is neither a string nor a number, an
  empty batch, a batch element that is not a message) → -32600 Invalid Request.
  The whole body is refused: the gateway never forwards part of a batch.

`error_body` / `result_body` build the reply documents; `id` None is written as
`"id": null` (JSON-RPC's rule for an error about an unreadable request).
"""

from __future__ import annotations

from typing import Any

import orjson

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
HEADER_MISMATCH = -32020            # MCP 2026-07-28: headers disagree with the body
UNSUPPORTED_PROTOCOL_VERSION = -32022

# The HTTP status a JSON-RPC error is answered with on the streamable HTTP transport
# (mcp.shared.inbound.ERROR_CODE_HTTP_STATUS in the Python SDK; others → 200).
HTTP_STATUS = {PARSE_ERROR: 400, INVALID_REQUEST: 400, INVALID_PARAMS: 400, HEADER_MISMATCH: 400,
               UNSUPPORTED_PROTOCOL_VERSION: 400, -32021: 400, METHOD_NOT_FOUND: 404}

REQUEST = "request"
NOTIFICATION = "notification"
RESPONSE = "response"

_ID_TYPES = (str, int, float)


class RpcError(Exception):
    """A JSON-RPC error to answer with (`status` is the HTTP status)."""

    def __init__(self, code: int, message: str, id: Any = None, data: Any = None,
                 status: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id
        self.data = data
        self.status = status if status is not None else HTTP_STATUS.get(code, 200)

    def body(self) -> bytes:
        return error_body(self.id, self.code, self.message, self.data)


class Message:
    """One JSON-RPC message of a body (`raw` is its decoded object)."""

    __slots__ = ("kind", "id", "method", "params", "raw")

    def __init__(self, kind: str, id: Any, method: str | None, params: Any, raw: dict):
        self.kind = kind
        self.id = id
        self.method = method
        self.params = params
        self.raw = raw

    @property
    def is_request(self) -> bool:
        return self.kind == REQUEST

    def __repr__(self) -> str:
        return f"Message({self.kind}, id={self.id!r}, method={self.method!r})"


class Body:
    """A parsed POST body: its messages, and whether it was a batch."""

    __slots__ = ("messages", "batch")

    def __init__(self, messages: list[Message], batch: bool):
        self.messages = messages
        self.batch = batch

    @property
    def requests(self) -> list[Message]:
        return [m for m in self.messages if m.kind == REQUEST]

    @property
    def only_notifications_or_responses(self) -> bool:
        """No request in the body: the streamable HTTP answer is 202 with no body."""
        return all(m.kind != REQUEST for m in self.messages)


def parse(body: bytes) -> Body:
    """Decode a POST body; raises RpcError (-32700 / -32600)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise RpcError(PARSE_ERROR, "Parse error: the body is not JSON") from None
    if type(doc) is list:
        if not doc:
            raise RpcError(INVALID_REQUEST, "Invalid Request: empty batch")
        return Body([_message(item, batch=True) for item in doc], True)
    return Body([_message(doc, batch=False)], False)


def _message(doc: Any, batch: bool) -> Message:
    if type(doc) is not dict:
        raise RpcError(INVALID_REQUEST, "Invalid Request: a JSON-RPC message is an object"
                       + (" (in a batch)" if batch else ""))
    rid = doc.get("id")
    has_id = "id" in doc
    if has_id and rid is not None and (type(rid) not in _ID_TYPES):
        raise RpcError(INVALID_REQUEST, "Invalid Request: id must be a string or a number")
    known_id = rid if has_id and type(rid) in _ID_TYPES else None
    if doc.get("jsonrpc") != "2.0":
        raise RpcError(INVALID_REQUEST, 'Invalid Request: "jsonrpc" must be "2.0"', known_id)
    if "method" in doc:
        method = doc["method"]
        if type(method) is not str or not method:
            raise RpcError(INVALID_REQUEST, "Invalid Request: method must be a non-empty string", known_id)
        params = doc.get("params")
        if params is not None and type(params) not in (dict, list):
            raise RpcError(INVALID_REQUEST, "Invalid Request: params must be an object or an array",
                           known_id)
        if "result" in doc or "error" in doc:
            raise RpcError(INVALID_REQUEST, "Invalid Request: a message is a request or a response",
                           known_id)
        if not has_id:
            return Message(NOTIFICATION, None, method, params, doc)
        if rid is None:
            # JSON-RPC allows a null id; MCP does not ("MUST NOT be null").
            raise RpcError(INVALID_REQUEST, "Invalid Request: a request id must not be null")
        return Message(REQUEST, rid, method, params, doc)
    # A response (to a server-initiated request): exactly one of result / error.
    if has_id and ("result" in doc) != ("error" in doc):
        if "error" in doc:
            err = doc["error"]
            if type(err) is not dict or type(err.get("code")) is not int:
                raise RpcError(INVALID_REQUEST, "Invalid Request: error must be an object with an "
                               "integer code", known_id)
        return Message(RESPONSE, rid, None, None, doc)
    raise RpcError(INVALID_REQUEST, "Invalid Request: neither a request, a notification nor a response",
                   known_id)


def error_body(id: Any, code: int, message: str, data: Any = None) -> bytes:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return orjson.dumps({"jsonrpc": "2.0", "id": id, "error": err})


def result_body(id: Any, result: Any) -> bytes:
    return orjson.dumps({"jsonrpc": "2.0", "id": id, "result": result})
