"""An OAuth 2.0 authorization server for MCP authorization tests (client credentials).

Serves RFC 8414 metadata (`/.well-known/oauth-authorization-server`, and the OIDC
discovery path), a JWKS and a token endpoint for the `client_credentials` grant
(HTTP Basic or form client authentication). Tokens are RS256 JWTs: `iss` this
server, `sub` the client id, `aud` the RFC 8707 `resource` of the request (or
`audience_override` when a test wants a token minted for another server), `scope`
the requested scopes, and the client's extra claims (`groups`, ...). Every token
request is recorded in `token_requests`. HTTP is StrictHTTPServer's (llhttp, exact
bytes in `server.received`, refused requests in `server.rejected`).
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from typing import Any
from urllib.parse import parse_qsl

import jwt

from tests.support.idp import SigningKey
from tests.support.strict_http import Conn, Request, StrictHTTPServer


class AuthorizationServer:
    def __init__(self, clients: dict[str, dict] | None = None):
        # client id → {"secret": ..., "claims": {...}}
        self.clients = clients or {}
        self.key = SigningKey("RSA")
        self.audience_override: str | None = None
        self.token_requests: list[dict] = []
        self.lock = threading.Lock()
        self.server = StrictHTTPServer(self._handle, name="oauth-as").start()
        self.port = self.server.port
        self.issuer = f"http://127.0.0.1:{self.port}"

    def _handle(self, req: Request, conn: Conn) -> None:
        if req.method == "GET":
            if req.path in ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"):
                return _send(conn, 200, self.metadata())
            if req.path == "/jwks.json":
                return _send(conn, 200, {"keys": [self.key.jwk()]})
            return _send(conn, 404, {"error": "not_found"})
        if req.method != "POST":
            return _send(conn, 405, {"error": "method_not_allowed"})
        form = dict(parse_qsl(req.body.decode()))
        auth = req.header("authorization") or ""
        cid, secret = form.get("client_id"), form.get("client_secret")
        if auth.lower().startswith("basic "):
            cid, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
        with self.lock:
            self.token_requests.append(form)
        client = self.clients.get(cid or "")
        if req.target != "/token" or form.get("grant_type") != "client_credentials":
            return _send(conn, 400, {"error": "unsupported_grant_type"})
        if client is None or client["secret"] != secret:
            return _send(conn, 401, {"error": "invalid_client"})
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": cid, "iat": now, "exp": now + 300, "jti": uuid.uuid4().hex,
                  "aud": self.audience_override or form.get("resource") or "none",
                  **client.get("claims", {})}
        if form.get("scope"):
            claims["scope"] = form["scope"]
        token = jwt.encode(claims, self.key.private, algorithm="RS256", headers={"kid": self.key.kid})
        _send(conn, 200, {"access_token": token, "token_type": "Bearer", "expires_in": 300,
                          **({"scope": form["scope"]} if form.get("scope") else {})})

    @property
    def jwks_url(self) -> str:
        return self.issuer + "/jwks.json"

    def metadata(self) -> dict:
        return {"issuer": self.issuer, "token_endpoint": self.issuer + "/token", "jwks_uri": self.jwks_url,
                "authorization_endpoint": self.issuer + "/authorize",   # required by the SDK's model
                "grant_types_supported": ["client_credentials"], "response_types_supported": ["token"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"]}

    def mint(self, **claims: Any) -> str:
        now = int(time.time())
        payload = {"iss": self.issuer, "iat": now, "exp": now + 300, **claims}
        return jwt.encode(payload, self.key.private, algorithm="RS256", headers={"kid": self.key.kid})

    def close(self) -> None:
        self.server.stop()


def _send(conn: Conn, status: int, doc: dict) -> None:
    conn.respond(status, [("content-type", "application/json"), ("cache-control", "no-store")],
                 json.dumps(doc).encode())
