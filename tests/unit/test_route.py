"""The route table (agproxy/proxy/route.py): the first-segment index picks exactly
the route a scan of every route in config order picks."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agproxy.http.messages import Headers, RequestHead
from agproxy.proxy.route import Match, Route, Router

SEGMENTS = ["", "api", "ap", "api2", "v1", "chat", "x"]


def _scan(routes: list[Route], req: RequestHead, listener: str, path: str) -> Route | None:
    for route in routes:
        if route.listener is not None and route.listener != listener:
            continue
        if route.match.matches(req, path):
            return route
    return None


def _paths() -> st.SearchStrategy[str]:
    seg = st.sampled_from(SEGMENTS)
    return st.one_of(
        st.lists(seg, min_size=1, max_size=3).map(lambda s: "/" + "/".join(s)),
        st.sampled_from(["/", "*", "//api", "/api/", "/api//x", ""]),
    )


def _match() -> st.SearchStrategy[Match]:
    return st.one_of(
        _paths().map(lambda p: Match(path_prefix=p)),
        _paths().map(lambda p: Match(path=p)),
        st.sampled_from(["^/api", "chat$", "^/$"]).map(lambda r: Match(path_regex=r)),
        st.sampled_from(["a.example", "*.example"]).map(lambda h: Match(host=h)),
        st.sampled_from(["GET", "POST"]).map(lambda m: Match(path_prefix="/api", methods=[m])),
        st.just(Match(headers={"x-t": "1"})),
        st.just(Match()),
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_match(), st.sampled_from([None, "main", "other"])), max_size=8),
       st.lists(st.tuples(_paths(), st.sampled_from(["GET", "POST"]),
                          st.sampled_from(["a.example", "b.example"]), st.booleans()), min_size=1, max_size=6))
def test_index_picks_what_a_full_scan_picks(table, requests):
    routes = [Route(f"r{i}", i, listener, match, None, 30.0, []) for i, (match, listener) in enumerate(table)]
    router = Router(routes)
    for path, method, host, header in requests:
        req = RequestHead(method, path, Headers([("x-t", "1")] if header else []), "http", host, "HTTP/1.1")
        assert router.match(req, "main", path) is _scan(routes, req, "main", path)
        assert router.match(req, "main", path + "/more") is _scan(routes, req, "main", path + "/more")


def test_catch_all_behind_prefixed_routes():
    routes = [Route(name, i, None, Match(path_prefix=prefix), None, 30.0, [])
              for i, (name, prefix) in enumerate([("a", "/api"), ("b", "/api/v2"), ("c", "/apix/"),
                                                  ("all", "/")])]
    router = Router(routes)

    def pick(path: str) -> str:
        route = router.route(RequestHead("GET", path, Headers(), "http", "h", "HTTP/1.1"), "main")
        return route.name if route else ""
    assert [pick(p) for p in ("/api", "/api/v2/x", "/apix", "/apix/y", "/ap", "/", "/x/api")] == \
        ["a", "a", "all", "c", "all", "all", "all"]
