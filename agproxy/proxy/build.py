"""Config model → runtime snapshot (routes with their filter chains, backends, identity).

Theory of operation: each policy key under a route and each backend type is built
by the module that implements it (`build(section, ctx)`), found through the
registry (proxy/registry.py), so that a feature that is not there yet is a clear
config error, never a silently ignored section. A route's filters are put in stage
order; once its chain is built, each filter and the backend may check it as a
whole (`check_route(chain)`: a token that no earlier filter provides, the headers
AgentCore may receive). Everything that can fail is checked here, at load
(unreadable key files, bad CEL, unknown providers), and reported by TOML path. No
network I/O happens while building; background work (JWKS refresh, credential
refresh) is registered with `ctx.on_start` and runs once the snapshot serves.
"""

from __future__ import annotations

import os
from typing import Any, Awaitable, Callable

from agproxy.config.model import Config
from agproxy.config.reader import ConfigError, Problems, Section, did_you_mean
from agproxy.proxy import registry
from agproxy.proxy.contract import Backend, Filter, RouteChain
from agproxy.proxy.route import Match, Route, Router


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

    def add_route(self, name: str, match: Match, backend: Backend, listener: str | None = None) -> None:
        """A route the gateway itself serves (e.g. the token service endpoints)."""
        self.extra_routes.append(Route(name, -1, listener, match, backend, 30.0, []))


class Runtime:
    """A compiled, immutable config snapshot: what a worker serves."""

    def __init__(self, cfg: Config, router: Router, backends: dict[str, Backend], ctx: BuildContext):
        self.cfg = cfg
        self.gateway = cfg.gateway
        self.listeners = cfg.listeners
        self.router = router
        self.backends = backends
        self.ctx = ctx
        self.tracing = None        # telemetry.tracing.Tracing when [telemetry].tracing is on
        self.log_fields = None     # telemetry.access_log.LogFields for [telemetry].access_log_fields

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


def build_runtime(cfg: Config, pool: Any = None, metrics: Any = None) -> Runtime:
    """Build everything; raises ConfigError listing every problem by TOML path."""
    problems = cfg.problems
    ctx = BuildContext(cfg, problems, pool, metrics)

    # Named JWT providers first: routes and the token service refer to them.
    if cfg.jwt_providers:
        from agproxy.identity.providers import build_provider
        for name, sec in cfg.jwt_providers.items():
            ctx.jwt_providers[name] = build_provider(name, sec, ctx)

    # The gateway's own token service: [route.obo] uses it in process.
    if cfg.token_exchange is not None:
        from agproxy.backends.token_service import build_service
        ctx.token_exchange = build_service(cfg.token_exchange, ctx)

    backends: dict[str, Backend] = {}
    for name, bcfg in cfg.backends.items():
        if bcfg.type not in registry.BACKEND_MODULES:
            bcfg.section.error("type", f"unknown backend type {bcfg.type!r}" +
                               did_you_mean(bcfg.type, registry.BACKEND_MODULES))
            continue
        module = registry.backend(bcfg.type)
        if module is None:
            bcfg.section.error("type", f"backend type {bcfg.type!r} is not supported in this version")
            continue
        backend = module.build(name, bcfg.section, ctx)
        if backend is not None:
            backend.name = name
            backends[name] = backend

    routes: list[Route] = []
    for rcfg in cfg.routes:
        filters, complete = _build_chain(rcfg.policies, ctx)
        chain = RouteChain(rcfg.name, rcfg.path, filters, problems)
        backend = backends.get(rcfg.backend)
        if complete:
            for f in chain.filters:
                f.check_route(chain)
            if backend is not None:
                backend.check_route(chain)
        if backend is None:
            continue
        routes.append(Route(rcfg.name, rcfg.index, rcfg.listener, Match(**rcfg.match),
                            backend, rcfg.timeout, filters))
    tracing, log_fields = _telemetry(cfg, ctx)
    problems.raise_if_any()
    router = Router(ctx.extra_routes + routes, normalize_path=cfg.gateway.normalize_path,
                    merge_slashes=cfg.gateway.merge_slashes)
    runtime = Runtime(cfg, router, backends, ctx)
    runtime.tracing, runtime.log_fields = tracing, log_fields
    return runtime


def _telemetry(cfg: Config, ctx: BuildContext):
    """Tracing (started in the serving process, never in a supervisor) and the CEL of
    [telemetry].access_log_fields."""
    tracing = None
    if cfg.tracing is not None:
        from agproxy.telemetry.tracing import Tracing
        tracing = Tracing(cfg.tracing, ctx.metrics)
        ctx.on_start(tracing.start)
        ctx.on_stop(tracing.stop)
    log_fields = None
    if cfg.access_log_fields:
        from agproxy.filters import compile_cel
        from agproxy.telemetry.access_log import LogFields
        compiled = [(name, compile_cel(ctx.problems, f"telemetry.access_log_fields.{name}", src))
                    for name, src in cfg.access_log_fields.items()]
        log_fields = LogFields([(n, e) for n, e in compiled if e is not None])
    return tracing, log_fields


def _build_chain(policies: dict[str, Section], ctx: BuildContext) -> tuple[list[Filter], bool]:
    """A route's filters in stage order, and whether the chain is complete.

    Incomplete: a section that is there built no filter while the config has
    problems (its own, or one it depends on, e.g. an invalid [token_exchange]).
    Route checks then give no verdict: "needs [route.jwt]" would be wrong.
    """
    problems = ctx.problems
    modules = {key: registry.policy(key) for key in policies}
    filters: list[Filter] = []
    missing = False
    for key in sorted(policies, key=lambda k: registry.stage(k, modules[k])):
        sec = policies[key]
        module = modules[key]
        if module is None:
            problems.add(sec.path, "not supported in this version")
            missing = True
            continue
        built = module.build(sec, ctx)
        if built is None:
            missing = True
            continue
        filters.extend(built if isinstance(built, list) else [built])
    return filters, not (missing and problems)


def load_runtime(path: str, pool: Any = None, metrics: Any = None) -> Runtime:
    from agproxy.config.model import load_file
    cfg = load_file(path)
    return build_runtime(cfg, pool, metrics)


__all__ = ["Backend", "BuildContext", "Runtime", "build_runtime", "load_runtime", "ConfigError"]
