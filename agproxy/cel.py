"""CEL expressions: compile once at config load, evaluate per request.

Theory of operation
===================

Every CEL expression in the config (authorization rules, header values, rate-limit
keys, health checks, ...) goes through this module, and nothing else imports the
CEL library, so the library can be swapped by rewriting this one file.

The library is ``cel-expr-python`` (import ``cel_expr_python``): Google's C++ CEL
runtime (cel-cpp) behind pybind11.  ``benchmarks/cel_bench.py`` and
``benchmarks/results/cel.md`` say why (about 10x faster per request than the pure
Python ``cel-python``, and a real type-checker at compile time).

Compile time (``compile_expression``, once per expression at config load)
    1. The source is tokenized by a small CEL lexer (strings, numbers, identifiers,
       punctuation).  The tokens give ``Expression.variables``: the top-level
       variables of ``VARIABLES`` the expression references (an identifier that is
       not a field name after ``.``), and the expression's *projection*: what it
       reads of each of them (see "Per request").  Both may over-approximate (a
       comprehension variable named ``jwt`` counts, and makes all of ``jwt`` read)
       but never miss anything.
    2. ``default(x, fallback)`` calls are rewritten (see below).
    3. The (rewritten) source is parsed and type-checked by the library in one
       shared environment that declares the ``VARIABLES`` as ``map(string, dyn)``
       and loads the ``strings`` extension (``join``, ``split``, ``lowerAscii``,
       ``upperAscii``, ``replace``, ``trim``, ``indexOf``, ...) and the
       ``encoders`` extension (``base64.encode/decode``).  Syntax errors,
       undeclared variables, unknown functions and statically wrong overloads
       (``1 == 1.0``, ``jwt == 1``) are ``CelCompileError`` here, never later.

Per request (``Activation`` + ``Expression.evaluate*``)
    The proxy builds one ``Activation`` per request from *providers*: zero-argument
    callables producing plain Python values (``dict``/``list``/``str``/``int``/
    ``float``/``bool``/``None``/``bytes``; no tuples or sets: the library rejects
    them when the value is read).  Nothing is computed up front.  When an
    expression is evaluated, the activation calls the providers of the variables
    that expression references (each provider at most once per activation) and
    hands the library the part of those values the expression reads; the library
    converts what it is given to CEL, and converting whole variables used to be
    most of the cost of a simple rule (an 800-character ``Authorization`` header in
    ``request.headers`` was converted even when the rule read one other header).

    Projection.  At compile time each expression gets a projection, computed from
    its tokens: per referenced variable ``V``, an occurrence ``V.f`` (``f`` not a
    method call ``V.f(``) or ``V["f"]`` (a string literal without escapes) reads
    field ``f``; any other occurrence (``V``, ``V.method(...)``, ``V[expr]``,
    ``"k" in V``, ``size(V)``, a comprehension variable named ``V``, ...) reads all
    of ``V``.  For the map fields ``request.headers`` and ``request.query``
    (``_MAP_FIELDS``) the same is done one level down: ``request.headers["x-a"]``
    reads one header, ``request.headers.exists(...)`` all of them.  Projections are
    interned (equal ones are one object).  The library then receives, per variable,
    ``{f: value[f] for each read f present}`` (two levels for headers/query) or the
    value itself when all of it is read or it is not a dict.  A key that is absent
    stays absent, so a missing key is still an error, ``has()`` still false and
    ``default()`` still falls back; results and error messages are those of the
    full values (``tests/unit/test_cel_projection.py`` checks this differentially).
    The one difference: a value the library cannot convert (a tuple, a non-string
    key) in a part of a variable that an expression does not read no longer makes
    that expression fail (it used to fail every expression reading the variable).

    What the library receives is a plain dict per projection, passed with
    ``program.eval(data=...)`` and converted at each evaluation: a native
    ``env.Activation`` would convert once but has a fixed cost (~18k instructions,
    callgrind) above converting a pruned dict the few times a request evaluates
    it.  These dicts are cached per activation and projection: every expression
    with the same projection uses the same one, and an expression whose projection
    is covered by an existing one reuses it (a ``default()`` probe uses its
    expression's, a batch member evaluated alone the batch's).  Otherwise one is
    built for just that projection from the full values, which are materialized
    once per activation.  The hot path (a projection already seen in this request)
    is one dict lookup.  ``Activation(providers, preload=names)`` hands the named
    variables whole to the first dict built, which then covers every later
    expression that reads only them: fewer builds, but no pruning of those
    variables.  A variable the library receives whole is walked entirely at each
    evaluation, so variables should stay small (headers and claims: ~2 µs; a
    1000-key map: ~0.4 ms).

    A variable whose provider is missing is an empty map.  So ``jwt.sub`` on a route
    without JWT authentication is an evaluation error ("no such key"), which
    callers treat as not matching / deny.  ``has(jwt.sub)`` is ``false`` there and
    ``default(jwt.sub, "anonymous")`` is ``"anonymous"``.

Errors are exceptions, never values
    The library does not raise on an evaluation error: it returns a value of type
    ERROR whose payload is a (truthy!) message string.  ``Expression.evaluate*``
    raise ``CelEvalError`` naming the expression instead, so that a rule like
    ``jwt.role == "admin"`` on a token without ``role`` can never be taken for
    true.  Asking a result for its type costs more than evaluating a simple rule,
    so the check is structural: an expression whose checked type is ``bool`` can
    only produce a bool or an error; any other expression is compiled as the
    one-element list ``[source]``, which is a list on success and an ERROR on
    failure (a list literal with an error element is an error).  Either way one
    ``type(value) is ...`` test tells success from error.

``default(x, fallback)``
    CEL functions are strict (an error argument never reaches the function) and
    the library offers no non-strict or macro hook, so ``default`` is a source
    rewrite done at compile time::

        default(X, Y)   ==>   (__agproxy_ok(N) ? dyn(X) : dyn(Y))

    ``X`` is also compiled on its own as probe ``N``; the ``__agproxy_ok``
    function (implemented in Python) evaluates that probe against the current
    activation and says whether it succeeded with a non-null value.  So ``X`` is
    evaluated twice on success (it is usually a field lookup: about a
    microsecond), ``Y`` only when needed, and the result keeps its exact CEL type.
    Consequences: ``default`` answers ``Y`` when ``X`` is an error of any kind
    (missing key, no such overload, division by zero, ...) or ``null``; ``X``
    cannot use a comprehension variable (``l.map(v, default(v.x, 0))`` is a
    compile error); and compile errors inside a ``default`` show the rewritten
    text.  Identifiers starting with ``__agproxy`` are reserved.

Number comparisons
    CEL does not convert between int and double.  Between two literals the
    type-checker rejects it (``1 == 1.0`` is a compile error); with a ``dyn`` value
    the runtime compares numerically (``jwt.exp == 1700000000.0`` and
    ``jwt.exp < 1.5e10`` are ``true`` for an int claim), but arithmetic does not
    mix them (``jwt.exp + 1.0`` is an evaluation error; write ``double(jwt.exp)``).

Results
    ``evaluate`` returns plain Python values: ``str``, ``int`` (CEL ``int`` and
    ``uint``), ``float``, ``bool``, ``None``, ``bytes``, ``list``, ``dict``;
    also ``datetime.datetime`` / ``datetime.timedelta`` for CEL timestamps and
    durations, and a type's name (``str``) for a CEL type value.

Threads
    ``default()`` finds the current activation through a module global, so one
    process evaluates on one thread (the event loop), as the design says.
"""
from __future__ import annotations

