"""The composition root: wires config, proxy and server together for `agproxy run`.

Lower layers never import the ones above them (DESIGN.md); this module sits above
all of them and hands the server the two things it needs from the proxy layer: a
way to build a runtime snapshot from the config file, and the request handler.
"""

from __future__ import annotations

from agproxy.proxy.build import load_runtime
from agproxy.proxy.exchange import Gateway
from agproxy.server.supervisor import Supervisor, run_supervisor
from agproxy.server.worker import Worker, run_worker


def serve(config_path: str, workers: int, metrics) -> int:
    """Serve until SIGTERM; one process, or a supervisor with `workers` children."""

    def make_worker(index: int = 0, *, serve_admin: bool = True, on_ready=None) -> Worker:
        return Worker(config_path, metrics,
                      load=lambda pool: load_runtime(config_path, pool, metrics),
                      make_gateway=lambda runtime, access_log: Gateway(runtime, metrics, access_log),
                      serve_admin=serve_admin, index=index, on_ready=on_ready)

    if workers == 1:
        return run_worker(make_worker())
    # Before the fork: the local rate limits' buckets live in memory every worker shares
    # (filters/rate_limit/buckets.py); a table created later would be one worker's own.
    from agproxy.config.model import load_file
    from agproxy.filters.rate_limit.buckets import shared_table
    shared_table(load_file(config_path).gateway.rate_limit_buckets)
    from agproxy.mcp.session import process_key
    process_key()       # the MCP session binding key, the same in every worker
    supervisor = Supervisor(
        config_path, workers, metrics,
        load=lambda: load_runtime(config_path),
        run_child=lambda index, on_ready: run_worker(make_worker(index, serve_admin=False, on_ready=on_ready)))
    return run_supervisor(supervisor)
