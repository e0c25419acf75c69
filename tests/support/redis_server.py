"""A real redis-server for tests (the Debian package `./dev setup` installs), and fake
Redis peers that misbehave.

`RedisServer(tmp_path, port=None, unix=False, password=None, tls=None)` starts
`redis-server` with no persistence on a free port (or a unix socket), as root
without systemd, and waits until it answers PING (a readiness condition, polled,
with a deadline). `stop()` ends it; `start()` again on the same port (a Redis
that died and came back). `cli(*args)` runs a command with redis-cli.

`SilentPeer` accepts connections and never answers; `GarbagePeer` answers every
read with bytes that are not RESP.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

from tests.support.ports import free_port


def redis_server_binary() -> str:
    path = shutil.which("redis-server")
    assert path, "redis-server is not installed (./dev setup installs the Debian package)"
    return path


class RedisServer:
    def __init__(self, tmp_path: Path, *, port: int | None = None, unix: bool = False,
                 password: str | None = None, tls: dict | None = None, name: str = "redis"):
        self.dir = Path(tmp_path) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.unix = unix
        self.socket_path = str(self.dir / "redis.sock") if unix else None
        self.port = 0 if unix else (port or free_port())
        self.password = password
        self.tls = tls
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def address(self) -> str:
        if self.unix:
            return f"unix://{self.socket_path}"
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        argv = [redis_server_binary(), "--save", "", "--appendonly", "no", "--daemonize", "no",
                "--dir", str(self.dir), "--bind", "127.0.0.1", "--protected-mode", "no",
                "--logfile", str(self.dir / "redis.log")]
        if self.unix:
            argv += ["--port", "0", "--unixsocket", self.socket_path, "--unixsocketperm", "700"]
        elif self.tls:
            argv += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.tls["cert"],
                     "--tls-key-file", self.tls["key"], "--tls-auth-clients", "no"]
        else:
            argv += ["--port", str(self.port)]
        if self.password:
            argv += ["--requirepass", self.password]
        return argv

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(self.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {self.log()}")
            try:
                if self.cli("PING").strip() in ("PONG", "NOAUTH Authentication required."):
                    return
            except subprocess.SubprocessError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server not answering after {timeout}s: {self.log()}")
            time.sleep(0.02)     # polling a readiness condition

    def cli(self, *args: str) -> str:
        argv = ["redis-cli"]
        if self.unix:
            argv += ["-s", self.socket_path]
        else:
            argv += ["-h", "127.0.0.1", "-p", str(self.port)]
            if self.tls:
                argv += ["--tls", "--cacert", self.tls["ca"]]
        if self.password:
            argv += ["--no-auth-warning", "-a", self.password]
        return subprocess.run(argv + list(args), capture_output=True, text=True, timeout=5).stdout

    def log(self) -> str:
        p = self.dir / "redis.log"
        return p.read_text(errors="replace")[-2000:] if p.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class _Peer:
    """A TCP listener on 127.0.0.1 whose connections `serve(conn)` handles, one thread each."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.address = f"redis://127.0.0.1:{self.port}"
        self.connections = 0
        self.conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self.conns.append(conn)
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn: socket.socket) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def close(self) -> None:
        self._stop.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)
        with self._lock:
            for c in self.conns:
                try:
                    c.close()
                except OSError:
                    pass


class SilentPeer(_Peer):
    """Accepts, reads, never answers."""

    def serve(self, conn: socket.socket) -> None:
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass


class GarbagePeer(_Peer):
    """Answers every read with bytes that are not RESP."""

    def serve(self, conn: socket.socket) -> None:
        try:
            while conn.recv(65536):
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        except OSError:
            pass
