"""`agproxy run | validate | version`: the command line.

Exit codes: 0 fine; 1 the configuration is invalid (every problem is printed with
its TOML path) or an address it binds is already in use; 2 usage errors.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

from agproxy import __version__


class _JsonFormatter(logging.Formatter):
    """One JSON object per line on stderr (the access log is separate, see telemetry/).
    Credential-shaped text (Bearer tokens, URL userinfo, key formats) is redacted from
    the message and the traceback, whoever wrote the line."""

    def format(self, record: logging.LogRecord) -> str:
        import orjson

        from agproxy.telemetry.redact import redact_text
        out = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
               "message": redact_text(record.getMessage())}
        if record.exc_info:
            out["exception"] = redact_text(self.formatException(record.exc_info))
        return orjson.dumps(out).decode()


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])


def cmd_validate(path: str) -> int:
    from agproxy.config.reader import ConfigError
    from agproxy.proxy.build import load_runtime
    try:
        load_runtime(path)
    except ConfigError as exc:
        print(f"{path}: invalid configuration ({len(exc.problems)} problem{'s' if len(exc.problems) != 1 else ''}):",
              file=sys.stderr)
        for p in exc.problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print(f"{path}: ok")
    return 0


def cmd_run(path: str, workers_override: int | None) -> int:
    from agproxy.config.model import load_file
    from agproxy.config.reader import ConfigError
    try:
        cfg = load_file(path)
        workers = workers_override if workers_override is not None else cfg.gateway.workers
        if workers == 0:
            workers = os.cpu_count() or 1
        if workers > 1:
            # Before prometheus_client is imported: its value class is chosen at import.
            os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="agproxy-metrics-"))
        from agproxy.proxy.build import build_runtime
        prefix = "agproxy"
        if cfg.telemetry is not None:
            prefix = cfg.telemetry.data.get("metrics_prefix", prefix)
        build_runtime(cfg)   # validate everything before binding anything
    except ConfigError as exc:
        print(f"{path}: invalid configuration:", file=sys.stderr)
        for p in exc.problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    from agproxy.server.listener import AddressInUse, check_free
    try:
        # Before any worker binds (with SO_REUSEPORT, which would share the port silently).
        for lst in cfg.listeners:
            check_free(lst.host, lst.port, f"listener {lst.name}")
        if cfg.gateway.admin is not None:
            check_free(cfg.gateway.admin[0], cfg.gateway.admin[1], "admin")
    except AddressInUse as exc:
        print(f"agproxy: cannot start: {exc}", file=sys.stderr)
        return 1
    from agproxy.telemetry.metrics import Metrics
    metrics = Metrics(prefix)
    from agproxy.app import serve
    return serve(path, workers, metrics)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agproxy", description="A gateway for AI agent traffic.")
    parser.add_argument("--log-level", default=os.environ.get("AGPROXY_LOG_LEVEL", "info"))
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="serve with a configuration file")
    run.add_argument("--config", "-c", required=True)
    run.add_argument("--workers", type=int, default=None, help="override [gateway].workers")
    val = sub.add_parser("validate", help="check a configuration file and exit")
    val.add_argument("config")
    sub.add_parser("version", help="print the version")
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    if args.cmd == "version":
        print(f"agproxy {__version__}")
        return 0
    if args.cmd == "validate":
        return cmd_validate(args.config)
    return cmd_run(args.config, args.workers)


if __name__ == "__main__":
    sys.exit(main())
