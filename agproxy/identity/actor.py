"""Actor identities: who acts on the user's behalf in a token exchange.

Theory of operation: an actor is the agent (workload) that calls a downstream on a
user's behalf. It proves who it is in one of three ways, and the token service
checks each differently:

- a Kubernetes projected service-account token (`kubernetes_token_file`): a JWT
  from the API server's issuer, `sub` = `system:serviceaccount:<ns>:<name>`,
  verified against an `actor_issuers` provider;
- a SPIFFE JWT-SVID (`spiffe_svid_file`): `sub` = `spiffe://<trust domain>/<path>`,
  `aud` and `exp` required, verified against an `actor_issuers` provider;
- OAuth client credentials (`client_id` + `client_secret_env`): checked against
  `[token_exchange].clients`, the secret compared in constant time (an unknown
  client costs the same comparison, so timing does not reveal which ids exist).

On the gateway's own side (`[route.obo]`), an `ActorSource` produces the current
credential. Token files are re-read when they change (kubelet and the SPIFFE
helper rotate them in place, usually by an atomic rename): the file is stat'ed at
most every `recheck` seconds and re-read only when its inode, size or mtime moved,
so the request path costs nothing in between. Tokens and secrets are never shown by
`describe()` or `repr()`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from dataclasses import dataclass
from typing import Any

K8S_SUB_PREFIX = "system:serviceaccount:"
SPIFFE_PREFIX = "spiffe://"


class ActorError(Exception):
    """The actor credential cannot be used; `reason` is safe to show."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ActorCredential:
    """What the acting workload presents: a token (JWT) or client credentials."""

    kind: str                      # "kubernetes" | "spiffe" | "client"
    token: str | None = None       # JWT for kubernetes / spiffe
    client_id: str | None = None
    client_secret: str | None = None

    @property
    def cache_key(self) -> str:
        # A rotated token is a new key; a client is its id (its secret is checked once).
        return self.token if self.token is not None else f"client:{self.client_id}"

    def __repr__(self) -> str:
        return f"ActorCredential(kind={self.kind!r}, client_id={self.client_id!r})"


class ActorSource:
    kind = ""

    def current(self) -> ActorCredential:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": self.kind}


class TokenFileActor(ActorSource):
    """A token file rotated in place (Kubernetes projected SA token, JWT-SVID)."""

    def __init__(self, path: str, kind: str, recheck: float = 5.0):
        self.path = path
        self.kind = kind
        self.recheck = recheck
        self._stamp: tuple | None = None
        self._token: str | None = None
        self._checked = 0.0
        self.reloads = 0

    def load(self) -> None:
        """Read now (at load: raises ActorError so the config error names the file)."""
        try:
            st = os.stat(self.path)
            with open(self.path, "r", encoding="ascii", errors="replace") as f:
                token = f.read().strip()
        except OSError as exc:
            raise ActorError(f"cannot read actor token file {self.path}: {exc.strerror or exc}") from None
        if token.count(".") != 2:
            raise ActorError(f"actor token file {self.path} does not hold a JWT")
        self._stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        self._token = token
        self.reloads += 1

    def current(self) -> ActorCredential:
        now = time.monotonic()
        if self._token is None or now - self._checked >= self.recheck:
            self._checked = now
            try:
                st = os.stat(self.path)
                if (st.st_ino, st.st_size, st.st_mtime_ns) != self._stamp:
                    self.load()
            except (OSError, ActorError):
                if self._token is None:   # keep the last good token while the file is mid-rotation
                    raise ActorError("actor token file unreadable")
        return ActorCredential(self.kind, token=self._token)

    def describe(self) -> dict:
        return {"kind": self.kind, "file": self.path}


class ClientCredentialsActor(ActorSource):
    kind = "client"

    def __init__(self, client_id: str, secret: str, secret_source: str):
        self.client_id = client_id
        self._cred = ActorCredential("client", client_id=client_id, client_secret=secret)
        self.secret_source = secret_source

    def current(self) -> ActorCredential:
        return self._cred

    def describe(self) -> dict:
        return {"kind": "client", "client_id": self.client_id, "secret_from": self.secret_source}


