"""OpenAPI documents: reading them (YAML or JSON), JSON pointers, and `$ref` expansion.

Theory of operation: `Documents` loads the root document (a file or inline text)
and, lazily, every file a relative `$ref` names (`common.yaml#/components/schemas/Pet`,
relative to the document that holds the reference, and never outside the root
document's folder), each once. YAML goes through
PyYAML's C loader when present, without its timestamp rule (an `example: 2024-01-01`
stays a string, as JSON would have it).

`Expander.expand(node, where)` returns a JSON Schema with every `$ref` resolved.
References are inlined, except where a schema refers to itself through a chain of
references (a tree, a linked list): the second visit of a reference still being
expanded becomes `{"$ref": "#/$defs/<Name>"}` and the expansion of that reference
goes once into `$defs` (which the caller puts at the root of the tool's
`inputSchema`). So recursive schemas stay finite and keep their meaning.
Non-recursive expansions are cached per reference, so a component used by 500
operations is expanded once.

OpenAPI 3.0 schemas are not quite JSON Schema; `to_json_schema` adapts the
differences a validator would misread: `nullable: true` → the type also allows
null; boolean `exclusiveMinimum` / `exclusiveMaximum` → the numeric forms.
OpenAPI 3.1 schemas are JSON Schema 2020-12 and pass as they are.

Problems are `SpecError`s carrying the JSON pointer (in the document that has the
problem) so the config error names where to look.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import unquote

import orjson


class SpecError(Exception):
    """A problem in the OpenAPI document: `pointer` (RFC 6901) says where."""

    def __init__(self, pointer: str, message: str, operation: str | None = None, file: str | None = None):
        self.pointer = pointer
        self.message = message
        self.operation = operation
        self.file = file
        super().__init__(self.describe())

    def describe(self) -> str:
        where = f"{self.file}#{self.pointer}" if self.file else f"#{self.pointer}"
        op = f"operation {self.operation}: " if self.operation else ""
        return f"{op}{where}: {self.message}"


def _yaml_loader():
    import yaml
    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    class Loader(base):  # type: ignore[misc, valid-type]
        pass

    # No timestamp rule: YAML dates stay strings, as JSON would have them.
    Loader.yaml_implicit_resolvers = {
        k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:timestamp"]
        for k, v in base.yaml_implicit_resolvers.items()
    }
    return Loader


_LOADER = None


def parse_text(text: str | bytes, name: str = "") -> Any:
    """A document's text → its data (JSON when it looks like JSON, else YAML)."""
    global _LOADER
    raw = text.encode() if isinstance(text, str) else text
    stripped = raw.lstrip()
    if stripped[:1] in (b"{", b"["):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass        # YAML flow style may also start with "{"
    import yaml
    if _LOADER is None:
        _LOADER = _yaml_loader()
    try:
        return yaml.load(raw, Loader=_LOADER)  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError("", f"invalid YAML/JSON{at}: {problem}", file=name or None) from None


def pointer_tokens(pointer: str) -> list[str]:
    if pointer in ("", "/"):
        return [] if pointer == "" else [""]
    if not pointer.startswith("/"):
        raise ValueError(f"a JSON pointer starts with '/': {pointer!r}")
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/")]


def escape(token: Any) -> str:
    return str(token).replace("~", "~0").replace("/", "~1")


def join(pointer: str, *tokens: Any) -> str:
    return pointer + "".join("/" + escape(t) for t in tokens)


