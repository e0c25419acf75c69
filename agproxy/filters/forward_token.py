"""`[route.forward_token]`: put a validated token in a named request header.

Theory of operation: pattern 2 (JWT pass-through with SigV4) sends the caller's
validated JWT (`token = "subject"`, i.e. `ex.jwt_token` from `[route.jwt]`) or the
exchanged one (`token = "obo"`, `ex.obo_token` from `[route.obo]`) to the
agent in a custom header, while the request itself is SigV4-signed. Whatever the
client sent under that header name is removed first (a client must never choose
what the gateway asserts). AgentCore caps custom header values at 4 KB
(`max_bytes`), so a larger token is refused with 431 and a clear message rather
than truncated into something that cannot verify. Nothing is awaited.

At load (`check_route`), the route must have a filter ahead of this one that
provides the token: `[route.jwt]` for "subject", `[route.obo]` for "obo".
"""

from __future__ import annotations

from typing import Any

from agproxy.config.reader import Section
from agproxy.proxy.contract import Filter, LocalReply, Provides, RouteChain
from agproxy.proxy.registry import TOKEN

KEY = "forward_token"
STAGE = TOKEN + 1       # after obo: it may forward the exchanged token

AGENTCORE_MAX_HEADER = 4096


class ForwardTokenFilter(Filter):
    name = "forward_token"

    def __init__(self, header: str, token: str, prefix: str, max_bytes: int, path: str = "forward_token"):
        self.header = header.lower()
        self.display = header
        self.token = token
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.path = path
        self.sets_request_headers = frozenset({self.header})

    def on_request(self, ex):
        headers = ex.request.headers
        headers.remove(self.header)
        value = ex.jwt_token if self.token == "subject" else ex.obo_token
        if not value:
            what = "validated caller token" if self.token == "subject" else "exchanged (OBO) token"
            return LocalReply.error(401, "unauthorized", f"no {what} to forward",
                                    [("www-authenticate", "Bearer")])
        value = self.prefix + value
        if len(value) > self.max_bytes:
            return LocalReply.error(
                431, "token_too_large",
                f"the token is {len(value)} bytes; {self.display} carries at most {self.max_bytes} "
                f"bytes (AgentCore's custom header limit): use claims_to_headers or a smaller token")
        headers.add(self.header, value)
        return None

    def check_route(self, chain: RouteChain) -> None:
        if self.token == "obo" and not chain.provides(Provides.OBO_TOKEN, before=self):
            chain.problems.add(f"{self.path}.token", '"obo" needs a [route.obo] section on this route')
        if self.token == "subject" and not chain.provides(Provides.CALLER_TOKEN, before=self):
            chain.problems.add(f"{self.path}.token", '"subject" needs [route.jwt] (the token must be '
                                                     'validated before it is forwarded)')

    def describe(self) -> dict:
        return {"type": self.name, "header": self.display, "token": self.token, "max_bytes": self.max_bytes}


def build(sec: Section, ctx: Any) -> ForwardTokenFilter | None:
    header = sec.str("header")
    token = sec.str("token", "subject", choices=("subject", "obo"))
    prefix = sec.str("prefix", "")
    max_bytes = sec.int("max_bytes", AGENTCORE_MAX_HEADER, min=64, max=65536)
    sec.done()
    if isinstance(header, str):
        low = header.lower()
        if not header or any(c in header for c in " :\r\n\t"):
            sec.error("header", "not a valid header name")
        elif low in ("host", "content-length", "transfer-encoding", "connection"):
            sec.error("header", f"{header} cannot carry a token")
    if not isinstance(header, str) or not isinstance(token, str):
        return None
    return ForwardTokenFilter(header, token, prefix or "", max_bytes, sec.path)
