"""A tool call → the REST request it stands for, and the REST answer → MCP content.

Theory of operation: `build_request(tool, arguments)` takes arguments already
validated against the tool's input schema and serialises each by its binding
(mcp/openapi/tools.py) the way OpenAPI 3 says:

- path (`simple`, `label`, `matrix`): the value percent-encoded whole, `/`
  included, and a value that is a dot segment (`.`, `..`) encoded too, so an
  argument can never climb out of its path segment;
- query (`form` exploded or not, `spaceDelimited`, `pipeDelimited`,
  `deepObject`): arrays as repeated names (exploded) or joined values;
- header (`simple`) and cookie (`form`): a value with a control character is
  refused (it would split the request head);
- the body: JSON (`orjson`), form-urlencoded, or the string given for any other
  media type; body properties that are top-level arguments are put back in one
  object.

Scalars are written as JSON would (`true`, `1.5`), null arguments are left out.

`tool_result(status, headers, body, modern)` is the CallToolResult: the body as
`text` content (image/audio bodies as such content), `structuredContent` with the
decoded JSON (any JSON value for 2026-07-28, an object for earlier revisions,
whose schema allows only that), `isError` for a 4xx/5xx with the status first in
the text so a model can see what went wrong.
"""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import quote

import orjson

from agproxy.mcp.openapi.tools import Tool

_RESERVED = ":/?[]@!$'()*,;"   # allowReserved, less &, #, =, + (they would change the query)


class ArgumentError(ValueError):
    """An argument that cannot be put into the request (`field`, `rule`)."""

    def __init__(self, field: str, rule: str, message: str):
        super().__init__(message)
        self.field = field
        self.rule = rule


class RestRequest:
    __slots__ = ("method", "target", "headers", "body")

    def __init__(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes | None):
        self.method = method
        self.target = target
        self.headers = headers
        self.body = body

    def __repr__(self) -> str:
        return f"RestRequest({self.method} {self.target})"


def scalar(value: Any) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return orjson.dumps(value).decode()
    return orjson.dumps(value).decode()


def _enc(text: str, reserved: bool = False) -> str:
    return quote(text, safe=_RESERVED if reserved else "")


def _path_value(value: Any, style: str, explode: bool, name: str) -> str:
    def seg(v: Any) -> str:
        s = _enc(scalar(v))
        if s in (".", ".."):
            s = s.replace(".", "%2E")
        return s

    if isinstance(value, list):
        parts = [seg(v) for v in value]
        if style == "label":
            return "." + (".".join(parts) if explode else ",".join(parts))
        if style == "matrix":
            return "".join(f";{name}={p}" for p in parts) if explode else f";{name}=" + ",".join(parts)
        return ",".join(parts)
    if isinstance(value, dict):
        if explode:
            pairs = [f"{seg(k)}={seg(v)}" for k, v in value.items()]
        else:
            pairs = [x for k, v in value.items() for x in (seg(k), seg(v))]
        if style == "label":
            return "." + (".".join(pairs) if explode else ",".join(pairs))
        if style == "matrix":
            return "".join(f";{p}" for p in pairs) if explode else f";{name}=" + ",".join(pairs)
        return ",".join(pairs)
    if style == "label":
        return "." + seg(value)
    if style == "matrix":
        return f";{name}={seg(value)}"
    return seg(value)


def _query_pairs(name: str, value: Any, style: str, explode: bool, reserved: bool) -> list[str]:
    n = _enc(name)

    def enc(v: Any) -> str:
        return _enc(scalar(v), reserved)

    if isinstance(value, list):
        if style == "spaceDelimited":
            return [f"{n}=" + "%20".join(enc(v) for v in value)]
        if style == "pipeDelimited":
            return [f"{n}=" + "%7C".join(enc(v) for v in value)]
        if explode:
            return [f"{n}={enc(v)}" for v in value]
        return [f"{n}=" + ",".join(enc(v) for v in value)]
    if isinstance(value, dict):
        if style == "deepObject":
            return [f"{n}%5B{_enc(str(k))}%5D={enc(v)}" for k, v in value.items()]
        if explode:
            return [f"{_enc(str(k))}={enc(v)}" for k, v in value.items()]
        return [f"{n}=" + ",".join(x for k, v in value.items() for x in (_enc(str(k)), enc(v)))]
    return [f"{n}={enc(value)}"]


