"""Secrets never leave the process: /config and log lines show them redacted.

Theory of operation
===================

A name-based rule alone misses most secrets a gateway config holds: they sit in
header values (`set = { "x-api-key" = '"sk-live-..."' }`), in static backend
headers, in URLs (`https://user:pw@host`, `?api_key=...`). So a value is redacted
for what it *is* as well as for the key it is under:

- by key (`redact`, for structured data such as /config): a key that names a
  secret (`password`, `client_secret`, `api_key`, `private_key`, `credential`,
  `session_token`, `access_key`, or ending in `key`, `secret`, `token`, `password`,
  `passwd`, `credential(s)`), except `*_env` and `*_file` keys, which name where a
  secret is, not the secret. Inside a table of headers (`headers`, transform
  `set`/`add`, `claims_to_headers`) any header known to carry a credential
  (`authorization`, `proxy-authorization`, `cookie`, `set-cookie`, and names such as
  `x-api-key`, `api-key`, `x-auth-token`, `token`) is redacted whatever its value;
- by shape (`redact_text`, applied to every string of /config and to every log
  line): `Bearer`/`Basic` credentials, URL userinfo, URL query parameters named
  like a secret, JSON Web Tokens, and well-known key formats (OpenAI/Anthropic
  `sk-...`, Stripe, AWS access key ids, GitHub, Slack, Google API keys, PEM private
  keys).

Only the secret part is replaced (`Bearer <redacted>`, `https://<redacted>@host`),
so the rest of the value stays useful for debugging. Nothing here is on the
request path.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "<redacted>"

SECRET_WORDS = ("secret", "password", "passwd", "api_key", "apikey", "private_key", "credential",
                "session_token", "access_key")
SECRET_SUFFIXES = ("key", "secret", "token", "password", "passwd", "credential", "credentials")
# A bare "key" or "token" is a lookup key or a mode outside header tables
# (rate_limit.key = "jwt.sub", forward_token.token = "subject").
_BARE = frozenset({"key", "token"})

#: headers whose value is a credential, whatever it looks like
CREDENTIAL_HEADERS = frozenset({
    "authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api-key",
    "x-auth-token", "x-access-token", "x-refresh-token", "x-amz-security-token", "x-goog-api-key",
    "ocp-apim-subscription-key", "x-csrf-token", "x-xsrf-token", "private-token", "x-vault-token",
})
#: tables whose keys are header names
HEADER_TABLES = frozenset({"headers", "set", "add", "claims_to_headers", "response_headers",
                           "request_headers"})

_TOKEN68 = r"[A-Za-z0-9\-._~+/]{8,}=*"
_PATTERNS: list[tuple[re.Pattern, str]] = [
    # RFC 9110 credentials (the scheme is case-insensitive)
    (re.compile(r"(?i)\b(bearer|basic)(\s+)" + _TOKEN68), r"\1\2" + REDACTED),
    # URL userinfo: scheme://user:password@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/?#\s@\"'<>]+@"), r"\1" + REDACTED + "@"),
    # URL query parameters named like a secret (?api_key=, &X-Amz-Signature=, &access_token=)
    (re.compile(r"(?i)([?&][^=&#\s\"']*?(?:key|secret|token|password|passwd|signature|sig|"
                r"credential|auth)s?=)[^&#\s\"']+"), r"\1" + REDACTED),
    # JSON Web Tokens (JWS compact)
    (re.compile(r"\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*"), REDACTED),
    # provider key formats
    (re.compile(r"\b(?:sk|rk|pk)[-_](?:live|test|proj|ant)?[-_]?[A-Za-z0-9_\-]{16,}"), REDACTED),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), REDACTED),
    (re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})"), REDACTED),
    (re.compile(r"\bxox[abposr]-[A-Za-z0-9\-]{10,}"), REDACTED),
    (re.compile(r"\bAIza[0-9A-Za-z_\-]{35}"), REDACTED),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)", re.S),
     REDACTED),
]
def _norm(key: str) -> str:
    return key.lower().replace("-", "_")


def is_secret_key(key: str) -> bool:
    """Whether a value under this key (outside a header table) is a secret."""
    k = _norm(key)
    if k.endswith("_env") or k.endswith("_file"):
        return False   # the name of a variable or a file is not the secret itself
    if k in _BARE:
        return False
    return any(w in k for w in SECRET_WORDS) or k.endswith(SECRET_SUFFIXES)


def is_credential_header(name: str) -> bool:
    """Whether a header of this name carries a credential."""
    n = name.lower()
    if n in CREDENTIAL_HEADERS:
        return True
    k = _norm(n)
    return any(w in k for w in SECRET_WORDS) or k.endswith(SECRET_SUFFIXES)


def redact_text(text: str) -> str:
    """`text` with every credential-shaped part replaced by `<redacted>`."""
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


def redact(value: Any, key: str = "", headers: bool = False) -> Any:
    """A copy of `value` (JSON-like data) with secrets redacted, by key and by shape.
    `headers`: the dict keys (or the first items of pairs) here are header names."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if headers and is_credential_header(k) and v:
                out[k] = REDACTED
            else:
                out[k] = redact(v, k, _norm(k) in HEADER_TABLES)
        return out
    if isinstance(value, (list, tuple)):
        if (headers and len(value) == 2 and type(value[0]) is str and type(value[1]) is str
                and is_credential_header(value[0])):
            return [value[0], REDACTED]     # a (name, value) pair
        return [redact(v, key, headers) for v in value]
    if isinstance(value, str):
        if value and key and is_secret_key(key):
            return REDACTED
        return redact_text(value)
    if isinstance(value, bytes) and key and is_secret_key(key):
        return REDACTED
    return value
