"""agproxy.cel projections: the library only receives the fields an expression reads.

The projection of an expression is computed at compile time from its tokens; the
activation hands the library a pruned view of each variable.  Pruning must never
change a result or an error: the differential tests evaluate every expression of a
table both pruned and against the full (unpruned) values.
"""
import pytest

from agproxy import cel
from agproxy.cel import VARIABLES, Activation, CelEvalError, ExpressionGroup, compile_expression

TOKEN = "Bearer " + "e" * 800


class Claims(dict):
    """Like identity.jwt_verify.VerifiedClaims: a dict subclass with a slot."""
    __slots__ = ("memo",)


CLAIMS = {
    "iss": "https://idp.example.com",
    "sub": "alice",
    "aud": "agproxy",
    "groups": ["engineering", "contractor"],
    "tenant_id": "t1",
    "exp": 1700000000,
    "ratio": 1.5,
    "a": {"b": "deep", "c": None},
    "nothing": None,
    "flag": True,
}
REQUEST = {
    "method": "POST",
    "path": "/v1/invocations",
    "host": "api.example.com",
    "scheme": "https",
    "headers": {
        "host": "api.example.com",
        "accept": "application/json, text/plain",
        "authorization": TOKEN,
        "content-type": "application/json",
        "x-tenant": "t1",
        "x-empty": "",
        "user-agent": "test/1.0",
    },
    "query": {"k": "v", "claim": "sub", "h": "x-tenant", "empty": ""},
    "protocol": "HTTP/1.1",
    "id": "req-1",
}
SOURCE = {"address": "10.0.0.1", "port": 5555, "tls": True}


def providers(jwt=CLAIMS, request=REQUEST, source=SOURCE):
    out = {}
    for name, value in (("jwt", jwt), ("request", request), ("source", source)):
        if value is not _ABSENT:
            out[name] = lambda v=value: v
    return out


_ABSENT = object()

DATASETS = {
    "standard": dict(),
    "claims subclass": dict(jwt=Claims(CLAIMS)),
    "no jwt provider": dict(jwt=_ABSENT),
    "jwt provider gives None": dict(jwt=None),
    "no headers or query": dict(request={"method": "GET", "path": "/"}),
    "headers not a map": dict(request={**REQUEST, "headers": "x-tenant: t1"}),
}


def describe(source):
    return compile_expression(source)._projection.describe()


# --------------------------------------------------------------------------------
# the projection of an expression
# --------------------------------------------------------------------------------

