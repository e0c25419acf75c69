"""A deny rule comparing a claim with a string (`default(jwt.role, "") == "contractor"`)
does not fire when the token carries the claim as a list (CEL's heterogeneous equality
is false, not an error). `agproxy validate` warns about the pattern; the forms that
docs/configuration.md recommends deny both shapes, through the real gateway."""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest

from tests.support.gateway import ROOT, agproxy_cmd
from tests.support.idp import IdP


@pytest.fixture(scope="module")
def idp():
    server = IdP()
    yield server
    server.close()


def config(idp: IdP, rules: str) -> str:
    return f'''
[[route]]
name = "agents"
match = {{ path_prefix = "/" }}
backend = "hello"
[route.jwt]
issuer = "{idp.issuer}"
audiences = ["agents"]
jwks = {{ inline = '{idp.jwks_json()}' }}
[route.authorization]
rules = [{rules}]

[backend.hello]
type = "static"
body = "hi"
'''


def validate(tmp_path, text: str) -> subprocess.CompletedProcess:
    path = tmp_path / "v.toml"
    path.write_text('[[listener]]\nname = "main"\nbind = "127.0.0.1:8080"\n' + text)
    return subprocess.run(agproxy_cmd() + ["validate", str(path)], capture_output=True, text=True,
                          cwd=str(ROOT), timeout=60)


def warnings(out: subprocess.CompletedProcess) -> list[str]:
    return [json.loads(line)["message"] for line in out.stderr.splitlines()
            if line.startswith("{") and json.loads(line)["level"] == "WARNING"]


def test_validate_warns_about_string_equality_on_a_claim_in_a_deny_rule(tmp_path, idp):
    out = validate(tmp_path, config(idp, """'jwt.sub != ""', { deny = 'default(jwt.role, "") == "contractor"' },
                                            { require = 'jwt.tenant != "t0"' }"""))
    assert out.returncode == 0, out.stderr
    (deny, require) = warnings(out)
    assert deny.startswith("route[0].authorization.rules[1].deny: compares jwt.role with a string")
    assert "never matches it" in deny and "\"x\" in jwt.role" in deny
    assert require.startswith("route[0].authorization.rules[2].require: compares jwt.tenant")
    # the recommended forms, and comparisons that cannot be lists, are not warned about
    out = validate(tmp_path, config(idp, """{ deny = '"contractor" in (type(jwt.role) == list ? jwt.role : [jwt.role])' },
                                            { deny = '"x" in jwt.groups' }, { deny = 'jwt.sub == "mallory"' },
                                            { require = 'jwt.tenant == "t1"' }"""))
    assert out.returncode == 0, out.stderr
    assert warnings(out) == []


ROLES = ("contractor", ["contractor"], "employee", ["employee"], None)   # None: no claim


@pytest.mark.parametrize("rule,statuses", [
    # the pitfall: a list-valued role slips through
    ("""{ deny = 'default(jwt.role, "") == "contractor"' }""", [403, 200, 200, 200, 200]),
    # for a list claim; `in` on a string (or a missing claim) is an evaluation error: denied
    ("""{ deny = '"contractor" in jwt.role' }""", [403, 403, 403, 200, 403]),
    # for a string or a list; a token without the claim is allowed
    ("""{ deny = 'has(jwt.role) && "contractor" in (type(jwt.role) == list ? jwt.role : [jwt.role])' }""",
     [403, 403, 200, 200, 200]),
])
def test_documented_patterns(start_gateway, idp, rule, statuses):
    gw = start_gateway(config(idp, rule))
    with httpx.Client(timeout=10) as client:
        got = [client.get(gw.url("/"), headers={"authorization": f"Bearer {idp.mint(role=role)}"}).status_code
               for role in ROLES]
    assert got == statuses
