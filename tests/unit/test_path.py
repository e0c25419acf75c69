"""Path normalisation (agproxy/http/path.py): RFC 3986 §5.2.4 / §6.2.2 cases, the
errors, and the routing view of encoded slashes and path parameters."""

from __future__ import annotations

import pytest

from agproxy.http.path import PathError, merge_only, needs_work, normalize, routing_view

CASES = [
    # (raw, merge_slashes=True, merge_slashes=False)
    ("/", "/", "/"),
    ("/v1/chat/completions", "/v1/chat/completions", "/v1/chat/completions"),
    ("/x/../secure/admin", "/secure/admin", "/secure/admin"),
    ("//secure/admin", "/secure/admin", "//secure/admin"),
    ("/secure//admin/", "/secure/admin/", "/secure//admin/"),
    ("/%73ecure/admin", "/secure/admin", "/secure/admin"),
    ("/secure/./admin", "/secure/admin", "/secure/admin"),
    ("/secure/%2e%2E/x", "/x", "/x"),
    ("/%2E%2E/%2e/secure", "/secure", "/secure"),
    ("/a/b/c/./../../g", "/a/g", "/a/g"),          # RFC 3986 §5.2.4's example
    ("/mid/content=5/../6", "/mid/6", "/mid/6"),   # idem
    ("/..", "/", "/"),
    ("/../../secure", "/secure", "/secure"),
    ("/a/.", "/a/", "/a/"),
    ("/a/..", "/", "/"),
    ("/a/b/..//", "/a/", "/a//"),
    ("/a//../b", "/b", "/a/b"),                    # slashes are merged first (as nginx does)
    ("/SECURE", "/SECURE", "/SECURE"),              # case is significant
    ("/%7euser/%41%5a", "/~user/AZ", "/~user/AZ"),  # unreserved: decoded
    ("/a%2fb%3a%c3%a9", "/a%2Fb%3A%C3%A9", "/a%2Fb%3A%C3%A9"),   # others: uppercase hex
    ("/a%25b", "/a%25b", "/a%25b"),                 # an encoded % stays one
    ("/secure%2F..%2Fpublic", "/secure%2F..%2Fpublic", "/secure%2F..%2Fpublic"),
    ("/.well-known/openid-configuration", "/.well-known/openid-configuration",
     "/.well-known/openid-configuration"),
    ("/a/.b/..c/...", "/a/.b/..c/...", "/a/.b/..c/..."),
]
# The path is decoded before dot segments are removed: "/a/b/..%2e" → "/a/b/..." (not a dot segment)
CASES.append(("/a/b/..%2e", "/a/b/...", "/a/b/..."))


@pytest.mark.parametrize("raw,merged,unmerged", CASES)
def test_normalize(raw, merged, unmerged):
    assert normalize(raw, True) == merged
    assert normalize(raw, False) == unmerged
    # idempotent: the output is already normal
    assert normalize(merged, True) == merged
    assert normalize(unmerged, False) == unmerged


@pytest.mark.parametrize("raw", ["/a%", "/a%2", "/a%zz", "/a%2g/b", "/%%41", "/a%\u0661\u0662",
                                 "/a\\b", "/..\\secure", "/a#b", "/public#/../secure"])
def test_invalid_paths_are_errors(raw):
    with pytest.raises(PathError):
        normalize(raw)


def test_ordinary_paths_need_no_work():
    for p in ("/", "/v1/chat/completions", "/agents/support/invocations", "/a-b_c~d.e"):
        assert not needs_work(p)
    for p in ("/a/../b", "//a", "/%41", "/a;b", "/a\\b", "/a#b", "/.x"):
        assert needs_work(p)


@pytest.mark.parametrize("path,view", [
    ("/plain/path", None),
    ("/repos/group%2Fname", "/repos/group/name"),
    ("/a%5Cb", "/a/b"),
    ("/secure;jsessionid=1/admin", "/secure/admin"),
    ("/;x/secure", "/secure"),
    ("/a%2F%2Fb/", "/a/b/"),
])
def test_routing_view(path, view):
    assert routing_view(path) == view


@pytest.mark.parametrize("path", ["/public%2F..%2Fsecure", "/a/..%2Fsecure", "/public/..;/secure",
                                  "/x/.;/y", "/a%5C..%5Cb"])
def test_dot_segments_hidden_from_rfc_3986_are_errors(path):
    with pytest.raises(PathError):
        routing_view(normalize(path))


def test_merge_only():
    assert merge_only("//a///b/../c") == "/a/b/../c"
