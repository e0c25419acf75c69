"""The admin port (health, /metrics, /config) has the data ports' deadlines: a head that
never ends gets 408 after `header_timeout`, an idle keep-alive connection is closed after
`idle_timeout`. conf/sidecar.toml binds it on 0.0.0.0, so a slowloris client on the pod
network must not be able to hold its connections open forever.

Raw sockets on 127.0.0.1 against the agproxy binary; the waits are the gateway's own
deadlines, bounded by socket timeouts."""

from __future__ import annotations

import socket
import time

from tests.support.gateway import GatewayProcess

CONFIG = """
[gateway]
admin = "127.0.0.1:{admin_port}"
header_timeout = "1s"
idle_timeout = "2s"

[[route]]
name = "all"
match = { path = "/" }
backend = "canned"

[backend.canned]
type = "static"
status = 200
body = "ok"
"""


def admin_socket(gw: GatewayProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gw.admin_port), timeout=10)


def read_until_close(s: socket.socket, timeout: float) -> bytes:
    s.settimeout(timeout)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    return data


def test_admin_head_that_never_ends_gets_408(tmp_path):
    gw = GatewayProcess(CONFIG, tmp_path)
    try:
        with admin_socket(gw) as s:
            start = time.monotonic()
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: aaaa")   # never finished
            answer = read_until_close(s, timeout=8)
            elapsed = time.monotonic() - start
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert elapsed < 6, elapsed
        # The port still serves well-behaved clients.
        status, body = gw.admin_get("/healthz")
        assert (status, body) == (200, b"ok\n")
    finally:
        gw.stop()


def test_idle_admin_keep_alive_connection_is_closed(tmp_path):
    gw = GatewayProcess(CONFIG, tmp_path)
    try:
        with admin_socket(gw) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            s.settimeout(5)
            first = s.recv(65536)
            assert first.startswith(b"HTTP/1.1 200"), first
            start = time.monotonic()
            rest = read_until_close(s, timeout=10)
            elapsed = time.monotonic() - start
        assert rest == b"", rest
        assert elapsed < 8, elapsed    # idle_timeout 2s plus the sweep's slack, not the 10s bound
    finally:
        gw.stop()
