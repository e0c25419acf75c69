"""An emulator of Amazon Bedrock AgentCore Runtime's data plane, for tests and demos.

Theory of operation: a real HTTP/1.1 server on 127.0.0.1 (the strict llhttp
server of tests/support/strict_http.py, in background threads: a request with
framing a production server would refuse gets 400) that behaves as AgentCore's
inbound authentication does, in front of a tiny echo "agent":

- `POST /runtimes/{percent-encoded runtime ARN}/invocations?qualifier=Q`. The raw
  path must carry the ARN single-encoded (`%3A`, `%2F`); an unknown ARN is 404
  (ResourceNotFoundException), a bad session id 400 (ValidationException).
- SigV4 mode: the signature is recomputed from the request as received, with
  botocore and the known test credentials, over exactly the headers listed in
  SignedHeaders and the SHA-256 of the body as received; any mismatch is 403
  (InvalidSignatureException). A Bearer token is refused (403) as AgentCore does
  for an IAM-authorized runtime. `Authorization` never reaches the agent.
- JWT mode (customJWTAuthorizer): `discoveryUrl` → `jwks_uri` are fetched (and
  re-fetched for an unknown `kid`), then signature, `iss`, `exp`, `nbf`,
  `allowedAudience` (vs `aud`) and `allowedClients` (vs `client_id`) are
  checked; failures are 401 with `WWW-Authenticate: Bearer ...`. A SigV4 request
  is refused (403).
- The agent sees only: the documented runtime headers (session id, user id, MCP
  and trace headers, content-type, accept) and the headers on the runtime's
  `requestHeaderAllowlist` (custom `X-Amzn-Bedrock-AgentCore-Runtime-Custom-*`
  ones; `Authorization` only in JWT mode). Values over 4 KB are refused (400).
- The echo agent answers JSON describing what it saw; with `{"stream": N}` in the
  payload it answers `text/event-stream`, N events, one chunk each, with a short
  pause between them. `{"agent_status": 500}` makes the container fail (424, as
  AgentCore reports agent failures), and `emulator.fail_next = (status, type)` (or
  `{"emulate_error": 429}` in the payload) makes the service itself answer an
  error, so tests can check that errors reach the client untouched.

Every request is recorded in `emulator.requests` (what the gateway sent) and
`emulator.agent_seen` (what the agent got), for assertions.

CLI (to try the example configs by hand):
    python -m tests.support.agentcore_emulator --port 9400 --mode sigv4
    python -m tests.support.agentcore_emulator --port 9400 --mode jwt \
        --discovery-url http://127.0.0.1:8080/.well-known/openid-configuration \
        --allowed-audience support-agent --allowed-clients agproxy
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import jwt as pyjwt

from agproxy.identity.aws import verify_sigv4
from tests.support.strict_http import Conn, Request, StrictHTTPServer, StrictPeer

TEST_ACCESS_KEY = "AKIDAGPROXYTEST00001"
TEST_SECRET_KEY = "agproxy-test-secret-key-do-not-use-anywhere-else"
DEFAULT_RUNTIME_ARN = "arn:aws:bedrock-agentcore:us-east-1:111122223333:runtime/support-a1B2c3"
SERVICE = "bedrock-agentcore"

SESSION_HEADER = "x-amzn-bedrock-agentcore-runtime-session-id"
USER_ID_HEADER = "x-amzn-bedrock-agentcore-runtime-user-id"
CUSTOM_PREFIX = "x-amzn-bedrock-agentcore-runtime-custom-"
# Headers AgentCore passes to the agent whatever the allowlist says.
RUNTIME_HEADERS = frozenset({
    SESSION_HEADER, USER_ID_HEADER, "mcp-session-id", "mcp-protocol-version", "mcp-method",
    "mcp-name", "traceparent", "tracestate", "baggage", "content-type", "accept",
})
DEFAULT_ALLOWLIST = (
    "X-Amzn-Bedrock-AgentCore-Runtime-Custom-User-Token",
    "X-Amzn-Bedrock-AgentCore-Runtime-Custom-User",
    "X-Amzn-Bedrock-AgentCore-Runtime-Custom-Roles",
    "X-Amzn-Bedrock-AgentCore-Runtime-Custom-Tenant",
    "Authorization",
)
MAX_HEADER_VALUE = 4096


@dataclass
class Seen:
    method: str
    path: str                      # raw request target as received
    headers: list[tuple[str, str]]
    body: bytes
    status: int = 0
    reason: str = ""
    raw: bytes = b""               # the request's exact bytes on the wire


@dataclass
class EmulatorConfig:
    mode: str = "sigv4"                       # "sigv4" | "jwt"
    runtime_arn: str = DEFAULT_RUNTIME_ARN
    credentials: dict[str, str] = field(default_factory=lambda: {TEST_ACCESS_KEY: TEST_SECRET_KEY})
    discovery_url: str | None = None
    allowed_audience: list[str] | None = None
    allowed_clients: list[str] | None = None
    allowed_scopes: list[str] | None = None
    header_allowlist: tuple[str, ...] = DEFAULT_ALLOWLIST
    stream_delay: float = 0.05
    jwks_ttl: float = 300.0


class _Jwks:
    """The customJWTAuthorizer's view of the issuer: discovery → jwks_uri → keys."""

    def __init__(self, discovery_url: str, ttl: float):
        self.discovery_url = discovery_url
        self.ttl = ttl
        self.issuer: str | None = None
        self.keys: dict[str, Any] = {}
        self.fetched = 0.0
        self.lock = threading.Lock()

    def _load(self) -> None:
        with urllib.request.urlopen(self.discovery_url, timeout=5) as r:
            doc = json.loads(r.read())
        with urllib.request.urlopen(doc["jwks_uri"], timeout=5) as r:
            jwks = json.loads(r.read())
        keys = {}
        for k in jwks.get("keys", []):
            try:
                keys[k.get("kid", "")] = pyjwt.PyJWK(k)
            except Exception:
                continue
        self.issuer = doc["issuer"]
        self.keys = keys
        self.fetched = time.monotonic()

    def key(self, kid: str) -> tuple[Any, str | None]:
        with self.lock:
            if not self.keys or time.monotonic() - self.fetched > self.ttl or kid not in self.keys:
                self._load()
            return self.keys.get(kid), self.issuer


