"""`type = "openapi_mcp"`: the gateway itself is the MCP server for a REST API.

Theory of operation: at load, the OpenAPI document (`spec_file` or `spec_inline`)
becomes a ToolSet (agproxy/mcp/openapi: tools, input schemas, validators); a
malformed spec is a config error naming the operation and the JSON pointer. Per
request the stateless server logic (agproxy/mcp/server.py) answers; a
`tools/call` becomes one REST request to `base_url` through the pooled upstream
client, and its answer the tool result (`isError` for 4xx/5xx, for an API that
cannot be reached, that times out or answers more than `max_response_bytes`).

What the REST API receives besides the call's own arguments (none of the MCP
client's headers pass, so neither does its credential):
- the request headers that the route's policies set (`[route.claims_to_headers]`,
  `[route.transform]`), found at load from the built chain;
- `forward_token = "caller"` (the validated caller token) or `"obo"` (the
  route's exchanged token) as `Authorization: Bearer`;
- `api_key = { header, env, prefix }`: a static key read from the environment
  at load (a missing variable is a config error);
- `x-request-id`, `x-forwarded-for`.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from agproxy.config.reader import Section, did_you_mean
from agproxy.http.messages import BodyTooLarge, Headers
from agproxy.mcp.jsonrpc import INVALID_PARAMS, RpcError, error_body
from agproxy.mcp.openapi import ArgumentError, SpecError, ToolSet, UnknownOperation, build_request, tool_result
from agproxy.mcp.server import ToolServer
from agproxy.proxy.build import BuildContext
from agproxy.proxy.contract import Backend, Response
from agproxy.telemetry import tracing
from agproxy.upstream.deadline import within
from agproxy.upstream.errors import UpstreamError
from agproxy.upstream.origin import Origin
from agproxy.upstream.pool import get_pool

log = logging.getLogger("agproxy.mcp")

TYPE = "openapi_mcp"
DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024
DEFAULT_MAX_RESPONSE = 10 * 1024 * 1024


class OpenApiMcpBackend(Backend):
    kind = TYPE

    def __init__(self, tools: ToolSet, server: ToolServer, origin: Origin, base_url: str, *,
                 max_message_bytes: int, max_response_bytes: int, forward_token: str | None,
                 api_key: tuple[str, str] | None, timeout: float | None):
        self.tools = tools
        self.server = server
        self.origin = origin
        self.base_url = base_url
        self.max_message_bytes = max_message_bytes
        self.max_response_bytes = max_response_bytes
        self.forward_token = forward_token
        self.api_key = api_key          # (header, value): the value is a secret
        self.timeout = timeout
        self._route_headers: dict[str, frozenset[str]] = {}   # route name → headers its policies set

    def check_route(self, chain: Any) -> None:
        self._route_headers[chain.name] = chain.request_headers_set()

    # -- per request ------------------------------------------------------------------
    async def answer(self, ex) -> tuple[int, Headers, bytes]:
        req = ex.request
        body = b""
        if req.method == "POST":
            try:
                body = await ex.read_body(self.max_message_bytes)
            except BodyTooLarge:
                ex.error = "mcp: message too large"
                return 413, Headers([("content-type", "application/json")]), error_body(
                    None, -32600, f"Invalid Request: the message exceeds {self.max_message_bytes} bytes")

        async def call(tool, arguments: dict, version: str) -> dict:
            return await self._call(ex, tool, arguments, version)

        ans = await self.server.handle(req.method, req.headers, body, call)
        return ans.status, Headers(ans.headers), ans.body

    async def respond(self, ex) -> Response:
        status, headers, body = await self.answer(ex)
        return Response(status, headers, body)

    async def _call(self, ex, tool, arguments: dict, version: str) -> dict:
        modern = version == "2026-07-28"
        try:
            rest = build_request(tool, arguments, self.origin.base_path)
        except ArgumentError as exc:
            raise RpcError(INVALID_PARAMS, str(exc), None, {"field": "/" + exc.field, "rule": exc.rule,
                                                            "message": str(exc)}) from None
        o = self.origin
        headers = Headers([("host", o.authority)])
        headers.items.extend(rest.headers)
        route = ex.route.name if ex.route is not None else ""
        for name in self._route_headers.get(route, ()):
            for value in ex.request.headers.get_all(name):
                headers.add(name, value)
        token = None
        if self.forward_token == "caller":
            token = ex.jwt_token
        elif self.forward_token == "obo":
            token = _obo_token(ex)
        if token:
            headers.set("authorization", "Bearer " + token)
        if self.api_key is not None:
            headers.set(self.api_key[0], self.api_key[1])
        headers.add("x-forwarded-for", ex.conn.peer_host)
        headers.add("x-request-id", ex.request_id)
        span = ex.span
        if span is not None and span.attributes is not None:   # a sampled request: the call's CLIENT span
            # The gateway is the MCP server here: the tool on its span, and on the REST call's.
            ex.span.set("mcp.method.name", "tools/call")
            ex.span.set("gen_ai.tool.name", tool.name)
            span = tracing.http_client_span(span, rest.method, o.scheme, o.authority, rest.target, self.name)
            span.attributes["mcp.method.name"] = "tools/call"
            span.attributes["gen_ai.tool.name"] = tool.name
            trace = tracing.context_headers(ex.span, span)
        else:
            trace, span = tracing.context_headers(span, None), None
        for name, value in trace:
            headers.set(name, value)
        start = time.monotonic()
        resp = None
        status, failure = 0, None
        kind = None
        try:
            resp = await get_pool().request(o, rest.method, rest.target, headers, rest.body,
                                            timeout=self.timeout, body_length=len(rest.body) if rest.body else None)
            status = resp.status
            data = await within(self.timeout or 60.0, _read_capped(resp, self.max_response_bytes))
        except UpstreamError as exc:
            failure, kind = str(exc), exc.kind
            ex.error = f"openapi_mcp {tool.name}: {exc}"
            what = "did not answer in time" if exc.kind == "timeout" else "could not be reached"
            return _error_result(f"the API {what} ({rest.method} {tool.path})", modern)
        except TimeoutError:
            failure, kind = "response body timed out", "timeout"
            if resp is not None:
                resp.abort()
            ex.error = f"openapi_mcp {tool.name}: response body timed out"
            return _error_result(f"the API did not finish its answer in time ({rest.method} {tool.path})", modern)
        except _TooLarge:
            failure, kind = "response too large", "response_too_large"
            ex.error = f"openapi_mcp {tool.name}: response over {self.max_response_bytes} bytes"
            return _error_result(f"the API's answer exceeds {self.max_response_bytes} bytes", modern)
        except BaseException:
            kind = "cancelled"
            raise
        finally:
            ex.add_attempt(self.name, o.authority, None, start, status, time.monotonic() - start, failure)
            if span is not None:
                if status:
                    span.attributes["http.response.status_code"] = status
                if failure or status >= 400 or kind == "cancelled":
                    span.fail(kind or str(status), failure)
                else:
                    span.end()
        return tool_result(resp.status, resp.headers.items, data, modern)

    def describe(self) -> dict:
        return {"type": self.kind, "base_url": self.base_url, "tools": [t.name for t in self.tools.tools],
                "forward_token": self.forward_token, "api_key_header": self.api_key[0] if self.api_key else None}


class _TooLarge(Exception):
    pass


async def _read_capped(resp, limit: int) -> bytes:
    parts = []
    size = 0
    reader = resp.body
    while True:
        chunk = await reader.read()
        if not chunk:
            return b"".join(parts)
        size += len(chunk)
        if size > limit:
            resp.abort()
            raise _TooLarge()
        parts.append(chunk)


def _error_result(text: str, modern: bool) -> dict:
    out: dict = {"content": [{"type": "text", "text": text}], "isError": True}
    if modern:
        out["resultType"] = "complete"
    return out


def _obo_token(ex) -> str | None:
    return ex.obo_token


# ---------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------

def build(name: str, sec: Section, ctx: BuildContext) -> OpenApiMcpBackend | None:
    before = len(sec.problems.items)
    sec.str("type")
    spec_file = sec.str("spec_file", None)
    spec_inline = sec.str("spec_inline", None)
    base_url = sec.str("base_url", None)
    include = sec.str_list("include_operations", None)
    exclude = sec.str_list("exclude_operations", None)
    ca = sec.str("tls_ca_file", None)
    insecure = sec.bool("tls_insecure_skip_verify", False)
    http2 = sec.bool("http2", False)
    connect_timeout = sec.duration("connect_timeout", 5.0)
    timeout = sec.duration("timeout", "30s")
    max_message = sec.int("max_message_bytes", DEFAULT_MAX_MESSAGE, min=1024)
    max_response = sec.int("max_response_bytes", DEFAULT_MAX_RESPONSE, min=1)
    page_size = sec.int("page_size", 0, min=0)
    max_batch = sec.int("max_batch", 32, min=1, max=10000)
    server_name = sec.str("server_name", name)
    instructions = sec.str("instructions", None)
    forward_token = sec.str("forward_token", "none", choices=("none", "caller", "obo"))
    key_sec = sec.section("api_key")
    sec.done()

    api_key = None
    if key_sec is not None:
        header = key_sec.str("header", "x-api-key")
        env = key_sec.str("env")
        prefix = key_sec.str("prefix", "")
        key_sec.done()
        from agproxy.filters import check_header_name
        hname = check_header_name(sec.problems, key_sec.sub("header"), header) if isinstance(header, str) else None
        if isinstance(env, str):
            value = os.environ.get(env)
            if not value:
                key_sec.error("env", f"environment variable {env} is not set")
            elif hname:
                api_key = (hname, (prefix or "") + value)
    if (spec_file is None) == (spec_inline is None):
        sec.error(None, "exactly one of spec_file or spec_inline is required")
        return None
    if ca is not None:
        ca = ctx.path(ca)
        if not os.path.isfile(ca):
            sec.error("tls_ca_file", f"file not found: {ca}")
    try:
        tools = ToolSet.load(spec_file=ctx.path(spec_file) if spec_file else None, spec_text=spec_inline,
                             base_dir=ctx.base_dir, include=include, exclude=exclude)
    except SpecError as exc:
        sec.error("spec_file" if spec_file else "spec_inline", f"invalid OpenAPI document: {exc.describe()}")
        return None
    except UnknownOperation as exc:
        sec.error(exc.key, f"no operation {exc.name!r} in the spec" + did_you_mean(exc.name, exc.known))
        return None
    if base_url is None:
        base_url = next((s for s in tools.servers if s.startswith(("http://", "https://"))), None)
        if base_url is None:
            sec.error("base_url", "required (the spec has no absolute servers[].url)")
            return None
    origin = sec.convert("base_url", base_url, lambda u: Origin.from_url(
        u, ca_file=ca, insecure=bool(insecure), http2=bool(http2), connect_timeout=connect_timeout or 5.0))
    if origin is None or len(sec.problems.items) > before:
        return None
    if insecure:
        log.warning("backend %s: TLS certificate verification is DISABLED (tls_insecure_skip_verify)", name)
    from agproxy import __version__
    server = ToolServer(tools, name=server_name or name, version=__version__, instructions=instructions,
                        page_size=page_size or None, max_batch=max_batch if isinstance(max_batch, int) else 32)
    return OpenApiMcpBackend(tools, server, origin, base_url, max_message_bytes=max_message,
                             max_response_bytes=max_response,
                             forward_token=None if forward_token == "none" else forward_token,
                             api_key=api_key, timeout=timeout)
