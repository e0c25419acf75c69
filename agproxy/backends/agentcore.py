"""`type = "agentcore"`: Amazon Bedrock AgentCore Runtime (InvokeAgentRuntime).

Theory of operation
===================

Every request on a route pointing here becomes one InvokeAgentRuntime call:

    POST {endpoint}/runtimes/{ARN, percent-encoded whole}/invocations?qualifier=Q

The region comes from the ARN, the endpoint defaults to
`https://bedrock-agentcore.{region}.amazonaws.com` (`endpoint` overrides it, for
VPC endpoints and the test emulator). The target is built once at load; the
upstream pool writes it as is, so `%3A`/`%2F` stay encoded on the wire while
botocore's canonical request encodes them once more (`%253A`), as AWS expects.

What AgentCore receives is decided here, not inherited from the client: a request
carries exactly `host`, `content-type`, `accept`, the session id, the MCP and
trace headers, the custom headers that this route's own filters set
(`claims_to_headers`, `forward_token`, `transform`) or that `forward_headers`
names, and the user id this backend derives. Nothing else of the client's
request is forwarded: no cookies, no client `Authorization` in SigV4 mode, no
client-chosen `...-Runtime-User-Id` (that is an assertion only the gateway makes),
no `X-Amzn-Bedrock-AgentCore-Runtime-Custom-*` header the route did not vouch for.

Two ways to authenticate:

- `auth = "sigv4"` (IAM): the body is buffered (up to `max_body`, ≤ 100 MB as
  AgentCore allows; over it 413) for the payload hash, and the request is signed
  with botocore's SigV4Auth over exactly the headers listed above (identity/aws.py).
  Credentials come from the standard chain, resolved once at startup in a thread
  and refreshed in the background; a request never fetches credentials.
- `auth = "bearer"` (AgentCore customJWTAuthorizer): `Authorization: Bearer` with
  the route's OBO token (`ex.obo_token`, pattern 1) or else the caller's
  validated token (`ex.jwt_token`); the body streams, nothing is buffered.

The session id (`X-Amzn-Bedrock-AgentCore-Runtime-Session-Id`, 33–256 chars) comes
from `session_header_from` (CEL) or the client's header; the user id from
`user_id_from` (CEL, SigV4 only). Responses — including AgentCore's errors (400,
403, 404, 409, 424, 429, 5xx) — are relayed with their status and body and
streamed (`text/event-stream` arrives chunk by chunk); they are counted per
status in `<prefix>_agentcore_responses_total{backend,status}`.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any
from urllib.parse import quote

from agproxy.backends.relay import relay
from agproxy.config.reader import Section
from agproxy.http.messages import BodyTooLarge, Headers, text_field_value
from agproxy.identity.aws import AwsCredentials, NoCredentials, SigV4Signer
from agproxy.proxy.contract import Backend, LocalReply, Provides, Response, RouteChain
from agproxy.upstream.origin import Origin

log = logging.getLogger("agproxy.agentcore")

TYPE = "agentcore"

SERVICE = "bedrock-agentcore"
MAX_BODY = 100 * 1024 * 1024
SESSION_HEADER = "x-amzn-bedrock-agentcore-runtime-session-id"
USER_ID_HEADER = "x-amzn-bedrock-agentcore-runtime-user-id"
CUSTOM_PREFIX = "x-amzn-bedrock-agentcore-runtime-custom-"
# Client headers passed through to AgentCore as they are.
PASS_THROUGH = frozenset({
    "content-type", "accept", "mcp-session-id", "mcp-protocol-version", "mcp-method", "mcp-name",
    "traceparent", "tracestate", "baggage",
})
NEVER_FORWARD = frozenset({"host", "authorization", "content-length", "transfer-encoding", "connection",
                           "cookie", "proxy-authorization", USER_ID_HEADER, "x-amz-date",
                           "x-amz-security-token", "x-amz-content-sha256"})
ARN_RE = re.compile(r"^arn:(aws|aws-cn|aws-us-gov):bedrock-agentcore:([a-z0-9-]+):(\d{12}):runtime/([A-Za-z0-9_.-]+)$")

def _response_counter(metrics: Any):
    if metrics is None:
        return None
    from prometheus_client import Counter
    return metrics.family(Counter, "agentcore_responses",
                          "AgentCore InvokeAgentRuntime responses by backend and status", ["backend", "status"])


class AgentCoreBackend(Backend):
    kind = TYPE

    def __init__(self, *, runtime_arn: str, qualifier: str, region: str, endpoint: str, origin: Origin,
                 auth: str, credentials: AwsCredentials | None, session_expr: Any, user_id_expr: Any,
                 forward_headers: frozenset[str], max_body: int, counter: Any):
        self.runtime_arn = runtime_arn
        self.qualifier = qualifier
        self.region = region
        self.endpoint = endpoint
        self.origin = origin
        self.auth = auth
        self.credentials = credentials
        self.signer = SigV4Signer(credentials, SERVICE, region) if credentials is not None else None
        self.session_expr = session_expr
        self.user_id_expr = user_id_expr
        self.forward_headers = forward_headers
        self.max_body = max_body
        self.target = (f"{origin.base_path}/runtimes/{quote(runtime_arn, safe='')}/invocations"
                       f"?qualifier={quote(qualifier, safe='')}")
        self.sign_url = f"{origin.scheme}://{origin.authority}{self.target}"
        self.route_headers: dict[str, frozenset[str]] = {}
        self.responses: dict[int, int] = {}
        self._counter = counter
        self._children: dict[int, Any] = {}

    # -- load time -----------------------------------------------------------------------
    def check_route(self, chain: RouteChain) -> None:
        """The headers this route's filters set are forwarded; bearer mode needs a token."""
        self.route_headers[chain.name] = chain.request_headers_set() - NEVER_FORWARD
        if self.auth == "bearer" and not (chain.provides(Provides.OBO_TOKEN) or
                                          chain.provides(Provides.CALLER_TOKEN)):
            chain.problems.add(f"{chain.path}.backend",
                               f"agentcore backend {self.name!r} uses auth = \"bearer\": the route needs "
                               "[route.obo] or [route.jwt] to provide the token")

    # -- per request ---------------------------------------------------------------------
    async def respond(self, ex) -> Response:
        req = ex.request
        if req.method != "POST":
            return LocalReply.error(405, "method_not_allowed", "AgentCore runtimes are invoked with POST",
                                    [("allow", "POST")])
        route = ex.route.name if ex.route is not None else ""
        extra = self.route_headers.get(route, frozenset()) | self.forward_headers
        headers: list[tuple[str, str]] = [("host", self.origin.authority)]
        client_session = None
        for k, v in req.headers.items:
            if k in PASS_THROUGH or k in extra:
                if k not in NEVER_FORWARD:
                    headers.append((k, v))
            elif k == SESSION_HEADER:
                client_session = v
        bad = self._runtime_headers(ex, headers, client_session)
        if bad is not None:
            return bad

        if self.auth == "sigv4":
            cl = req.headers.get("content-length")
            if ex.body is None and cl is not None and cl.isdigit() and int(cl) > self.max_body:
                return self._too_large()
            try:
                body = await ex.read_body(self.max_body)
            except BodyTooLarge:
                return self._too_large()
            try:
                try:
                    signed = self.signer.sign("POST", self.sign_url, headers, body)
                except NoCredentials:
                    await self.credentials.wait_resolved()
                    signed = self.signer.sign("POST", self.sign_url, headers, body)
                headers.extend(signed)
            except NoCredentials as exc:
                log.error("agentcore %s: cannot sign: %s", self.name, exc)
                return LocalReply.error(503, "no_credentials", "the gateway has no AWS credentials")
            length: int | None = len(body)
        else:
            token = ex.obo_token or ex.jwt_token
            if not token:
                return LocalReply.error(401, "unauthorized", "no token to present to AgentCore",
                                        [("www-authenticate", "Bearer")])
            headers.append(("authorization", "Bearer " + token))
            body, length = ex.request_body()
            if length is not None and length > self.max_body:
                return self._too_large()
        # Counted by the status the client gets (an upstream failure counts as its 502/504).
        ex.on_done(self._count_done)
        return await relay(ex, self.origin, "POST", self.target, Headers(headers), body, ex.route.timeout,
                           length, self.name)

    def _runtime_headers(self, ex, headers: list, client_session: str | None) -> LocalReply | None:
        from agproxy.cel import CelEvalError
        session = client_session
        if self.session_expr is not None:
            try:
                session = self.session_expr.evaluate_str(ex.activation)
            except CelEvalError:
                return LocalReply.error(400, "bad_request", "cannot derive the AgentCore session id for this request")
        if session is not None:
            if not (33 <= len(session) <= 256) or not session.isprintable():
                return LocalReply.error(400, "bad_request",
                                        "the AgentCore session id must be 33 to 256 printable characters")
            headers.append((SESSION_HEADER, session if self.session_expr is None else text_field_value(session)))
        if self.user_id_expr is not None:
            try:
                user = self.user_id_expr.evaluate_str(ex.activation)
            except CelEvalError:
                return LocalReply.error(403, "forbidden", "cannot derive the AgentCore user id for this request")
            if not user or len(user) > 1024 or not user.isprintable():
                return LocalReply.error(400, "bad_request", "the AgentCore user id must be 1 to 1024 characters")
            headers.append((USER_ID_HEADER, text_field_value(user)))
        return None

    def _too_large(self) -> LocalReply:
        return LocalReply.error(413, "payload_too_large",
                                f"the request body exceeds {self.max_body} bytes (this AgentCore backend's limit)")

    def _count_done(self, ex) -> None:
        if ex.status != 499:     # the client left before any answer: nothing to count
            self._count(ex.status)

    def _count(self, status: int) -> None:
        self.responses[status] = self.responses.get(status, 0) + 1
        if self._counter is not None:
            c = self._children.get(status)
            if c is None:
                c = self._children[status] = self._counter.labels(self.name, str(status))
            c.inc()

    def describe(self) -> dict:
        out: dict[str, Any] = {
            "type": self.kind,
            "runtime_arn": self.runtime_arn,
            "qualifier": self.qualifier,
            "region": self.region,
            "endpoint": self.endpoint,
            "auth": self.auth,
            "max_body": self.max_body,
            "responses": {str(k): v for k, v in sorted(self.responses.items())},
        }
        if self.credentials is not None:
            out["aws_credentials"] = self.credentials.describe()
        if self.session_expr is not None:
            out["session_header_from"] = self.session_expr.source
        if self.user_id_expr is not None:
            out["user_id_from"] = self.user_id_expr.source
        if self.forward_headers:
            out["forward_headers"] = sorted(self.forward_headers)
        return out


