"""Config model → runtime snapshot (routes with their filter chains, backends, identity).

Theory of operation: each policy key under a route and each backend type is built
by the module that implements it (`build(section, ctx)`); modules are looked up by
name so that a feature that is not there yet is a clear config error, never a
silently ignored section. Everything that can fail is checked here, at load
(unreadable key files, bad CEL, unknown providers), and reported by TOML path. No
network I/O happens while building; background work (JWKS refresh, credential
refresh) is registered with `ctx.on_start` and runs once the snapshot serves.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Awaitable, Callable

from agproxy.config.model import Config
from agproxy.config.reader import ConfigError, Problems, Section, did_you_mean
from agproxy.proxy.filter import ORDER, Filter
from agproxy.proxy.route import Match, Route, Router

POLICY_MODULES = {
    "jwt": "agproxy.filters.jwt",
    "authorization": "agproxy.filters.authorization",
    "transform": "agproxy.filters.transform",
    "claims_to_headers": "agproxy.filters.claims_headers",
    "obo": "agproxy.filters.obo",
    "forward_token": "agproxy.filters.forward_token",
    "mcp_auth": "agproxy.filters.mcp_auth",
    "mcp_authorization": "agproxy.filters.mcp_authorization",
    "rate_limit": "agproxy.filters.rate_limit",
    "ext_authz": "agproxy.filters.ext_authz",
}

BACKEND_MODULES = {
    "http": "agproxy.backends.http",
    "static": "agproxy.backends.static",
    "agentcore": "agproxy.backends.agentcore",
    "mcp": "agproxy.backends.mcp",
    "openapi_mcp": "agproxy.backends.openapi_mcp",
    "llm_group": "agproxy.backends.llm_group",
}


class Backend:
    """What a route points at. `handle` answers the exchange (through ex.send_*)."""

    name = ""
    kind = ""

    async def handle(self, ex) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> dict:
        return {"type": self.kind}


class BuildContext:
    """What builders may use: paths, shared services, and registration hooks."""

    def __init__(self, cfg: Config, problems: Problems, pool: Any, metrics: Any):
        self.cfg = cfg
        self.problems = problems
        self.base_dir = cfg.base_dir
        self.pool = pool
        self.metrics = metrics
        self.jwt_providers: dict[str, Any] = {}
        self.token_exchange: Any = None
        self.starters: list[Callable[[], Awaitable[None]]] = []
        self.stoppers: list[Callable[[], Awaitable[None]]] = []
        self.readiness: dict[str, Callable[[], str | None]] = {}
        self.extra_routes: list[Route] = []

    def path(self, p: str) -> str:
        """A file path from the config, relative to the config file's folder."""
        return p if os.path.isabs(p) else os.path.join(self.base_dir, p)

    def on_start(self, fn: Callable[[], Awaitable[None]]) -> None:
        self.starters.append(fn)

    def on_stop(self, fn: Callable[[], Awaitable[None]]) -> None:
        self.stoppers.append(fn)

    def add_readiness(self, name: str, check: Callable[[], str | None]) -> None:
        """check() returns None when ready, else the reason it is not."""
        self.readiness[name] = check

    def add_route(self, name: str, match: Match, backend: Backend) -> None:
        """A route the gateway itself serves (e.g. the token service endpoints)."""
        self.extra_routes.append(Route(name, -1, None, match, backend, 30.0, []))


class Runtime:
    """A compiled, immutable config snapshot: what a worker serves."""

    def __init__(self, cfg: Config, router: Router, backends: dict[str, Backend], ctx: BuildContext):
        self.cfg = cfg
        self.gateway = cfg.gateway
        self.listeners = cfg.listeners
        self.router = router
        self.backends = backends
        self.ctx = ctx

    async def start(self) -> None:
        for fn in self.ctx.starters:
            await fn()

    async def stop(self) -> None:
        for fn in self.ctx.stoppers:
            try:
                await fn()
            except Exception:
                pass

    def not_ready(self) -> list[str]:
        reasons = []
        for name, check in self.ctx.readiness.items():
            why = check()
            if why:
                reasons.append(f"{name}: {why}")
        return reasons

    def describe(self) -> dict:
        from agproxy.telemetry.redact import redact
        return {
            "source": self.cfg.path,
            "config": redact(self.cfg.raw),
            "routes": [
                {
                    "name": r.name,
                    "listener": r.listener,
                    "match": r.match.describe(),
                    "backend": getattr(r.backend, "name", None),
                    "timeout_seconds": r.timeout,
                    "filters": [f.describe() for f in r.filters],
                }
                for r in self.router.routes
            ],
            "backends": {name: b.describe() for name, b in self.backends.items()},
        }


def _load_builder(table: dict[str, str], key: str):
    modname = table[key]
    try:
        return importlib.import_module(modname).build
    except ModuleNotFoundError as exc:
        if exc.name and modname.startswith(exc.name):
            return None
        raise


def build_runtime(cfg: Config, pool: Any = None, metrics: Any = None) -> Runtime:
    """Build everything; raises ConfigError listing every problem by TOML path."""
    problems = cfg.problems
    ctx = BuildContext(cfg, problems, pool, metrics)

    # Named JWT providers first: routes and the token service refer to them.
    if cfg.jwt_providers:
        from agproxy.identity.providers import build_provider
        for name, sec in cfg.jwt_providers.items():
            ctx.jwt_providers[name] = build_provider(name, sec, ctx)

    if cfg.token_exchange is not None:
        te = _try_import("agproxy.identity.token_exchange")
        if te is None:
            problems.add("token_exchange", "not supported in this version")
        else:
            ctx.token_exchange = te.build(cfg.token_exchange, ctx)

    backends: dict[str, Backend] = {}
    for name, bcfg in cfg.backends.items():
        if bcfg.type not in BACKEND_MODULES:
            bcfg.section.error("type", f"unknown backend type {bcfg.type!r}" + did_you_mean(bcfg.type, BACKEND_MODULES))
            continue
        builder = _load_builder(BACKEND_MODULES, bcfg.type)
        if builder is None:
            bcfg.section.error("type", f"backend type {bcfg.type!r} is not supported in this version")
            continue
        backend = builder(name, bcfg.section, ctx)
        if backend is not None:
            backend.name = name
            backends[name] = backend

    routes: list[Route] = []
    for rcfg in cfg.routes:
        filters: list[Filter] = []
        for key in sorted(rcfg.policies, key=ORDER.__getitem__):
            sec: Section = rcfg.policies[key]
            builder = _load_builder(POLICY_MODULES, key)
            if builder is None:
                problems.add(sec.path, "not supported in this version")
                continue
            built = builder(sec, ctx)
            if built is None:
                continue
            filters.extend(built if isinstance(built, list) else [built])
        backend = backends.get(rcfg.backend)
        if backend is None:
            continue
        check = getattr(backend, "check_route", None)
        if check is not None:
            check(rcfg, filters, problems)
        routes.append(Route(rcfg.name, rcfg.index, rcfg.listener, Match(**rcfg.match),
                            backend, rcfg.timeout, filters))
    problems.raise_if_any()
    return Runtime(cfg, Router(ctx.extra_routes + routes), backends, ctx)


def _try_import(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):
            return None
        raise


def load_runtime(path: str, pool: Any = None, metrics: Any = None) -> Runtime:
    from agproxy.config.model import load_file
    cfg = load_file(path)
    return build_runtime(cfg, pool, metrics)


__all__ = ["Backend", "BuildContext", "Runtime", "build_runtime", "load_runtime", "ConfigError"]
