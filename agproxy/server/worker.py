"""One serving process: an event loop with its listeners, pool, runtime and signals.

Theory of operation: `Worker.main()` builds the pool and telemetry, binds every
listener (SO_REUSEPORT, so sibling workers share ports), starts the runtime's
background tasks, and then waits for a signal. SIGHUP reloads: the file is
loaded and built in full first; on any error the running snapshot stays and the
error is logged. A new snapshot serves new requests at once; requests in flight
finish on the old one. SIGTERM/SIGINT drain: stop accepting, tell every
connection to finish what it has (HTTP/2 GOAWAY; HTTP/1.1 closes after the
current response), and exit when all are gone or `drain_timeout` has passed.
SIGUSR1 reopens a file access log (rotation).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from typing import Callable

from agproxy.admin import Admin
from agproxy.config.reader import ConfigError
from agproxy.server.listener import ConnectionTracker, Listener
from agproxy.telemetry.access_log import AccessLog
from agproxy.upstream.pool import Pool, set_pool

log = logging.getLogger("agproxy.server")


class Worker:
    """`load(pool)` builds a runtime snapshot from the config file (raising ConfigError);
    `make_gateway(runtime, access_log)` returns the request handler, an object with
    `.handle(stream)` and a swappable `.runtime`. Both come from agproxy.app, which
    wires the layers above this one (proxy/, filters/, backends/) in."""

    def __init__(self, config_path: str, metrics, load: Callable, make_gateway: Callable, *,
                 serve_admin: bool = True, index: int = 0, on_ready: Callable[[], None] | None = None):
        self.config_path = config_path
        self.load = load
        self.make_gateway = make_gateway
        self.metrics = metrics
        self.serve_admin = serve_admin
        self.index = index
        self.on_ready = on_ready
        self.runtime = None
        self.gateway = None
        self.listeners: list[Listener] = []
        self.admin_listener: Listener | None = None
        self.tracker = ConnectionTracker()
        self.admin_tracker = ConnectionTracker()   # its own: not counted as client traffic, not drained
        self.ready = False
        self._stop: asyncio.Event | None = None
        self._draining = False

    # -- lifecycle ----------------------------------------------------------------------
    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.pool = Pool(metrics=self.metrics)
        set_pool(self.pool)
        runtime = self.load(self.pool)
        self.runtime = runtime
        access_log = AccessLog(runtime.gateway.access_log)
        self.gateway = self.make_gateway(runtime, access_log)
        await runtime.start()   # background work (credentials, JWKS) begins before traffic does
        for lcfg in runtime.listeners:
            gauge = self.metrics.active.labels(lcfg.name) if self.metrics is not None else None
            lst = Listener(lcfg, runtime.gateway, self.gateway.handle, self.tracker.view(gauge))
            lst.start()
            self.listeners.append(lst)
        if self.serve_admin and runtime.gateway.admin is not None:
            self.start_admin(runtime)
        for sig, fn in ((signal.SIGTERM, self.request_stop), (signal.SIGINT, self.request_stop),
                        (signal.SIGHUP, self.request_reload), (signal.SIGUSR1, access_log.reopen)):
            loop.add_signal_handler(sig, fn)
        self.ready = True
        settle_heap()
        self._schedule_sweep()
        log.info("worker %d serving %s", self.index,
                 ", ".join(f"{l.name}={l.cfg.host}:{l.port}{' (tls+plaintext)' if l.ssl else ''}" for l in self.listeners))
        if self.on_ready is not None:
            self.on_ready()
        await self._stop.wait()
        await self._drain(runtime.gateway.drain_timeout)
        access_log.close()
        await self.pool.close()
        if self.runtime is not None:
            await self.runtime.stop()
        return 0

    def start_admin(self, runtime) -> None:
        from agproxy.config.model import ListenerConfig
        host, port = runtime.gateway.admin  # type: ignore[misc]
        admin = Admin(lambda: self.runtime, self.metrics, self.not_ready)
        self.admin_listener = Listener(ListenerConfig("admin", host, port), runtime.gateway,
                                       admin.handle, self.admin_tracker, shared=False)
        self.admin_listener.start()

    def not_ready(self) -> list[str]:
        if not self.ready or self.runtime is None:
            return ["starting"]
        if self._draining:
            return ["draining"]
        return self.runtime.not_ready()

    def request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def request_reload(self) -> None:
        asyncio.get_running_loop().create_task(self.reload())

    async def reload(self) -> bool:
        try:
            new = self.load(self.pool)
        except ConfigError as exc:
            log.error("reload of %s rejected, keeping the running config:\n%s", self.config_path, exc)
            self._count_reload("rejected")
            return False
        except Exception as exc:
            log.exception("reload of %s failed, keeping the running config: %s", self.config_path, exc)
            self._count_reload("rejected")
            return False
        old_listeners = [(l.name, l.host, l.port, bool(l.tls)) for l in self.runtime.listeners]
        new_listeners = [(l.name, l.host, l.port, bool(l.tls)) for l in new.listeners]
        if old_listeners != new_listeners:
            log.warning("reload: listener changes take effect only after a restart")
        await new.start()
        old, self.runtime = self.runtime, new
        self.gateway.runtime = new
        log.info("configuration reloaded from %s", self.config_path)
        self._count_reload("ok")
        if old is not None:
            asyncio.get_running_loop().create_task(old.stop())
        return True

    def _count_reload(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.config_reloads.labels(result).inc()

    async def _drain(self, timeout: float) -> None:
        self._draining = True
        for lst in self.listeners:
            lst.stop_accepting()
        for conn in list(self.tracker.conns):
            conn.shutdown()
        deadline = time.monotonic() + timeout
        while self.tracker.conns and time.monotonic() < deadline:
            waiter = asyncio.get_running_loop().create_future()
            self.tracker.on_empty = waiter
            try:
                await asyncio.wait_for(waiter, max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                break
        for conn in list(self.tracker.conns):
            conn.close(abort=True)
        if self.admin_listener is not None:
            self.admin_listener.stop_accepting()

    def _schedule_sweep(self) -> None:
        """One periodic pass over the client connections (`sweep_connections`). A
        timestamp per connection and this sweep replace a timer per request; deadlines
        fire at most about two sweep intervals late."""
        loop = asyncio.get_running_loop()

        def sweep() -> None:
            gateway = self.runtime.gateway
            now = time.monotonic()
            sweep_connections(self.tracker.conns, gateway.idle_timeout, now)
            # The admin port (metrics, /config; bound to the pod network by the sidecar
            # example) gets the same idle and head deadlines as the data ports.
            sweep_connections(self.admin_tracker.conns, gateway.idle_timeout, now)
            loop.call_later(sweep_interval(gateway), sweep)

        loop.call_later(sweep_interval(self.runtime.gateway), sweep)


def sweep_connections(conns, idle_timeout: float, now: float) -> None:
    """Idle connections are shut down; every other one checks its own deadlines
    (`check_deadlines(now)`: HTTP/1.1's head and no-progress deadlines, HTTP/2's
    header-block and per-stream no-progress deadlines). An idle_timeout of 0 is no limit."""
    cutoff = now - idle_timeout if idle_timeout and idle_timeout > 0 else None
    for conn in list(conns):
        if cutoff is not None and conn.idle and conn.last_activity < cutoff:
            conn.shutdown()
            continue
        check = getattr(conn, "check_deadlines", None)
        if check is not None:
            check(now)


def sweep_interval(gateway) -> float:
    """Fine enough for the shortest timeout (an eighth of it), 50 ms to 5 s; 0 is no limit."""
    candidates = [t for t in (gateway.idle_timeout / 4, gateway.header_timeout / 8,
                              gateway.stream_idle_timeout / 8) if t > 0]
    return max(0.05, min(candidates + [5.0]))


#: Cyclic-GC thresholds of a serving process (gen0 allocations, gen1, gen2 runs).
#: With 160 HTTP/2 streams in flight, the defaults (700, 10, 10) had the collector
#: walk the in-flight objects over and over: ~10% of an HTTP/2 request (callgrind,
#: 320k -> 288k instructions; HTTP/1.1 unchanged). Requests leave no reference
#: cycles (tests/unit/test_no_cycles.py), so rarer runs only delay freeing the
#: occasional cycle (an exception's traceback, a cancelled task).
GC_THRESHOLDS = (20_000, 50, 100)


def settle_heap() -> None:
    """Once serving: collect, then move what startup built (modules, the config, its
    compiled expressions) out of the collector's view (gc.freeze), and space runs out."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run_worker(worker: Worker) -> int:
    import uvloop
    return uvloop.run(worker.main())
