"""The CEL lexer, and what an expression reads: its variables and its projection.

Tokens (strings, numbers, identifiers, punctuation) are enough to know which
top-level variables an expression references and which of their fields it reads
(see the package docstring, "Projection").  Both may over-approximate, never miss.
Projections are interned: equal ones are one object, so activations can key
their library data by identity.
"""

from __future__ import annotations

import re
import weakref
from typing import Iterable

from agproxy.cel.environment import VARIABLES

_TOKEN_RE = re.compile(
    r"""
      (?P<ws>\s+|//[^\n]*)
    | (?P<str>
          (?:[rR][bB]?|[bB][rR])          # raw strings: no escapes
          (?:\"\"\"[\s\S]*?\"\"\"|'''[\s\S]*?'''|"[^"\r\n]*"|'[^'\r\n]*')
        | [bB]?
          (?:\"\"\"(?:\\[\s\S]|[^\\])*?\"\"\"|'''(?:\\[\s\S]|[^\\])*?'''
             |"(?:\\.|[^"\\\r\n])*"|'(?:\\.|[^'\\\r\n])*')
      )
    | (?P<num>0[xX][0-9a-fA-F]+[uU]?|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?[uU]?)
    | (?P<ident>[_a-zA-Z][_a-zA-Z0-9]*)
    | (?P<bq>`[^`]*`)
    | (?P<op>[\s\S])
    """,
    re.VERBOSE,
)

# After one of these tokens a `.` is member access, so the identifier after it is a
# field or method name, not a top-level variable.
_OPERAND_END = frozenset({"str", "num", "ident", "bq", ")", "]", "}"})


def _tokenize(source: str) -> list[tuple[str, str, int, int]]:
    """(kind, text, start, end) for each significant token; kind is the op text for ops."""
    tokens = []
    for m in _TOKEN_RE.finditer(source):
        kind = m.lastgroup
        if kind == "ws":
            continue
        text = m.group()
        if kind == "op":
            kind = text
        tokens.append((kind, text, m.start(), m.end()))
    return tokens


def _is_member(tokens, i: int) -> bool:
    """Is tokens[i] (an identifier) a field/method name after `.` or `.?`?"""
    j = i - 1
    if j >= 0 and tokens[j][0] == "?":
        j -= 1
    return j >= 1 and tokens[j][0] == "." and tokens[j - 1][0] in _OPERAND_END


# ---------------------------------------------------------------------------------
# Projections: which fields of each variable an expression reads
# ---------------------------------------------------------------------------------

# Fields of a variable that are maps whose keys are projected too (`request.headers`
# holds every request header, including long credentials).
_MAP_FIELDS = {"request": frozenset({"headers", "query"})}


def _string_literal(text: str) -> "str | None":
    """The value of a CEL string literal token; None for bytes literals and for
    literals with escapes (not decoded here: the caller then keeps everything)."""
    i = 0
    raw = False
    while text[i] in "rRbB":
        if text[i] in "bB":
            return None
        raw = True
        i += 1
    body = text[i:]
    q = 3 if body[:3] in ('"""', "'''") else 1
    value = body[q:-q]
    if (not raw and "\\" in value) or "\r" in value:
        return None
    return value


def _selection(tokens, j: int) -> "tuple[str, int] | None":
    """If tokens[j:] start with `.name` (not a method call `.name(`) or `["literal"]`,
    (the selected key, the index after the selection); else None."""
    n = len(tokens)
    if j + 1 < n:
        kind = tokens[j][0]
        if kind == "." and tokens[j + 1][0] == "ident" and (j + 2 >= n or tokens[j + 2][0] != "("):
            return tokens[j + 1][1], j + 2
        if kind == "[" and j + 2 < n and tokens[j + 1][0] == "str" and tokens[j + 2][0] == "]":
            key = _string_literal(tokens[j + 1][1])
            if key is not None:
                return key, j + 3
    return None


