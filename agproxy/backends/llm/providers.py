"""How a request reaches each provider kind: URL, credentials, headers, the pool.

Theory of operation: a `Provider` is built once from its `[[backend.X.provider]]`
table. Per attempt, `request(...)` writes exactly the headers the provider
needs, nothing of the client's request (its `Authorization`, cookies, identity
headers never travel: the caller's credential is the gateway's business, the
provider's key is the gateway's secret):

- `openai` / `openai_compatible`: `POST {url}/v1/chat/completions`,
  `authorization: Bearer $api_key_env` (optional for openai_compatible);
- `anthropic`: `POST {url}/v1/messages`, `x-api-key: $api_key_env`,
  `anthropic-version` (`anthropic_version`, default 2023-06-01);
- `bedrock`: `POST {url}/model/{modelId}/converse[-stream]`, `url` defaulting to
  `https://bedrock-runtime.{region}.amazonaws.com`, SigV4 (service `bedrock`,
  the provider's region) with the gateway's AWS credentials (identity/aws.py:
  botocore's chain, resolved at startup, refreshed in the background).

A `url` with a path is a prefix (`https://host/openai` → `/openai/v1/...`). API
keys are read from the environment at load and appear nowhere else: not in
/config, not in logs, never in an answer. A variable that is not set leaves the
gateway not ready (/readyz names it) and the provider unusable (every attempt
fails as a connect error, so the group fails over); `agproxy validate` does not
need the secrets.

Requests go through the gateway's upstream pool (`upstream/pool.py`): pooled
keep-alive HTTP/1.1, or HTTP/2 with `http2 = true`; the body is in memory (kept
for failover), so a pool retry on a stale keep-alive connection is safe.
"""

from __future__ import annotations

import os
from typing import Any

from agproxy.http.messages import Headers
from agproxy.identity.aws import AwsCredentials, NoCredentials, SigV4Signer
from agproxy.upstream.errors import UpstreamError
from agproxy.upstream.h1 import UpstreamResponse
from agproxy.upstream.origin import Origin
from agproxy.upstream.pool import get_pool

KINDS = ("openai", "openai_compatible", "anthropic", "bedrock")
ANTHROPIC_VERSION = "2023-06-01"
_ACCEPT_STREAM = {"openai": "text/event-stream", "openai_compatible": "text/event-stream",
                  "anthropic": "text/event-stream", "bedrock": "application/vnd.amazon.eventstream"}


class Provider:
    __slots__ = ("name", "kind", "origin", "model", "models", "priority", "weight", "timeout", "api_key_env",
                 "_api_key", "anthropic_version", "region", "credentials", "signer", "url")

    def __init__(self, name: str, kind: str, origin: Origin, *, model: str | None = None,
                 models: dict[str, str] | None = None, priority: int = 0, weight: float = 1.0,
                 timeout: float | None = None, api_key_env: str | None = None, api_key: str | None = None,
                 anthropic_version: str = ANTHROPIC_VERSION, region: str | None = None,
                 credentials: AwsCredentials | None = None, url: str = ""):
        self.name = name
        self.kind = kind
        self.origin = origin
        self.model = model
        self.models = models or {}
        self.priority = priority
        self.weight = weight
        self.timeout = timeout
        self.api_key_env = api_key_env
        self._api_key = api_key
        self.anthropic_version = anthropic_version
        self.region = region
        self.credentials = credentials
        self.signer = SigV4Signer(credentials, "bedrock", region) if credentials is not None and region else None
        self.url = url

    def model_for(self, requested: str) -> str | None:
        """The provider's model for a requested name; None when it does not serve it."""
        m = self.models.get(requested)
        if m is not None:
            return m
        if self.models and self.model is None:
            return None
        return self.model or requested

    def headers(self, target: str, body: bytes, stream: bool) -> Headers:
        """Exactly what the provider receives (SigV4 signs this list)."""
        h = [("host", self.origin.authority), ("content-type", "application/json"),
             ("accept", _ACCEPT_STREAM[self.kind] if stream else "application/json")]
        kind = self.kind
        if self.api_key_env is not None and not self._api_key:
            raise UpstreamError("connect", f"provider {self.name}: environment variable {self.api_key_env} is not set")
        if kind == "anthropic":
            h.append(("x-api-key", self._api_key or ""))
            h.append(("anthropic-version", self.anthropic_version))
        elif kind == "bedrock":
            url = f"{self.origin.scheme}://{self.origin.authority}{target}"
            h.extend(self.signer.sign("POST", url, h, body))
        elif self._api_key:
            h.append(("authorization", "Bearer " + self._api_key))
        return Headers(h)

    async def request(self, path: str, body: bytes, stream: bool, timeout: float | None,
                      trace: tuple = ()) -> UpstreamResponse:
        """Send one request; the response head (its body still streaming). Raises
        UpstreamError (connect / timeout / reset / protocol). `trace`: the W3C
        trace-context headers (telemetry/tracing.py `context_headers`), after signing."""
        target = self.origin.base_path + path
        try:
            headers = self.headers(target, body, stream)
        except NoCredentials:
            await self.credentials.wait_resolved()
            try:
                headers = self.headers(target, body, stream)
            except NoCredentials as exc:
                raise UpstreamError("connect", f"no AWS credentials to sign for {self.name}: {exc}") from None
        if trace:
            headers.items += trace
        return await get_pool().request(self.origin, "POST", target, headers, body,
                                        timeout=self.timeout or timeout, body_length=len(body))

    def describe(self) -> dict:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "url": self.url, "priority": self.priority,
                               "weight": self.weight}
        if self.model:
            out["model"] = self.model
        if self.models:
            out["models"] = dict(self.models)
        if self.api_key_env:
            out["api_key_env"] = self.api_key_env        # the variable's name, never its value
        if self.region:
            out["region"] = self.region
        if self.credentials is not None:
            out["aws_credentials"] = self.credentials.describe()
        return out


