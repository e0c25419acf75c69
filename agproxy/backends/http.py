"""`type = "http"`: a plain HTTP(S) upstream, HTTP/1.1 pooled or HTTP/2 multiplexed."""

from __future__ import annotations

import logging
import os

from agproxy.backends.relay import relay, upstream_request_headers
from agproxy.config.reader import Section
from agproxy.proxy.build import BuildContext
from agproxy.proxy.contract import Backend, Response
from agproxy.upstream.origin import Origin

log = logging.getLogger("agproxy.config")

TYPE = "http"


class HttpBackend(Backend):
    kind = TYPE

    def __init__(self, url: str, origin: Origin):
        self.url = url
        self.origin = origin
        self.base = origin.base_path

    async def respond(self, ex) -> Response:
        o = self.origin
        headers = upstream_request_headers(ex, o.authority, o.http2)   # (positional: cheaper)
        body, length = ex.request_body()
        target = self.base + ex.request.target if self.base else ex.request.target
        return await relay(ex, o, ex.request.method, target, headers, body, ex.route.timeout, length,
                           self.name)

    def describe(self) -> dict:
        return {"type": self.kind, "url": self.url, "http2": self.origin.http2,
                "tls_insecure_skip_verify": self.origin.insecure}


def build(name: str, sec: Section, ctx: BuildContext) -> HttpBackend | None:
    sec.str("type")
    url = sec.str("url")
    ca = sec.str("tls_ca_file", None)
    insecure = sec.bool("tls_insecure_skip_verify", False)
    http2 = sec.bool("http2", False)
    connect_timeout = sec.duration("connect_timeout", 5.0)
    sec.done()
    if ca is not None:
        ca = ctx.path(ca)
        if not os.path.isfile(ca):
            sec.error("tls_ca_file", f"file not found: {ca}")
    if not isinstance(url, str):
        return None
    origin = sec.convert("url", url, lambda u: Origin.from_url(
        u, ca_file=ca, insecure=bool(insecure), http2=bool(http2), connect_timeout=connect_timeout or 5.0))
    if origin is None:
        return None
    if insecure:
        log.warning("backend %s: TLS certificate verification is DISABLED (tls_insecure_skip_verify)", name)
    return HttpBackend(url, origin)
