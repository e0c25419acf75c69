"""Small client calls the gateway makes for itself (JWKS, discovery, token endpoints)."""

from __future__ import annotations

from agproxy.http.messages import Headers
from agproxy.upstream.errors import UpstreamError
from agproxy.upstream.origin import Origin
from agproxy.upstream.pool import get_pool


class FetchResult:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: Headers, body: bytes):
        self.status = status
        self.headers = headers
        self.body = body


async def fetch(url: str, *, method: str = "GET", headers: list[tuple[str, str]] | None = None,
                body: bytes | None = None, timeout: float = 5.0, ca_file: str | None = None,
                max_bytes: int = 4 * 1024 * 1024) -> FetchResult:
    """One request, the whole response in memory. Raises UpstreamError."""
    try:
        origin = Origin.from_url(url, ca_file=ca_file, connect_timeout=timeout)
    except ValueError as exc:
        raise UpstreamError("connect", str(exc)) from None
    rest = url.split("://", 1)[1]
    slash = rest.find("/")
    target = rest[slash:] if slash >= 0 else "/"
    target = target.split("#", 1)[0] or "/"
    h = Headers([("host", origin.authority), ("user-agent", "agproxy"), ("accept", "*/*")])
    for k, v in headers or ():
        h.set(k.lower(), v)
    resp = await get_pool().request(origin, method, target, h, body, timeout=timeout)
    parts, total = [], 0
    try:
        while True:
            chunk = await resp.body.read()
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                resp.abort()
                raise UpstreamError("protocol", f"response from {url} larger than {max_bytes} bytes")
            parts.append(chunk)
    except UpstreamError:
        raise
    except Exception as exc:
        raise UpstreamError("reset", f"reading {url}: {exc}") from None
    return FetchResult(resp.status, resp.headers, b"".join(parts))
