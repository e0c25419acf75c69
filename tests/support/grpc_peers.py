"""Real gRPC peers for tests: grpcio servers on Envoy's protos, and the faults around them.

- `GrpcPeer`: a grpcio server on 127.0.0.1 (ephemeral port, or a given one to come
  back on) running servicers in a thread pool, in this process. `AuthorizationPeer`
  is an `envoy.service.auth.v3.Authorization` servicer whose answer is a function
  of the request (`handler`), that records each call (request, metadata, the
  deadline the server saw, whether the call was cancelled) under a Condition so
  tests wait for events, never for time; `hold()` makes calls block until
  `release()` (a deadline test: the server is still "working" when the client
  gives up).
- `GrpcPeerProcess`: the same Authorization server in a child process
  (`python -m tests.support.grpc_peers PORT`), for a server that dies mid-call:
  `kill()` is SIGKILL, no goodbye on the wire. A Check for path `/hang` prints
  `hang` and blocks; the parent waits for that line.
- `RawPeer`: a TCP listener that is not gRPC at all: it answers each connection
  with fixed bytes (an HTTP/1.1 response, random bytes) or with nothing (accepts
  and stays silent) and counts connections.

Reuse these for ext_authz and the rate-limit service (add a servicer beside
AuthorizationPeer); keep them strict: they record what arrived, byte for byte.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from concurrent import futures
from typing import Callable

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2, status_pb2

CheckRequest = external_auth_pb2.CheckRequest
CheckResponse = external_auth_pb2.CheckResponse
CHECK = "/envoy.service.auth.v3.Authorization/Check"


def allow(request, context) -> CheckResponse:
    return CheckResponse(status=status_pb2.Status(code=code_pb2.OK))


def deny(request, context) -> CheckResponse:
    return CheckResponse(status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED))


class Call:
    """What the server saw of one call. `ended` turns true when grpcio reports the RPC
    over: while the handler is still held, that means the client gave up (deadline,
    cancel, connection gone) before any answer."""

    def __init__(self, request, metadata: list[tuple[str, str | bytes]], time_remaining: float | None):
        self.request = request
        self.metadata = metadata
        self.time_remaining = time_remaining
        self.ended = False
        self.ended_before_answer = False


class HoldablePeer:
    """The test side of a servicer: `hold()` makes calls wait (bounded) until `release()`;
    `wait_for(predicate)` waits on `cond`, which the servicer notifies on every call."""

    what = "the gRPC peer"

    def _init_hold(self) -> None:
        self.cond = threading.Condition()
        self._held = False
        self._release = threading.Event()

    def hold(self) -> None:
        self._held = True
        self._release.clear()

    def release(self) -> None:
        self._held = False
        self._release.set()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, timeout):
                raise AssertionError(f"{self.what} did not reach the expected state in time")


class AuthorizationPeer(HoldablePeer, external_auth_pb2_grpc.AuthorizationServicer):
    def __init__(self, handler: Callable = allow):
        self.handler = handler
        self.calls: list[Call] = []
        self._init_hold()

    # -- servicer -------------------------------------------------------------------
    def Check(self, request, context):
        call = Call(request, list(context.invocation_metadata()), context.time_remaining())
        answered = False

        def on_end():
            with self.cond:
                call.ended = True
                call.ended_before_answer = not answered
                self.cond.notify_all()

        context.add_callback(on_end)
        with self.cond:
            self.calls.append(call)
            self.cond.notify_all()
        if self._held:
            self._release.wait(30)     # bounded: a test that forgets release() still ends
        response = self.handler(request, context)
        answered = True
        return response



class GrpcPeer:
    """A grpcio server on 127.0.0.1, in this process."""

    def __init__(self, *servicers: tuple[Callable, object], port: int = 0, workers: int = 8,
                 tls: dict | None = None):
        self.servicers = servicers
        self.workers = workers
        self.port = port
        self.tls = tls                 # {"cert": path, "key": path} (tests/support/certs.py)
        self.server: grpc.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "GrpcPeer":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.workers),
                             options=[("grpc.so_reuseport", 0)])
        for add, servicer in self.servicers:
            add(servicer, server)
        if self.tls is None:
            port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        else:
            with open(self.tls["key"], "rb") as k, open(self.tls["cert"], "rb") as c:
                creds = grpc.ssl_server_credentials([(k.read(), c.read())])
            port = server.add_secure_port(f"127.0.0.1:{self.port}", creds)
        if port == 0:
            raise RuntimeError(f"gRPC peer could not bind 127.0.0.1:{self.port}")
        self.port = port
        server.start()
        self.server = server
        return self

    def stop(self, grace: float | None = None) -> None:
        if self.server is not None:
            self.server.stop(grace).wait(10)
            self.server = None

    def __enter__(self) -> "GrpcPeer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def authorization_peer(handler: Callable = allow, port: int = 0,
                       tls: dict | None = None) -> tuple[GrpcPeer, AuthorizationPeer]:
    servicer = AuthorizationPeer(handler)
    return GrpcPeer((external_auth_pb2_grpc.add_AuthorizationServicer_to_server, servicer), port=port,
                    tls=tls), servicer


class GrpcPeerProcess:
    """The Authorization server in a child process, to be killed mid-call."""

    def __init__(self, port: int):
        self.port = port
        self.proc: subprocess.Popen | None = None
        self._lines: list[str] = []
        self._cond = threading.Condition()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "GrpcPeerProcess":
        with self._cond:
            self._lines = []
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.support.grpc_peers", str(self.port)],
                                     cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_line("ready")
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self._lines.append(line.strip())
                self._cond.notify_all()

    def wait_line(self, text: str, timeout: float = 20.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: text in self._lines, timeout):
                raise AssertionError(f"gRPC peer process did not print {text!r} (got {self._lines})")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        self.kill()
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.stdout.close()
            self.proc = None


class RawPeer:
    """A TCP listener that speaks no gRPC: `reply` bytes per connection (None: silence)."""

    def __init__(self, reply: bytes | None):
        self.reply = reply
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.received = bytearray()
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "RawPeer":
        self.sock.settimeout(0.2)
        self.thread.start()
        return self

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._conns.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            data = conn.recv(65536)
            with self._lock:
                self.received += data
            if self.reply is not None:
                conn.sendall(self.reply)
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(65536):    # until the client closes (bounded by the timeout)
                    pass
            else:
                while not self._stop.is_set() and conn.recv(65536):
                    pass
        except OSError:
            pass
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()
        with self._lock:
            for c in self._conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.thread.join(5)

    def __enter__(self) -> "RawPeer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _child_main(port: int) -> None:
    """The child of GrpcPeerProcess: serve until killed or until stdin closes."""
    hang = threading.Event()

    def handler(request, context):
        if request.attributes.request.http.path == "/hang":
            print("hang", flush=True)
            hang.wait(60)
        return allow(request, context)

    peer, _ = authorization_peer(handler, port=port)
    peer.start()
    print("ready", flush=True)
    sys.stdin.read()           # the parent went away or closed our stdin: exit
    peer.stop(0)


if __name__ == "__main__":
    _child_main(int(sys.argv[1]))
