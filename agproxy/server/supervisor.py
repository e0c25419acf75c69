"""Several worker processes sharing each port (SO_REUSEPORT), one supervisor.

Theory of operation: the supervisor forks `workers` children; each builds its own
runtime and binds every listener with SO_REUSEPORT, so the kernel spreads
connections across them. Children report readiness over a pipe. The supervisor
serves the admin port itself: /readyz is ready once every child is, /metrics
aggregates the children through prometheus-client's multiprocess files, /config
shows the supervisor's own (identically loaded) snapshot. SIGHUP validates the
file in the supervisor first and only then forwards it; SIGTERM is forwarded and
the supervisor waits for the children to drain; SIGUSR1 (reopen the access log) is
forwarded. A child that dies unexpectedly
is restarted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Callable

from agproxy.config.reader import ConfigError

log = logging.getLogger("agproxy.server")


class Supervisor:
    def __init__(self, config_path: str, workers: int, metrics, load: Callable, run_child: Callable):
        """`load()` builds a snapshot (ConfigError when invalid); `run_child(index, on_ready)`
        serves as worker `index` in a forked child and returns its exit code."""
        self.config_path = config_path
        self.load = load
        self.run_child = run_child
        self.n = workers
        self.metrics = metrics
        self.children: dict[int, int] = {}    # pid -> index
        self.ready: set[int] = set()
        self.runtime = None
        self.stopping = False

    def spawn(self, index: int) -> None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:   # child
            os.close(r)
            code = 1
            asyncio.events._set_running_loop(None)   # the parent's loop is not ours
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1):
                signal.signal(sig, signal.SIG_DFL)
            try:
                def ready() -> None:
                    os.write(w, b"r")
                    os.close(w)
                code = self.run_child(index, ready)
            except BaseException:
                logging.getLogger("agproxy.server").exception("worker %d failed", index)
            finally:
                os._exit(code)
        os.close(w)
        self.children[pid] = index
        loop = asyncio.get_running_loop()

        def on_ready() -> None:
            try:
                data = os.read(r, 1)
            except OSError:
                data = b""
            loop.remove_reader(r)
            os.close(r)
            if data:
                self.ready.add(pid)
        loop.add_reader(r, on_ready)

    def not_ready(self) -> list[str]:
        if self.stopping:
            return ["draining"]
        missing = self.n - len(self.ready & set(self.children))
        reasons = [f"{missing} of {self.n} workers not ready"] if missing else []
        if self.runtime is not None:
            reasons += self.runtime.not_ready()
        return reasons

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        self.runtime = self.load()
        for i in range(self.n):
            self.spawn(i)
        admin_listener = None
        if self.runtime.gateway.admin is not None:
            from agproxy.admin import Admin
            from agproxy.config.model import ListenerConfig
            from agproxy.server.listener import ConnectionTracker, Listener
            host, port = self.runtime.gateway.admin
            admin = Admin(lambda: self.runtime, self.metrics, self.not_ready)
            admin_listener = Listener(ListenerConfig("admin", host, port), self.runtime.gateway,
                                      admin.handle, ConnectionTracker(), shared=False)
            admin_listener.start()
        done = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, self._stop, done)
        loop.add_signal_handler(signal.SIGINT, self._stop, done)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        loop.add_signal_handler(signal.SIGUSR1, self._forward, signal.SIGUSR1)
        loop.add_signal_handler(signal.SIGCHLD, self._reap, done)
        await done.wait()
        if admin_listener is not None:
            admin_listener.stop_accepting()
        return 0

    def _stop(self, done: asyncio.Event) -> None:
        self.stopping = True
        for pid in list(self.children):
            _kill(pid, signal.SIGTERM)
        if not self.children:
            done.set()

    def _reload(self) -> None:
        try:
            new = self.load()
        except ConfigError as exc:
            log.error("reload of %s rejected, keeping the running config:\n%s", self.config_path, exc)
            return
        self.runtime = new
        for pid in list(self.children):
            _kill(pid, signal.SIGHUP)

    def _forward(self, sig: int) -> None:
        for pid in list(self.children):
            _kill(pid, sig)

    def _reap(self, done: asyncio.Event) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            index = self.children.pop(pid, None)
            self.ready.discard(pid)
            if index is None:
                continue
            if not self.stopping:
                log.error("worker %d (pid %d) exited with status %d; restarting", index, pid, status)
                self.spawn(index)
        if self.stopping and not self.children:
            done.set()


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def run_supervisor(supervisor: Supervisor) -> int:
    # The stdlib loop, not uvloop: uvloop reserves SIGCHLD, and the supervisor is off the hot path.
    return asyncio.run(supervisor.main())