def build_actor_source(sec: Any, ctx: Any) -> ActorSource | None:
    """`actor = { kubernetes_token_file | spiffe_svid_file | client_id + client_secret_env }`."""
    k8s = sec.str("kubernetes_token_file", None)
    spiffe = sec.str("spiffe_svid_file", None)
    client_id = sec.str("client_id", None)
    secret_env = sec.str("client_secret_env", None)
    secret_file = sec.str("client_secret_file", None)
    recheck = sec.duration("recheck", 5.0)
    sec.done()
    given = [k for k, v in (("kubernetes_token_file", k8s), ("spiffe_svid_file", spiffe),
                            ("client_id", client_id)) if v]
    if len(given) != 1:
        sec.error(None, "exactly one of kubernetes_token_file, spiffe_svid_file, client_id is required")
        return None
    if k8s or spiffe:
        if secret_env or secret_file:
            sec.error("client_secret_env", "only with client_id")
        src = TokenFileActor(ctx.path(k8s or spiffe), "kubernetes" if k8s else "spiffe",
                             recheck if recheck is not None else 5.0)
        try:
            src.load()
        except ActorError as exc:
            sec.error("kubernetes_token_file" if k8s else "spiffe_svid_file", exc.reason)
            return None
        return src
    if bool(secret_env) == bool(secret_file):
        sec.error("client_secret_env", "one of client_secret_env or client_secret_file is required with client_id")
        return None
    secret = read_secret(sec, secret_env, secret_file, ctx)
    if secret is None:
        return None
    return ClientCredentialsActor(client_id, secret, f"env:{secret_env}" if secret_env else f"file:{secret_file}")


def read_secret(sec: Any, env: str | None, file: str | None, ctx: Any) -> str | None:
    """A secret from an environment variable or a file; problems reported at load."""
    if env:
        value = os.environ.get(env)
        if not value:
            sec.error("client_secret_env", f"environment variable {env} is not set")
            return None
        return value
    path = ctx.path(file)
    try:
        with open(path, "r", encoding="utf-8") as f:
            value = f.read().strip()
    except OSError as exc:
        sec.error("client_secret_file", f"cannot read {path}: {exc.strerror or exc}")
        return None
    if not value:
        sec.error("client_secret_file", f"{path} is empty")
        return None
    return value


class ClientRegistry:
    """Registered OAuth clients (id → SHA-256 of the secret), constant-time checks."""

    _DUMMY = hashlib.sha256(b"agproxy-no-such-client").digest()

    def __init__(self) -> None:
        self._clients: dict[str, bytes] = {}

    def add(self, client_id: str, secret: str) -> None:
        self._clients[client_id] = hashlib.sha256(secret.encode()).digest()

    def __contains__(self, client_id: str) -> bool:
        return client_id in self._clients

    def __len__(self) -> int:
        return len(self._clients)

    def authenticate(self, client_id: str, secret: str) -> bool:
        want = self._clients.get(client_id)
        got = hashlib.sha256(secret.encode("utf-8", "replace")).digest()
        ok = hmac.compare_digest(want if want is not None else self._DUMMY, got)
        return ok and want is not None

    def ids(self) -> list[str]:
        return sorted(self._clients)


def check_actor_shape(claims: dict) -> str:
    """Which kind of workload identity a verified actor token is; raises ActorError."""
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise ActorError("actor token has no subject")
    if sub.startswith(SPIFFE_PREFIX):
        aud = claims.get("aud")
        if not aud:
            raise ActorError("JWT-SVID without audience")
        if "exp" not in claims:
            raise ActorError("JWT-SVID without expiry")
        rest = sub[len(SPIFFE_PREFIX):]
        if not rest or rest.startswith("/") or "?" in rest or "#" in rest:
            raise ActorError("malformed SPIFFE ID")
        return "spiffe"
    if sub.startswith(K8S_SUB_PREFIX):
        parts = sub[len(K8S_SUB_PREFIX):].split(":")
        if len(parts) != 2 or not all(parts):
            raise ActorError("malformed service account subject")
        return "kubernetes"
    return "jwt"
