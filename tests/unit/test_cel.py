"""agproxy.cel: compile errors, extensions, lazy activation, errors as exceptions."""
import datetime

import pytest

from agproxy import cel
from agproxy.cel import (
    Activation,
    CelCompileError,
    CelError,
    CelEvalError,
    compile_expression,
)

CLAIMS = {
    "iss": "https://idp.example.com",
    "sub": "alice",
    "groups": ["engineering", "contractor"],
    "tenant_id": "t1",
    "exp": 1700000000,
    "ratio": 1.0,
    "a": {"b": "deep"},
    "nothing": None,
}
REQUEST = {
    "method": "GET",
    "path": "/invocations",
    "headers": {"x-tenant": "t1", "content-type": "application/json"},
}


def act(**values):
    """An Activation whose providers return the given values."""
    return Activation({name: (lambda v=v: v) for name, v in values.items()})


def ev(source, **values):
    return compile_expression(source).evaluate(act(**values))


def std():
    return act(jwt=CLAIMS, request=REQUEST)


# --------------------------------------------------------------------------------
# compile
# --------------------------------------------------------------------------------

def test_exception_hierarchy():
    assert issubclass(CelCompileError, CelError)
    assert issubclass(CelEvalError, CelError)
    assert cel.VARIABLES == ("request", "source", "jwt", "mcp", "llm", "response", "ext_authz")


@pytest.mark.parametrize("source, words", [
    ("jwt.sub +", ["syntax error"]),
    ("jwt.sub == 'a' &&", ["syntax error"]),
    ("nofunc(1)", ["undeclared reference", "nofunc"]),
    ('jwt.sub.nope()', ["undeclared reference", "nope"]),
    ('foo.bar == "x"', ["undeclared reference", "foo"]),
    ("1 == 1.0", ["no matching overload"]),
    ("jwt == 1", ["no matching overload"]),
])
def test_compile_errors_say_what_is_wrong(source, words):
    with pytest.raises(CelCompileError) as info:
        compile_expression(source)
    message = str(info.value).lower()
    assert repr(source).lower() in message   # names the expression
    for word in words:
        assert word.lower() in message


@pytest.mark.parametrize("source", ["", "   ", None, 42])
def test_compile_rejects_empty_and_non_strings(source):
    with pytest.raises(CelCompileError):
        compile_expression(source)


@pytest.mark.parametrize("source", [
    "default(jwt.x)", "default(jwt.x, 1, 2)", "default(, 1)", "default(jwt.x, 1",
])
def test_default_arity_is_a_compile_error(source):
    with pytest.raises(CelCompileError, match="default"):
        compile_expression(source)


def test_reserved_identifiers():
    with pytest.raises(CelCompileError, match="reserved"):
        compile_expression("__agproxy_ok(1)")
    with pytest.raises(CelCompileError, match="reserved"):
        compile_expression("__agproxy_v")


def test_default_cannot_use_comprehension_variables():
    with pytest.raises(CelCompileError, match="comprehension"):
        compile_expression('jwt.groups.map(g, default(g.x, ""))')


@pytest.mark.parametrize("source, expected", [
    ('jwt.sub != ""', {"jwt"}),
    ('request.headers["x-tenant"] == jwt.tenant_id', {"request", "jwt"}),
    ('"literal"', set()),
    ("llm.request.model", {"llm"}),              # field named like a variable
    ('mcp["jwt"] == source.address', {"mcp", "source"}),
    (".jwt.sub", {"jwt"}),                       # root-qualified name
    ('"jwt.sub request"', set()),                # inside a string
    ('response.code >= 500 || response.code == 429', {"response"}),
    ('default(jwt.department, request.path)', {"jwt", "request"}),
])
def test_variables(source, expected):
    e = compile_expression(source)
    assert e.variables == frozenset(expected)
    assert e.source == source


# --------------------------------------------------------------------------------
# extensions and standard functions
# --------------------------------------------------------------------------------

