"""Request-head validation and response-head building in agproxy/http/h2.py (no sockets)."""

from __future__ import annotations

import pytest

from agproxy.http import h2 as h2mod
from agproxy.http.h1 import Limits
from agproxy.http.messages import NOTE_REQUEST_ID, NOTE_TRACEPARENT, NOTE_TRACESTATE, Headers

LIM = Limits(max_headers=5, max_header_bytes=1000)
BASE = [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"api.example:8443"), (b":path", b"/v1/x?y=1")]


def parse(extra=(), base=BASE):
    return h2mod._parse_request(list(base) + list(extra), LIM)


def test_parses_pseudo_headers_and_fields():
    method, path, scheme, authority, items, length, noted = parse([(b"content-length", b"12"), (b"x-a", b"1")])
    assert (method, path, scheme, authority, length) == ("POST", "/v1/x?y=1", "https", "api.example:8443", 12)
    assert items == [("content-length", "12"), ("x-a", "1")]
    assert noted == 0


def test_trace_context_and_request_id_fields_are_noted_and_kept():
    """The layers above test RequestHead.noted instead of scanning (http/messages.py
    NOTED_FIELDS); the fields themselves stay in the head, in order."""
    fields = [(b"tracestate", b"a=1"), (b"x-b", b"2"), (b"traceparent", b"00-x"), (b"x-request-id", b"r")]
    *_, items, _, noted = parse(fields)
    assert items == [("tracestate", "a=1"), ("x-b", "2"), ("traceparent", "00-x"), ("x-request-id", "r")]
    assert noted == NOTE_TRACEPARENT | NOTE_TRACESTATE | NOTE_REQUEST_ID
    assert parse([(b"tracestate", b"a=1")])[6] == NOTE_TRACESTATE
    # The branch that notes them must not take `host` (the authority when none came).
    base = [f for f in BASE if f[0] != b":authority"]
    assert parse([(b"traceparent", b"00-x"), (b"host", b"h.example")], base)[3] == "h.example"


def test_host_is_the_authority_when_there_is_no_authority():
    base = [f for f in BASE if f[0] != b":authority"]
    assert parse([(b"host", b"h.example")], base)[3] == "h.example"


def test_cookie_crumbs_are_joined():
    items = parse([(b"cookie", b"a=1"), (b"x", b"y"), (b"cookie", b"b=2")])[4]
    assert items == [("cookie", "a=1; b=2"), ("x", "y")]


@pytest.mark.parametrize("block, status", [
    (BASE + [(b":path", b"/again")], 400),                          # repeated pseudo-header
    (BASE[:1] + [(b"x", b"1")] + BASE[1:], 400),                     # pseudo after a regular field
    (BASE + [(b":protocol", b"websocket")], 400),                   # unknown pseudo-header
    ([f for f in BASE if f[0] != b":path"], 400),
    ([f for f in BASE if f[0] != b":method"], 400),
    ([(b":method", b"GE T")] + BASE[1:], 400),
    ([(b":method", b"CONNECT"), (b":authority", b"x:443")], 501),
    (BASE[:3] + [(b":path", b"/a b")], 400),
    (BASE[:3] + [(b":path", b"relative")], 400),
    ([BASE[0], (b":scheme", b"ftp")] + BASE[2:], 400),
    (BASE + [(b"X-Upper", b"1")], 400),
    (BASE + [(b"connection", b"close")], 400),
    (BASE + [(b"transfer-encoding", b"chunked")], 400),
    (BASE + [(b"te", b"gzip")], 400),
    (BASE + [(b"x", b"a\r\nb")], 400),
    (BASE + [(b"x", b"a\x00b")], 400),
    (BASE + [(b"content-length", b"1x")], 400),
    (BASE + [(b"content-length", b"1"), (b"content-length", b"2")], 400),
    (BASE + [(b"x%d" % i, b"v") for i in range(6)], 431),
    (BASE + [(b"x", b"v" * 2000)], 431),
])
def test_malformed_requests(block, status):
    with pytest.raises(h2mod._Malformed) as e:
        h2mod._parse_request(block, LIM)
    assert e.value.status == status


def test_options_asterisk_and_te_trailers_are_fine():
    m, path, *_ = h2mod._parse_request([(b":method", b"OPTIONS"), (b":scheme", b"http"), (b":path", b"*")], LIM)
    assert (m, path) == ("OPTIONS", "*")
    assert parse([(b"te", b"trailers")])[4] == [("te", "trailers")]


def test_trailer_fields():
    items, pseudo = h2mod._headers_to_list([(b"grpc-status", b"0"), (b"grpc-message", b"ok")], LIM, trailers=True)
    assert items == [("grpc-status", "0"), ("grpc-message", "ok")] and not pseudo
    with pytest.raises(h2mod._Malformed):
        h2mod._headers_to_list([(b":status", b"200")], LIM, trailers=True)


def test_response_block_drops_connection_specific_fields():
    block = h2mod.response_block(200, Headers([("connection", "close"), ("Content-Type", "text/plain"),
                                               ("transfer-encoding", "chunked"), ("x-v", "é")]))
    assert block == [(b":status", b"200"), (b"content-type", b"text/plain"), (b"x-v", "é".encode("latin-1"))]


def test_upstream_request_block_maps_host_and_filters_hop_fields():
    from agproxy.upstream.h2 import request_block
    block = request_block("GET", "/p?q", Headers([("host", "up.example"), ("connection", "x"), ("te", "trailers, deflate"),
                                                  ("x-a", "1")]), "http", "default:80")
    assert block == [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"up.example"),
                     (b":path", b"/p?q"), (b"te", b"trailers"), (b"x-a", b"1")]
