"""AWS credentials and SigV4 request signing.

Theory of operation: credentials come from botocore's standard chain (environment,
shared config and profiles, web identity / IRSA, container and instance metadata),
optionally as a named profile (`aws_profile`) and optionally through an
assume-role step (`aws_role_arn`). Resolving the chain may do network I/O
(instance metadata, STS), so it happens once, at startup, in a worker thread
(`AwsCredentials.start`), never per request. botocore hands back either static
credentials or `RefreshableCredentials`; per request we only call
`get_frozen_credentials()`, which is a few attribute reads as long as the
credentials are not inside botocore's refresh window. A background task asks for
them from a thread every `refresh_check` seconds, so the (blocking) refresh near
expiry happens there and not on the event loop.

`SigV4Signer` signs one request with botocore's `SigV4Auth`: the canonical request
(including the double encoding of an already percent-encoded path, which non-S3
services use), the string to sign and the header are all botocore's. We only
hand it exactly the headers that will be sent, a precomputed payload hash (the
body is hashed once, not re-read through AWSRequest.prepare()), and cache the
derived signing key per (secret, date, region, service), which saves four HMACs
per request. Secrets never appear in `describe()` or logs.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import hashlib
import logging
import threading
from typing import Any, Iterable
from urllib.parse import urlsplit

from botocore.auth import SIGNED_HEADERS_BLACKLIST, SIGV4_TIMESTAMP, SigV4Auth
from botocore.awsrequest import AWSRequest

log = logging.getLogger("agproxy.aws")

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_BLACKLIST = frozenset(SIGNED_HEADERS_BLACKLIST)


class NoCredentials(Exception):
    """No usable AWS credentials (not resolved yet, or none in the chain)."""


class AwsCredentials:
    """The gateway's AWS identity, resolved once and refreshed in the background."""

    def __init__(self, profile: str | None = None, role_arn: str | None = None,
                 role_session_name: str = "agproxy", region: str | None = None,
                 refresh_check: float = 60.0):
        self.profile = profile
        self.role_arn = role_arn
        self.role_session_name = role_session_name
        self.region = region
        self.refresh_check = refresh_check
        self._creds: Any = None        # botocore Credentials / RefreshableCredentials
        self.error: str | None = "not resolved yet"
        self._task: asyncio.Task | None = None
        self._lock = threading.Lock()
        self._resolving: asyncio.Future | None = None

    # -- resolution (blocking; run in a thread) --------------------------------------
    def resolve_blocking(self) -> None:
        import botocore.session
        from botocore.credentials import RefreshableCredentials

        session = botocore.session.Session(profile=self.profile) if self.profile else botocore.session.Session()
        creds = session.get_credentials()
        if creds is None:
            raise NoCredentials("no AWS credentials found in the standard chain")
        if self.role_arn:
            region = self.region or session.get_config_variable("region") or "us-east-1"
            sts = session.create_client("sts", region_name=region)
            role_arn, name = self.role_arn, self.role_session_name

            def refresh() -> dict:
                out = sts.assume_role(RoleArn=role_arn, RoleSessionName=name)["Credentials"]
                return {
                    "access_key": out["AccessKeyId"],
                    "secret_key": out["SecretAccessKey"],
                    "token": out["SessionToken"],
                    "expiry_time": out["Expiration"].isoformat(),
                }

            creds = RefreshableCredentials.create_from_metadata(refresh(), refresh, "assume-role")
        frozen = creds.get_frozen_credentials()
        if not frozen.access_key or not frozen.secret_key:
            raise NoCredentials("AWS credentials are incomplete")
        with self._lock:
            self._creds = creds
            self.error = None

    def set_static(self, access_key: str, secret_key: str, token: str | None = None) -> None:
        """Tests and benchmarks: fixed credentials, no chain."""
        from botocore.credentials import Credentials
        self._creds = Credentials(access_key, secret_key, token)
        self.error = None

    async def start(self) -> None:
        """Resolve in a thread; keep refreshing ahead of expiry in a thread."""
        loop = asyncio.get_running_loop()
        self._resolving = loop.create_future()
        try:
            await asyncio.to_thread(self.resolve_blocking)
            log.info("aws credentials resolved (method=%s)", self.method)
        except Exception as exc:  # reported through readiness, not fatal
            self.error = _describe_error(exc)
            log.error("aws credentials: %s", self.error)
        finally:
            fut, self._resolving = self._resolving, None
            if fut is not None and not fut.done():
                fut.set_result(None)
        self._task = loop.create_task(self._refresher())

    async def wait_resolved(self, timeout: float = 5.0) -> None:
        """While the first resolution runs (a request raced startup), wait for it."""
        fut = self._resolving
        if fut is not None and self._creds is None:
            try:
                await asyncio.wait_for(asyncio.shield(fut), timeout)
            except asyncio.TimeoutError:
                pass

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _refresher(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_check)
            try:
                if self._creds is None:
                    await asyncio.to_thread(self.resolve_blocking)
                else:
                    # Triggers botocore's refresh (if inside its window) off the loop.
                    await asyncio.to_thread(self._creds.get_frozen_credentials)
                self.error = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.error = _describe_error(exc)
                log.warning("aws credentials refresh failed: %s", self.error)

    # -- per request -----------------------------------------------------------------
    def frozen(self):
        """(access_key, secret_key, token) — cheap; raises NoCredentials."""
        creds = self._creds
        if creds is None:
            raise NoCredentials(self.error or "no AWS credentials")
        return creds.get_frozen_credentials()

    @property
    def method(self) -> str | None:
        return getattr(self._creds, "method", None)

    def readiness(self) -> str | None:
        return None if self._creds is not None else (self.error or "no AWS credentials")

    def describe(self) -> dict:
        out: dict[str, Any] = {"source": self.method or "unresolved"}
        if self.profile:
            out["profile"] = self.profile
        if self.role_arn:
            out["role_arn"] = self.role_arn
        return out


