"""Pure pieces of the gRPC client (agproxy/upstream/grpc.py): grpc-timeout values,
targets, metadata rules. The calls themselves: tests/integration/test_grpc_client.py."""

from __future__ import annotations

import pytest

from agproxy.upstream.grpc import GrpcClient, _metadata, encode_timeout, parse_target


@pytest.mark.parametrize("seconds, text", [
    (0.02, "20m"), (0.25, "250m"), (0.3, "300m"), (2.0, "2S"), (2.5, "2500m"), (60.0, "1M"),
    (99.999999, "99999999u"), (1 / 3, "333334u"), (1e-9, "1n"), (1.5e-9, "2n"),
    (0.0000001, "100n"), (0, "1n"), (-1, "1n"), (86400.0, "24H"), (10**6, "1000000S"),
    (10**9 + 1, "16666667M"), (10**12, "99999999H"),
])
def test_grpc_timeout_encoding(seconds, text):
    assert encode_timeout(seconds) == text
    value, unit = int(text[:-1]), text[-1]
    assert len(text[:-1]) <= 8 and unit in "HMSmun"
    scale = {"H": 3600, "M": 60, "S": 1, "m": 1e-3, "u": 1e-6, "n": 1e-9}[unit]
    assert value * scale >= min(seconds, 99999999 * 3600) - 1e-12       # never shorter than ours


@pytest.mark.parametrize("address, host, port", [
    ("127.0.0.1:9191", "127.0.0.1", 9191), ("authz.internal:443", "authz.internal", 443),
    ("[::1]:8081", "::1", 8081),
])
def test_targets(address, host, port):
    assert parse_target(address) == (host, port)


@pytest.mark.parametrize("address", ["127.0.0.1", ":9191", "host:", "host:http", "::1:80", "h:0", "h:70000",
                                     "grpc://h:1"])
def test_bad_targets(address):
    with pytest.raises(ValueError):
        parse_target(address)


def test_client_authority_and_tls():
    assert GrpcClient("[::1]:8081").authority == "[::1]:8081"
    c = GrpcClient("authz.internal:443", tls=True)
    assert c.origin.scheme == "https" and c.origin.http2 and c.authority == "authz.internal"


def test_metadata_text_and_binary():
    assert _metadata([("x-request-id", "r-1"), ("trace-bin", b"\x00\xff"), ("k-bin", "é")]) == [
        ("x-request-id", "r-1"), ("trace-bin", "AP8"), ("k-bin", "w6k")]


@pytest.mark.parametrize("name, value", [
    ("X-Upper", "v"), ("grpc-timeout", "1S"), ("te", "trailers"), ("content-type", "text/plain"),
    (":path", "/x"), ("bad name", "v"), ("", "v"), ("x-ok", "line\r\nbreak"), ("x-ok", "caf\u00e9"),
    ("x-ok", b"bytes"),
])
def test_metadata_refused(name, value):
    with pytest.raises(ValueError):
        _metadata([(name, value)])


@pytest.mark.parametrize("path", ["Check", "/Check", "/pkg.Service/Method/x", "pkg.Service/Method"])
def test_method_paths(path):
    with pytest.raises(ValueError):
        GrpcClient("127.0.0.1:1").unary(path, object)