import datetime
import itertools
import re
import weakref
from typing import Callable, Iterable

__all__ = [
    "CelError",
    "CelCompileError",
    "CelEvalError",
    "VARIABLES",
    "compile_expression",
    "Expression",
    "Activation",
]

VARIABLES = ("request", "source", "jwt", "mcp", "llm", "response")

_RESERVED_PREFIX = "__agproxy"
_OK_FUNCTION = "__agproxy_ok"
_STR_VAR = "__agproxy_v"


class CelError(Exception):
    """Base class of CEL errors."""


class CelCompileError(CelError):
    """The expression is invalid: syntax, unknown function, undeclared variable, bad overload."""


class CelEvalError(CelError):
    """Evaluation failed (missing key, no such overload, wrong result type, ...)."""


# ---------------------------------------------------------------------------------
# The library's environment (built on first compile: it costs ~70 ms)
# ---------------------------------------------------------------------------------

_cel = None          # the cel_expr_python.cel module
_env = None          # the shared environment
_BOOL_TYPE = None    # cel.Type.BOOL
_string_of = None    # compiled `[string(__agproxy_v)]` for CEL's text form of a value


def _get_env():
    global _cel, _env, _BOOL_TYPE, _string_of
    if _env is None:
        from cel_expr_python import cel
        from cel_expr_python.ext import ext_encoders, ext_strings

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
        _cel = cel
        _BOOL_TYPE = cel.Type.BOOL
        _string_of = env.compile(f"[string({_STR_VAR})]")
        _env = env
    return _env