@pytest.mark.parametrize("source, expected", [
    ("1 + 2", {}),
    ("jwt.sub", {"jwt": {"sub": None}}),
    ('jwt["sub"]', {"jwt": {"sub": None}}),
    ("jwt['sub'] + jwt.iss", {"jwt": {"iss": None, "sub": None}}),
    ('jwt[r"sub"]', {"jwt": {"sub": None}}),
    ('jwt["""sub"""]', {"jwt": {"sub": None}}),
    (".jwt.sub", {"jwt": {"sub": None}}),
    ("jwt . sub // comment", {"jwt": {"sub": None}}),
    ("jwt.a.b", {"jwt": {"a": None}}),
    ('jwt.a["b"]', {"jwt": {"a": None}}),
    ("has(jwt.sub)", {"jwt": {"sub": None}}),
    ('jwt.sub.startsWith("a")', {"jwt": {"sub": None}}),
    ("jwt.groups.exists(g, g == jwt.sub)", {"jwt": {"groups": None, "sub": None}}),
    ('request.headers["x-tenant"] == jwt.tenant_id',
     {"jwt": {"tenant_id": None}, "request": {"headers": ["x-tenant"]}}),
    ('request.headers.accept + request.headers["x-tenant"] + request.query.k',
     {"request": {"headers": ["accept", "x-tenant"], "query": ["k"]}}),
    ('request["headers"]["x-tenant"]', {"request": {"headers": ["x-tenant"]}}),
    ("request.path + request.method", {"request": {"method": None, "path": None}}),
    ('has(request.headers.accept)', {"request": {"headers": ["accept"]}}),
    ('request.headers["x-tenant"] == "t1" || request.headers.exists(k, k == "a")',
     {"request": {"headers": None}}),
    # whole variable
    ("jwt", {"jwt": None}),
    ("size(jwt)", {"jwt": None}),
    ('"sub" in jwt', {"jwt": None}),
    ("jwt.size()", {"jwt": None}),
    ('jwt.exists(k, k == "sub")', {"jwt": None}),
    ("jwt[request.query.claim]", {"jwt": None, "request": {"query": ["claim"]}}),
    ('jwt["s" + "ub"]', {"jwt": None}),
    ('jwt["s\\x75b"]', {"jwt": None}),                 # escapes are not decoded
    ('jwt.sub == "x" && jwt == {}', {"jwt": None}),
    ('[{"x": 1}].all(jwt, jwt.x == 1)', {"jwt": None}),  # comprehension variable
    ("request", {"request": None}),
    ("request.headers.map(request, request)", {"request": None}),
    # whole field
    ("size(request.headers)", {"request": {"headers": None}}),
    ('"x-tenant" in request.headers', {"request": {"headers": None}}),
    ("request.headers", {"request": {"headers": None}}),
    ("has(request.headers)", {"request": {"headers": None}}),
    ("request.headers.size()", {"request": {"headers": None}}),
    ('request.headers["x" + "y"]', {"request": {"headers": None}}),
    ("request.headers[request.query.h]", {"request": {"headers": None, "query": ["h"]}}),
    ("request.query.all(k, k != \"\")", {"request": {"query": None}}),
    ('request.headers["x-tenant"] + request.headers.filter(k, true)[0]',
     {"request": {"headers": None}}),
    ("source.address", {"source": {"address": None}}),
    # names that are not the top-level variable
    ('{"jwt": jwt.sub}.jwt', {"jwt": {"sub": None}}),
    ('[{"headers": {"a": "b"}}].map(headers, headers.a)', {}),
    ('jwt.groups.map(g, {"request": g}.request)', {"jwt": {"groups": None}}),
    ('"request.headers" + "jwt"', {}),
    # default(): the parent's projection covers the probe
    ('default(request.headers["x-nope"], jwt.sub)',
     {"jwt": {"sub": None}, "request": {"headers": ["x-nope"]}}),
    ("default(jwt.a.c, default(jwt.sub, jwt))", {"jwt": None}),
])
def test_projection(source, expected):
    assert describe(source) == expected
    e = compile_expression(source)
    assert e.variables == frozenset(expected)


def test_equal_projections_are_one_object():
    a = compile_expression('jwt.sub == "alice" && request.headers["x-tenant"] == "t1"')
    b = compile_expression('jwt["sub"] != request.headers["x-tenant"]')
    c = compile_expression('jwt.sub == "alice"')
    assert a._projection is b._projection
    assert a._projection is not c._projection
    assert a._projection.covers(c._projection)
    assert not c._projection.covers(a._projection)


def test_probe_projection_is_covered_by_its_parent():
    e = compile_expression('default(request.headers["x-nope"], "z") + jwt.sub')
    (probe,) = e._probes
    assert probe.expression._projection.describe() == {"request": {"headers": ["x-nope"]}}
    assert e._projection.covers(probe.expression._projection)


def test_batch_projection_is_the_union_of_its_members():
    group = ExpressionGroup([compile_expression(s) for s in (
        'request.headers["x-tenant"] == jwt.tenant_id',
        'request.path.startsWith("/v1")',
        'default(request.query.k, "") == "v"',
    )])
    combined = group._rest._combined
    assert combined is not None
    assert combined._projection.describe() == {
        "jwt": {"tenant_id": None},
        "request": {"headers": ["x-tenant"], "path": None, "query": ["k"]},
    }
    for e in group.expressions:
        assert combined._projection.covers(e._projection)


