"""OpenAPI operations → MCP tools (names, descriptions, input schemas, argument bindings).

Theory of operation: `build_tools(docs, include, exclude)` walks `paths` in
document order and makes one `Tool` per operation:

- name: the `operationId`, else `<method>_<path>`; characters outside
  `[A-Za-z0-9_-]` become `_`, at most 64 characters; a name already taken (two
  operationIds that differ only in a dropped character, or the same first 64
  characters) gets `_2`, `_3`, ... within the 64;
- description: the summary and the description (both when they differ);
- `inputSchema`: one object whose properties are the path, query, header and
  cookie parameters and, for a JSON body that is an object with properties
  (and no additional ones), its properties; any other body is one `body`
  argument. A name used in more than one location is renamed in every location
  that uses it to `<name>__<location>` (`id__path`, `id__query`, `id__body`), so
  arguments never collide and each says where it goes. Required parameters and
  required body properties are required arguments; unknown arguments are refused
  (`additionalProperties: false`); recursive schemas live in `$defs`;
- `bindings`: for each argument, where it goes in the REST request and how it
  is serialised (style, explode), for mcp/openapi/rest.py.

Header parameters named `Accept`, `Content-Type` or `Authorization` are ignored
(OpenAPI's rule), and so are those the gateway owns on the wire (`Host`,
`Content-Length`, hop-by-hop and framing headers such as `Transfer-Encoding` or
`Connection`): an argument's value comes from a model, and a second
Content-Length or Host would smuggle a request to the API or pick another host.

`include` / `exclude` name operations by operationId (or by the tool name for
operations without one). A problem is a `SpecError` naming the operation and the
JSON pointer.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from agproxy.http.messages import HOP_BY_HOP
from agproxy.mcp.openapi.refs import Documents, Expander, SpecError, join

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
LOCATIONS = ("path", "query", "header", "cookie")
_GATEWAY_HEADERS = frozenset({"accept", "content-type", "authorization", "host", "content-length"}) | HOP_BY_HOP
MAX_NAME = 64
_BAD_NAME = re.compile(r"[^A-Za-z0-9_-]")
_TEMPLATE = re.compile(r"\{([^{}]+)\}")
_JSON = re.compile(r"^application/(?:[\w.+-]*\+)?json$", re.I)
_DEFAULT_STYLE = {"path": "simple", "query": "form", "header": "simple", "cookie": "form"}
_STYLES = {"path": ("simple", "label", "matrix"), "query": ("form", "spaceDelimited", "pipeDelimited", "deepObject"),
           "header": ("simple",), "cookie": ("form",)}


class Binding:
    """Where one argument goes: `location` (path/query/header/cookie/body/body_field), the
    name it has there, and its serialisation."""

    __slots__ = ("argument", "location", "name", "style", "explode", "allow_reserved")

    def __init__(self, argument: str, location: str, name: str, style: str = "", explode: bool = False,
                 allow_reserved: bool = False):
        self.argument = argument
        self.location = location
        self.name = name
        self.style = style
        self.explode = explode
        self.allow_reserved = allow_reserved

    def __repr__(self) -> str:
        return f"Binding({self.argument!r} → {self.location} {self.name!r})"


class Tool:
    __slots__ = ("name", "operation_id", "method", "path", "description", "input_schema", "bindings",
                 "body_media_type", "annotations", "pointer")

    def __init__(self, name: str, operation_id: str | None, method: str, path: str, description: str,
                 input_schema: dict, bindings: list[Binding], body_media_type: str | None,
                 annotations: dict, pointer: str):
        self.name = name
        self.operation_id = operation_id
        self.method = method.upper()
        self.path = path
        self.description = description
        self.input_schema = input_schema
        self.bindings = bindings
        self.body_media_type = body_media_type
        self.annotations = annotations
        self.pointer = pointer

    def listing(self) -> dict:
        """The entry of this tool in a tools/list result."""
        out: dict[str, Any] = {"name": self.name, "inputSchema": self.input_schema}
        if self.description:
            out["description"] = self.description
        if self.annotations:
            out["annotations"] = self.annotations
        return out


def sanitize(name: str) -> str:
    return _BAD_NAME.sub("_", name)[:MAX_NAME] or "operation"


def _fallback_name(method: str, path: str) -> str:
    parts = [p.strip("{}") for p in path.split("/") if p]
    return sanitize("_".join([method] + parts))


def _unique(name: str, taken: set[str]) -> str:
    if name not in taken:
        return name
    n = 2
    while True:
        suffix = f"_{n}"
        candidate = name[: MAX_NAME - len(suffix)] + suffix
        if candidate not in taken:
            return candidate
        n += 1


def build_tools(docs: Documents, include: Iterable[str] | None = None,
                exclude: Iterable[str] | None = None) -> list[Tool]:
    root = docs.root
    if not isinstance(root, dict):
        raise SpecError("", "an OpenAPI document is an object")
    version = root.get("openapi")
    if not isinstance(version, str) or not re.match(r"^3\.[01]\.\d+", version):
        if "swagger" in root:
            raise SpecError("/swagger", "Swagger 2.0 is not supported: convert it to OpenAPI 3.0 or 3.1")
        raise SpecError("/openapi", f"expected OpenAPI 3.0.x or 3.1.x, got {version!r}")
    openapi30 = version.startswith("3.0")
    paths = root.get("paths")
    if paths is None:
        paths = {}
    if not isinstance(paths, dict):
        raise SpecError("/paths", "paths must be an object")
    include_set = set(include) if include is not None else None
    exclude_set = set(exclude or ())
    expander = Expander(docs, openapi30)
    tools: list[Tool] = []
    taken: set[str] = set()
    seen_ops: set[str] = set()
    all_ids: list[str] = []
    for path, item in paths.items():
        ipointer = join("/paths", path)
        if not isinstance(path, str) or not path.startswith("/"):
            raise SpecError(ipointer, "a path must start with '/'")
        if not isinstance(item, dict):
            raise SpecError(ipointer, "a path item must be an object")
        item_file: str | None = docs.root_file
        if "$ref" in item:
            item, item_file, ipointer = docs.resolve(item["$ref"], docs.root_file, join(ipointer, "$ref"))
            if not isinstance(item, dict):
                raise SpecError(ipointer, "a path item must be an object")
        shared = item.get("parameters", [])
        for method in METHODS:
            op = item.get(method)
            if op is None:
                continue
            opointer = join(ipointer, method)
            if not isinstance(op, dict):
                raise SpecError(opointer, "an operation must be an object")
            op_id = op.get("operationId")
            if op_id is not None and not isinstance(op_id, str):
                raise SpecError(join(opointer, "operationId"), "operationId must be a string")
            label = op_id or f"{method.upper()} {path}"
            if op_id is not None:
                if op_id in seen_ops:
                    raise SpecError(join(opointer, "operationId"), f"operationId {op_id!r} is used twice",
                                    operation=label)
                seen_ops.add(op_id)
            name = _unique(sanitize(op_id) if op_id else _fallback_name(method, path), taken)
            key = op_id or name
            all_ids.append(key)
            if include_set is not None and key not in include_set:
                continue
            if key in exclude_set:
                continue
            if op.get("deprecated") is True and include_set is None:
                pass   # deprecated operations stay tools unless excluded
            try:
                tool = _tool(docs, expander, name, op_id, method, path, op, shared, opointer, item_file)
            except SpecError as exc:
                exc.operation = exc.operation or label
                raise SpecError(exc.pointer, exc.message, exc.operation, exc.file) from None
            taken.add(name)
            tools.append(tool)
    for which, names in (("include_operations", include_set), ("exclude_operations", exclude_set)):
        for n in sorted(names or ()):
            if n not in all_ids:
                raise UnknownOperation(which, n, all_ids)
    return tools


class UnknownOperation(Exception):
    def __init__(self, key: str, name: str, known: list[str]):
        self.key = key
        self.name = name
        self.known = known
        super().__init__(f"{key}: no operation {name!r} in the spec")


def _tool(docs: Documents, expander: Expander, name: str, op_id: str | None, method: str, path: str,
          op: dict, shared: Any, opointer: str, file: str | None) -> Tool:
    expander.begin()
    params = _parameters(docs, shared, op.get("parameters", []), opointer, file)
    template = _TEMPLATE.findall(path)
    declared_path = {p["name"] for p in params.values() if p["in"] == "path"}
    for t in template:
        if t not in declared_path:
            raise SpecError(opointer, f"path template {{{t}}} has no path parameter")
    for pname in declared_path:
        if pname not in template:
            raise SpecError(opointer, f"path parameter {pname!r} is not in the path template {path!r}")

    # (argument name wanted, location, schema, required, binding kwargs)
    entries: list[tuple[str, str, Any, bool, dict]] = []
    for (pname, loc), p in params.items():
        style = p.get("style", _DEFAULT_STYLE[loc])
        if style not in _STYLES[loc]:
            raise SpecError(p["_pointer"], f"style {style!r} is not valid for a {loc} parameter")
        schema = _param_schema(docs, expander, p, file)
        if p.get("description") and isinstance(schema, dict) and "description" not in schema:
            schema = {**schema, "description": p["description"]}
        required = loc == "path" or p.get("required") is True
        entries.append((pname, loc, schema, required, {
            "style": style, "explode": p.get("explode", style == "form"),
            "allow_reserved": p.get("allowReserved") is True}))

    body_media = None
    body_required = False
    body = op.get("requestBody")
    if body is not None:
        bpointer = join(opointer, "requestBody")
        bfile = file
        if isinstance(body, dict) and "$ref" in body:
            body, bfile, bpointer = docs.resolve(body["$ref"], file, join(bpointer, "$ref"))
        if not isinstance(body, dict):
            raise SpecError(bpointer, "requestBody must be an object")
        content = body.get("content")
        if not isinstance(content, dict) or not content:
            raise SpecError(join(bpointer, "content"), "requestBody needs a content map")
        body_required = body.get("required") is True
        body_media = next((m for m in content if _JSON.match(m)), None) or \
            ("application/x-www-form-urlencoded" if "application/x-www-form-urlencoded" in content else None) or \
            next(iter(content))
        media = content[body_media]
        mpointer = join(bpointer, "content", body_media)
        if not isinstance(media, dict):
            raise SpecError(mpointer, "a media type must be an object")
        raw_schema = media.get("schema", {})
        schema = expander.expand(raw_schema, bfile, join(mpointer, "schema"))
        structured = _JSON.match(body_media) or body_media == "application/x-www-form-urlencoded"
        if not structured:
            schema = {"type": "string", "description": f"the request body ({body_media})"}
        if structured and _flat_object(schema):
            req = set(schema.get("required", []))
            for prop, sub in schema["properties"].items():
                # Required when the body is: an optional body may be left out whole.
                entries.append((prop, "body_field", sub, body_required and prop in req, {}))
        else:
            if isinstance(schema, dict) and body.get("description") and "description" not in schema:
                schema = {**schema, "description": body["description"]}
            entries.append(("body", "body", schema, body_required, {}))

    counts: dict[str, int] = {}
    for arg, *_ in entries:
        counts[arg] = counts.get(arg, 0) + 1
    properties: dict[str, Any] = {}
    required: list[str] = []
    bindings: list[Binding] = []
    for arg, loc, schema, req, kw in entries:
        argname = arg
        if counts[arg] > 1:
            argname = f"{arg}__{'body' if loc in ('body', 'body_field') else loc}"
        if argname in properties:
            raise SpecError(opointer, f"argument {argname!r} is defined twice")
        properties[argname] = schema if schema is not None else {}
        if req:
            required.append(argname)
        bindings.append(Binding(argname, loc, arg, **kw))
    input_schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        input_schema["required"] = required
    input_schema["additionalProperties"] = False
    defs = expander.finish()
    if defs:
        input_schema["$defs"] = defs

    summary = op.get("summary") if isinstance(op.get("summary"), str) else ""
    description = op.get("description") if isinstance(op.get("description"), str) else ""
    if summary and description and summary.strip() not in description:
        text = f"{summary.strip()}\n\n{description.strip()}"
    else:
        text = (description or summary).strip()
    m = method.upper()
    annotations: dict[str, Any] = {}
    if summary:
        annotations["title"] = summary.strip()
    annotations["readOnlyHint"] = m in ("GET", "HEAD", "OPTIONS")
    if m not in ("GET", "HEAD", "OPTIONS"):
        annotations["destructiveHint"] = m == "DELETE"
        annotations["idempotentHint"] = m in ("PUT", "DELETE")
    annotations["openWorldHint"] = True
    return Tool(name, op_id, method, path, text, input_schema, bindings, body_media if body is not None else None,
                annotations, opointer)


def _flat_object(schema: Any) -> bool:
    """A body whose properties can be top-level arguments: an object with properties
    that allows nothing besides them."""
    if not isinstance(schema, dict) or schema.get("type") != "object":
        return False
    props = schema.get("properties")
    if not isinstance(props, dict) or not props:
        return False
    extra = schema.get("additionalProperties", True if "patternProperties" in schema else None)
    if extra not in (None, False):
        return False
    return not any(k in schema for k in ("allOf", "anyOf", "oneOf", "not", "if", "$ref"))


def _parameters(docs: Documents, shared: Any, own: Any, opointer: str, file: str | None) -> dict:
    """Path-item parameters overridden by the operation's, keyed by (name, in)."""
    out: dict[tuple[str, str], dict] = {}
    for plist, base in ((shared, join(opointer.rsplit("/", 1)[0], "parameters")),
                        (own, join(opointer, "parameters"))):
        if not isinstance(plist, list):
            raise SpecError(base, "parameters must be a list")
        for i, p in enumerate(plist):
            ppointer = join(base, i)
            pfile = file
            if isinstance(p, dict) and "$ref" in p:
                p, pfile, ppointer = docs.resolve(p["$ref"], file, join(ppointer, "$ref"))
            if not isinstance(p, dict):
                raise SpecError(ppointer, "a parameter must be an object")
            name, loc = p.get("name"), p.get("in")
            if not isinstance(name, str) or not name:
                raise SpecError(join(ppointer, "name"), "a parameter needs a name")
            if loc not in LOCATIONS:
                raise SpecError(join(ppointer, "in"), f"'in' must be one of {', '.join(LOCATIONS)}, got {loc!r}")
            if loc == "header" and name.lower() in _GATEWAY_HEADERS:
                continue    # OpenAPI ignores the first three; the rest frame the request (ours)
            out[(name, loc)] = {**p, "_pointer": ppointer, "_file": pfile}
    return out


def _param_schema(docs: Documents, expander: Expander, p: dict, file: str | None) -> Any:
    ppointer = p["_pointer"]
    pfile = p.get("_file", file)
    if "schema" in p:
        return expander.expand(p["schema"], pfile, join(ppointer, "schema"))
    content = p.get("content")
    if isinstance(content, dict) and len(content) == 1:
        media, m = next(iter(content.items()))
        if isinstance(m, dict) and "schema" in m:
            return expander.expand(m["schema"], pfile, join(ppointer, "content", media, "schema"))
    raise SpecError(ppointer, "a parameter needs a schema (or a content map with one media type)")