@pytest.mark.parametrize("source, expected", [
    ('jwt.groups.join(",")', "engineering,contractor"),
    ("jwt.groups.join()", "engineeringcontractor"),
    ("[].join(',')", ""),
    ('"a,b,,c".split(",")', ["a", "b", "", "c"]),
    ('"MiXeD".lowerAscii()', "mixed"),
    ('"MiXeD".upperAscii()', "MIXED"),
    ('jwt.iss.startsWith("https://")', True),
    ('jwt.iss.endsWith(".com")', True),
    ('jwt.iss.contains("idp")', True),
    ('jwt.sub.matches("^a.*e$")', True),
    ('jwt.sub.matches("^b")', False),
    ('"contractor" in jwt.groups', True),
    ("has(jwt.sub)", True),
    ("has(jwt.role)", False),
    ('"x-tenant" in request.headers', True),
    ("jwt.groups.size()", 2),
    ('jwt.groups.exists(g, g == "contractor")', True),
    ('jwt.groups.map(g, g.upperAscii())', ["ENGINEERING", "CONTRACTOR"]),
    ('base64.encode(b"ab")', "YWI="),
    ('jwt.sub + "-" + request.headers["x-tenant"]', "alice-t1"),
])
def test_functions(source, expected):
    assert compile_expression(source).evaluate(std()) == expected


@pytest.mark.parametrize("source, expected", [
    ('default(jwt.department, "none")', "none"),       # missing key
    ('default(jwt.sub, "none")', "alice"),             # present key
    ('default(jwt.a.b, "x")', "deep"),                 # present nested key
    ('default(jwt.a.c, "x")', "x"),                    # missing nested key
    ('default(jwt.missing.b, "x")', "x"),              # missing parent
    ('default(jwt.nothing, "was null")', "was null"),  # null claim
    ('default(jwt.sub.size() / 0, -1)', -1),           # any error, not only keys
    ('default(jwt.exp, "none")', 1700000000),          # types may differ
    ('default(default(jwt.q, jwt.r), "both missing")', "both missing"),
    ('default(jwt.q, default(jwt.r, "inner"))', "inner"),
    ('default(jwt.roles, []).join(",")', ""),
    ('default(jwt.groups, []).join(",")', "engineering,contractor"),
    ('default(jwt.role, "user") == "admin"', False),
    ('"x-" + default(request.headers["x-missing"], "none")', "x-none"),
    ('[default(jwt.q, 1), default(jwt.sub, 2)]', [1, "alice"]),
])
def test_default(source, expected):
    assert compile_expression(source).evaluate(std()) == expected


def test_default_fallback_is_lazy_and_its_error_propagates():
    assert ev('default(jwt.sub, jwt.nope)', jwt=CLAIMS) == "alice"
    with pytest.raises(CelEvalError):
        ev('default(jwt.missing, jwt.nope)', jwt=CLAIMS)


def test_default_on_route_without_jwt():
    e = compile_expression('default(jwt.sub, "anonymous")')
    assert e.evaluate(Activation({})) == "anonymous"


def test_default_restores_global_state():
    compile_expression('default(jwt.x, 1)').evaluate(std())
    assert cel.defaults.evaluating.activation is None
    with pytest.raises(CelEvalError):
        compile_expression('default(jwt.x, jwt.y)').evaluate(std())
    assert cel.defaults.evaluating.activation is None


def test_default_method_named_default_is_not_rewritten():
    with pytest.raises(CelCompileError):
        compile_expression('jwt.sub.default("x")')


# --------------------------------------------------------------------------------
# lazy providers
# --------------------------------------------------------------------------------

class Counting:
    def __init__(self, value):
        self.value = value
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.value


def test_unreferenced_provider_is_never_called():
    jwt, request, llm = Counting(CLAIMS), Counting(REQUEST), Counting({})
    a = Activation({"jwt": jwt, "request": request, "llm": llm})
    assert compile_expression('jwt.sub == "alice"').evaluate_bool(a) is True
    assert compile_expression('"x" == "x"').evaluate_bool(a) is True
    assert (jwt.calls, request.calls, llm.calls) == (1, 0, 0)


