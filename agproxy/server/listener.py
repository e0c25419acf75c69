"""Accept connections and decide, per connection, TLS or plaintext, HTTP/1.1 or HTTP/2.

Theory of operation: a listening socket with SO_REUSEPORT (so worker processes
share the port) is watched with `add_reader`. Without TLS, accepted sockets go
straight to the HTTP/1.1 adapter (which itself switches to HTTP/2 on the client
preface). With TLS configured, each accepted socket waits (first_byte_timeout)
until it is readable, and one byte is peeked (MSG_PEEK, nothing consumed): 0x16 is
a TLS handshake record → uvloop's native TLS with a handshake timeout, ALPN then
picks h2 or http/1.1; anything else is plaintext on the same port. Garbage, a
half ClientHello or a silent client cost only that connection.

SO_REUSEPORT would also let a second gateway (or anything else) share a port
silently, so `agproxy run` first checks each address with a socket bound without it
(`check_free`): any listener already there makes that bind fail, and the start is
refused. Worker restarts and reloads bind nothing new and skip the check; the
admin port, never shared, binds without SO_REUSEPORT at all.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from typing import Callable

from agproxy.config.model import GatewayConfig, ListenerConfig
from agproxy.http.h1 import H1Connection, Limits
from agproxy.http.h2 import H2Connection   # at import: its tables cost ~130 ms to build
from agproxy.http.messages import ConnInfo
from agproxy.server.tls import server_context

log = logging.getLogger("agproxy.server")


class ConnectionTracker:
    """Live client connections: for idle sweeps, drain and the active-connections gauge.

    Listeners of one worker share the `conns` set (the worker drains them all) while
    each keeps its own gauge child (active connections by listener).
    """

    def __init__(self, gauge=None, conns: set | None = None):
        self.conns: set = conns if conns is not None else set()
        self.gauge = gauge
        self.on_empty: asyncio.Future | None = None

    def view(self, gauge) -> "ConnectionTracker":
        """A tracker over the same connections that counts into another gauge."""
        t = ConnectionTracker(gauge, self.conns)
        t.on_empty = None
        t._parent = self
        return t

    def add(self, conn) -> None:
        if conn not in self.conns:
            self.conns.add(conn)
            if self.gauge is not None:
                self.gauge.inc()

    def discard(self, conn) -> None:
        if conn in self.conns:
            self.conns.discard(conn)
            if self.gauge is not None:
                self.gauge.dec()
            if not self.conns:
                owner = getattr(self, "_parent", self)
                waiter = owner.on_empty
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)

    def __len__(self) -> int:
        return len(self.conns)


class AddressInUse(Exception):
    """Another process already listens on an address the configuration binds."""


def check_free(host: str, port: int, what: str) -> None:
    """Raise AddressInUse if `host:port` cannot be bound exclusively right now: a
    listener there (another gateway with SO_REUSEPORT included) makes this bind fail,
    connections in TIME_WAIT do not (SO_REUSEADDR). Port 0 is always free."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    shown = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUse(f"{shown} ({what}) is already in use by another process") from None
            raise AddressInUse(f"cannot listen on {shown} ({what}): {exc.strerror or exc}") from None