def _describe_error(exc: BaseException) -> str:
    # botocore messages do not include secrets; keep them short.
    return f"{type(exc).__name__}: {exc}"[:300]


class _SignHeaders(dict):
    """The headers to sign as botocore's canonicalisation reads them (name → values).

    botocore builds an `email.message`-based HTTPHeaders for this, twice per
    request; that is most of its signing time. Its `canonical_headers` and
    `signed_headers` only iterate the names and call `get_all`, which this gives.
    """

    def get_all(self, name: str) -> list[str]:
        return self[name]


class _Auth(SigV4Auth):
    """botocore's SigV4Auth with a precomputed payload hash, the header list given
    directly (no HTTPHeaders round trip) and a cached signing key."""

    _keys: dict = {}

    def headers_to_sign(self, request):  # noqa: D401 - botocore hook
        given = request.context.get("sign_headers")
        if given is None:
            return super().headers_to_sign(request)
        out = _SignHeaders()
        for name, value in given:
            lname = name.lower()
            if lname not in _BLACKLIST:
                out.setdefault(lname, []).append(value)
        if "host" not in out:
            raise ValueError("the host header must be among the headers to sign")
        return out

    def payload(self, request) -> str:  # noqa: D401 - botocore hook
        h = request.context.get("payload_sha256")
        return h if h is not None else super().payload(request)

    def signature(self, string_to_sign: str, request) -> str:
        secret = self.credentials.secret_key
        date = request.context["timestamp"][0:8]
        ck = (secret, date, self._region_name, self._service_name)
        k_signing = _Auth._keys.get(ck)
        if k_signing is None:
            k_date = self._sign(f"AWS4{secret}".encode(), date)
            k_region = self._sign(k_date, self._region_name)
            k_service = self._sign(k_region, self._service_name)
            k_signing = self._sign(k_service, "aws4_request")
            if len(_Auth._keys) > 64:
                _Auth._keys.clear()
            _Auth._keys[ck] = k_signing
        return self._sign(k_signing, string_to_sign, hex=True)


