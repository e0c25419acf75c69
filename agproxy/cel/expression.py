"""Compiling an expression and evaluating it against an activation.

An expression whose checked type is not bool is compiled as ``[source]`` so that
one ``type(value)`` test tells a result from the library's ERROR value (see the
package docstring, "Errors are exceptions").  ``_Batch`` compiles several into one
list expression: one library call for a filter's rules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import datetime

from agproxy.cel import environment
from agproxy.cel.convert import _format_duration, _format_timestamp, _to_plain, _type_name
from agproxy.cel.defaults import _Probe, _rewrite, evaluating
from agproxy.cel.environment import _STR_VAR, CelCompileError, CelEvalError, get_env
from agproxy.cel.lexer import _Projection, _projection_of, _tokenize, _whole

_library = environment.library

def compile_expression(source: str) -> "Expression":
    """Parse and type-check source; raises CelCompileError.  Call at config load."""
    if not isinstance(source, str):
        raise CelCompileError(f"a CEL expression must be a string, not {type(source).__name__}")
    if not source.strip():
        raise CelCompileError("empty CEL expression")
    tokens = _tokenize(source)
    probes: list[_Probe] = []
    rewritten = _rewrite(source, tokens, probes, _compile_probe)
    return _compile_rewritten(source, rewritten, tokens, tuple(probes))

if TYPE_CHECKING:
    from agproxy.cel.activation import Activation


def _compile_probe(source: str, rewritten: str, tokens) -> "Expression":
    return _compile_rewritten(source, rewritten, tokens, ())


def _compile_rewritten(source: str, rewritten: str, tokens, probes) -> "Expression":
    env = get_env()
    try:
        program = env.compile(rewritten)
        wrapped = program.return_type() != _library.bool_type
        if wrapped:
            # Make an error cheap to tell from a string: "[x]" is a list when x
            # succeeds and stays an ERROR (a str payload) when it fails.  (The
            # newline ends a trailing // comment.)
            program = env.compile(f"[{rewritten}\n]")
    except Exception as exc:
        raise CelCompileError(
            f"invalid CEL expression {source!r}: {_clean_compile_message(str(exc))}") from None
    projection = _projection_of(tokens)
    return Expression(source, projection.names, program, probes, wrapped, projection)


def _clean_compile_message(message: str) -> str:
    # "INVALID_ARGUMENT: ERROR: <input>:1:5: undeclared reference to 'x' ...\n | src\n | ..^"
    for prefix in ("INVALID_ARGUMENT: ",):
        if message.startswith(prefix):
            message = message[len(prefix):]
    message = message.replace("ERROR: <input>:", "at ")
    message = message.strip()
    if message.endswith(" [INVALID_ARGUMENT]"):
        message = message[: -len(" [INVALID_ARGUMENT]")]
    return message


class Expression:
    """A compiled expression.  Immutable; share it between requests."""

    __slots__ = ("source", "variables", "_program", "_probes", "_wrapped", "_projection")

    def __init__(self, source: str, variables: frozenset, program, probes=(), wrapped=True,
                 projection: "_Projection | None" = None):
        self.source = source
        self.variables: frozenset[str] = variables
        self._program = program
        self._probes = probes      # keeps the default() probes alive
        self._wrapped = wrapped    # program is "[source]" (the static type is not bool)
        # what it reads of the variables (default: all of each)
        self._projection = projection if projection is not None else _whole(variables)

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"

    def _value(self, activation: "Activation"):
        """The result's library plain value; raises CelEvalError on any error."""
        native = activation._natives.get(self._projection)
        if native is None:
            native = activation._native_for(self._projection)
        try:
            if self._probes:
                saved = evaluating.activation
                evaluating.activation = activation
                try:
                    value = self._program.eval(data=native).plain_value()
                finally:
                    evaluating.activation = saved
            else:
                value = self._program.eval(data=native).plain_value()
        except Exception as exc:
            raise CelEvalError(f"evaluating {self.source!r}: {exc}") from exc
        if self._wrapped:
            if type(value) is list:
                return value[0]
        elif value is True or value is False:
            return value
        # An ERROR result: its plain value is the message.
        raise CelEvalError(f"evaluating {self.source!r}: {value}")

    def evaluate(self, activation: "Activation") -> object:
        """The result as a plain Python value; raises CelEvalError on any error."""
        value = self._value(activation)
        t = type(value)
        if t is bool or t is str or t is int or t is float or value is None:
            return value
        return _to_plain(value)

    def evaluate_bool(self, activation: "Activation") -> bool:
        """The result, which must be a bool; raises CelEvalError otherwise."""
        return self._as_bool(self._value(activation))

    def _as_bool(self, value) -> bool:
        if value is True or value is False:
            return value
        raise CelEvalError(
            f"evaluating {self.source!r}: expected a bool, got {_type_name(value)}")

    def evaluate_str(self, activation: "Activation") -> str:
        """The result as text (for header values, keys): str as is; int, uint, double,
        bool, bytes (UTF-8), timestamp and duration in CEL's string() form; anything
        else (list, map, null) raises CelEvalError."""
        return self._as_str(self._value(activation))

    def _as_str(self, value) -> str:
        t = type(value)
        if t is str:
            return value
        if t is int:
            return str(value)
        if t is bool:
            return "true" if value else "false"
        if t is float or t is bytearray:
            text = _library.string_of.eval(data={_STR_VAR: value}).plain_value()
            if type(text) is list:
                return text[0]
            raise CelEvalError(f"evaluating {self.source!r}: {text}")
        if t is datetime.datetime:
            return _format_timestamp(value)
        if t is datetime.timedelta:
            return _format_duration(value)
        raise CelEvalError(
            f"evaluating {self.source!r}: expected a string, got {_type_name(value)}")


class _Batch:
    """Expressions compiled into one list expression `[e1, e2, ...]` (one library call)."""

    __slots__ = ("expressions", "_combined")

    def __init__(self, expressions: "tuple[Expression, ...]"):
        self.expressions = expressions
        self._combined: Expression | None = None
        if len(expressions) > 1:
            try:
                self._combined = compile_expression(
                    "[" + ",".join(f"({e.source}\n)" for e in expressions) + "]")
            except CelCompileError:
                self._combined = None   # e.g. mixed element types the checker refuses

    def values(self, activation: "Activation") -> list:
        if self._combined is not None:
            try:
                values = self._combined._value(activation)
                if type(values) is list and len(values) == len(self.expressions):
                    return values
            except CelEvalError:
                pass
        out: list = []
        for e in self.expressions:
            try:
                out.append(e._value(activation))
            except CelEvalError as exc:
                out.append(exc)
        return out
