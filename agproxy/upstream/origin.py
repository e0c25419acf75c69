"""Where a backend lives: scheme, host, port and how to speak to it (TLS, HTTP/2)."""

from __future__ import annotations

import socket
import ssl
from functools import lru_cache
from urllib.parse import urlsplit


class Origin:
    __slots__ = ("scheme", "host", "port", "ca_file", "insecure", "http2", "connect_timeout",
                 "server_name", "authority", "base_path", "key")

    def __init__(self, scheme: str, host: str, port: int, *, ca_file: str | None = None,
                 insecure: bool = False, http2: bool = False, connect_timeout: float = 5.0,
                 server_name: str | None = None, base_path: str = ""):
        self.scheme = scheme
        self.host = host
        self.port = port
        self.ca_file = ca_file
        self.insecure = insecure
        self.http2 = http2
        self.connect_timeout = connect_timeout
        self.server_name = server_name or host
        default = 443 if scheme == "https" else 80
        h = f"[{host}]" if ":" in host else host
        self.authority = h if port == default else f"{h}:{port}"
        self.base_path = base_path.rstrip("/")
        self.key = (scheme, host, port, ca_file, insecure, http2, self.server_name)

    @classmethod
    def from_url(cls, url: str, *, ca_file: str | None = None, insecure: bool = False,
                 http2: bool = False, connect_timeout: float = 5.0) -> "Origin":
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"unsupported URL scheme {parts.scheme!r} in {url!r} (use http:// or https://)")
        if not parts.hostname:
            raise ValueError(f"URL {url!r} has no host")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port, ca_file=ca_file, insecure=insecure,
                   http2=http2, connect_timeout=connect_timeout, base_path=parts.path)

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        return client_ssl_context(self.ca_file, self.insecure, self.http2)

    def __repr__(self) -> str:
        return f"Origin({self.scheme}://{self.authority})"


@lru_cache(maxsize=64)
def client_ssl_context(ca_file: str | None, insecure: bool, http2: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file)
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2", "http/1.1"] if http2 else ["http/1.1"])
    return ctx


def set_nodelay(transport) -> None:
    """Disable Nagle on an upstream connection: requests are written whole, in one write."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
