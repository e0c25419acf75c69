"""The policy registry and route-level checks, through the real loader.

Configs go through agproxy.config.model.parse + build_runtime; what is asserted is
what a user sees: the exact problems (TOML path and message, in order) or the
order of the filters a route runs.
"""

from __future__ import annotations

import importlib
import importlib.util
import tomllib

import pytest

from agproxy.config.model import parse
from agproxy.config.reader import ConfigError
from agproxy.proxy.build import build_runtime
from tests.support.gateway import ROOT

DEMO = ROOT / "conf" / "agentcore"
ARN = "arn:aws:bedrock-agentcore:us-east-1:111122223333:runtime/support-a1B2c3"

BASE = """
[[listener]]
name = "main"
bind = "127.0.0.1:0"

[backend.echo]
type = "http"
url = "http://127.0.0.1:9"
"""

IDENTITY = f"""
[jwt_provider.idp]
issuer = "https://idp.agproxy.test"
audiences = ["agents"]
jwks = {{ file = "{DEMO}/idp-jwks.json" }}

[jwt_provider.k8s]
issuer = "https://kubernetes.default.svc"
audiences = ["agproxy"]
jwks = {{ file = "{DEMO}/k8s-jwks.json" }}

[token_exchange]
issuer = "http://127.0.0.1:8080"
signing_keys = [{{ file = "{DEMO}/obo-signing-1.pem", kid = "obo-1" }}]
subject_issuers = ["idp"]
actor_issuers = ["k8s"]
"""

OBO = f"""
[route.obo]
actor = {{ kubernetes_token_file = "{DEMO}/agent-token" }}
audience = "support-agent"
"""


def runtime(text: str):
    return build_runtime(parse(tomllib.loads(BASE + text)))


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        runtime(text)
    return info.value.problems


def agentcore(auth: str) -> str:
    return f"""
[backend.agent]
type = "agentcore"
runtime_arn = "{ARN}"
auth = "{auth}"
endpoint = "http://127.0.0.1:9"
"""


# -- what this version does not build ------------------------------------------------------

def test_every_policy_key_of_the_registry_is_built():
    # No policy is planned any more: each key maps to a module that declares it.
    from agproxy.proxy import registry
    assert registry.PLANNED_STAGES == {}
    for key in registry.policy_keys():
        module = registry.policy(key)
        assert module is not None and module.KEY == key, key


def test_problems_follow_the_filter_order():
    # The TOML lists ext_authz first: the problems follow the filter order.
    assert problems("""
[[route]]
name = "agents"
backend = "echo"

[route.ext_authz]
protocol = "grpc"

[[route.rate_limit.local]]
key = "jwt.sub"
capacity = 0
refill = { tokens = 100, every = "60s" }
""") == [
        "route[0].rate_limit.local[0].capacity: must be >= 1, got 0",
        "route[0].ext_authz.address: required",
    ]


def test_every_backend_type_of_the_registry_is_built():
    # No backend type is planned any more: each name maps to a module that declares it.
    from agproxy.proxy import registry
    for kind in registry.BACKEND_MODULES:
        module = registry.backend(kind)
        assert module is not None and module.TYPE == kind, kind


def test_llm_group_is_built_and_checked_at_load():
    found = problems("""
[backend.llm]
type = "llm_group"
health = "response.code >"
eviction = { duration = "1m", max_duration = "10s" }
""")
    assert found[:2] == [
        "backend.llm.eviction.max_duration: must be at least duration",
        "backend.llm.provider: an llm_group needs at least one [[backend.NAME.provider]]",
    ]
    assert found[2].startswith("backend.llm.health: invalid CEL expression 'response.code >'") and len(found) == 3


def test_unknown_policy_key_and_backend_type():
    assert problems("""
[[route]]
name = "r"
backend = "echo"
[route.jwtt]
providers = ["idp"]

[backend.other]
type = "htp"
""") == [
        'route[0].jwtt: unknown key (did you mean "jwt"?)',
        "backend.other.type: unknown backend type 'htp' (did you mean \"http\"?)",
    ]


# -- order ---------------------------------------------------------------------------------

