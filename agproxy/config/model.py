"""The top-level configuration model: [gateway], [[listener]], [[route]], [backend.*].

Policy sections under a route and backend bodies are validated by the module that
implements them (proxy/registry.py names them, proxy/build.py builds them); here
we check what every route and listener has in common, and read the TOML file
itself.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from agproxy.config.reader import ConfigError, Problems, Section, did_you_mean

TOP_LEVEL = ("gateway", "listener", "route", "backend", "jwt_provider", "token_exchange", "telemetry")
ROUTE_KEYS = ("name", "listener", "match", "backend", "timeout")
MATCH_KEYS = ("path", "path_prefix", "path_regex", "methods", "headers", "host")


@dataclass
class GatewayConfig:
    workers: int = 1
    admin: tuple[str, int] | None = ("127.0.0.1", 15000)
    access_log: str = "stdout"
    drain_timeout: float = 10.0
    idle_timeout: float = 60.0
    first_byte_timeout: float = 10.0
    handshake_timeout: float = 10.0
    max_header_bytes: int = 65536
    max_headers: int = 100
    max_concurrent_streams: int = 100
    max_request_body: int = 100 * 1024 * 1024
    header_timeout: float = 10.0          # the whole request head must arrive within this
    stream_idle_timeout: float = 300.0    # no progress either way for this long: reset the stream
    normalize_path: bool = True           # route on (and forward) the RFC 3986-normalised path
    merge_slashes: bool = True
    headers_with_underscores: str = "drop"   # drop | reject | allow
    rate_limit_buckets: int = 65536       # slots of the local rate limits' shared table


@dataclass
class TlsConfig:
    cert_file: str
    key_file: str


@dataclass
class ListenerConfig:
    name: str
    host: str
    port: int
    tls: TlsConfig | None = None


@dataclass
class RouteConfig:
    name: str
    index: int
    path: str
    listener: str | None
    match: dict[str, Any]
    backend: str
    timeout: float
    policies: dict[str, Section] = field(default_factory=dict)


@dataclass
class BackendConfig:
    name: str
    type: str
    section: Section


@dataclass
class Config:
    path: str
    base_dir: str
    raw: dict
    gateway: GatewayConfig
    listeners: list[ListenerConfig]
    routes: list[RouteConfig]
    backends: dict[str, BackendConfig]
    jwt_providers: dict[str, Section]
    token_exchange: Section | None
    telemetry: Section | None
    problems: Problems
    tracing: Any = None                    # telemetry.tracing.TracingSettings, or None: off
    access_log_fields: dict[str, str] = field(default_factory=dict)   # name -> CEL source


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) <= 65535):
        raise ValueError(f"invalid address {text!r} (expected host:port)")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def load_file(path: str) -> Config:
    """Read and check the top level; policy/backend sections are checked by build."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from None
    return parse(raw, path)


def parse(raw: dict, path: str = "<inline>") -> Config:
    problems = Problems()
    root = Section("", raw, problems)
    for key in raw:
        if key not in TOP_LEVEL:
            problems.add(key, "unknown section" + did_you_mean(key, TOP_LEVEL))

    base_dir = os.path.dirname(os.path.abspath(path)) if path != "<inline>" else os.getcwd()
    gateway = _gateway(root.section("gateway"), base_dir)
    listeners = _listeners(root.sections("listener"), problems, base_dir)
    backends = _backends(root.section("backend"))
    routes = _routes(root.sections("route"), listeners, backends, problems)

    providers: dict[str, Section] = {}
    jp = root.section("jwt_provider")
    if jp is not None:
        for name in jp.keys():
            providers[name] = jp.section(name)  # type: ignore[assignment]
    telemetry = root.section("telemetry")
    tracing, log_fields = _telemetry(telemetry)
    return Config(
        path=path,
        base_dir=base_dir,
        raw=raw,
        gateway=gateway,
        listeners=listeners,
        routes=routes,
        backends=backends,
        jwt_providers=providers,
        token_exchange=root.section("token_exchange"),
        telemetry=telemetry,
        problems=problems,
        tracing=tracing,
        access_log_fields=log_fields,
    )