class AgentCoreEmulator(StrictPeer):
    """Start with `start()` (or as a context manager); `url` is the endpoint to configure."""

    def __init__(self, config: EmulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0,
                 **overrides: Any):
        cfg = config or EmulatorConfig()
        for k, v in overrides.items():
            setattr(cfg, k, v)
        self.config = cfg
        self.requests: list[Seen] = []
        self.agent_seen: list[dict] = []
        self.fail_next: tuple[int, str] | None = None
        self._jwks = _Jwks(cfg.discovery_url, cfg.jwks_ttl) if cfg.discovery_url else None
        self._allow = {h.lower() for h in cfg.header_allowlist}
        self.server = StrictHTTPServer(lambda req, conn: _Call(self, req, conn).run(), host=host,
                                       port=port, name="agentcore-emulator")

    # -- lifecycle (start, stop, with, port: StrictPeer) ------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"     # also when bound to another address

    @property
    def invoke_path(self) -> str:
        return f"/runtimes/{quote(self.config.runtime_arn, safe='')}/invocations"

    def set_discovery(self, url: str) -> None:
        self.config.discovery_url = url
        self._jwks = _Jwks(url, self.config.jwks_ttl)

    # -- the service -------------------------------------------------------------------
    def check_sigv4(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> str | None:
        host = dict(headers).get("host", "")
        url = f"http://{host}{target}"
        return verify_sigv4(method, url, headers, body, self.config.credentials, SERVICE)

    def check_jwt(self, token: str) -> str | None:
        cfg = self.config
        if self._jwks is None:
            return "no discoveryUrl configured"
        try:
            header = pyjwt.get_unverified_header(token)
        except pyjwt.PyJWTError as exc:
            return f"malformed token: {exc}"
        if header.get("alg") not in ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256"):
            return f"algorithm {header.get('alg')!r} not allowed"
        try:
            key, issuer = self._jwks.key(header.get("kid", ""))
        except Exception as exc:
            return f"cannot fetch the discovery document or JWKS: {exc}"
        if key is None:
            return "no key for the token's kid"
        try:
            claims = pyjwt.decode(token, key.key, algorithms=[header["alg"]], issuer=issuer,
                                  options={"verify_aud": False, "require": ["exp", "iss"]})
        except pyjwt.ExpiredSignatureError:
            return "token expired"
        except pyjwt.PyJWTError as exc:
            return f"invalid token: {exc}"
        if cfg.allowed_audience:
            aud = claims.get("aud")
            auds = aud if isinstance(aud, list) else [aud]
            if not any(a in cfg.allowed_audience for a in auds):
                return "audience not allowed"
        if cfg.allowed_clients and claims.get("client_id") not in cfg.allowed_clients:
            return "client_id not allowed"
        if cfg.allowed_scopes:
            scopes = str(claims.get("scope", "")).split()
            if not any(s in cfg.allowed_scopes for s in scopes):
                return "scope not allowed"
        return None

    def agent_headers(self, headers: list[tuple[str, str]]) -> dict[str, str] | str:
        out: dict[str, str] = {}
        for k, v in headers:
            lk = k.lower()
            if lk == "authorization":
                if self.config.mode == "jwt" and lk in self._allow:
                    out[lk] = v
                continue
            if lk in RUNTIME_HEADERS or lk in self._allow:
                if lk.startswith(CUSTOM_PREFIX) and len(v.encode("latin-1", "replace")) > MAX_HEADER_VALUE:
                    return f"header {k} exceeds {MAX_HEADER_VALUE} bytes"
                out[lk] = f"{out[lk]}, {v}" if lk in out else v
        return out


def _error_body(kind: str, message: str) -> bytes:
    return json.dumps({"message": message, "__type": kind}).encode()


class _Call:
    """One request to the emulator (the service, then the echo agent)."""

    def __init__(self, emu: AgentCoreEmulator, req: Request, conn: Conn):
        self.emu = emu
        self.req = req
        self.conn = conn
        self.command = req.method
        self.path = req.target

    def run(self) -> None:
        if self.command == "POST":
            self.do_POST()
        elif self.command == "GET":
            self.do_GET()
        else:
            self._send(405, _error_body("UnknownOperationException", "unknown operation"))

    def _send(self, status: int, body: bytes, headers: list[tuple[str, str]] | None = None,
              kind: str | None = None) -> None:
        out = [("server", "agentcore-emulator"), ("content-type", "application/json")]
        if kind:
            out.append(("x-amzn-errortype", kind))
        out.extend(headers or ())
        self.conn.respond(status, out, body)

    def _fail(self, seen: Seen, status: int, kind: str, message: str,
              headers: list[tuple[str, str]] | None = None) -> None:
        seen.status, seen.reason = status, message
        self._send(status, _error_body(kind, message), headers, kind)

    def do_GET(self) -> None:
        if self.path == "/ping":
            self._send(200, b'{"status": "Healthy"}')
        else:
            self._send(404, _error_body("UnknownOperationException", "unknown operation"))

    def do_POST(self) -> None:
        emu = self.emu
        cfg = emu.config
        body = self.req.body
        headers = list(self.req.headers)
        seen = Seen(self.command, self.path, headers, body, raw=self.req.raw)
        emu.requests.append(seen)
        hmap = dict(headers)

        parts = urlsplit(self.path)
        prefix, suffix = "/runtimes/", "/invocations"
        if not (parts.path.startswith(prefix) and parts.path.endswith(suffix)):
            return self._fail(seen, 404, "UnknownOperationException", "unknown operation")
        encoded_arn = parts.path[len(prefix):-len(suffix)]
        if "/" in encoded_arn or ":" in encoded_arn:
            return self._fail(seen, 400, "ValidationException",
                              "the runtime ARN must be percent-encoded in the path")
        if unquote(encoded_arn) != cfg.runtime_arn:
            return self._fail(seen, 404, "ResourceNotFoundException",
                              f"no agent runtime {unquote(encoded_arn)!r}")
        qualifier = parse_qs(parts.query).get("qualifier", ["DEFAULT"])[0]

        authz = hmap.get("authorization", "")
        if cfg.mode == "sigv4":
            if not authz.startswith("AWS4-HMAC-SHA256"):
                return self._fail(seen, 403, "AccessDeniedException",
                                  "Authorization method mismatch: this runtime is configured for SigV4")
            why = emu.check_sigv4(self.command, self.path, headers, body)
            if why:
                return self._fail(seen, 403, "InvalidSignatureException", why)
        else:
            if not authz.lower().startswith("bearer "):
                return self._fail(seen, 403 if authz else 401, "AccessDeniedException",
                                  "Authorization method mismatch: this runtime is configured for JWT bearer tokens",
                                  [("www-authenticate", 'Bearer error="invalid_request"')])
            why = emu.check_jwt(authz[7:].strip())
            if why:
                return self._fail(seen, 401, "AccessDeniedException", why,
                                  [("www-authenticate",
                                    f'Bearer error="invalid_token", error_description="{why}"')])

        session = hmap.get(SESSION_HEADER)
        if session is not None and not (33 <= len(session) <= 256):
            return self._fail(seen, 400, "ValidationException", "runtimeSessionId must be 33-256 characters")
        user_id = hmap.get(USER_ID_HEADER)
        if user_id is not None and (cfg.mode != "sigv4" or len(user_id) > 1024):
            return self._fail(seen, 400 if cfg.mode == "sigv4" else 403, "ValidationException",
                              "runtimeUserId is only accepted with SigV4 (and at most 1024 characters)")
        if emu.fail_next is not None:
            status, kind = emu.fail_next
            emu.fail_next = None
            return self._fail(seen, status, kind, f"emulated {kind}")
        payload: Any = None
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            payload = None
        if isinstance(payload, dict) and isinstance(payload.get("emulate_error"), int):
            status = payload["emulate_error"]
            kind = {429: "ThrottlingException", 409: "ConflictException", 404: "ResourceNotFoundException",
                    400: "ValidationException", 403: "AccessDeniedException",
                    424: "RuntimeClientError"}.get(status, "InternalServerException")
            return self._fail(seen, status, kind, f"emulated {kind}")

        agent_headers = emu.agent_headers(headers)
        if isinstance(agent_headers, str):
            return self._fail(seen, 400, "ValidationException", agent_headers)
        session = session or (uuid.uuid4().hex + uuid.uuid4().hex)[:40]
        agent_headers.setdefault(SESSION_HEADER, session)
        seen.status = 200
        self._agent(payload, body, agent_headers, qualifier, session)

    # -- the echo agent ---------------------------------------------------------------
    def _agent(self, payload: Any, body: bytes, headers: dict[str, str], qualifier: str, session: str) -> None:
        emu = self.emu
        seen = {"headers": headers, "body": body.decode("utf-8", "replace"), "qualifier": qualifier,
                "runtime_arn": emu.config.runtime_arn}
        emu.agent_seen.append(seen)
        status = 200
        if isinstance(payload, dict) and isinstance(payload.get("agent_status"), int):
            status = payload["agent_status"]
            if status >= 500:   # the container failed: AgentCore answers 424
                return self._send(424, _error_body("RuntimeClientError",
                                                   f"agent container returned {status}"))
        stream = payload.get("stream") if isinstance(payload, dict) else None
        resp_headers = [(SESSION_HEADER, session)]
        if isinstance(stream, int) and stream > 0:
            self.conn.start_chunked(200, [("server", "agentcore-emulator"),
                                          ("content-type", "text/event-stream"), *resp_headers])
            for i in range(stream):
                event = f"id: {i}\ndata: {json.dumps({'n': i, 'ts': time.time()})}\n\n".encode()
                if not self.conn.send_chunk(event):
                    return
                time.sleep(emu.config.stream_delay)
            self.conn.end_chunked()
            return
        out = json.dumps({"agent": "echo", "saw": seen}).encode()
        self._send(status, out, resp_headers)


# ---------------------------------------------------------------------------------
# Demo / test identities: an IdP, a Kubernetes issuer, the gateway's OBO key
# ---------------------------------------------------------------------------------

DEMO_IDP_ISSUER = "https://idp.agproxy.test"
DEMO_K8S_ISSUER = "https://kubernetes.default.svc"
DEMO_AGENT_SA = "system:serviceaccount:agents:support"


class DemoIdentity:
    """Key files for the examples and tests, and tokens minted with them.

    Files in `folder`: idp.pem + idp-jwks.json (the users' IdP), k8s.pem +
    k8s-jwks.json (the cluster's service-account issuer), agent-token (a projected
    SA token for the agent), obo-signing-1.pem / obo-signing-2.pem (the gateway's
    OBO keys: the first signs, both are published).
    """

    def __init__(self, folder: str):
        import os as _os
        self.folder = folder
        self.p = lambda name: _os.path.join(folder, name)

    def create(self, actor_ttl: int = 10 * 365 * 86400) -> "DemoIdentity":
        import os as _os
        from agproxy.identity.minting import generate_rsa_pem, load_private_key, public_jwk
        _os.makedirs(self.folder, exist_ok=True)
        for name in ("idp", "k8s", "obo-signing-1", "obo-signing-2"):
            generate_rsa_pem(self.p(f"{name}.pem"))
        for name, kid in (("idp", "idp-1"), ("k8s", "k8s-1")):
            key = load_private_key(self.p(f"{name}.pem"))
            with open(self.p(f"{name}-jwks.json"), "w") as f:
                json.dump({"keys": [public_jwk(key, kid, "RS256")]}, f, indent=1)
        self.write_actor_token(ttl=actor_ttl)
        return self

    def _sign(self, name: str, kid: str, claims: dict) -> str:
        from agproxy.identity.minting import load_private_key
        return pyjwt.encode(claims, load_private_key(self.p(f"{name}.pem")), algorithm="RS256",
                            headers={"kid": kid})

    def user_token(self, sub: str = "alice", ttl: int = 3600, **extra: Any) -> str:
        now = int(time.time())
        claims = {"iss": DEMO_IDP_ISSUER, "sub": sub, "aud": "agents", "iat": now, "exp": now + ttl,
                  "groups": ["support", "eng"], "department": "cx", "tenant_id": "t-42",
                  "email": f"{sub}@example.com", "scope": "agents:invoke"}
        claims.update(extra)
        return self._sign("idp", "idp-1", {k: v for k, v in claims.items() if v is not None})

    def actor_claims(self, ttl: int) -> dict:
        now = int(time.time())
        return {"iss": DEMO_K8S_ISSUER, "sub": DEMO_AGENT_SA, "aud": ["agproxy"], "iat": now, "exp": now + ttl,
                "jti": uuid.uuid4().hex,
                "kubernetes.io": {"namespace": "agents", "serviceaccount": {"name": "support", "uid": "4f1c"},
                                  "pod": {"name": "support-7d9f", "uid": "9a2b"}}}

    def write_actor_token(self, ttl: int = 3600, path: str | None = None, signer: str = "k8s") -> str:
        import os as _os
        token = self._sign(signer, "k8s-1", self.actor_claims(ttl))
        path = path or self.p("agent-token")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(token + "\n")
        _os.replace(tmp, path)   # atomic, as kubelet rotates projected tokens
        return token


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="AgentCore Runtime emulator (tests and demos)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9400)
    ap.add_argument("--mode", choices=("sigv4", "jwt"), default="sigv4")
    ap.add_argument("--runtime-arn", default=DEFAULT_RUNTIME_ARN)
    ap.add_argument("--discovery-url", default=None)
    ap.add_argument("--allowed-audience", action="append", default=None)
    ap.add_argument("--allowed-clients", action="append", default=None)
    ap.add_argument("--allow-header", action="append", default=None,
                    help="requestHeaderAllowlist entry (repeatable; default: the examples' headers)")
    ap.add_argument("--print-token", metavar="SUB", default=None,
                    help="print a user token from the demo IdP in --identity-dir and exit")
    ap.add_argument("--identity-dir", default="conf/agentcore",
                    help="demo key folder (default: conf/agentcore)")
    args = ap.parse_args(argv)
    if args.print_token:
        print(DemoIdentity(args.identity_dir).user_token(args.print_token))
        return
    cfg = EmulatorConfig(mode=args.mode, runtime_arn=args.runtime_arn, discovery_url=args.discovery_url,
                         allowed_audience=args.allowed_audience, allowed_clients=args.allowed_clients)
    if args.allow_header:
        cfg.header_allowlist = tuple(args.allow_header)
    if args.mode == "jwt" and not args.discovery_url:
        ap.error("--mode jwt needs --discovery-url")
    emu = AgentCoreEmulator(cfg, host=args.host, port=args.port)
    print(f"AgentCore emulator ({args.mode}) on {emu.url}; runtime {cfg.runtime_arn}", flush=True)
    if args.mode == "sigv4":
        print(f"test credentials: AWS_ACCESS_KEY_ID={TEST_ACCESS_KEY} AWS_SECRET_ACCESS_KEY=<see "
              f"tests/support/agentcore_emulator.py TEST_SECRET_KEY>", flush=True)
    try:
        emu.server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