def _compile(sec: Section, key: str, src: Any):
    if not isinstance(src, str):
        return None
    from agproxy.cel import CelCompileError, compile_expression
    try:
        return compile_expression(src)
    except CelCompileError as exc:
        sec.error(key, str(exc))
        return None


def build(name: str, sec: Section, ctx: Any) -> AgentCoreBackend | None:
    sec.str("type")
    arn = sec.str("runtime_arn")
    qualifier = sec.str("qualifier", "DEFAULT")
    auth = sec.str("auth", "sigv4", choices=("sigv4", "bearer"))
    endpoint = sec.str("endpoint", None)
    session_src = sec.str("session_header_from", None)
    user_src = sec.str("user_id_from", None)
    profile = sec.str("aws_profile", None)
    role_arn = sec.str("aws_role_arn", None)
    max_body = sec.int("max_body", MAX_BODY, min=0, max=MAX_BODY)
    forward = sec.str_list("forward_headers", [])
    ca = sec.str("tls_ca_file", None)
    connect_timeout = sec.duration("connect_timeout", 5.0)
    sec.done()

    region = None
    if isinstance(arn, str):
        m = ARN_RE.match(arn)
        if not m:
            sec.error("runtime_arn", "expected arn:aws:bedrock-agentcore:<region>:<account>:runtime/<id>")
        else:
            region = m.group(2)
    if isinstance(qualifier, str) and not re.match(r"^[A-Za-z0-9_-]{1,64}$", qualifier):
        sec.error("qualifier", "must be an endpoint name (letters, digits, '_' and '-')")
    if auth == "bearer":
        if user_src is not None:
            sec.error("user_id_from", 'only with auth = "sigv4" (AgentCore accepts a user id only from IAM callers)')
        for key, v in (("aws_profile", profile), ("aws_role_arn", role_arn)):
            if v is not None:
                sec.error(key, 'only with auth = "sigv4"')
    if role_arn is not None and not re.match(r"^arn:aws[a-z-]*:iam::\d{12}:role/.+$", role_arn):
        sec.error("aws_role_arn", "expected arn:aws:iam::<account>:role/<name>")
    fwd: set[str] = set()
    for i, h in enumerate(forward or []):
        low = h.lower()
        if low in NEVER_FORWARD:
            sec.problems.add(f"{sec.sub('forward_headers')}[{i}]", f"{h} is never forwarded to AgentCore")
        fwd.add(low)
    session_expr = _compile(sec, "session_header_from", session_src)
    user_expr = _compile(sec, "user_id_from", user_src)
    if ca is not None:
        ca = ctx.path(ca)
        if not os.path.isfile(ca):
            sec.error("tls_ca_file", f"file not found: {ca}")
    if region is None or not isinstance(auth, str):
        return None
    endpoint = endpoint or f"https://bedrock-agentcore.{region}.amazonaws.com"
    origin = sec.convert("endpoint", endpoint,
                         lambda u: Origin.from_url(u, ca_file=ca, connect_timeout=connect_timeout or 5.0))
    if origin is None:
        return None
    if origin.scheme == "http" and origin.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("agentcore backend %s: endpoint %s is plain http", name, endpoint)

    creds = None
    if auth == "sigv4":
        cache = getattr(ctx, "_agentcore_credentials", None)
        if cache is None:
            cache = ctx._agentcore_credentials = {}
        key = (profile, role_arn)
        creds = cache.get(key)
        if creds is None:
            creds = cache[key] = AwsCredentials(profile=profile, role_arn=role_arn, region=region)
            ctx.on_start(creds.start)
            ctx.on_stop(creds.stop)
            label = "aws_credentials" + (f"[{profile or ''}{'→' + role_arn if role_arn else ''}]"
                                         if (profile or role_arn) else "")
            ctx.add_readiness(label, creds.readiness)
    return AgentCoreBackend(runtime_arn=arn, qualifier=qualifier, region=region, endpoint=endpoint,
                            origin=origin, auth=auth, credentials=creds, session_expr=session_expr,
                            user_id_expr=user_expr, forward_headers=frozenset(fwd), max_body=max_body,
                            counter=_response_counter(ctx.metrics))