def _projection_of(tokens) -> "_Projection":
    """What the expression reads of each variable it references (see _Projection).

    An occurrence of a variable followed by `.f` or `["f"]` reads field f; any other
    occurrence (bare, `V.method(`, `V[expr]`, `x in V`, a comprehension variable
    named V, ...) reads all of V.  Same one level down for _MAP_FIELDS.  This may
    over-approximate (keep more than is read) but never misses a read key."""
    spec: dict = {}
    for i, (kind, text, _, _) in enumerate(tokens):
        if kind != "ident" or text not in VARIABLES or _is_member(tokens, i):
            continue
        if text in spec and spec[text] is None:
            continue
        sel = _selection(tokens, i + 1)
        if sel is None:
            spec[text] = None
            continue
        field, j = sel
        fields = spec.setdefault(text, {})
        if field in _MAP_FIELDS.get(text, ()):
            sub = _selection(tokens, j)
            if sub is None:
                fields[field] = None
            elif field not in fields:
                fields[field] = {sub[0]}
            elif fields[field] is not None:
                fields[field].add(sub[0])
        else:
            fields[field] = None
    return _intern(spec)


class _Projection:
    """The part of the activation an expression reads, per variable: all of it, or
    some of its fields (each field: all of it, or some of its keys).  Interned by
    _intern(): equal projections are one object, so an activation keys its native
    activations by projection identity."""

    __slots__ = ("names", "plan", "_spec", "_covers", "__weakref__")

    def __init__(self, spec: dict, plan: tuple):
        # spec: {name: None | {field: None | set(keys)}}; None = everything
        self._spec = spec
        self.names: frozenset[str] = frozenset(spec)
        # plan: spec as sorted tuples, what Activation._native_for walks
        self.plan = plan
        self._covers: dict = {}   # projection -> does self hold all it reads?

    def __repr__(self) -> str:
        return f"_Projection({self.describe()!r})"

    def describe(self) -> dict:
        """{name: None (all of it) | {field: None (all of it) | sorted list of keys}}."""
        return {name: None if fields is None else
                {f: None if keys is None else list(keys) for f, keys in fields}
                for name, fields in self.plan}

    def covers(self, other: "_Projection") -> bool:
        """Does an activation built for self hold everything other reads?"""
        result = self._covers.get(other)
        if result is None:
            result = self._covers[other] = _spec_covers(self._spec, other._spec)
        return result

    def union(self, other: "_Projection") -> "_Projection":
        spec = {name: _copy_fields(fields) for name, fields in self._spec.items()}
        for name, fields in other._spec.items():
            if name not in spec:
                spec[name] = _copy_fields(fields)
            elif spec[name] is None or fields is None:
                spec[name] = None
            else:
                mine = spec[name]
                for f, keys in fields.items():
                    if f not in mine:
                        mine[f] = None if keys is None else set(keys)
                    elif mine[f] is None or keys is None:
                        mine[f] = None
                    else:
                        mine[f] |= keys
        return _intern(spec)


def _copy_fields(fields):
    if fields is None:
        return None
    return {f: None if keys is None else set(keys) for f, keys in fields.items()}


def _spec_covers(mine: dict, theirs: dict) -> bool:
    for name, fields in theirs.items():
        if name not in mine:
            return False
        have = mine[name]
        if have is None:
            continue
        if fields is None:
            return False
        for f, keys in fields.items():
            if f not in have:
                return False
            have_keys = have[f]
            if have_keys is None:
                continue
            if keys is None or not keys <= have_keys:
                return False
    return True


_projections: "weakref.WeakValueDictionary[tuple, _Projection]" = weakref.WeakValueDictionary()


def _intern(spec: dict) -> _Projection:
    plan = tuple(
        (name, None if fields is None else tuple(
            (f, None if keys is None else tuple(sorted(keys)))
            for f, keys in sorted(fields.items())))
        for name, fields in sorted(spec.items()))
    projection = _projections.get(plan)
    if projection is None:
        projection = _projections[plan] = _Projection(spec, plan)
    return projection


def _whole(names: Iterable[str]) -> _Projection:
    """All of each of names."""
    return _intern({name: None for name in names})