def test_filters_run_in_stage_order_whatever_the_toml_order():
    rt = runtime(IDENTITY + """
[[route]]
name = "r"
backend = "echo"

[route.forward_token]
header = "x-token"
token = "obo"
""" + OBO + """
[route.claims_to_headers]
"x-user" = "jwt.sub"

[route.transform.request]
set = { "x-via" = '"agproxy"' }

[route.authorization]
rules = ['jwt.sub != ""']

[route.jwt]
providers = ["idp"]
""")
    route = next(r for r in rt.router.routes if r.name == "r")
    assert [f.name for f in route.filters] == [
        "jwt", "authorization", "transform", "claims_to_headers", "obo", "forward_token"]


def test_registry_modules_declare_their_key_and_stage():
    """Every built policy module declares the key it is registered under and its stage;
    every backend module its type; planned ones have no module yet."""
    from agproxy.proxy import registry
    stages = {}
    for key, modname in registry.POLICY_MODULES.items():
        if key in registry.PLANNED_STAGES:
            assert importlib.util.find_spec(modname) is None, f"{modname} exists: drop its PLANNED_STAGES line"
            stages[key] = registry.PLANNED_STAGES[key]
            continue
        mod = importlib.import_module(modname)
        assert mod.KEY == key and callable(mod.build)
        stages[key] = mod.STAGE
    assert sorted(stages, key=stages.__getitem__) == [
        "jwt", "mcp_auth", "authorization", "mcp_authorization", "rate_limit", "ext_authz",
        "transform", "claims_to_headers", "obo", "forward_token"]
    assert len(set(stages.values())) == len(stages)
    for kind, modname in registry.BACKEND_MODULES.items():
        if importlib.util.find_spec(modname) is None:
            assert kind in ("mcp", "openapi_mcp")
            continue
        mod = importlib.import_module(modname)
        assert mod.TYPE == kind and callable(mod.build)


# -- route-level checks on the built chain ---------------------------------------------------

def test_forward_token_needs_the_policy_that_provides_its_token():
    assert problems(IDENTITY + """
[[route]]
name = "a"
backend = "echo"
[route.forward_token]
header = "x-token"
token = "obo"

[[route]]
name = "b"
backend = "echo"
[route.forward_token]
header = "x-token"
""" + OBO) == [
        'route[0].forward_token.token: "obo" needs a [route.obo] section on this route',
        'route[1].forward_token.token: "subject" needs [route.jwt] (the token must be validated '
        'before it is forwarded)',
    ]


def test_forward_token_with_its_provider_is_accepted():
    rt = runtime(IDENTITY + """
[[route]]
name = "a"
backend = "echo"
[route.jwt]
providers = ["idp"]
[route.forward_token]
header = "x-token"

[[route]]
name = "b"
backend = "echo"
[route.forward_token]
header = "x-token"
token = "obo"
""" + OBO)
    assert [[f.name for f in r.filters] for r in rt.router.routes if r.index >= 0] == [
        ["jwt", "forward_token"], ["obo", "forward_token"]]


def test_agentcore_bearer_needs_a_token_providing_policy():
    assert problems(agentcore("bearer") + """
[[route]]
name = "r"
backend = "agent"
[route.transform.request]
set = { "x-via" = '"agproxy"' }
""") == [
        "route[0].backend: agentcore backend 'agent' uses auth = \"bearer\": the route needs "
        "[route.obo] or [route.jwt] to provide the token",
    ]
    for policy in (IDENTITY + "\n[[route]]\nname = \"r\"\nbackend = \"agent\"\n[route.jwt]\nproviders = [\"idp\"]\n",
                   IDENTITY + "\n[[route]]\nname = \"r\"\nbackend = \"agent\"\n" + OBO):
        runtime(agentcore("bearer") + policy)


def test_no_route_check_verdict_on_a_chain_broken_by_other_problems():
    # [route.jwt] names an unknown provider: its filter is not built, but the route does
    # have it; only the real problem is reported, not "needs [route.jwt]".
    assert problems(IDENTITY + agentcore("bearer") + """
[[route]]
name = "r"
backend = "agent"
[route.jwt]
providers = ["nope"]
[route.forward_token]
header = "x-token"
""") == ["route[0].jwt.providers[0]: unknown JWT provider 'nope' (define it as [jwt_provider.nope])"]
    # [token_exchange] is invalid: [route.obo] builds nothing, yet the route has it.
    broken = IDENTITY.replace('subject_issuers = ["idp"]', 'subject_issuers = []')
    assert problems(broken + agentcore("bearer") + """
[[route]]
name = "r"
backend = "agent"
[route.forward_token]
header = "x-token"
token = "obo"
""" + OBO) == ["token_exchange.subject_issuers: at least one trusted subject issuer is required"]
