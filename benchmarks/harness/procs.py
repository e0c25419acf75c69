"""Child processes: start pinned to a core, wait until they serve, stop them all.

Every child runs under ``taskset -c CORE`` in its own session (process group),
so stopping it stops whatever it forked (nginx workers, haproxy threads, agproxy
workers). The Supervisor remembers every child it started; ``stop_all`` is
called from a ``finally`` in run.py and from ``atexit``, so nothing outlives
the benchmark, even on Ctrl-C or an exception.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import os
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Child:
    name: str
    popen: subprocess.Popen
    log_path: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])


class Supervisor:
    """Owns every process the benchmark starts."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.children: list[Child] = []
        atexit.register(self.stop_all)

    def start(self, name: str, argv: list[str], core: int, env: dict | None = None) -> Child:
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                ["taskset", "-c", str(core), *argv],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env=env, cwd=self.workdir,
            )
        child = Child(name, popen, log_path)
        self.children.append(child)
        return child

    def run(self, name: str, argv: list[str], core: int, timeout: float) -> tuple[int, str]:
        """Run a command to completion (bounded by timeout); return (exit code, output)."""
        child = self.start(name, argv, core)
        try:
            code = child.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(child)
            return -1, child.log_path.read_text(errors="replace") + f"\n[timed out after {timeout:.0f}s]"
        self.children.remove(child)  # on Ctrl-C it stays listed, for stop_all
        output = child.log_path.read_text(errors="replace")
        child.log_path.unlink(missing_ok=True)
        return code, output

    def stop(self, child: Child, grace: float = 5.0) -> None:
        _signal_group(child.popen, signal.SIGTERM)
        try:
            child.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_group(child.popen, signal.SIGKILL)
            child.popen.wait(timeout=grace)
        _signal_group(child.popen, signal.SIGKILL)  # stragglers left in the group
        if child in self.children:
            self.children.remove(child)

    def stop_all(self) -> None:
        for child in list(reversed(self.children)):
            with contextlib.suppress(Exception):  # best effort, at exit
                self.stop(child)


def _signal_group(popen: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, sig)


def raise_on_termination_signals() -> None:
    """SIGINT → KeyboardInterrupt (even when started in the background, where it
    is inherited as ignored); SIGTERM/SIGHUP → SystemExit: ``finally`` blocks run."""
    def handler(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (all held open until all are chosen)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def http_get(url: str, headers: dict | None = None, timeout: float = 2.0) -> tuple[int, bytes]:
    """One HTTP/1.1 GET (TLS not verified); returns (status, body)."""
    scheme, rest = url.split("://", 1)
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    if scheme == "https":
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection(host, int(port), timeout=timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", "/" + path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_ready(child: Child, url: str, timeout: float) -> str | None:
    """Poll url until it answers 200. Returns None when ready, else why not."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not child.alive():
            return f"exited with code {child.popen.returncode}"
        try:
            status, _ = http_get(url, timeout=1.0)
            if status == 200:
                return None
            last = f"HTTP {status}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.2)
    return f"not ready after {timeout:.0f}s ({last})"