def test_referenced_providers_called_at_most_once_across_expressions():
    jwt, request = Counting(CLAIMS), Counting(REQUEST)
    a = Activation({"jwt": jwt, "request": request})
    exprs = [compile_expression(s) for s in (
        'jwt.sub != ""',
        '"contractor" in jwt.groups',
        'request.headers["x-tenant"] == jwt.tenant_id',   # needs a new variable
        'jwt.groups.join(",")',
        'default(request.headers["x-nope"], jwt.sub)',
    )]
    for _ in range(3):
        results = [e.evaluate(a) for e in exprs]
    assert results == [True, True, True, "engineering,contractor", "alice"]
    assert (jwt.calls, request.calls) == (1, 1)


def test_not_provided_variable_is_an_empty_map():
    a = Activation({})
    assert compile_expression("jwt").evaluate(a) == {}
    assert compile_expression("has(jwt.sub)").evaluate_bool(a) is False
    assert compile_expression("size(source)").evaluate(a) == 0
    with pytest.raises(CelEvalError, match="sub"):
        compile_expression('jwt.sub == "alice"').evaluate_bool(a)


def test_provider_returning_none_is_an_empty_map():
    a = Activation({"jwt": lambda: None})
    assert compile_expression("jwt").evaluate(a) == {}


def test_failing_provider_raises_cel_eval_error():
    def boom():
        raise RuntimeError("jwks down")
    a = Activation({"jwt": boom})
    with pytest.raises(CelEvalError, match="jwks down"):
        compile_expression('jwt.sub == "x"').evaluate_bool(a)


def test_unsupported_python_value_is_an_eval_error():
    # providers must give lists, not tuples (the library rejects them on access)
    a = Activation({"jwt": lambda: {"groups": ("a", "b")}})
    with pytest.raises(CelEvalError):
        compile_expression('"a" in jwt.groups').evaluate_bool(a)


def test_unknown_provider_names_are_ignored():
    a = Activation({"jwt": lambda: CLAIMS, "custom": lambda: 1 / 0})
    assert compile_expression("jwt.sub").evaluate(a) == "alice"


def test_expression_without_variables_on_empty_activation():
    assert compile_expression("1 + 2").evaluate(Activation({})) == 3
    assert compile_expression("1 + 2").evaluate(Activation()) == 3


# --------------------------------------------------------------------------------
# errors are exceptions, never (truthy) values
# --------------------------------------------------------------------------------

def test_security_missing_claim_never_matches():
    rule = compile_expression('jwt.role == "admin"')
    a = act(jwt={"sub": "mallory"})            # no role claim
    with pytest.raises(CelEvalError) as info:
        rule.evaluate_bool(a)
    assert "jwt.role" in str(info.value)       # names the expression
    assert "role" in str(info.value)
    with pytest.raises(CelEvalError):
        rule.evaluate(a)
    with pytest.raises(CelEvalError):
        rule.evaluate_str(a)
    with pytest.raises(CelEvalError):          # negation of an error is an error
        compile_expression('!(jwt.role == "admin")').evaluate_bool(a)


def test_logical_operators_absorb_errors():
    # CEL semantics rule authors should know: `||` / `&&` can absorb an error.
    a = act(jwt={"sub": "mallory"})
    assert compile_expression('jwt.role == "admin" || true').evaluate_bool(a) is True
    assert compile_expression('jwt.role == "admin" && false').evaluate_bool(a) is False
    with pytest.raises(CelEvalError):
        compile_expression('jwt.role == "admin" || false').evaluate_bool(a)