# --------------------------------------------------------------------------------
# what the library receives
# --------------------------------------------------------------------------------

@pytest.fixture
def recorded(monkeypatch):
    """The data of each projection handed to the library, in order."""
    built = []

    def record(data):
        built.append(data)
        return data

    monkeypatch.setattr(cel.activation, "_bound", record)
    return built


def test_library_receives_only_what_is_read(recorded):
    a = Activation(providers())
    e = compile_expression('request.headers["x-tenant"] == jwt.tenant_id')
    assert e.evaluate_bool(a) is True
    assert recorded == [{"jwt": {"tenant_id": "t1"}, "request": {"headers": {"x-tenant": "t1"}}}]


def test_missing_fields_are_left_out(recorded):
    a = Activation(providers())
    e = compile_expression('has(jwt.nope) || has(request.headers.nope) || has(request.nope)')
    assert e.evaluate_bool(a) is False
    assert recorded == [{"jwt": {}, "request": {"headers": {}}}]   # has() is still false


def test_whole_values_are_passed_as_they_are(recorded):
    claims = Claims(CLAIMS)
    a = Activation(providers(jwt=claims))
    assert compile_expression("size(jwt)").evaluate(a) == len(CLAIMS)
    assert recorded[0]["jwt"] is claims


def test_natives_are_shared_per_projection_and_reused_when_covered(recorded):
    a = Activation(providers())
    big = compile_expression('request.headers["x-tenant"] == jwt.tenant_id && jwt.sub == "alice"')
    same = compile_expression('jwt["sub"] != request.headers["x-tenant"] || jwt.tenant_id == ""')
    smaller = compile_expression('jwt.sub')
    other = compile_expression('request.path')
    assert big.evaluate_bool(a) and same.evaluate_bool(a)
    assert smaller.evaluate(a) == "alice"
    assert len(recorded) == 1                       # same projection, then a covered one
    assert a._natives[smaller._projection] is a._natives[big._projection]
    assert other.evaluate(a) == "/v1/invocations"
    assert recorded[1] == {"request": {"path": "/v1/invocations"}}
    for _ in range(3):
        for e in (big, same, smaller, other):
            e.evaluate(a)
    assert len(recorded) == 2


def test_default_probe_reuses_the_parent_activation(recorded):
    a = Activation(providers())
    e = compile_expression('default(request.headers["x-nope"], jwt.sub) + '
                           'default(request.headers["x-tenant"], "-")')
    assert e.evaluate(a) == "alicet1"
    assert len(recorded) == 1


def test_probe_evaluated_with_its_own_projection_first(recorded):
    # The probe looks up its own projection: with an unrelated activation built
    # first, it must find the parent's (which covers it), not build another.
    a = Activation(providers())
    assert compile_expression("jwt.sub").evaluate(a) == "alice"
    e = compile_expression('default(request.headers["x-tenant"], "-") + request.method')
    assert e.evaluate(a) == "t1POST"
    assert len(recorded) == 2


def test_failing_batch_members_reuse_the_batch_activation(recorded):
    group = ExpressionGroup([compile_expression(s) for s in (
        'request.headers["x-tenant"] == jwt.missing',      # fails: the batch fails
        'request.path == "/v1/invocations"',
        'default(request.headers["x-nope"], "-") == "-"',
    )])
    results = group.evaluate_bools(Activation(providers()))
    assert isinstance(results[0], CelEvalError) and results[1:] == [True, True]
    assert len(recorded) == 1


def test_providers_are_called_once_per_activation_whatever_the_projections():
    calls = {"jwt": 0, "request": 0}

    def counted(name, value):
        def provider():
            calls[name] += 1
            return value
        return provider

    a = Activation({"jwt": counted("jwt", CLAIMS), "request": counted("request", REQUEST)})
    for source in ("jwt.sub", "request.path", 'request.headers["x-tenant"]', "size(jwt)",
                   "request.query.k", "request"):
        compile_expression(source).evaluate(a)
    assert calls == {"jwt": 1, "request": 1}


