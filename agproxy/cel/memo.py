"""``ExpressionGroup``: several expressions evaluated in one library call, with
results memoised per verified token (see the class docstring)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agproxy.cel.environment import CelEvalError
from agproxy.cel.expression import Expression, _Batch
from agproxy.cel.lexer import _MAP_FIELDS, _Projection

_PURE_VARIABLES = frozenset({"jwt"})

#: distinct request inputs remembered per token and ExpressionGroup (ExpressionGroup)
MAX_INPUTS_PER_TOKEN = 16
# What may key that memo: variables, and fields that differ per request rather than per caller.
_KEYABLE_VARIABLES = frozenset({"jwt", "request", "source"})
_PER_REQUEST_FIELDS = {"request": frozenset({"id"}), "source": frozenset({"port"})}

if TYPE_CHECKING:
    from agproxy.cel.activation import Activation


def _memoizable(projection: "_Projection") -> bool:
    """Does projection read only caller-level scalar fields (besides jwt)?"""
    for name, fields in projection.plan:
        if name not in _KEYABLE_VARIABLES:
            return False
        if name == "jwt":
            continue
        if fields is None:
            return False
        for field, keys in fields:
            if field in _PER_REQUEST_FIELDS.get(name, ()):
                return False
            if field in _MAP_FIELDS.get(name, ()) and keys is None:
                return False
    return True


def _inputs_key(data: dict):
    """A hashable key of the non-jwt part of a projection's data, or None."""
    parts = []
    for name, value in data.items():
        if name == "jwt":
            continue
        frozen = _freeze(value)
        if frozen is _UNKEYABLE:
            return None
        parts.append((name, frozen))
    return tuple(parts)


_UNKEYABLE = object()


def _freeze(value):
    t = type(value)
    if t is str:
        return value
    if t is dict:
        items = []
        for k, v in value.items():
            frozen = _freeze(v)
            if frozen is _UNKEYABLE:
                return _UNKEYABLE
            items.append((k, frozen))
        return ("map", tuple(items))
    if t is int or t is bool or t is float or value is None:
        return (t.__name__, value)     # 1, 1.0 and True are equal keys in Python
    return _UNKEYABLE


class ExpressionGroup:
    """Several expressions evaluated together, as cheaply as the library allows.

    cel-expr-python has a fixed cost per evaluation (converting the activation's
    maps into the C++ runtime) that is larger than evaluating a typical rule. A
    group compiles its members into one list expression `[e1, e2, ...]`, so a
    filter with N rules pays that cost once (measured: 5 rules 31 µs → 9 µs). A
    list with a failing element fails as a whole; only then are the members
    evaluated one by one, so each still gets its own result or its own error:
    the semantics are exactly those of evaluating each expression alone.

    Members that read nothing but `jwt` are pure functions of the verified claims;
    given the token's `memo` (identity.jwt_verify.VerifiedClaims) their results are
    computed once per token and reused by every later request with that token.

    The other members are pure functions of the claims and of the few request
    fields they read (their projection), when those are scalar fields such as
    `request.headers["x-tenant"]`, `request.method` or `source.address`. Their
    results are kept in the token's memo too, keyed by the values of those fields
    (at most `MAX_INPUTS_PER_TOKEN` distinct ones per token and group), so a
    caller that repeats the same token with the same tenant header costs one
    library call, not one per request. A member reading anything per-request
    (`request.id`, `source.port`), a whole map, or `mcp`/`llm`/`response` keeps
    the group out of this.
    """

    __slots__ = ("expressions", "_pure", "_pure_idx", "_rest", "_rest_idx", "_rest_inputs",
                 "_inputs_key")

    def __init__(self, expressions: "list[Expression]"):
        self.expressions = tuple(expressions)
        self._pure_idx = tuple(i for i, e in enumerate(self.expressions) if e.variables <= _PURE_VARIABLES)
        self._rest_idx = tuple(i for i in range(len(self.expressions)) if i not in self._pure_idx)
        self._pure = _Batch(tuple(self.expressions[i] for i in self._pure_idx))
        self._rest = _Batch(tuple(self.expressions[i] for i in self._rest_idx))
        rest = [self.expressions[i]._projection for i in self._rest_idx]
        inputs = rest[0] if rest else None
        for p in rest[1:]:
            inputs = inputs.union(p)
        # The projection whose values key the memo of the non-pure members, or None.
        self._rest_inputs = inputs if inputs is not None and _memoizable(inputs) else None
        self._inputs_key = (self, "inputs")

    def _rest_values(self, activation: "Activation", memo: dict | None) -> list:
        inputs = self._rest_inputs
        if memo is None or inputs is None:
            return self._rest.values(activation)
        data = activation._natives.get(inputs)
        if data is None:
            data = activation._native_for(inputs)
        key = _inputs_key(data)
        if key is None:
            return self._rest.values(activation)
        seen = memo.get(self._inputs_key)
        if seen is None:
            seen = memo[self._inputs_key] = {}
        values = seen.get(key)
        if values is None:
            values = self._rest.values(activation)
            if len(seen) < MAX_INPUTS_PER_TOKEN:
                seen[key] = values
        return values

    def _values(self, activation: "Activation", memo: dict | None) -> list:
        if not self._pure_idx:
            return self._rest_values(activation, memo)
        pure = memo.get(self) if memo is not None else None
        if pure is None:
            pure = self._pure.values(activation)
            if memo is not None:
                memo[self] = pure
        if not self._rest_idx:
            return pure
        out: list = [None] * len(self.expressions)
        for i, v in zip(self._pure_idx, pure):
            out[i] = v
        for i, v in zip(self._rest_idx, self._rest_values(activation, memo)):
            out[i] = v
        return out

    def evaluate_bools(self, activation: "Activation", memo: dict | None = None) -> list:
        """Per member: its bool result, or the CelEvalError it raised."""
        out = []
        for e, v in zip(self.expressions, self._values(activation, memo)):
            if v is True or v is False or isinstance(v, CelEvalError):
                out.append(v)
            else:
                try:
                    out.append(e._as_bool(v))
                except CelEvalError as exc:
                    out.append(exc)
        return out

    def evaluate_strs(self, activation: "Activation", memo: dict | None = None) -> list:
        """Per member: its string result (as evaluate_str), or the CelEvalError it raised."""
        out = []
        for e, v in zip(self.expressions, self._values(activation, memo)):
            if type(v) is str or isinstance(v, CelEvalError):
                out.append(v)
            else:
                try:
                    out.append(e._as_str(v))
                except CelEvalError as exc:
                    out.append(exc)
        return out