def _header_value(argument: str, value: Any, explode: bool) -> str:
    if isinstance(value, list):
        text = ",".join(scalar(v) for v in value)
    elif isinstance(value, dict):
        text = ",".join(f"{k}={scalar(v)}" if explode else f"{k},{scalar(v)}" for k, v in value.items())
    else:
        text = scalar(value)
    if any(ord(c) < 0x20 and c != "\t" or ord(c) == 0x7F for c in text):
        raise ArgumentError(argument, "header", f"argument {argument!r} cannot be sent in a header: "
                                                "it contains control characters")
    return text


def build_request(tool: Tool, arguments: dict, base_path: str = "") -> RestRequest:
    path = tool.path
    query: list[str] = []
    headers: list[tuple[str, str]] = []
    cookies: list[str] = []
    body_obj: Any = None
    body_fields: dict[str, Any] | None = None
    for b in tool.bindings:
        if b.argument not in arguments:
            continue
        value = arguments[b.argument]
        if value is None:
            continue
        loc = b.location
        if loc == "path":
            path = path.replace("{" + b.name + "}", _path_value(value, b.style, b.explode, b.name))
        elif loc == "query":
            query.extend(_query_pairs(b.name, value, b.style, b.explode, b.allow_reserved))
        elif loc == "header":
            headers.append((b.name.lower(), _header_value(b.argument, value, b.explode)))
        elif loc == "cookie":
            cookies.append(f"{b.name}={_enc(scalar(value))}")
        elif loc == "body":
            body_obj = value
        else:
            if body_fields is None:
                body_fields = {}
            body_fields[b.name] = value
    if body_fields is not None:
        body_obj = body_fields
    if cookies:
        headers.append(("cookie", "; ".join(cookies)))
    body: bytes | None = None
    media = tool.body_media_type
    if body_obj is not None and media is not None:
        if media == "application/x-www-form-urlencoded":
            pairs = []
            items = body_obj.items() if isinstance(body_obj, dict) else []
            for k, v in items:
                for one in (v if isinstance(v, list) else [v]):
                    pairs.append(f"{quote(str(k), safe='')}={quote(scalar(one), safe='')}")
            body = "&".join(pairs).encode()
        elif "json" in media.lower():
            body = orjson.dumps(body_obj)
        else:
            body = body_obj.encode() if isinstance(body_obj, str) else orjson.dumps(body_obj)
        headers.append(("content-type", media))
    target = base_path.rstrip("/") + path
    if query:
        target += "?" + "&".join(query)
    headers.append(("accept", "application/json, */*;q=0.5"))
    return RestRequest(tool.method, target, headers, body)


def _media(headers: Any) -> str:
    ctype = ""
    for k, v in headers:
        if k == "content-type":
            ctype = v
            break
    return ctype.split(";")[0].strip().lower()


def tool_result(status: int, headers: Any, body: bytes, modern: bool) -> dict:
    """The CallToolResult for a REST answer (`headers`: (name, value) pairs)."""
    media = _media(headers)
    is_error = status >= 400
    content: list[dict] = []
    structured: Any = None
    has_structured = False
    if media.startswith(("image/", "audio/")) and body and not is_error:
        content.append({"type": "image" if media.startswith("image/") else "audio",
                        "data": base64.b64encode(body).decode("ascii"), "mimeType": media})
    else:
        if media == "application/json" or media.endswith("+json"):
            try:
                structured = orjson.loads(body) if body else None
                has_structured = bool(body)
            except orjson.JSONDecodeError:
                pass
        text = body.decode("utf-8", "replace")
        if is_error:
            text = f"HTTP {status}" + (f": {text}" if text else "")
        content.append({"type": "text", "text": text})
    result: dict[str, Any] = {"content": content, "isError": is_error}
    if has_structured and (modern or isinstance(structured, dict)):
        result["structuredContent"] = structured
    if modern:
        result["resultType"] = "complete"
    return result
