"""agproxy/mcp/resource.py: RFC 9728 metadata, challenges, RFC 8707 audience, scopes."""

from __future__ import annotations

import orjson

from agproxy.http.messages import Headers
from agproxy.mcp.resource import ProtectedResource, TrustedProxies, audience_matches, normalize_url, token_scopes


def test_resource_url_as_addressed_and_forwarded_only_from_trusted():
    pr = ProtectedResource("/mcp", ["https://idp"], scopes_supported=["tools:read"],
                           trusted_proxies=TrustedProxies(["10.0.0.0/8"]))
    fwd = Headers([("x-forwarded-proto", "https"), ("x-forwarded-host", "gw.example.com")])
    assert pr.resource_url("http", "127.0.0.1:8080", "127.0.0.1", fwd) == "http://127.0.0.1:8080/mcp"
    assert pr.resource_url("http", "GW:8080", "10.1.2.3", fwd) == "https://gw.example.com/mcp"
    assert pr.metadata_url("https://gw.example.com/mcp") == \
        "https://gw.example.com/.well-known/oauth-protected-resource/mcp"
    assert pr.metadata_paths == ("/.well-known/oauth-protected-resource/mcp", "/.well-known/oauth-protected-resource")
    doc = orjson.loads(pr.document("https://gw.example.com/mcp"))
    assert doc == {"resource": "https://gw.example.com/mcp", "authorization_servers": ["https://idp"],
                   "bearer_methods_supported": ["header"], "scopes_supported": ["tools:read"]}
    assert pr.challenge("https://gw.example.com/mcp") == (
        'Bearer resource_metadata="https://gw.example.com/.well-known/oauth-protected-resource/mcp", '
        'scope="tools:read"')
    assert pr.challenge("http://h/mcp", "insufficient_scope", 'need "x"', ["x"]).startswith(
        'Bearer error="insufficient_scope", error_description="need \\"x\\"", ')


def test_audience_and_scopes():
    assert audience_matches({"aud": "HTTPS://GW.example.com:443/mcp/"}, "https://gw.example.com/mcp")
    assert audience_matches({"aud": ["other", "https://gw.example.com/mcp"]}, "https://gw.example.com/mcp")
    assert not audience_matches({"aud": "https://other.example.com/mcp"}, "https://gw.example.com/mcp")
    assert not audience_matches({}, "https://gw.example.com/mcp")
    assert normalize_url("http://H:80/a/") == "http://h/a"
    assert token_scopes({"scope": "a b", "scp": ["c"]}) == {"a", "b", "c"}


def test_audience_url_trusts_only_the_gateways_own_authority():
    from agproxy.http.messages import ConnInfo, Headers
    from agproxy.mcp.resource import ProtectedResource, TrustedProxies
    pr = ProtectedResource("/mcp", ["https://idp"], trusted_proxies=TrustedProxies(["10.0.0.0/8"]))
    conn = ConnInfo("192.0.2.7", 5555, 8080, False, local_host="127.0.0.1")
    none = Headers([])
    assert pr.audience_url("http", "127.0.0.1:8080", conn, none) == "http://127.0.0.1:8080/mcp"
    assert pr.audience_url("http", "other.example", conn, none) is None
    assert pr.audience_url("http", "127.0.0.1:9999", conn, none) is None
    assert pr.audience_url("http", "gw.example.com", conn, none, host_bound=True) == "http://gw.example.com/mcp"
    proxied = ConnInfo("10.1.2.3", 5555, 8080, False, local_host="10.0.0.5")
    fwd = Headers([("x-forwarded-host", "gw.example.com"), ("x-forwarded-proto", "https")])
    assert pr.audience_url("http", "10.0.0.5:8080", proxied, fwd) == "https://gw.example.com/mcp"
    assert pr.audience_url("http", "other.example", conn, fwd) is None          # not a trusted peer
    fixed = ProtectedResource("/mcp", [], resource="https://gw.example.com/mcp")
    assert fixed.audience_url("http", "other.example", conn, none) == "https://gw.example.com/mcp"