# ---------------------------------------------------------------------------------
# Lexer: referenced variables and default() calls
# ---------------------------------------------------------------------------------

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


class _Probe:
    """The first argument of one default() call, compiled on its own."""

    __slots__ = ("expression", "__weakref__")

    def __init__(self, expression: "Expression"):
        self.expression = expression


_probe_ids = itertools.count(1)
_probes: "weakref.WeakValueDictionary[int, _Probe]" = weakref.WeakValueDictionary()
_current: "Activation | None" = None   # the activation being evaluated (for default())


def _probe_ok(probe_id: int) -> bool:
    """__agproxy_ok(N): did default()'s first argument evaluate to a non-null value?"""
    probe = _probes.get(probe_id)
    activation = _current
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


def _rewrite(source: str, tokens, probes: list) -> str:
    """Rewrite every default(X, Y) in source; new probes are appended to probes."""
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
            x_rewritten = _rewrite(x_src, _shift(x_tokens, -tokens[i + 2][2]), probes)
            y_rewritten = _rewrite(y_src, _shift(y_tokens, -tokens[c + 1][2]), probes)
            try:
                x_expr = _compile_rewritten(x_src, x_rewritten, x_tokens, ())
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


# ---------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------

def compile_expression(source: str) -> "Expression":
    """Parse and type-check source; raises CelCompileError.  Call at config load."""
    if not isinstance(source, str):
        raise CelCompileError(f"a CEL expression must be a string, not {type(source).__name__}")
    if not source.strip():
        raise CelCompileError("empty CEL expression")
    tokens = _tokenize(source)
    probes: list[_Probe] = []
    rewritten = _rewrite(source, tokens, probes)
    return _compile_rewritten(source, rewritten, tokens, tuple(probes))


def _compile_rewritten(source: str, rewritten: str, tokens, probes) -> "Expression":
    env = _get_env()
    try:
        program = env.compile(rewritten)
        wrapped = program.return_type() != _BOOL_TYPE
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
        global _current
        native = activation._natives.get(self._projection)
        if native is None:
            native = activation._native_for(self._projection)
        try:
            if self._probes:
                saved = _current
                _current = activation
                try:
                    value = self._program.eval(data=native).plain_value()
                finally:
                    _current = saved
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
            text = _string_of.eval(data={_STR_VAR: value}).plain_value()
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


_PURE_VARIABLES = frozenset({"jwt"})

#: distinct request inputs remembered per token and ExpressionGroup (ExpressionGroup)
MAX_INPUTS_PER_TOKEN = 16
# What may key that memo: variables, and fields that differ per request rather than per caller.
_KEYABLE_VARIABLES = frozenset({"jwt", "request", "source"})
_PER_REQUEST_FIELDS = {"request": frozenset({"id"}), "source": frozenset({"port"})}


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


def _type_name(value) -> str:
    """The CEL type name of a library plain value (for messages)."""
    if value is None:
        return "null"
    return {bool: "bool", int: "int", float: "double", str: "string", bytearray: "bytes",
            list: "list", dict: "map"}.get(type(value), type(value).__name__)


def _format_timestamp(value: datetime.datetime) -> str:
    """CEL's string(timestamp): RFC 3339 in UTC, fraction only when non-zero."""
    if value.tzinfo is not None:
        value = value.astimezone(datetime.timezone.utc)
    text = value.strftime("%Y-%m-%dT%H:%M:%S")
    return text + _fraction(value.microsecond) + "Z"


def _format_duration(value: datetime.timedelta) -> str:
    """CEL's string(duration): seconds, fraction only when non-zero ("1.500s")."""
    micros = (value.days * 86400 + value.seconds) * 1_000_000 + value.microseconds
    sign = "-" if micros < 0 else ""
    seconds, fraction = divmod(abs(micros), 1_000_000)
    return f"{sign}{seconds}{_fraction(fraction)}s"