class Documents:
    """The root document and the files its references reach, loaded once each."""

    def __init__(self, root: Any, root_file: str | None, base_dir: str):
        self.root_file = os.path.abspath(root_file) if root_file else None
        self.base_dir = os.path.dirname(self.root_file) if self.root_file else base_dir
        self.docs: dict[str | None, Any] = {self.root_file: root}

    @classmethod
    def from_file(cls, path: str) -> "Documents":
        try:
            with open(path, "rb") as f:
                text = f.read()
        except OSError as exc:
            raise SpecError("", f"cannot read {path}: {exc.strerror or exc}") from None
        return cls(parse_text(text, path), path, os.path.dirname(os.path.abspath(path)))

    @classmethod
    def from_text(cls, text: str, base_dir: str) -> "Documents":
        return cls(parse_text(text), None, base_dir)

    @property
    def root(self) -> Any:
        return self.docs[self.root_file]

    def label(self, file: str | None) -> str | None:
        if file is None or file == self.root_file:
            return None
        return os.path.relpath(file, self.base_dir)

    def load(self, file: str) -> Any:
        if file not in self.docs:
            try:
                with open(file, "rb") as f:
                    text = f.read()
            except OSError as exc:
                raise SpecError("", f"cannot read {file}: {exc.strerror or exc}") from None
            self.docs[file] = parse_text(text, file)
        return self.docs[file]

    def resolve(self, ref: str, file: str | None, where: str) -> tuple[Any, str | None, str]:
        """A `$ref` found in `file` at `where` → (target, its file, its pointer)."""
        if not isinstance(ref, str):
            raise SpecError(where, "$ref must be a string", file=self.label(file))
        target, _, fragment = ref.partition("#")
        if target:
            if "://" in target:
                raise SpecError(where, f"remote $ref {ref!r} is not supported (only local and "
                                       "relative-file references)", file=self.label(file))
            base = os.path.dirname(file) if file else self.base_dir
            tfile: str | None = os.path.normpath(os.path.join(base, unquote(target)))
            # Only files under the spec's own folder (symlinks resolved): a spec is often
            # someone else's file, and what a $ref reads is served to every MCP client.
            root = os.path.realpath(self.base_dir)
            if os.path.commonpath([root, os.path.realpath(tfile)]) != root:  # type: ignore[arg-type]
                raise SpecError(where, f"$ref {ref!r} points outside the spec's folder", file=self.label(file))
            doc = self.load(tfile)  # type: ignore[arg-type]
        else:
            tfile = file
            doc = self.docs[file]
        pointer = unquote(fragment)
        node = doc
        try:
            for tok in pointer_tokens(pointer):
                if isinstance(node, dict):
                    node = node[tok] if tok in node else node[int(tok)] if tok.isdigit() and int(tok) in node \
                        else node[tok]
                elif isinstance(node, list):
                    node = node[int(tok)]
                else:
                    raise KeyError(tok)
        except (KeyError, IndexError, ValueError):
            raise SpecError(where, f"$ref {ref!r} does not resolve", file=self.label(file)) from None
        return node, tfile, pointer


def to_json_schema(node: dict, openapi30: bool) -> dict:
    """One schema object's own keywords, adapted from OpenAPI 3.0 where it differs."""
    if not openapi30:
        return node
    out = dict(node)
    if out.pop("nullable", False) is True:
        t = out.get("type")
        if isinstance(t, str):
            out["type"] = [t, "null"]
        elif "enum" in out and None not in out["enum"]:
            out["enum"] = list(out["enum"]) + [None]
    for key, base in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        flag = out.get(key)
        if isinstance(flag, bool):
            if flag and base in out:
                out[key] = out.pop(base)
            else:
                out.pop(key)
    return out


# Keywords whose value is a schema, a list of schemas, or a map of schemas.
_SUB_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains",
            "propertyNames", "unevaluatedItems", "unevaluatedProperties", "contentSchema",
            "additionalItems")
_SUB_LIST = ("allOf", "anyOf", "oneOf", "prefixItems")
_SUB_MAP = ("properties", "patternProperties", "dependentSchemas", "$defs", "definitions")
# OpenAPI-only keywords a JSON Schema validator would ignore anyway; dropped from tools.
_DROP = ("discriminator", "xml", "externalDocs", "example")


