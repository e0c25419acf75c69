"""Request-path normalisation: the path routes match on is the path upstreams receive.

Theory of operation
===================

A gateway that matches routes on the raw path and forwards it unchanged lets a
client pick a route with one spelling and the backend serve another:
`/x/../secure`, `//secure`, `/%73ecure` miss a JWT-protected `/secure` route, reach
a catch-all, and a backend that normalises (most do) serves `/secure` without the
check. So the path is normalised once per request, before routing, and the
normalised path is what routing, policies (CEL `request.path`), the access log and
the upstream see. The query is never touched.

`normalize(path, merge_slashes)` (`[gateway] normalize_path = true`), in order:

1. percent-encoding (RFC 3986 §6.2.2.2): `%XX` of an unreserved character
   (`A-Z a-z 0-9 - . _ ~`) is decoded, every other `%XX` is kept with uppercase hex.
   A `%` not followed by two hex digits is an error (400);
2. a raw backslash or `#` in the path is an error (400): neither is allowed in a
   request target, and some backends take `\\` for `/`;
3. `merge_slashes`: runs of `/` become one (`//secure` → `/secure`);
4. dot segments are removed (RFC 3986 §5.2.4): `/a/./b/../c` → `/a/c`, never
   above the root. Step 1 runs first, so `%2E%2E` is a dot segment too.

`%2F` and `%5C` (encoded `/` and `\\`) stay encoded and are not separators for
steps 3-4 (RFC 3986: they are data, as in `/repos/group%2Fname`), and `;` is data
too, but some backends decode `%2F` to `/` or cut `;params` off each segment
(Tomcat: `/secure;x/admin` → `/secure/admin`). `routing_view(path)` gives the path
such a backend would see; the router accepts the request only when both spellings
pick the same route, and a dot segment that only that reading reveals
(`/a/..%2Fsecure`, `/a/..;/secure`) is an error. Routing cannot be bypassed
either way.

`merge_slashes` alone (`normalize_path = false`) only merges slashes.

Cost: an ordinary path (`/v1/chat/completions`) is only tested (`needs_work`, six
substring scans, behind a set of paths already found clean in proxy/route.py), never
copied.
"""

from __future__ import annotations

import re

__all__ = ["PathError", "needs_work", "normalize", "merge_only", "routing_view"]


def needs_work(path: str) -> bool:
    """Whether the path may change or be ambiguous (proxy/route.py inlines this test).
    "/." also catches "/.well-known", which the slow path leaves as it is."""
    return ("%" in path or "/." in path or "//" in path or ";" in path
            or "\\" in path or "#" in path)


_HEX = frozenset("0123456789abcdefABCDEF")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ALT_SEPARATORS = re.compile(r"%2F|%5C|/")
_SLASHES = re.compile(r"/{2,}")


class PathError(ValueError):
    """A request path the gateway refuses (answered 400); the message is safe to show."""


def _percent(path: str) -> str:
    parts = path.split("%")
    out = [parts[0]]
    for part in parts[1:]:
        if len(part) < 2 or part[0] not in _HEX or part[1] not in _HEX:
            raise PathError("invalid percent-encoding in the path")
        c = chr(int(part[:2], 16))
        if c in _UNRESERVED:
            out.append(c)
        else:
            out.append("%")
            out.append(part[:2].upper())
        out.append(part[2:])
    return "".join(out)


def _segments(segs: list[str], merge: bool) -> str:
    """RFC 3986 §5.2.4 over a path split on "/" (segs[0] is the empty string before
    the leading slash); with `merge`, empty segments are dropped except a trailing one."""
    out: list[str] = []
    last = len(segs) - 1
    for i in range(1, last + 1):
        s = segs[i]
        if s == ".":
            pass
        elif s == "..":
            if out:
                out.pop()
        elif s or not merge:
            out.append(s)
            continue
        if i == last:      # "/a/." "/a/.." "/a/": the path ends in a slash
            out.append("")
    return "/" + "/".join(out)


def normalize(path: str, merge_slashes: bool = True) -> str:
    """The normalised form of an origin-form path (no query); raises PathError."""
    if "%" in path:
        path = _percent(path)
    if "\\" in path:
        raise PathError("backslash in the path")
    if "#" in path:
        raise PathError("fragment in the request target")
    if "/." not in path and not (merge_slashes and "//" in path):
        return path
    return _segments(path.split("/"), merge_slashes)


def merge_only(path: str) -> str:
    return _SLASHES.sub("/", path)


def routing_view(path: str) -> str | None:
    """For a normalised path: how a backend that decodes `%2F`/`%5C` into separators
    and drops `;params` would read it, or None when no such backend reads it
    differently. Raises PathError when that reading has a dot segment."""
    if "%2F" not in path and "%5C" not in path and ";" not in path:
        return None
    segs = [s.partition(";")[0] for s in _ALT_SEPARATORS.split(path)]
    if "." in segs or ".." in segs:
        raise PathError("dot segment behind an encoded slash or a path parameter")
    return _segments(segs, True)
