"""Routes and the route table: first match wins, in config order.

A route matches on listener, host (exact, or `*.example.com`), path (exact, prefix
or regex), methods and exact header values. Matching is a few string compares per
route; no route → the gateway's own 404. Routes match the normalised path
(`Router.route`, http/path.py), case-sensitively.

The router does not try every route: a route whose `path` or `path_prefix` names a
first segment (`/api`, `/v1/chat`) can only match paths with that first segment, so
at load the routes are indexed by it (`_index`); a request tries, in config order,
the routes of its first segment and those that may match any path (`/`, a regex,
host or header matches only). First match wins exactly as if every route were
tried. Measured (callgrind): each route tried costs ~2.3k instructions, and the
benchmark's catch-all `/` sits behind seven others.
"""

from __future__ import annotations

import re
from typing import Any

from agproxy.http.messages import RequestHead
from agproxy.http.path import PathError, merge_only, normalize, routing_view
from agproxy.proxy.contract import Filter


class Match:
    __slots__ = ("path", "path_prefix", "path_regex", "methods", "headers", "host", "host_suffix")

    def __init__(self, path: str | None = None, path_prefix: str | None = None,
                 path_regex: str | None = None, methods: list[str] | None = None,
                 headers: dict[str, str] | None = None, host: str | None = None):
        self.path = path
        self.path_prefix = path_prefix
        self.path_regex = re.compile(path_regex) if path_regex else None
        self.methods = frozenset(m.upper() for m in methods) if methods else None
        self.headers = [(k.lower(), v) for k, v in (headers or {}).items()]
        host = host.lower() if host else None
        self.host_suffix = host[1:] if host and host.startswith("*.") else None
        self.host = None if self.host_suffix else host

    def matches(self, req: RequestHead, path: str) -> bool:
        if self.methods is not None and req.method not in self.methods:
            return False
        if self.host is not None and req.host != self.host:
            return False
        if self.host_suffix is not None and not req.host.endswith(self.host_suffix):
            return False
        if self.path is not None and path != self.path:
            return False
        if self.path_prefix is not None and not _prefix_match(path, self.path_prefix):
            return False
        if self.path_regex is not None and not self.path_regex.search(path):
            return False
        for name, value in self.headers:
            if req.headers.get(name) != value:
                return False
        return True

    def describe(self) -> dict:
        out: dict[str, Any] = {}
        for key in ("path", "path_prefix", "host"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        if self.host_suffix:
            out["host"] = "*" + self.host_suffix
        if self.path_regex is not None:
            out["path_regex"] = self.path_regex.pattern
        if self.methods:
            out["methods"] = sorted(self.methods)
        if self.headers:
            out["headers"] = dict(self.headers)
        return out


def _prefix_match(path: str, prefix: str) -> bool:
    # "/api" matches "/api", "/api/x" and "/api?..", not "/apix" — unless the prefix ends in "/".
    if not path.startswith(prefix):
        return False
    return len(path) == len(prefix) or prefix.endswith("/") or path[len(prefix)] == "/"


class Route:
    """A matched route's plan, computed once at load so the exchange only reads it.

    The request phase runs `head_filters`, then buffers the body (up to
    `body_limit`) and runs `body_filters` (from the first filter that declares a
    `body_limit` on: stages are ordered, so authentication has run by then).
    `response_filters` are the filters with a response phase, in reverse order;
    `reads_response_body` means one of them may return a body hook.
    """

    __slots__ = ("name", "listener", "match", "backend", "timeout", "filters", "head_filters",
                 "body_filters", "response_filters", "body_limit", "reads_response_body", "index")

    def __init__(self, name: str, index: int, listener: str | None, match: Match, backend: Any,
                 timeout: float, filters: list[Filter]):
        self.name = name
        self.index = index
        self.listener = listener
        self.match = match
        self.backend = backend
        self.timeout = timeout
        self.filters = tuple(filters)
        first = next((i for i, f in enumerate(filters) if f.body_limit is not None), len(filters))
        self.head_filters = tuple(filters[:first])
        self.body_filters = tuple(filters[first:])
        limits = [f.body_limit for f in self.body_filters if f.body_limit is not None]
        self.body_limit = max(limits) if limits else None
        self.response_filters = tuple(f for f in reversed(filters)
                                      if type(f).on_response is not Filter.on_response)
        self.reads_response_body = any(f.reads_response_body for f in self.response_filters)


# Paths seen to need no normalisation (a property of the string alone, so one set
# per process serves every Router).
_CLEAN: set[str] = set()
_CLEAN_MAX = 4096
_CLEAN_LEN = 256


def _first_segment(match: Match) -> str | None:
    """The first path segment of every path `match` accepts, or None when it may
    accept paths with any first segment. `/api` and `/api/` accept `/api`, `/api/x`
    (and `/api?..`): first segment `api`; `/` accepts anything."""
    p = match.path if match.path is not None else match.path_prefix
    if p is None or p[:1] != "/" or p == "/":
        return None
    return p[1:].partition("/")[0]


def _index(routes: tuple[Route, ...]) -> tuple[tuple[Route, ...], dict[str, tuple[Route, ...]]]:
    """The routes any path may match, and per first segment the routes a path with
    that segment may match; both in config order."""
    segs = {_first_segment(r.match) for r in routes} - {None}
    by_seg = {seg: tuple(r for r in routes if _first_segment(r.match) in (None, seg)) for seg in segs}
    return tuple(r for r in routes if _first_segment(r.match) is None), by_seg


class Router:
    def __init__(self, routes: list[Route], *, normalize_path: bool = True, merge_slashes: bool = True):
        self.routes = tuple(routes)    # (a tuple: the index below must not go stale)
        self.normalize_path = normalize_path
        self.merge_slashes = merge_slashes
        self._check = normalize_path or merge_slashes
        self._any, self._by_segment = _index(self.routes)

    def replace(self, old: Route, new: Route) -> None:
        """Put `new` in `old`'s place (the in-process test gateway adds filters to a route)."""
        routes = list(self.routes)
        routes[routes.index(old)] = new
        self.routes = tuple(routes)
        self._any, self._by_segment = _index(self.routes)

    def route(self, req: RequestHead, listener: str) -> Route | None:
        """Normalise the request's path in place (`[gateway] normalize_path`,
        `merge_slashes`; see http/path.py), then match. Raises PathError (→ 400)
        for a path that is invalid or that routes differently when read the way
        some backends read it."""
        path = req.path
        # The per-request test that the path needs no work. Measured (callgrind, per
        # request): six substring scans ~2.0-2.4k instructions, a regex search more;
        # a set of paths already found clean ~0.9k, and paths repeat. The set is
        # bounded (entries and length); once full, the scans alone decide.
        if self._check and path not in _CLEAN:
            if ("%" in path or "/." in path or "//" in path or ";" in path
                    or "\\" in path or "#" in path):
                if path[:1] == "/":
                    return self._route_slow(req, listener, path)
            elif len(_CLEAN) < _CLEAN_MAX and len(path) <= _CLEAN_LEN:
                _CLEAN.add(path)
        if path[:1] == "/":
            end = path.find("/", 1)
            routes = self._by_segment.get(path[1:] if end < 0 else path[1:end], self._any)
        else:
            routes = self._any
        for route in routes:
            if route.listener is not None and route.listener != listener:
                continue
            if route.match.matches(req, path):
                return route
        return None

    def _route_slow(self, req: RequestHead, listener: str, path: str) -> Route | None:
        if self.normalize_path:
            new = normalize(path, self.merge_slashes)
            alt = routing_view(new)
        else:
            new, alt = merge_only(path), None
        if new != path:
            _, sep, query = req.target.partition("?")
            req.set_target(new + sep + query)
        found = self.match(req, listener, new)
        if alt is not None and self.match(req, listener, alt) is not found:
            raise PathError("the path routes differently when %2F, %5C or ';' are read as separators")
        return found

    def match(self, req: RequestHead, listener: str, path: str | None = None) -> Route | None:
        """The first route for this request, on its path as it is (no normalisation)."""
        if path is None:
            path = req.path
        if path[:1] == "/":
            end = path.find("/", 1)
            routes = self._by_segment.get(path[1:] if end < 0 else path[1:end], self._any)
        else:
            routes = self._any
        for route in routes:
            if route.listener is not None and route.listener != listener:
                continue
            if route.match.matches(req, path):
                return route
        return None