class Expander:
    """Expands `$ref`s of schemas, one tool at a time (see the module docstring).

    `begin()` starts a tool; `expand(...)` its schemas; `finish()` returns the
    `$defs` they need (the recursive schemas they reach, and those these reach).
    """

    def __init__(self, docs: Documents, openapi30: bool):
        self.docs = docs
        self.openapi30 = openapi30
        self._cache: dict[tuple, tuple[Any, frozenset]] = {}   # ref key → (expansion, $defs names used)
        self._names: dict[tuple, str] = {}        # ref key → its $defs name (stable per spec)
        self._taken: set[str] = set()
        self._defs: dict[str, tuple[Any, frozenset]] = {}      # name → (expansion, $defs names used)
        self._stack: list[tuple] = []
        self._recursive: set[tuple] = set()
        self._emitted: list[str] = []             # $defs names referenced by the current tool

    def begin(self) -> None:
        self._emitted = []

    def finish(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        todo = list(dict.fromkeys(self._emitted))
        while todo:
            name = todo.pop()
            if name in out:
                continue
            expansion, uses = self._defs[name]
            out[name] = expansion
            todo.extend(n for n in uses if n not in out)
        return out

    def expand(self, node: Any, file: str | None, where: str) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return self._ref(node, file, where)
            out = {}
            for k, v in to_json_schema(node, self.openapi30).items():
                if k in _DROP or k.startswith("x-"):
                    continue
                if k in _SUB_ONE and isinstance(v, (dict, bool)):
                    out[k] = self.expand(v, file, join(where, k))
                elif k in _SUB_LIST and isinstance(v, list):
                    out[k] = [self.expand(s, file, join(where, k, i)) for i, s in enumerate(v)]
                elif k in _SUB_MAP and isinstance(v, dict):
                    out[k] = {name: self.expand(s, file, join(where, k, name)) for name, s in v.items()}
                elif k == "items" and isinstance(v, list):       # draft-4 tuple form
                    out["prefixItems"] = [self.expand(s, file, join(where, k, i)) for i, s in enumerate(v)]
                else:
                    out[k] = v
            return out
        if isinstance(node, list):
            return [self.expand(s, file, join(where, i)) for i, s in enumerate(node)]
        return node

    def _ref(self, node: dict, file: str | None, where: str) -> Any:
        target, tfile, pointer = self.docs.resolve(node["$ref"], file, join(where, "$ref"))
        key = (tfile, pointer)
        if key in self._stack:                    # a cycle: refer to its definition
            self._recursive.add(key)
            result: Any = self._def_ref(self._name(key))
        else:
            cached = self._cache.get(key)
            if cached is None:
                self._stack.append(key)
                mark = len(self._emitted)
                try:
                    expansion = self.expand(target, tfile, pointer)
                finally:
                    self._stack.pop()
                uses = frozenset(self._emitted[mark:])
                del self._emitted[mark:]
                if key in self._recursive:
                    name = self._name(key)
                    self._defs[name] = (expansion, uses)
                    cached = (self._def_ref(name, emit=False), frozenset((name,)))
                else:
                    cached = (expansion, uses)
                self._cache[key] = cached
            result, uses = cached
            self._emitted.extend(uses)
        siblings = [k for k in node if k != "$ref" and k not in _DROP and not k.startswith("x-")]
        if siblings and isinstance(result, dict):
            # OpenAPI 3.1 allows keywords beside $ref (description, ...); they apply too.
            extra = {k: node[k] for k in siblings if k not in result}
            if "$ref" in result:
                return {"allOf": [result], **extra} if extra else result
            return {**result, **extra}
        return result

    def _def_ref(self, name: str, emit: bool = True) -> dict:
        if emit:
            self._emitted.append(name)
        return {"$ref": "#/$defs/" + name}

    def _name(self, key: tuple) -> str:
        name = self._names.get(key)
        if name is None:
            tokens = pointer_tokens(key[1]) if key[1] else []
            base = "".join(c if c.isalnum() or c in "_-." else "_" for c in (tokens[-1] if tokens else "root"))
            base = base or "schema"
            name, n = base, 2
            while name in self._taken:
                name, n = f"{base}_{n}", n + 1
            self._taken.add(name)
            self._names[key] = name
        return name