def bind_socket(host: str, port: int, reuse_port: bool = True) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port and hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class Listener:
    def __init__(self, cfg: ListenerConfig, gateway: GatewayConfig, handler: Callable,
                 tracker: ConnectionTracker, metrics=None, shared: bool = True):
        self.cfg = cfg
        self.shared = shared          # SO_REUSEPORT: the workers' data ports; not admin
        self.name = cfg.name
        self.handler = handler
        self.tracker = tracker
        self.limits = Limits(gateway.max_header_bytes, gateway.max_headers, gateway.idle_timeout,
                             gateway.max_concurrent_streams,
                             header_timeout=gateway.header_timeout,
                             stream_idle_timeout=gateway.stream_idle_timeout,
                             headers_with_underscores=gateway.headers_with_underscores)
        self.first_byte_timeout = gateway.first_byte_timeout
        self.handshake_timeout = gateway.handshake_timeout
        self.ssl: ssl.SSLContext | None = server_context(cfg.tls.cert_file, cfg.tls.key_file) if cfg.tls else None
        self.sock: socket.socket | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.port = cfg.port
        # The address clients connect to, for ConnInfo.local_host: the bound one, or
        # (a wildcard bind) asked of each accepted socket.
        self._local_host = "" if cfg.host in ("0.0.0.0", "::", "") else cfg.host

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock = bind_socket(self.cfg.host, self.cfg.port, reuse_port=self.shared)
        self.port = self.sock.getsockname()[1]
        self.loop.add_reader(self.sock.fileno(), self._on_accept)

    def stop_accepting(self) -> None:
        if self.sock is not None and self.loop is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    # -- accepting ------------------------------------------------------------------------
    def _on_accept(self) -> None:
        sock = self.sock
        if sock is None:
            return
        for _ in range(128):
            try:
                csock, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:   # EMFILE and friends: log and keep the listener alive
                log.warning("listener %s: accept failed: %s", self.name, exc)
                return
            csock.setblocking(False)
            try:
                csock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            if self.ssl is None:
                self._serve(csock, addr, tls=False)
            else:
                self._await_first_byte(csock, addr)

    def _await_first_byte(self, csock: socket.socket, addr) -> None:
        loop = self.loop
        fd = csock.fileno()
        timer = loop.call_later(self.first_byte_timeout, self._give_up, csock, fd)
        loop.add_reader(fd, self._on_first_byte, csock, addr, timer)

    def _give_up(self, csock: socket.socket, fd: int) -> None:
        self.loop.remove_reader(fd)
        csock.close()

    def _on_first_byte(self, csock: socket.socket, addr, timer: asyncio.TimerHandle) -> None:
        try:
            first = csock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            first = b""
        self.loop.remove_reader(csock.fileno())
        timer.cancel()
        if not first:
            csock.close()
            return
        self._serve(csock, addr, tls=first[0] == 0x16)

    def _serve(self, csock: socket.socket, addr, tls: bool) -> None:
        peer_host, peer_port = addr[0], addr[1]
        local = self._local_host
        if not local:
            try:
                local = csock.getsockname()[0]
            except OSError:
                local = ""
        info = ConnInfo(peer_host, peer_port, self.port, tls, listener=self.name, local_host=local)
        if not tls:
            proto = self._protocol(info)
            self.loop.create_task(self._connect(csock, proto, None))
        else:
            self.loop.create_task(self._connect(csock, None, info))

    def _protocol(self, info: ConnInfo) -> H1Connection:
        return H1Connection(self.handler, info, self.limits, self._switch_to_h2(info), self.tracker)

    def _switch_to_h2(self, info: ConnInfo):
        def switch(transport, data: bytes) -> None:
            info.alpn = info.alpn or "h2c"
            proto = H2Connection(self.handler, info, self.limits, tracker=self.tracker)
            transport.set_protocol(proto)
            proto.connection_made(transport)
            if data:
                proto.data_received(data)
        return switch

    async def _connect(self, csock: socket.socket, proto, info: ConnInfo | None) -> None:
        loop = self.loop
        try:
            if info is None:
                await loop.connect_accepted_socket(lambda: proto, csock)
            else:
                def factory():
                    return _TlsProtocolSelector(self, info)
                await loop.connect_accepted_socket(factory, csock, ssl=self.ssl,
                                                   ssl_handshake_timeout=self.handshake_timeout)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as exc:
            log.debug("listener %s: connection from %s dropped during setup: %s", self.name, info, exc)
            try:
                csock.close()
            except OSError:
                pass


class _TlsProtocolSelector:
    """Created before the handshake; once it completes, picks the protocol by ALPN."""

    def __init__(self, listener: Listener, info: ConnInfo):
        self.listener = listener
        self.info = info
        self.proto = None

    def connection_made(self, transport) -> None:
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is not None:
            self.info.alpn = sslobj.selected_alpn_protocol()
            self.info.sni = getattr(sslobj, "server_hostname", None)
        proto = self.listener._protocol(self.info)
        transport.set_protocol(proto)
        self.proto = proto
        proto.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.proto.data_received(data)

    def eof_received(self):
        return self.proto.eof_received() if self.proto and hasattr(self.proto, "eof_received") else None

    def connection_lost(self, exc) -> None:
        if self.proto is not None:
            self.proto.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.proto is not None:
            self.proto.pause_writing()

    def resume_writing(self) -> None:
        if self.proto is not None:
            self.proto.resume_writing()
