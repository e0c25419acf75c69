"""``default(x, fallback)``: a compile-time rewrite (see the package docstring).

``default(X, Y)`` becomes ``(__agproxy_ok(N) ? dyn(X) : dyn(Y))``; ``X`` is compiled
on its own as probe ``N``, and ``__agproxy_ok`` (called back by the library)
evaluates it against the activation being evaluated, which ``evaluating`` holds
while an expression with probes runs (one thread per process: the event loop).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import itertools
import weakref
from typing import Callable

from agproxy.cel.environment import _OK_FUNCTION, _RESERVED_PREFIX, CelCompileError
from agproxy.cel.lexer import _is_member

if TYPE_CHECKING:
    from agproxy.cel.expression import Expression


class _Evaluating:
    """The activation being evaluated by an expression that has default() probes."""

    __slots__ = ("activation",)

    def __init__(self) -> None:
        self.activation = None


evaluating = _Evaluating()

class _Probe:
    """The first argument of one default() call, compiled on its own."""

    __slots__ = ("expression", "__weakref__")

    def __init__(self, expression: "Expression"):
        self.expression = expression


_probe_ids = itertools.count(1)
_probes: "weakref.WeakValueDictionary[int, _Probe]" = weakref.WeakValueDictionary()

def _probe_ok(probe_id: int) -> bool:
    """__agproxy_ok(N): did default()'s first argument evaluate to a non-null value?"""
    probe = _probes.get(probe_id)
    activation = evaluating.activation
    if probe is None or activation is None:
        return False
    expr = probe.expression
    try:
        native = activation._natives.get(expr._projection)
        if native is None:
            native = activation._native_for(expr._projection)
        value = expr._program.eval(data=native).plain_value()
    except Exception:
        return False
    if expr._wrapped:
        return type(value) is list and value[0] is not None
    return value is True or value is False


def _rewrite(source: str, tokens, probes: list, compile_probe: Callable) -> str:
    """Rewrite every default(X, Y) in source; new probes are appended to probes.
    `compile_probe(source, rewritten, tokens)` compiles a probe's expression."""
    out = []
    pos = 0
    i = 0
    n = len(tokens)
    while i < n:
        kind, text, start, _ = tokens[i]
        if kind == "ident" and text.startswith(_RESERVED_PREFIX):
            raise CelCompileError(
                f"invalid CEL expression {source!r}: identifiers starting with "
                f"{_RESERVED_PREFIX!r} are reserved")
        if (kind == "ident" and text == "default" and i + 1 < n and tokens[i + 1][0] == "("
                and not _is_member(tokens, i)):
            # Find the matching ")" and the top-level commas.
            depth = 0
            commas = []
            j = i + 1
            while j < n:
                k = tokens[j][0]
                if k in "([{":
                    depth += 1
                elif k in ")]}":
                    depth -= 1
                    if depth == 0:
                        break
                elif k == "," and depth == 1:
                    commas.append(j)
                j += 1
            if j >= n or tokens[j][0] != ")":
                raise CelCompileError(
                    f"invalid CEL expression {source!r}: unbalanced parentheses in default(...)")
            if len(commas) != 1 or commas[0] + 1 == j:
                raise CelCompileError(
                    f"invalid CEL expression {source!r}: default() takes exactly two "
                    "arguments: default(expression, fallback)")
            c = commas[0]
            x_src = source[tokens[i + 2][2]:tokens[c][2]] if c > i + 2 else ""
            y_src = source[tokens[c + 1][2]:tokens[j][2]]
            if not x_src.strip():
                raise CelCompileError(
                    f"invalid CEL expression {source!r}: default() takes exactly two "
                    "arguments: default(expression, fallback)")
            x_tokens = tokens[i + 2:c]
            y_tokens = tokens[c + 1:j]
            x_rewritten = _rewrite(x_src, _shift(x_tokens, -tokens[i + 2][2]), probes, compile_probe)
            y_rewritten = _rewrite(y_src, _shift(y_tokens, -tokens[c + 1][2]), probes, compile_probe)
            try:
                x_expr = compile_probe(x_src, x_rewritten, x_tokens)
            except CelCompileError as exc:
                raise CelCompileError(
                    f"invalid CEL expression {source!r}: in the first argument of "
                    f"default(): {exc} (default() cannot use comprehension variables)"
                ) from None
            probe = _Probe(x_expr)
            probe_id = next(_probe_ids)
            _probes[probe_id] = probe
            probes.append(probe)
            out.append(source[pos:start])
            out.append(f"({_OK_FUNCTION}({probe_id}) ? dyn({x_rewritten}) : dyn({y_rewritten}))")
            pos = tokens[j][3]
            i = j + 1
            continue
        i += 1
    out.append(source[pos:])
    return "".join(out)


def _shift(tokens, delta: int):
    return [(k, t, s + delta, e + delta) for (k, t, s, e) in tokens]