def _fraction(micros: int) -> str:
    """".500" / ".000250" / "": digits in groups of three, as cel-cpp prints them."""
    if not micros:
        return ""
    if micros % 1000 == 0:
        return ".%03d" % (micros // 1000)
    return ".%06d" % micros


def _to_plain(value):
    """Library plain values -> agproxy's plain values (bytes not bytearray, type names)."""
    t = type(value)
    if t is list:
        return [_to_plain(v) for v in value]
    if t is dict:
        return {_to_plain(k): _to_plain(v) for k, v in value.items()}
    if t is bytearray:
        return bytes(value)
    if _cel is not None and t is _cel.Type:
        return value.name().lower()
    return value


_MISSING = object()
_dict_get = dict.get


def _prune(value: dict, fields: tuple) -> dict:
    """{f: value[f]} for the fields of a projection plan present in value; a field
    with keys is itself pruned to those keys when it is a dict."""
    view = {}
    for f, keys in fields:
        v = _dict_get(value, f, _MISSING)
        if v is _MISSING:
            continue
        if keys is not None and isinstance(v, dict):
            sub = {}
            for k in keys:
                x = _dict_get(v, k, _MISSING)
                if x is not _MISSING:
                    sub[k] = x
            v = sub
        view[f] = v
    return view


_EMPTY = _intern({})


def _bound(data: dict) -> dict:
    """What the library is given for one projection: the pruned plain dict, which
    `program.eval(data=...)` converts at each evaluation. A native
    `env.Activation(data)` converts once but costs ~18k instructions to build
    (callgrind), more than converting a pruned dict the few times a request
    evaluates it. (A seam for tests, which record what the library receives.)"""
    return data


class Activation:
    """Lazily built variables.  Built per request by the proxy layer.

    ``providers`` maps a variable name to a zero-argument function producing its
    plain Python value (a provider returning ``None`` gives an empty map).  A
    provider is called at most once, and only if an evaluated expression references
    that variable.  A variable without provider is an empty map.  A provider that
    raises makes the evaluation raise CelEvalError (and is called again by the next
    expression that needs it).

    The library only receives the part of each value that the evaluated expression
    reads (its projection, see the module docstring); the library activations are
    cached per projection and shared by every expression they cover.

    ``preload`` (optional) names variables to materialize, whole, together with the
    first ones an evaluation needs: the library's activation built then covers every
    later expression that reads only those variables (and the first one's), instead
    of one being built per newly needed projection (a few µs each), at the price of
    converting all of each preloaded variable when it is read.  Their providers are
    then called even if no evaluated expression needs them.
    """

    __slots__ = ("_providers", "_values", "_natives", "_native", "_preload")

    def __init__(self, providers: dict[str, Callable[[], object]] | None = None,
                 preload: Iterable[str] = ()):
        self._providers = providers or {}
        self._values: dict[str, object] = {}      # full provider values
        self._natives: dict = {}                  # _Projection -> what the library gets (_bound)
        self._native = None                       # the one built last
        self._preload = _whole(preload) if preload else None

    def set_provider(self, name: str, provider: Callable[[], object]) -> None:
        """Add or replace one provider (e.g. ``response`` once the response head is
        known), keeping every other variable already materialized."""
        self._providers = {**self._providers, name: provider}
        if name in self._values:
            del self._values[name]
            self._natives = {p: n for p, n in self._natives.items() if name not in p.names}
            self._native = None

    def _native_for(self, projection: _Projection):
        """A library activation holding at least what projection reads (materializing
        the variables it needs)."""
        natives = self._natives
        native = natives.get(projection)
        if native is not None:
            return native
        if projection is _EMPTY:
            return None        # reads no variable: the library needs no activation
        if natives:
            for p, native in natives.items():
                if p.covers(projection):
                    natives[projection] = native   # (the loop ends here)
                    return native
        build = projection
        if self._preload is not None:
            build = build.union(self._preload)
            self._preload = None
        values = self._values
        data = {}
        for name, fields in build.plan:
            value = values.get(name, _MISSING)
            if value is _MISSING:
                value = self._materialize(name)
            if fields is not None and isinstance(value, dict):
                value = _prune(value, fields)
            data[name] = value
        native = _bound(data)
        natives[projection] = native
        if build is not projection:
            natives[build] = native
        self._native = native
        return native

    def _materialize(self, name: str):
        """The full value of variable name (calling its provider once)."""
        provider = self._providers.get(name)
        if provider is None:
            value = {}
        else:
            try:
                value = provider()
            except Exception as exc:
                raise CelEvalError(f"building CEL variable {name!r}: {exc!r}") from exc
            if value is None:
                value = {}
        self._values[name] = value
        return value
