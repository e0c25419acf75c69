"""The CEL library (cel-expr-python) and the one environment every expression is
compiled in; the error types; the variable names expressions may use.

Built on first compile (it costs ~70 ms), then shared.  ``library`` holds what
other modules of the package need of it at evaluation time.
"""

from __future__ import annotations

VARIABLES = ("request", "source", "jwt", "mcp", "llm", "response", "ext_authz")

_RESERVED_PREFIX = "__agproxy"
_OK_FUNCTION = "__agproxy_ok"
_STR_VAR = "__agproxy_v"


class CelError(Exception):
    """Base class of CEL errors."""


class CelCompileError(CelError):
    """The expression is invalid: syntax, unknown function, undeclared variable, bad overload."""


class CelEvalError(CelError):
    """Evaluation failed (missing key, no such overload, wrong result type, ...)."""



class _Library:
    """The library module and what was built from it (None until the first compile)."""

    __slots__ = ("cel", "env", "bool_type", "string_of")

    def __init__(self) -> None:
        self.cel = None          # the cel_expr_python.cel module
        self.env = None          # the shared environment
        self.bool_type = None    # cel.Type.BOOL
        self.string_of = None    # compiled `[string(__agproxy_v)]`: CEL's text form of a value


library = _Library()


def get_env():
    """The shared environment (built on first use)."""
    if library.env is None:
        from cel_expr_python import cel
        from cel_expr_python.ext import ext_encoders, ext_strings

        from agproxy.cel.defaults import _probe_ok

        map_type = cel.Type.Map(cel.Type.STRING, cel.Type.DYN)
        variables = {name: map_type for name in VARIABLES}
        variables[_STR_VAR] = cel.Type.DYN
        ok_decl = cel.FunctionDecl(
            _OK_FUNCTION,
            [cel.Overload(_OK_FUNCTION + "_int", return_type=cel.Type.BOOL,
                          parameters=[cel.Type.INT], impl=_probe_ok)],
        )
        env = cel.NewEnv(
            variables=variables,
            extensions=[ext_strings.ExtStrings(), ext_encoders.ExtEncoders()],
            functions=[ok_decl],
        )
        library.cel = cel
        library.bool_type = cel.Type.BOOL
        library.string_of = env.compile(f"[string({_STR_VAR})]")
        library.env = env
    return library.env