def build_provider(sec: Any, ctx: Any, credentials_cache: dict) -> Provider | None:
    """One `[[backend.X.provider]]` table; problems are reported at its TOML path."""
    name = sec.str("name")
    kind = sec.str("kind", choices=KINDS)
    url = sec.str("url", None)
    model = sec.str("model", None)
    models = sec.str_map("models", {})
    priority = sec.int("priority", 0, min=0)
    weight = sec.number("weight", 1.0)
    timeout = sec.duration("timeout", None)
    key_env = sec.str("api_key_env", None)
    version = sec.str("anthropic_version", ANTHROPIC_VERSION)
    region = sec.str("region", None)
    profile = sec.str("aws_profile", None)
    role_arn = sec.str("aws_role_arn", None)
    http2 = sec.bool("http2", False)
    ca = sec.str("tls_ca_file", None)
    connect_timeout = sec.duration("connect_timeout", 5.0)
    sec.done()
    if isinstance(weight, float) and weight <= 0:
        sec.error("weight", "must be > 0")
    if not isinstance(kind, str) or not isinstance(name, str):
        return None
    key = None
    if kind in ("openai", "anthropic", "openai_compatible"):
        if key_env is None and kind != "openai_compatible":
            sec.error("api_key_env", f"required for kind = {kind!r}: the name of the environment variable "
                                     "holding the API key (keys never go in the config text)")
        elif key_env is not None:
            key = os.environ.get(key_env)
            if not key:
                # A secret of the running process, not of the config: `validate` passes
                # without it; a gateway started without it is not ready, and the provider
                # is never sent a request without its key.
                ctx.add_readiness(f"llm_api_key[{name}]", lambda v=key_env: f"environment variable {v} is not set")
        for k, v in (("region", region), ("aws_profile", profile), ("aws_role_arn", role_arn)):
            if v is not None:
                sec.error(k, 'only with kind = "bedrock"')
        if url is None:
            if kind == "openai":
                url = "https://api.openai.com"
            elif kind == "anthropic":
                url = "https://api.anthropic.com"
            else:
                sec.error("url", 'required for kind = "openai_compatible"')
                return None
    else:
        if key_env is not None:
            sec.error("api_key_env", 'bedrock signs with AWS credentials (SigV4), not an API key')
        if region is None:
            sec.error("region", 'required for kind = "bedrock"')
            return None
        url = url or f"https://bedrock-runtime.{region}.amazonaws.com"
    if kind != "anthropic" and sec.has("anthropic_version"):
        sec.error("anthropic_version", 'only with kind = "anthropic"')
    if ca is not None:
        ca = ctx.path(ca)
        if not os.path.isfile(ca):
            sec.error("tls_ca_file", f"file not found: {ca}")
    origin = sec.convert("url", url, lambda u: Origin.from_url(u, ca_file=ca, http2=bool(http2),
                                                               connect_timeout=connect_timeout or 5.0))
    if origin is None:
        return None
    creds = None
    if kind == "bedrock":
        ck = (profile, role_arn)
        creds = credentials_cache.get(ck)
        if creds is None:
            creds = credentials_cache[ck] = AwsCredentials(profile=profile, role_arn=role_arn, region=region)
            ctx.on_start(creds.start)
            ctx.on_stop(creds.stop)
            ctx.add_readiness("aws_credentials[llm]" if ck == (None, None) else f"aws_credentials[llm:{profile or ''}"
                              f"{'→' + role_arn if role_arn else ''}]", creds.readiness)
    return Provider(name, kind, origin, model=model, models=models or {}, priority=priority or 0,
                    weight=weight if isinstance(weight, float) and weight > 0 else 1.0, timeout=timeout,
                    api_key_env=key_env, api_key=key, anthropic_version=version or ANTHROPIC_VERSION,
                    region=region, credentials=creds, url=url)
