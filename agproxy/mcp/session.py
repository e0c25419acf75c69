"""Binding an MCP session id to the identity that created it, without state.

Theory of operation: MCP's security best practices say session ids are not
authentication and that a server binds them to the user. Behind the gateway the
MCP server never sees the user's token (it is not forwarded), so it cannot; the
gateway does, statelessly, by sealing each `Mcp-Session-Id` the server hands out:

    client sees   <server's id>.<tag>      tag = base64url(HMAC-SHA256(key, iss NUL sub NUL id))[:22]
    server sees   <server's id>

`seal(identity, sid)` adds the tag on the way out (every response that carries the
header); `open(identity, value)` checks and strips it on the way in, and None
(answered 404 "Session not found", so the client starts a new session, as for an
expired one) when the tag is missing or made for someone else. Nothing is stored:
every worker holding the same key accepts the same ids. The key is random per
gateway (`process_key()`, created before the workers fork so they share it), or
read from an environment variable so that replicas share it (`session_key_env`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

_TAG_CHARS = 22     # 16 bytes of HMAC, base64url without padding
_KEY: bytes | None = None


def process_key() -> bytes:
    """The gateway's random binding key (created once; call before forking workers)."""
    global _KEY
    if _KEY is None:
        _KEY = os.urandom(32)
    return _KEY


class SessionSeal:
    __slots__ = ("key",)

    def __init__(self, key: bytes):
        self.key = key

    def _tag(self, identity: str, sid: str) -> str:
        mac = hmac.new(self.key, f"{identity}\x00{sid}".encode("utf-8", "surrogatepass"), hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()).decode("ascii")[:_TAG_CHARS]

    def seal(self, identity: str, sid: str) -> str:
        return f"{sid}.{self._tag(identity, sid)}"

    def open(self, identity: str, value: str) -> str | None:
        sid, dot, tag = value.rpartition(".")
        if not dot or not sid or len(tag) != _TAG_CHARS:
            return None
        return sid if hmac.compare_digest(tag, self._tag(identity, sid)) else None


def identity_of(claims: object) -> str:
    """Who a session belongs to: the token's issuer and subject."""
    get = getattr(claims, "get", None)
    if get is None:
        return ""
    return f"{get('iss') or ''}\x00{get('sub') or ''}"