def test_set_provider_drops_only_activations_that_read_it(recorded):
    a = Activation(providers())
    jwt_rule = compile_expression('jwt.sub == "alice"')
    code = compile_expression("response.code")
    assert jwt_rule.evaluate_bool(a)
    with pytest.raises(CelEvalError):
        code.evaluate(a)
    a.set_provider("response", lambda: {"code": 503})
    assert code.evaluate(a) == 503
    a.set_provider("response", lambda: {"code": 200})
    assert code.evaluate(a) == 200
    assert jwt_rule.evaluate_bool(a)
    # jwt once; response: {} (no provider), 503, 200
    assert [sorted(d) for d in recorded] == [["jwt"], ["response"], ["response"], ["response"]]


def test_preload_is_whole_and_covers_later_expressions(recorded):
    a = Activation(providers(), preload=("jwt", "request"))
    assert compile_expression("jwt.sub").evaluate(a) == "alice"
    assert compile_expression('request.headers["x-tenant"]').evaluate(a) == "t1"
    assert len(recorded) == 1
    assert recorded[0]["request"] is REQUEST


def test_invalid_values_in_unread_fields_are_not_converted():
    # Providers must only produce CEL-convertible values; a tuple is rejected by the
    # library when the field holding it is read, and only then (it never sees unread
    # fields).
    a = Activation({"jwt": lambda: {"sub": "alice", "groups": ("a", "b")}})
    assert compile_expression("jwt.sub").evaluate(a) == "alice"
    with pytest.raises(CelEvalError, match="tuple"):
        compile_expression('"a" in jwt.groups').evaluate(a)
    with pytest.raises(CelEvalError, match="tuple"):
        compile_expression("size(jwt)").evaluate(a)


# --------------------------------------------------------------------------------
# differential: pruned and full activations agree on every result and error
# --------------------------------------------------------------------------------

