"""Config errors of the MCP backends and policies, through the real loader: what a user
sees is the exact problem, at its TOML path."""

from __future__ import annotations

import os
import tomllib

import pytest

from agproxy.config.model import parse
from agproxy.config.reader import ConfigError
from agproxy.proxy.build import build_runtime
from tests.support.gateway import ROOT

SPEC = ROOT / "tests" / "support" / "petstore" / "openapi.yaml"
JWKS = ROOT / "conf" / "agentcore" / "idp-jwks.json"

BASE = """
[[listener]]
name = "main"
bind = "127.0.0.1:0"

[backend.echo]
type = "http"
url = "http://127.0.0.1:9"
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        build_runtime(parse(tomllib.loads(BASE + text)))
    return info.value.problems


def runtime(text: str):
    return build_runtime(parse(tomllib.loads(BASE + text)))


def test_openapi_mcp_problems():
    assert problems(f"""
[backend.a]
type = "openapi_mcp"
spec_file = "{SPEC}"
spec_inline = "openapi: 3.1.0"
""") == ["backend.a: exactly one of spec_file or spec_inline is required"]
    assert problems(f"""
[backend.a]
type = "openapi_mcp"
spec_file = "{SPEC}"
include_operations = ["listPet"]
""") == ['backend.a.include_operations: no operation \'listPet\' in the spec (did you mean "listPets"?)']
    assert problems("""
[backend.a]
type = "openapi_mcp"
spec_inline = '''{"openapi": "3.0.3", "paths": {"/x": {"get": {"operationId": "x", "parameters": [{"in": "query"}]}}}}'''
base_url = "http://127.0.0.1:1"
""") == ["backend.a.spec_inline: invalid OpenAPI document: operation x: #/paths/~1x/get/parameters/0/name: "
         "a parameter needs a name"]
    assert problems(f"""
[backend.a]
type = "openapi_mcp"
spec_file = "{SPEC}"
api_key = {{ env = "AGPROXY_TEST_UNSET_VARIABLE" }}
""") == ["backend.a.api_key.env: environment variable AGPROXY_TEST_UNSET_VARIABLE is not set"]
    assert problems("""
[backend.a]
type = "openapi_mcp"
spec_inline = '{"openapi": "3.1.0", "paths": {}}'
""") == ["backend.a.base_url: required (the spec has no absolute servers[].url)"]


def test_openapi_mcp_base_url_from_servers_and_key_never_shown(monkeypatch):
    monkeypatch.setenv("AGPROXY_TEST_KEY", "s3cret-value")
    rt = runtime(f"""
[backend.a]
type = "openapi_mcp"
spec_file = "{SPEC}"
api_key = {{ header = "x-api-key", env = "AGPROXY_TEST_KEY" }}
""")
    d = rt.describe()["backends"]["a"]
    assert d["base_url"] == "http://127.0.0.1:9100/api" and d["api_key_header"] == "x-api-key"
    assert "s3cret-value" not in repr(rt.describe())


def test_policy_problems():
    assert problems("""
[[route]]
name = "r"
match = { path = "/mcp" }
backend = "echo"

[route.mcp_authorization]
rules = []
""") == ["route[0].mcp_authorization.rules: at least one rule is required"]
    assert problems("""
[[route]]
name = "r"
match = { path = "/mcp" }
backend = "echo"

[route.mcp_authorization]
rules = ['mcp.tool.name.startsWith(']
""")[0].startswith("route[0].mcp_authorization.rules[0]: invalid CEL")
    assert problems(f"""
[[route]]
name = "r"
match = {{ path = "/mcp" }}
backend = "echo"

[route.mcp_auth]
mode = "optional"
issuer = "https://idp"
jwks = {{ file = "{JWKS}" }}
""") == ["route[0].mcp_auth.mode: mcp_auth is always strict (an MCP client is told where to get a token)"]
    assert problems(f"""
[[route]]
name = "r"
match = {{ path_regex = "^/m" }}
backend = "echo"

[route.mcp_auth]
issuer = "https://idp"
jwks = {{ file = "{JWKS}" }}
trusted_proxies = ["not-an-address"]
resource_metadata = {{ resource = "x" }}
""") == [
        "route[0].mcp_auth.resource_metadata.resource: set by the gateway (use the mcp_auth key of that name)",
        "route[0].mcp_auth.trusted_proxies: 'not-an-address' does not appear to be an IPv4 or IPv6 network",
        "route[0].mcp_auth.resource: required when the route matches neither path nor path_prefix",
    ]


def test_mcp_auth_registers_the_metadata_routes_in_filter_order():
    rt = runtime(f"""
[[route]]
name = "r"
match = {{ path = "/tools/mcp" }}
backend = "echo"

[route.mcp_authorization]
rules = ['mcp.tool.name != "x"']

[route.mcp_auth]
issuer = "https://idp"
jwks = {{ file = "{JWKS}" }}
""")
    routes = {r.name: r for r in rt.router.routes}
    assert routes["mcp_auth.metadata:route[0].mcp_auth"].match.path == \
        "/.well-known/oauth-protected-resource/tools/mcp"
    assert routes["mcp_auth.metadata-root:route[0].mcp_auth"].match.path == "/.well-known/oauth-protected-resource"
    assert [f.name for f in routes["r"].filters] == ["mcp_auth", "mcp_authorization"]