def _telemetry(sec: Section | None) -> tuple[Any, dict[str, str]]:
    """[telemetry]: (tracing settings or None, access-log fields: name -> CEL source).
    The CEL is compiled by proxy/build.py, with the other expressions."""
    if sec is None:
        return None, {}
    prefix = sec.str("metrics_prefix", "agproxy")
    if isinstance(prefix, str) and not (prefix.replace("_", "a").isalnum() and not prefix[0].isdigit()):
        sec.error("metrics_prefix", "must be letters, digits and underscores, not starting with a digit")
    tracing = None
    tsec = sec.section("tracing")
    if tsec is not None:
        from agproxy.telemetry.tracing import read_settings
        tracing = read_settings(tsec)
    fields = sec.str_map("access_log_fields", {}) or {}
    if fields:
        from agproxy.telemetry.access_log import CORE_FIELDS
        for name in fields:
            if name in CORE_FIELDS:
                sec.problems.add(f"{sec.sub('access_log_fields')}.{name}",
                                 f"{name!r} is a field the access log always has; choose another name")
            elif not name.replace("_", "a").replace(".", "a").isalnum():
                sec.problems.add(f"{sec.sub('access_log_fields')}.{name}",
                                 "a field name is letters, digits, '_' and '.'")
    sec.done()
    return tracing, fields


def _resolve(base_dir: str, p: str) -> str:
    return p if os.path.isabs(p) else os.path.join(base_dir, p)


def _gateway(sec: Section | None, base_dir: str) -> GatewayConfig:
    g = GatewayConfig()
    if sec is None:
        return g
    g.workers = sec.int("workers", 1, min=0, max=256)
    admin = sec.str("admin", "127.0.0.1:15000")
    if admin in ("", "off"):
        g.admin = None
    elif isinstance(admin, str):
        g.admin = sec.convert("admin", admin, parse_address)
    g.access_log = sec.str("access_log", "stdout")
    if isinstance(g.access_log, str) and g.access_log not in ("stdout", "stderr", "off", "", "none"):
        g.access_log = _resolve(base_dir, g.access_log)
        folder = os.path.dirname(g.access_log)
        if not os.path.isdir(folder):
            sec.error("access_log", f"folder does not exist: {folder}")
    g.drain_timeout = sec.duration("drain_timeout", 10.0)
    g.idle_timeout = sec.duration("idle_timeout", 60.0)
    g.first_byte_timeout = sec.duration("first_byte_timeout", 10.0)
    g.handshake_timeout = sec.duration("handshake_timeout", 10.0)
    g.max_header_bytes = sec.int("max_header_bytes", 65536, min=1024, max=1 << 20)
    g.max_headers = sec.int("max_headers", 100, min=8, max=1000)
    g.max_concurrent_streams = sec.int("max_concurrent_streams", 100, min=1, max=10000)
    g.max_request_body = sec.int("max_request_body", 100 * 1024 * 1024, min=0)
    g.header_timeout = sec.duration("header_timeout", 10.0)
    g.stream_idle_timeout = sec.duration("stream_idle_timeout", 300.0)
    g.normalize_path = sec.bool("normalize_path", True)
    g.merge_slashes = sec.bool("merge_slashes", True)
    g.headers_with_underscores = sec.str("headers_with_underscores", "drop")
    if g.headers_with_underscores not in ("drop", "reject", "allow"):
        sec.error("headers_with_underscores", "must be one of: drop, reject, allow")
    g.rate_limit_buckets = sec.int("rate_limit_buckets", 65536, min=64, max=1 << 24)
    if g.rate_limit_buckets & (g.rate_limit_buckets - 1):
        sec.error("rate_limit_buckets", "must be a power of two")
        g.rate_limit_buckets = 65536
    sec.done()
    return g


