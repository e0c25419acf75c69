"""A stateless MCP server over streamable HTTP, for both protocol generations.

Theory of operation: `ToolServer.handle(method, headers, body, call)` answers one
HTTP request to the MCP endpoint and returns an `Answer` (status, headers, body
bytes). It keeps no state between requests, so any worker can answer any
request and there is no session to lose:

- POST only (GET → 405: this server opens no stream of its own; DELETE → 405:
  there is no session to end). The body must be JSON (415 otherwise) and the
  client must accept JSON (406 otherwise). Answers are always
  `application/json`, which streamable HTTP allows for every request.
- The generation comes from `MCP-Protocol-Version`. A sessionless revision
  (2026-07-28) request must carry the per-request envelope in `params._meta`
  (protocol version and client capabilities; else -32602) whose version agrees
  with the header and the routing headers (-32020, mcp/call.py), at a version
  served here (-32022 with the supported list). Results carry `resultType`
  and, for lists and discovery, `cacheScope` / `ttlMs`. Errors take the HTTP
  status of the SDKs' table (400, 404 for an unknown method).
- Handshake-era requests (2025-06-18, 2025-11-25, and a request without the
  header, which means 2025-03-26) get `initialize` answered with the version
  the client asked for when served here, else the latest handshake version;
  errors travel in a 200 like any JSON-RPC response. A batch is answered with
  an array (2025-03-26 allowed them); it holds at most `max_batch` requests
  (else -32600, HTTP 400): each tools/call is a REST call, and one HTTP request
  (which a rate limit counts once) must not become thousands of them.
- `server/discover` answers in either generation (the SDK's `mode="auto"` probes
  it first); `ping`; `tools/list` (all tools in one page unless `page_size`;
  the cursor is the offset, opaque to clients); `tools/call` (unknown tool or
  invalid arguments → -32602 naming the field and the rule; otherwise `call`,
  the backend's coroutine doing the REST call, returns the CallToolResult);
  notifications and client responses → 202 with no body; anything else → -32601.
"""

from __future__ import annotations

import base64
from typing import Any, Awaitable, Callable

import orjson

from agproxy.mcp.call import (HANDSHAKE_VERSIONS, KNOWN_VERSIONS, MODERN_VERSIONS, PROTOCOL_VERSION_HEADER,
                              check_headers, is_modern)
from agproxy.mcp.jsonrpc import (INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND, REQUEST,
                                 UNSUPPORTED_PROTOCOL_VERSION, Message, RpcError, error_body, parse)

PROTOCOL_META = "io.modelcontextprotocol/protocolVersion"
CAPABILITIES_META = "io.modelcontextprotocol/clientCapabilities"
SERVER_INFO_META = "io.modelcontextprotocol/serverInfo"
LATEST_HANDSHAKE = HANDSHAKE_VERSIONS[-1]

ToolCall = Callable[[Any, dict, str], Awaitable[dict]]   # (tool, arguments, version) → result


class Answer:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, body: bytes = b"", headers: list[tuple[str, str]] | None = None):
        self.status = status
        self.body = body
        self.headers = headers if headers is not None else (
            [("content-type", "application/json")] if body else [])

    def __repr__(self) -> str:
        return f"Answer({self.status}, {self.body[:200]!r})"


def _json(status: int, body: bytes) -> Answer:
    return Answer(status, body, [("content-type", "application/json")])


def _accepts_json(accept: str | None) -> bool:
    if accept is None:
        return True
    for part in accept.split(","):
        media = part.split(";")[0].strip().lower()
        if media in ("application/json", "application/*", "*/*"):
            return True
    return False


