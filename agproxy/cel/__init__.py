"""CEL expressions: compile once at config load, evaluate per request.

Theory of operation
===================

The package has one module per job: ``environment`` (the library, its shared
environment, the error types), ``lexer`` (tokens, and from them the variables and
the projection an expression reads), ``defaults`` (the ``default()`` rewrite and
its probes), ``expression`` (compiling, evaluating, batching), ``activation`` (the
per-request variables and what the library receives of them), ``memo``
(``ExpressionGroup``: batched evaluation memoised per token) and ``convert``
(library values to plain Python values and CEL's text forms).  Everything else in
agproxy imports the names re-exported here.

Every CEL expression in the config (authorization rules, header values, rate-limit
keys, health checks, ...) goes through this module, and nothing else imports the
CEL library, so the library can be swapped by rewriting this package.

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

from agproxy.cel.activation import Activation
from agproxy.cel.environment import VARIABLES, CelCompileError, CelError, CelEvalError
from agproxy.cel.expression import Expression, compile_expression
from agproxy.cel.memo import MAX_INPUTS_PER_TOKEN, ExpressionGroup

__all__ = [
    "CelError",
    "CelCompileError",
    "CelEvalError",
    "VARIABLES",
    "compile_expression",
    "Expression",
    "Activation",
    "ExpressionGroup",
    "MAX_INPUTS_PER_TOKEN",
]
