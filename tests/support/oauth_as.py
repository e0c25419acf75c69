"""An OAuth 2.0 authorization server for MCP authorization tests (client credentials).

Serves RFC 8414 metadata (`/.well-known/oauth-authorization-server`, and the OIDC
discovery path), a JWKS and a token endpoint for the `client_credentials` grant
(HTTP Basic or form client authentication). Tokens are RS256 JWTs: `iss` this
server, `sub` the client id, `aud` the RFC 8707 `resource` of the request (or
`audience_override` when a test wants a token minted for another server), `scope`
the requested scopes, and the client's extra claims (`groups`, ...). Every token
request is recorded in `token_requests`.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

import jwt

from tests.support.idp import SigningKey


class AuthorizationServer:
    def __init__(self, clients: dict[str, dict] | None = None):
        # client id → {"secret": ..., "claims": {...}}
        self.clients = clients or {}
        self.key = SigningKey("RSA")
        self.audience_override: str | None = None
        self.token_requests: list[dict] = []
        self.lock = threading.Lock()
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path in ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"):
                    self._send(200, srv.metadata())
                elif path == "/jwks.json":
                    self._send(200, {"keys": [srv.key.jwk()]})
                else:
                    self._send(404, {"error": "not_found"})

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                form = dict(parse_qsl(self.rfile.read(length).decode()))
                auth = self.headers.get("authorization") or ""
                cid, secret = form.get("client_id"), form.get("client_secret")
                if auth.lower().startswith("basic "):
                    cid, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
                with srv.lock:
                    srv.token_requests.append(form)
                client = srv.clients.get(cid or "")
                if self.path != "/token" or form.get("grant_type") != "client_credentials":
                    return self._send(400, {"error": "unsupported_grant_type"})
                if client is None or client["secret"] != secret:
                    return self._send(401, {"error": "invalid_client"})
                now = int(time.time())
                claims = {"iss": srv.issuer, "sub": cid, "iat": now, "exp": now + 300, "jti": uuid.uuid4().hex,
                          "aud": srv.audience_override or form.get("resource") or "none",
                          **client.get("claims", {})}
                if form.get("scope"):
                    claims["scope"] = form["scope"]
                token = jwt.encode(claims, srv.key.private, algorithm="RS256", headers={"kid": srv.key.kid})
                self._send(200, {"access_token": token, "token_type": "Bearer", "expires_in": 300,
                                 **({"scope": form["scope"]} if form.get("scope") else {})})

            def _send(self, status: int, doc: dict) -> None:
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.send_header("cache-control", "no-store")
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.issuer = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

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
        self.server.shutdown()
        self.server.server_close()
