"""A rate-limit key's value per request, without CEL for the plain field reads.

Most keys name one field: `jwt.sub`, `jwt["tenant_id"]`, `request.headers["x-api-key"]`,
`source.address`, `request.path`. Evaluating those through the CEL library (the
activation, the projection, the library call) cost ~60,000 instructions per
request (callgrind, benchmarks/ratelimit_bench.py "filter, header key"), a quarter
of a whole proxied request; reading the field directly costs a few hundred. So
`key_reader(expr)` recognises exactly those shapes and reads the field itself,
with CEL's semantics: a missing header or claim is an error (the caller fails
closed), and a claim that is not a string (a number, a list) is handed to CEL after
all, so that its text is CEL's `string()` form. Any other expression is evaluated by
CEL.

A header a key reads that the request repeats is refused (`RepeatedHeader`, 400 in
every limiter whatever its failure_mode), never joined: `x-api-key: K` plus
`x-api-key: <random>` would otherwise be a fresh bucket per request while the
upstream (Go, Starlette: the first value) still reads K, a way around any limit.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Callable

_HEADER = re.compile(r"""^\s*request\s*\.\s*headers\s*\[\s*(["'])([a-z0-9!#$%&*+.^_`|~-]+)\1\s*\]\s*$""")
_CLAIM_DOT = re.compile(r"^\s*jwt\s*\.\s*([A-Za-z_][A-Za-z0-9_]*)\s*$")
_CLAIM_INDEX = re.compile(r"""^\s*jwt\s*\[\s*(["'])([^"'\\]+)\1\s*\]\s*$""")
_FIELD = re.compile(r"^\s*(request\s*\.\s*(?:path|method|host)|source\s*\.\s*address)\s*$")


class KeyError_(LookupError):
    """The key's field is not there (CEL: no such key)."""


class RepeatedHeader(ValueError):
    """A header the key reads appears more than once in the request (the client's doing)."""

    def __init__(self, name: str):
        super().__init__(f"header {name!r} is repeated and a rate limit key reads it")
        self.name = name


_HEADER_READ = re.compile(r"""headers\s*\[\s*(["'])([^"'\\]+)\1\s*\]""")


def key_reader(expr: Any) -> Callable[[Any], str]:
    """A function ex → the key's text (raising when CEL's evaluation would fail)."""
    src = expr.source
    m = _HEADER.match(src)
    if m:
        return _header_reader(m.group(2))
    m = _CLAIM_DOT.match(src) or _CLAIM_INDEX.match(src)
    if m:
        return _claim_reader(m.group(m.lastindex), expr)
    m = _FIELD.match(src)
    if m:
        field = re.sub(r"\s+", "", m.group(1))
        if field == "source.address":
            return lambda ex: ex.conn.peer_host
        attr = field.split(".")[1]
        return lambda ex: getattr(ex.request, attr)
    names = frozenset(m.group(2).lower() for m in _HEADER_READ.finditer(src))
    if not names:
        return lambda ex: expr.evaluate_str(ex.activation)

    def read_checked(ex: Any) -> str:
        seen = set()
        for k, _ in ex.request.headers.items:
            if k in names:
                if k in seen:
                    raise RepeatedHeader(k)
                seen.add(k)
        return expr.evaluate_str(ex.activation)
    return read_checked


def _header_reader(name: str) -> Callable[[Any], str]:
    def read(ex: Any) -> str:
        found = None
        for k, v in ex.request.headers.items:
            if k == name:
                if found is not None:
                    raise RepeatedHeader(name)
                found = v
        if found is None:
            raise KeyError_(f"no such key: {name}")
        return found
    return read


def _claim_reader(claim: str, expr: Any) -> Callable[[Any], str]:
    def read(ex: Any) -> str:
        claims = ex.jwt_claims
        value = claims.get(claim) if claims else None
        if type(value) is str:
            return value
        if value is None and (not claims or claim not in claims):
            raise KeyError_(f"no such key: {claim}")
        return expr.evaluate_str(ex.activation)    # not text: CEL's string() form, or its error
    return read


#: The longest key value sent to a remote limiter as it is; longer or unprintable ones
#: (client input: a header can be 64 KB) go as their digest, so a client cannot grow
#: Redis keys or a rate-limit service's descriptor cache without bound.
MAX_VALUE = 128


def bounded(value: str) -> str:
    """`value`, or `#` + its 128-bit digest when it is too long or not printable."""
    if len(value) > MAX_VALUE or not value.isprintable():
        return "#" + hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    return value