@pytest.mark.parametrize("source", [
    "jwt.sub + 1",                 # no such overload at run time
    "jwt.sub.size() / 0",          # division by zero
    'jwt.groups[5]',               # index out of range
    'request.headers["x-missing"]',
    'int(jwt.sub)',                # conversion failure
    '[jwt.nope]',
    '{"k": jwt.nope}',
])
def test_eval_errors_raise(source):
    with pytest.raises(CelEvalError):
        compile_expression(source).evaluate(std())


@pytest.mark.parametrize("source", ['jwt.sub', "1", "jwt.groups", "null", "jwt"])
def test_evaluate_bool_rejects_non_bool(source):
    with pytest.raises(CelEvalError, match="expected a bool"):
        compile_expression(source).evaluate_bool(std())


def test_evaluate_bool_returns_python_bools():
    assert compile_expression('jwt.sub == "alice"').evaluate_bool(std()) is True
    assert compile_expression('jwt.sub == "bob"').evaluate_bool(std()) is False


def test_error_string_result_is_distinguished_from_a_string():
    # a successful string that looks like an error message stays a string
    assert ev('"NOT_FOUND: Key not found in map"') == "NOT_FOUND: Key not found in map"


# --------------------------------------------------------------------------------
# numbers: int vs double (pinned)
# --------------------------------------------------------------------------------

@pytest.mark.parametrize("source, expected", [
    ("jwt.exp == 1700000000.0", True),   # dyn int claim vs double literal: numeric
    ("jwt.exp < 1.5e10", True),
    ("jwt.ratio == 1", True),            # dyn double claim vs int literal
    ("jwt.exp == 1700000000", True),
    ("jwt.exp + 1", 1700000001),
    ("jwt.exp / 2", 850000000),          # int division stays int
])
def test_int_double_comparisons(source, expected):
    assert compile_expression(source).evaluate(std()) == expected


def test_int_double_arithmetic_is_an_error():
    with pytest.raises(CelCompileError):
        compile_expression("1 + 1.0")
    with pytest.raises(CelEvalError):
        compile_expression("jwt.exp + 1.0").evaluate(std())


# --------------------------------------------------------------------------------
# results and header values
# --------------------------------------------------------------------------------

def test_headers_map_access():
    a = std()
    assert compile_expression('request.headers["x-tenant"]').evaluate(a) == "t1"
    assert compile_expression('request.headers["x-tenant"] == jwt.tenant_id').evaluate_bool(a)
    assert compile_expression('"x-tenant" in request.headers').evaluate_bool(a)
    assert compile_expression('has(request.headers.x)').evaluate_bool(a) is False


def test_results_are_plain_python():
    out = ev('{"a": [1, 2u, 1.5, true, null, b"x", "s"], "m": {"k": jwt.groups}}', jwt=CLAIMS)
    assert out == {"a": [1, 2, 1.5, True, None, b"x", "s"],
                   "m": {"k": ["engineering", "contractor"]}}
    assert type(out["a"][5]) is bytes
    assert type(ev('b"ab"')) is bytes
    assert ev("jwt", jwt=CLAIMS) == CLAIMS
    assert ev('timestamp("2024-01-01T00:00:00Z")') == datetime.datetime(
        2024, 1, 1, tzinfo=datetime.timezone.utc)
    assert ev('duration("90s")') == datetime.timedelta(seconds=90)
    assert ev("type(1)") == "int"


@pytest.mark.parametrize("source, expected", [
    ("jwt.sub", "alice"),
    ("jwt.exp", "1700000000"),
    ("7u", "7"),
    ("true", "true"),
    ("1 == 2", "false"),
    ("1.5", "1.5"),
    ("2.0", "2"),                # CEL's string(2.0)
    ("1e20", "1e+20"),
    ('b"ab"', "ab"),
    ('timestamp("2024-01-01T00:00:00.5Z")', "2024-01-01T00:00:00.500Z"),
    ('duration("90s")', "90s"),
    ('duration("-1.25s")', "-1.250s"),
    ('jwt.groups.join(",")', "engineering,contractor"),
])
def test_evaluate_str(source, expected):
    e = compile_expression(source)
    assert e.evaluate_str(std()) == expected
    if not source.startswith(("jwt.", "7u")):
        # the same text as CEL's own string()
        assert compile_expression(f"string({source})").evaluate(std()) == expected