def _listeners(secs: list[Section], problems: Problems, base_dir: str) -> list[ListenerConfig]:
    out: list[ListenerConfig] = []
    seen: set[str] = set()
    if not secs:
        problems.add("listener", "at least one [[listener]] is required")
    for i, sec in enumerate(secs):
        name = sec.str("name", f"listener{i}")
        bind = sec.str("bind")
        addr = sec.convert("bind", bind, parse_address) if isinstance(bind, str) else None
        tls = None
        tsec = sec.section("tls")
        if tsec is not None:
            cert, key = tsec.str("cert_file"), tsec.str("key_file")
            tsec.done()
            if isinstance(cert, str) and isinstance(key, str):
                cert, key = _resolve(base_dir, cert), _resolve(base_dir, key)
                if tsec.convert("cert_file", (cert, key), _check_keypair) is not None:
                    tls = TlsConfig(cert, key)
        sec.done()
        if name in seen:
            sec.error("name", f"duplicate listener name {name!r}")
        seen.add(name)
        if addr:
            out.append(ListenerConfig(name, addr[0], addr[1], tls))
    return out


def _check_keypair(paths: tuple[str, str]) -> bool:
    import ssl
    cert, key = paths
    for p in paths:
        if not os.path.isfile(p):
            raise ValueError(f"file not found: {p}")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"cannot load the certificate and key ({cert}, {key}): {exc}") from None
    return True


def _backends(sec: Section | None) -> dict[str, BackendConfig]:
    out: dict[str, BackendConfig] = {}
    if sec is None:
        return out
    for name in sec.keys():
        bsec = sec.section(name)
        assert bsec is not None
        btype = bsec.str("type")
        if isinstance(btype, str):
            out[name] = BackendConfig(name, btype, bsec)
    return out


def _routes(secs: list[Section], listeners: list[ListenerConfig], backends: dict[str, BackendConfig],
            problems: Problems) -> list[RouteConfig]:
    from agproxy.proxy.registry import policy_keys

    known_policies = policy_keys()
    out: list[RouteConfig] = []
    listener_names = [l.name for l in listeners]
    for i, sec in enumerate(secs):
        name = sec.str("name", f"route{i}")
        listener = sec.str("listener", None)
        if listener is not None and listeners and listener not in listener_names:
            sec.error("listener", f"unknown listener {listener!r}" + did_you_mean(listener, listener_names))
        backend = sec.str("backend")
        if isinstance(backend, str) and backend not in backends:
            sec.error("backend", f"unknown backend {backend!r}" + did_you_mean(backend, backends))
        timeout = sec.duration("timeout", 60.0)
        match: dict[str, Any] = {}
        msec = sec.section("match")
        if msec is not None:
            for key in ("path", "path_prefix", "path_regex", "host"):
                v = msec.str(key, None)
                if v is not None:
                    match[key] = v
            if "path_regex" in match:
                import re
                msec.convert("path_regex", match["path_regex"], re.compile)
            for key in ("path", "path_prefix"):
                if key in match and not match[key].startswith("/"):
                    msec.error(key, "must start with '/'")
            methods = msec.str_list("methods", None)
            if methods:
                match["methods"] = methods
            headers = msec.str_map("headers", None)
            if headers:
                match["headers"] = headers
            msec.done()
        policies = {}
        for key in sec.keys():
            if key in ROUTE_KEYS:
                continue
            if key in known_policies:
                policies[key] = sec.section(key)
        sec.done(allowed_extra=known_policies)
        if isinstance(backend, str):
            out.append(RouteConfig(name, i, sec.path, listener, match, backend,
                                   60.0 if timeout is None else timeout, policies))
    names = [r.name for r in out]
    for r in out:
        if names.count(r.name) > 1:
            problems.add(f"{r.path}.name", f"duplicate route name {r.name!r}")
    return out
