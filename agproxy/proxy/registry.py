"""The policy registry: which route policy keys and backend types exist, and where.

Theory of operation: each policy module (`filters/*`) declares, at its top level,
the config key it implements (`KEY`), its stage in the fixed filter order
(`STAGE`, one of the constants below plus a small offset inside the stage) and
`build(sec, ctx)`; each backend module (`backends/*`) declares `TYPE` and
`build(name, sec, ctx)`. This module only maps a key to the module that
implements it, so modules are imported lazily, when a config uses them (an
unused AgentCore backend never loads botocore).

Adding a policy is writing its module and adding its line here. A key the config
language reserves but this version does not build yet stays in the table with no
module behind it; the loader refuses it ("not supported in this version", at its
TOML path). `PLANNED_STAGES` keeps the place such a policy will take in the
filter order, so problems are still listed in filter order; the line goes when
the module is written and declares its own `STAGE`.

Stages (DESIGN.md, "The filter contract"): authentication → authorization →
rate limiting → ext-auth → transformations → token exchange / signing → backend.
"""

from __future__ import annotations

import importlib
from types import ModuleType

AUTHENTICATION = 10
AUTHORIZATION = 20
RATE_LIMITING = 30
EXT_AUTH = 40
TRANSFORMATION = 50
TOKEN = 60          # token exchange and request signing: last, they read what came before

POLICY_MODULES = {
    "jwt": "agproxy.filters.jwt",
    "mcp_auth": "agproxy.filters.mcp_auth",
    "authorization": "agproxy.filters.authorization",
    "mcp_authorization": "agproxy.filters.mcp_authorization",
    "rate_limit": "agproxy.filters.rate_limit",
    "ext_authz": "agproxy.filters.ext_authz",
    "transform": "agproxy.filters.transform",
    "claims_to_headers": "agproxy.filters.claims_headers",
    "obo": "agproxy.filters.obo",
    "forward_token": "agproxy.filters.forward_token",
}

PLANNED_STAGES: dict[str, int] = {}   # none left: every policy key is built

BACKEND_MODULES = {
    "http": "agproxy.backends.http",
    "static": "agproxy.backends.static",
    "agentcore": "agproxy.backends.agentcore",
    "mcp": "agproxy.backends.mcp.proxy",
    "openapi_mcp": "agproxy.backends.mcp.openapi",
    "llm_group": "agproxy.backends.llm.group",
}

def policy_keys() -> tuple[str, ...]:
    """Every key a [[route]] may hold besides its own (name, match, backend, ...)."""
    return tuple(POLICY_MODULES)


def policy(key: str) -> ModuleType | None:
    """The module implementing a route policy key; None when this version has none."""
    return _load(POLICY_MODULES[key])


def stage(key: str, module: ModuleType | None) -> int:
    return module.STAGE if module is not None else PLANNED_STAGES.get(key, TOKEN + 99)


def backend(kind: str) -> ModuleType | None:
    """The module implementing a backend type; None when this version has none."""
    return _load(BACKEND_MODULES[kind])


def _load(modname: str) -> ModuleType | None:
    try:
        return importlib.import_module(modname)
    except ModuleNotFoundError as exc:
        # Only the module itself missing means "not built"; a missing dependency
        # inside an existing module is a real error and propagates.
        if exc.name and modname.startswith(exc.name):
            return None
        raise