@pytest.mark.parametrize("source", ["jwt.groups", "null", "jwt", 'b"\\xff"', "jwt.nope"])
def test_evaluate_str_rejects(source):
    with pytest.raises(CelEvalError):
        compile_expression(source).evaluate_str(std())


def test_expression_is_shareable_between_activations():
    e = compile_expression('jwt.sub + ":" + request.headers["x-tenant"]')
    assert e.evaluate_str(std()) == "alice:t1"
    other = act(jwt={"sub": "bob"}, request={"headers": {"x-tenant": "t9"}})
    assert e.evaluate_str(other) == "bob:t9"
    assert repr(e) == "Expression('jwt.sub + \":\" + request.headers[\"x-tenant\"]')"


# --------------------------------------------------------------------------------
# additions beyond the base API: preload, set_provider
# --------------------------------------------------------------------------------

def test_preload_materializes_together_but_still_lazily():
    jwt, request, llm = Counting(CLAIMS), Counting(REQUEST), Counting({})
    a = Activation({"jwt": jwt, "request": request, "llm": llm}, preload=("jwt", "request"))
    assert (jwt.calls, request.calls) == (0, 0)          # nothing up front
    assert compile_expression('jwt.sub == "alice"').evaluate_bool(a)
    assert (jwt.calls, request.calls, llm.calls) == (1, 1, 0)
    native = a._native
    assert compile_expression('request.headers["x-tenant"] == "t1"').evaluate_bool(a)
    assert a._native is native                           # no rebuild
    assert (jwt.calls, request.calls, llm.calls) == (1, 1, 0)


def test_set_provider_keeps_other_variables():
    jwt = Counting(CLAIMS)
    a = Activation({"jwt": jwt})
    rule = compile_expression("response.code >= 500")
    with pytest.raises(CelEvalError):
        rule.evaluate_bool(a)                            # no response yet: empty map
    a.set_provider("response", lambda: {"code": 503})
    assert rule.evaluate_bool(a) is True
    a.set_provider("response", lambda: {"code": 200})    # replaces a materialized one
    assert rule.evaluate_bool(a) is False
    assert compile_expression("jwt.sub").evaluate(a) == "alice"
    assert jwt.calls == 1


@pytest.mark.parametrize("source, expected", [
    ("jwt.flag", True),                          # dyn used as a rule
    ('default(jwt.missing == "x", true)', True),
    ('default(jwt.sub == "alice", false)', True),
    ("default(jwt.flag, false)", True),
    ("default(jwt.noflag, false)", False),
])
def test_bool_rules_of_dyn_type(source, expected):
    a = act(jwt={**CLAIMS, "flag": True})
    assert compile_expression(source).evaluate_bool(a) is expected


@pytest.mark.parametrize("source, expected, variables", [
    ('"default(jwt.x, 1)"', "default(jwt.x, 1)", set()),          # not rewritten in strings
    ("'''a \"default(\" b'''", 'a "default(" b', set()),
    ('r"\\d" + default(jwt.q, "-")', "\\d-", {"jwt"}),
    ('default(jwt.q, "a)b,c")', "a)b,c", {"jwt"}),
    ('default(jwt.q, // fallback follows\n "x")', "x", {"jwt"}),
    ('jwt.sub // trailing comment', "alice", {"jwt"}),
    ('jwt.sub == "alice" // trailing comment', True, {"jwt"}),
    ('default({"k": [1, 2]}.k, [])', [1, 2], set()),
    ('default(jwt.groups.filter(g, g.startsWith("c")), [])', ["contractor"], {"jwt"}),
])
def test_lexer_edge_cases(source, expected, variables):
    e = compile_expression(source)
    assert e.evaluate(std()) == expected
    assert e.variables == frozenset(variables)