DIFFERENTIAL = [
    # field access and literal indexes
    "jwt.sub",
    'jwt["sub"]',
    "jwt['tenant_id'] == \"t1\"",
    'jwt[r"iss"]',
    'jwt["""aud"""]',
    ".jwt.sub",
    "jwt.a.b",
    'jwt["a"]["b"]',
    "jwt.a.c",
    "jwt.nothing",
    "jwt.missing",
    'jwt["missing"]',
    "jwt.a.missing",
    "jwt.exp > 1.5e9",
    "jwt.exp + 1.0",
    "jwt.groups[0]",
    "jwt.groups[5]",
    'jwt.sub.startsWith("a") && jwt.flag',
    '{"jwt": jwt.sub}.jwt',
    "[jwt.sub, request.method].join(\"/\")",
    'has(jwt.sub) ? jwt.sub : "anonymous"',
    'jwt.missing == "x" || true',
    'jwt.missing == "x" && false',
    # non-literal indexes
    "jwt[request.query.claim]",
    "jwt[request.query.nope]",
    'jwt["s\\x75b"]',
    'jwt["s" + "ub"]',
    "request.headers[request.query.h]",
    'request.headers["X-Tenant".lowerAscii()]',
    # has()
    "has(jwt.sub)",
    "has(jwt.missing)",
    "has(jwt.a.b)",
    "has(request.headers.accept)",
    "has(request.headers.nope)",
    "has(request.headers)",
    "has(request.query.k)",
    "has(request.nope)",
    "has(llm.model)",
    # in / size / whole values
    '"sub" in jwt',
    '"x-tenant" in request.headers',
    '"nope" in request.query',
    "size(jwt)",
    "size(request.headers)",
    "size(request.query)",
    "request.headers.size()",
    "size(source)",
    "jwt",
    "request.query",
    "jwt == jwt && request.headers == request.headers",
    'jwt.sub == "alice" && size(jwt) > 3',
    # macros
    'jwt.groups.exists(g, g == "engineering")',
    'jwt.groups.all(g, g != jwt.sub)',
    'jwt.groups.map(g, g.upperAscii())',
    'jwt.groups.filter(g, g.startsWith("c"))',
    'jwt.exists(k, k == "sub")',
    'request.headers.exists(k, k.startsWith("x-"))',
    'request.headers.all(k, request.headers[k] != "" || k == "x-empty")',
    'request.headers.filter(k, k.startsWith("x-")).size()',
    'request.query.map(k, request.query[k]).size()',
    # comprehension variables named like variables
    '[{"tenant_id": "x"}].all(jwt, jwt.tenant_id == "x")',
    '[{"a": 1}].exists(jwt, jwt.a == 1) && jwt.sub == "alice"',
    'jwt.groups.map(jwt, jwt + "!")',
    'request.headers.exists(headers, headers == "x-tenant")',
    '[{"headers": {"k": "v"}}].map(request, request.headers.k)',
    '[1].exists(request, request == 1) || request.headers["x-tenant"] == "t1"',
    '[{"sub": "z"}].map(jwt, jwt.sub)[0] + jwt.sub',
    # string functions
    'jwt.groups.join(",")',
    'request.headers.accept.split(",").size()',
    'request.headers["x-tenant"].upperAscii()',
    'request.headers.authorization.size() > 500',
    'request.path.split("/")',
    'request.headers["user-agent"].lowerAscii().contains("test")',
    # missing keys, nested request.headers[...]
    'request.headers["x-tenant"] == jwt.tenant_id',
    'request.headers["x-nope"]',
    "request.query.nope",
    "request.nope.x",
    'request["headers"]["x-tenant"]',
    'request["headers"].accept',
    "request.headers['''x-tenant''']",
    'request.headers["x-empty"] == ""',
    "request.query.k + request.query.empty",
    "source.address + \":\" + string(source.port)",
    "llm.model",
    # default()
    'default(jwt.missing, "x")',
    'default(jwt.sub, "x")',
    'default(jwt.nothing, "null-fallback")',
    'default(request.headers["x-nope"], jwt.sub)',
    'default(request.headers["x-tenant"], "z")',
    'default(request.query.k, "q")',
    'default(default(jwt.a.missing, jwt.missing), "n")',
    'default(jwt.a.c, default(jwt.sub, "n"))',
    'default(jwt[request.query.claim], "none")',
    'default(llm.model, "none")',
    'default(jwt.exp + 1.0, 0.0)',
    'default(jwt.groups.filter(g, g.startsWith("c")), [])',
    'default(size(request.headers), 0)',
    # constants
    "1 + 2",
    'default({"k": [1, 2]}.k, [])',
]


def outcome(source, activation):
    try:
        return ("ok", compile_expression(source).evaluate(activation))
    except CelEvalError as exc:
        return ("error", str(exc))


@pytest.mark.parametrize("dataset", list(DATASETS))
@pytest.mark.parametrize("source", DIFFERENTIAL)
def test_pruned_and_full_agree(source, dataset):
    full = Activation(providers(**DATASETS[dataset]), preload=VARIABLES)
    pruned = Activation(providers(**DATASETS[dataset]))
    expected = outcome(source, full)
    assert outcome(source, pruned) == expected
    # the same holds on an activation that already served other expressions
    shared = Activation(providers(**DATASETS[dataset]))
    for other in ("jwt.sub", 'request.headers["x-tenant"]', "request.path", "has(jwt.a)"):
        outcome(other, shared)
    assert outcome(source, shared) == expected


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_group_pruned_and_full_agree(dataset):
    group = ExpressionGroup([compile_expression(s) for s in DIFFERENTIAL])
    assert group._rest._combined is not None and group._pure._combined is not None
    full = Activation(providers(**DATASETS[dataset]), preload=VARIABLES)
    pruned = Activation(providers(**DATASETS[dataset]))
    norm = lambda values: [("error", str(v)) if isinstance(v, CelEvalError) else v
                           for v in values]
    assert norm(group.evaluate_strs(pruned)) == norm(group.evaluate_strs(full))