class ToolServer:
    def __init__(self, tools: Any, *, name: str = "agproxy", version: str = "0",
                 instructions: str | None = None, page_size: int | None = None, ttl_ms: int = 0,
                 max_batch: int = 32):
        self.tools = tools                 # a mcp.openapi.ToolSet (by_name, listing, validate)
        self.max_batch = max_batch
        self.info = {"name": name, "version": version}
        self.instructions = instructions
        self.page_size = page_size
        self.ttl_ms = ttl_ms

    async def handle(self, method: str, headers: Any, body: bytes, call: ToolCall) -> Answer:
        if method != "POST":
            return Answer(405, b"", [("allow", "POST")])
        ctype = (headers.get("content-type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return _json(415, error_body(None, INVALID_REQUEST, "Unsupported Media Type: "
                                                                "Content-Type must be application/json"))
        if not _accepts_json(headers.get("accept")):
            return _json(406, error_body(None, INVALID_REQUEST, "Not Acceptable: the client must accept "
                                                                "application/json"))
        versions = headers.get_all(PROTOCOL_VERSION_HEADER)
        version = versions[0].strip() if versions else None
        modern = is_modern(version)
        try:
            parsed = parse(body)
            err = check_headers(parsed, headers)
            if err is not None:
                raise err
            if version is not None and version not in KNOWN_VERSIONS:
                raise RpcError(UNSUPPORTED_PROTOCOL_VERSION, f"Unsupported protocol version {version[:40]!r}",
                               next((m.id for m in parsed.requests), None),
                               {"supported": list(MODERN_VERSIONS), "requested": version[:40]}, status=400)
            if modern and parsed.batch:
                raise RpcError(INVALID_REQUEST, "Invalid Request: batches are not part of 2026-07-28")
            if parsed.batch and len(parsed.requests) > self.max_batch:
                raise RpcError(INVALID_REQUEST, f"Invalid Request: a batch holds at most {self.max_batch} "
                                                "requests here", status=400)
        except RpcError as exc:
            return _json(exc.status, exc.body())
        if parsed.only_notifications_or_responses:
            return Answer(202)
        answers = []
        for msg in parsed.messages:
            if msg.kind != REQUEST:
                continue
            try:
                result = await self._request(msg, version, modern, call)
                answers.append({"jsonrpc": "2.0", "id": msg.id, "result": result})
            except RpcError as exc:
                if exc.id is None:
                    exc.id = msg.id
                if not parsed.batch:
                    return _json(exc.status if modern else 200, exc.body())
                answers.append(orjson.loads(exc.body()))
        if parsed.batch:
            return _json(200, orjson.dumps(answers))
        return _json(200, orjson.dumps(answers[0]))

    # -- one request ---------------------------------------------------------------------
    async def _request(self, msg: Message, version: str | None, modern: bool, call: ToolCall) -> dict:
        params = msg.params if type(msg.params) is dict else {}
        method = msg.method
        if modern:
            self._envelope(msg, params, version)
        if method == "server/discover":
            return self._stamp({
                "supportedVersions": list(MODERN_VERSIONS),
                "capabilities": self._capabilities(),
                **({"instructions": self.instructions} if self.instructions else {}),
                "cacheScope": "public", "ttlMs": self.ttl_ms, "resultType": "complete",
            })
        if method == "initialize":
            if modern:
                raise RpcError(METHOD_NOT_FOUND, "initialize is not part of 2026-07-28 (use server/discover)",
                               msg.id)
            asked = params.get("protocolVersion")
            chosen = asked if asked in HANDSHAKE_VERSIONS else LATEST_HANDSHAKE
            out = {"protocolVersion": chosen, "capabilities": self._capabilities(), "serverInfo": self.info}
            if self.instructions:
                out["instructions"] = self.instructions
            return out
        if method == "ping":
            if modern:      # removed in 2026-07-28
                raise RpcError(METHOD_NOT_FOUND, "ping is not part of 2026-07-28", msg.id)
            return {}
        if method == "tools/list":
            return self._list(msg, params, modern)
        if method == "tools/call":
            return await self._call(msg, params, version or "2025-03-26", modern, call)
        raise RpcError(METHOD_NOT_FOUND, f"Method not found: {method[:100]}", msg.id)

    def _envelope(self, msg: Message, params: dict, version: str | None) -> None:
        meta = params.get("_meta")
        if type(meta) is not dict or PROTOCOL_META not in meta or CAPABILITIES_META not in meta:
            raise RpcError(INVALID_PARAMS, f"params._meta must carry {PROTOCOL_META!r} and {CAPABILITIES_META!r}",
                           msg.id)
        if meta[PROTOCOL_META] != version:
            from agproxy.mcp.jsonrpc import HEADER_MISMATCH
            raise RpcError(HEADER_MISMATCH, "MCP-Protocol-Version does not match params._meta's protocol version",
                           msg.id)

    def _capabilities(self) -> dict:
        return {"tools": {"listChanged": False}}

    def _stamp(self, result: dict) -> dict:
        result["_meta"] = {SERVER_INFO_META: self.info}
        return result

    def _list(self, msg: Message, params: dict, modern: bool) -> dict:
        listing = self.tools.listing
        start = 0
        cursor = params.get("cursor")
        if cursor is not None:
            start = _decode_cursor(cursor, len(listing), msg.id)
        end = len(listing) if not self.page_size else min(len(listing), start + self.page_size)
        out: dict[str, Any] = {"tools": listing[start:end]}
        if end < len(listing):
            out["nextCursor"] = base64.urlsafe_b64encode(f"o{end}".encode()).decode()
        if modern:
            out.update(cacheScope="public", ttlMs=self.ttl_ms, resultType="complete")
            self._stamp(out)
        return out

    async def _call(self, msg: Message, params: dict, version: str, modern: bool, call: ToolCall) -> dict:
        name = params.get("name")
        if type(name) is not str:
            raise RpcError(INVALID_PARAMS, "tools/call needs params.name (a string)", msg.id)
        tool = self.tools.by_name.get(name)
        if tool is None:
            raise RpcError(INVALID_PARAMS, f"Unknown tool: {name[:100]}", msg.id)
        arguments = params.get("arguments")
        if arguments is None:
            arguments = {}
        if type(arguments) is not dict:
            raise RpcError(INVALID_PARAMS, "params.arguments must be an object", msg.id,
                           {"field": "", "rule": "type", "message": "arguments must be an object"})
        problem = self.tools.validate(tool, arguments)
        if problem is not None:
            raise RpcError(INVALID_PARAMS, problem.message, msg.id, problem.data())
        result = await call(tool, arguments, version)
        if modern:
            result.setdefault("resultType", "complete")
            self._stamp(result)
        return result


def _decode_cursor(cursor: Any, size: int, rid: Any) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor.encode()).decode() if type(cursor) is str else ""
        if text[:1] == "o" and text[1:].isdigit() and int(text[1:]) <= size:
            return int(text[1:])
    except (ValueError, UnicodeDecodeError):
        pass
    raise RpcError(INVALID_PARAMS, "Invalid cursor", rid)