def host_from_url(url: str) -> str:
    """The Host value botocore signs for a URL (default port omitted)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    default = {"http": 80, "https": 443}.get(parts.scheme)
    if parts.port is not None and parts.port != default:
        host = f"{host}:{parts.port}"
    return host


class SigV4Signer:
    """Signs requests for one service and region with the gateway's credentials."""

    def __init__(self, credentials: AwsCredentials, service: str, region: str):
        self.credentials = credentials
        self.service = service
        self.region = region

    def sign(self, method: str, url: str, headers: Iterable[tuple[str, str]], body: bytes | None,
             now: _dt.datetime | None = None) -> list[tuple[str, str]]:
        """Headers to add (`authorization`, `x-amz-date`, maybe `x-amz-security-token`).

        `headers` must be exactly the headers that will be sent, including `host`.
        `url` is the wire URL (path already percent-encoded; it is not re-normalised
        here, botocore encodes it once more for the canonical request).
        """
        frozen = self.credentials.frozen()
        auth = _Auth(frozen, self.service, self.region)
        ts = (now or _dt.datetime.now(_dt.timezone.utc)).strftime(SIGV4_TIMESTAMP)
        added = [("x-amz-date", ts)]
        if frozen.token:
            added.append(("x-amz-security-token", frozen.token))
        req = AWSRequest(method=method, url=url)
        ctx = req.context
        ctx["timestamp"] = ts
        ctx["payload_sha256"] = hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256
        ctx["sign_headers"] = [*headers, *added]
        # botocore: canonical request (path encoded once more), string to sign, signature.
        canonical = auth.canonical_request(req)
        signature = auth.signature(auth.string_to_sign(req, canonical), req)
        signed = auth.signed_headers(auth.headers_to_sign(req))
        # botocore's _inject_signature_to_request format, without the HTTPHeaders copy.
        added.append(("authorization", f"AWS4-HMAC-SHA256 Credential={auth.scope(req)}, "
                                       f"SignedHeaders={signed}, Signature={signature}"))
        return added


def verify_sigv4(method: str, url: str, headers: list[tuple[str, str]], body: bytes,
                 secrets: dict[str, str], service: str, max_skew: float = 300.0,
                 now: _dt.datetime | None = None) -> str | None:
    """Recompute a received request's signature with botocore (the emulator's check).

    `url` is the request URL as received (raw path, raw query). Returns None when
    the signature matches, else why it does not. Only the headers named in
    SignedHeaders enter the canonical request, as AWS does.
    """
    import hmac as _hmac
    from botocore.credentials import Credentials

    hmap: dict[str, list[str]] = {}
    for k, v in headers:
        hmap.setdefault(k.lower(), []).append(v)
    authz = (hmap.get("authorization") or [""])[0]
    if not authz.startswith("AWS4-HMAC-SHA256 "):
        return "missing or malformed SigV4 Authorization header"
    fields: dict[str, str] = {}
    for part in authz[len("AWS4-HMAC-SHA256 "):].split(","):
        k, _, v = part.strip().partition("=")
        fields[k] = v
    try:
        akid, date, region, svc, term = fields["Credential"].split("/")
        signed = fields["SignedHeaders"].split(";")
        given = fields["Signature"]
    except (KeyError, ValueError):
        return "malformed SigV4 Authorization header"
    if svc != service or term != "aws4_request":
        return f"credential scope names service {svc!r}, expected {service!r}"
    secret = secrets.get(akid)
    if secret is None:
        return "the security token included in the request is invalid (unknown access key)"
    amz_date = (hmap.get("x-amz-date") or [""])[0]
    try:
        when = _dt.datetime.strptime(amz_date, SIGV4_TIMESTAMP).replace(tzinfo=_dt.timezone.utc)
    except ValueError:
        return "missing or malformed X-Amz-Date"
    if amz_date[:8] != date:
        return "credential scope date does not match X-Amz-Date"
    current = now or _dt.datetime.now(_dt.timezone.utc)
    if abs((current - when).total_seconds()) > max_skew:
        return "signature expired (X-Amz-Date too far from now)"
    if "host" not in signed:
        return "host must be a signed header"
    token = (hmap.get("x-amz-security-token") or [None])[0]
    auth = _Auth(Credentials(akid, secret, token), service, region)
    req = AWSRequest(method=method, url=url)
    for name in signed:
        if name not in hmap:
            return f"signed header {name!r} is missing from the request"
        req.headers[name] = ",".join(hmap[name])
    req.context["timestamp"] = amz_date
    req.context["payload_sha256"] = hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256
    canonical = auth.canonical_request(req)
    if auth.signed_headers(auth.headers_to_sign(req)) != ";".join(signed):
        return "SignedHeaders do not match the canonical header list"
    expected = auth.signature(auth.string_to_sign(req, canonical), req)
    if not _hmac.compare_digest(expected, given):
        return ("The request signature we calculated does not match the signature you provided. "
                "Check your AWS Secret Access Key and signing method.")
    return None