def test_full_reference_really_is_unpruned(recorded):
    full = Activation(providers(), preload=VARIABLES)
    compile_expression("jwt.sub").evaluate(full)
    assert recorded[0]["jwt"] is CLAIMS and recorded[0]["request"] is REQUEST


# -- per-token memo of rules that read the request -------------------------------------

def _request_with(tenant: str, method: str = "POST") -> dict:
    return {**REQUEST, "method": method, "headers": {**REQUEST["headers"], "x-tenant": tenant}}


def test_mixed_rules_are_memoised_per_token_by_the_fields_they_read(monkeypatch):
    group = ExpressionGroup([compile_expression('jwt.sub != ""'),
                             compile_expression('request.headers["x-tenant"] == jwt.tenant_id'),
                             compile_expression('request.method == "POST"')])
    calls = []
    real = cel.expression._Batch.values
    monkeypatch.setattr(cel.expression._Batch, "values", lambda self, act: calls.append(self) or real(self, act))
    claims = Claims(CLAIMS)
    claims.memo = {}
    sequence = [("t1", "POST", [True, True, True]), ("t2", "POST", [True, False, True]),
                ("t1", "GET", [True, True, False]), ("t1", "POST", [True, True, True]),
                ("t2", "POST", [True, False, True]), ("t1", "GET", [True, True, False])]
    for tenant, method, want in sequence:
        a = Activation(providers(jwt=claims, request=_request_with(tenant, method)))
        assert group.evaluate_bools(a, claims.memo) == want
    # one library call for the jwt-only rule, one per distinct (tenant, method), none after
    assert len(calls) == 1 + 3
    # another token has its own memo: nothing carries over
    other = Claims({**CLAIMS, "tenant_id": "t2"})
    other.memo = {}
    a = Activation(providers(jwt=other, request=_request_with("t2")))
    assert group.evaluate_bools(a, other.memo) == [True, True, True]


def test_memo_of_request_inputs_is_bounded():
    group = ExpressionGroup([compile_expression('request.headers["x-tenant"] == jwt.tenant_id')])
    claims = Claims(CLAIMS)
    claims.memo = {}
    for i in range(3 * cel.MAX_INPUTS_PER_TOKEN):
        tenant = "t1" if i % 2 else f"other-{i}"
        a = Activation(providers(jwt=claims, request=_request_with(tenant)))
        assert group.evaluate_bools(a, claims.memo) == [tenant == "t1"]
    (seen,) = [v for k, v in claims.memo.items() if isinstance(k, tuple)]
    assert len(seen) == cel.MAX_INPUTS_PER_TOKEN


@pytest.mark.parametrize("source, memoised", [
    ('request.headers["x-tenant"] == jwt.tenant_id', True),
    ('request.method == "GET" && source.address == "10.0.0.1"', True),
    ('request.id == jwt.sub', False),                       # differs per request
    ('source.port > 1024', False),
    ('"x-tenant" in request.headers', False),               # a whole map
    ('request.headers.exists(h, h == "x")', False),
    ('size(request) > 0', False),
    ('mcp.tool == "x"', False),
])
def test_which_groups_memoise_request_inputs(source, memoised):
    group = ExpressionGroup([compile_expression(source)])
    assert (group._rest_inputs is not None) is memoised


def test_memo_keys_tell_types_apart():
    group = ExpressionGroup([compile_expression('source.tls == true')])
    claims = Claims(CLAIMS)
    claims.memo = {}
    for tls, want in ((True, [True]), (1, [False]), (True, [True]), (1, [False])):
        a = Activation(providers(jwt=claims, source={**SOURCE, "tls": tls}))
        got = group.evaluate_bools(a, claims.memo)
        assert got[0] is want[0] or (not want[0] and got[0] is not True)
