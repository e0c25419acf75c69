"""The pure pieces of ext_authz: header mutation semantics, query edits, CheckResponse →
Decision, the decision cache (with an injected clock), BodyReader.peek, and the
configuration's problems by TOML path (through the real loader)."""

from __future__ import annotations

import asyncio
import tomllib

import pytest
import uvloop
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as ext
from google.protobuf import struct_pb2, wrappers_pb2
from google.rpc import status_pb2

from agproxy.config.model import parse
from agproxy.config.reader import ConfigError
from agproxy.filters.ext_authz.cache import DecisionCache
from agproxy.filters.ext_authz.decision import (ADD, ADD_IF_ABSENT, APPEND, SET, SET_IF_EXISTS, BadAnswer,
                                                Decision, apply_mutations, edit_query, mutation_op)
from agproxy.filters.ext_authz.grpc_check import Answer, ErrorAnswer, decide
from agproxy.http.messages import BodyReader, BodyTooLarge, Headers, RequestHead
from agproxy.proxy.build import build_runtime


def hvo(key, value, append=None, action=None):
    opt = base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, value=value))
    if append is not None:
        opt.append.CopyFrom(wrappers_pb2.BoolValue(value=append))
    if action is not None:
        opt.append_action = action
    return opt


# -- HeaderValueOption → op --------------------------------------------------------------------

@pytest.mark.parametrize("append, action, request_op, response_op", [
    (None, 0, SET, APPEND),          # unset: Envoy sets request headers, appends response ones
    (True, 0, APPEND, ADD),          # a response value on a line of its own (Set-Cookie)
    (False, 0, SET, SET),
    (True, 3, APPEND, ADD),          # the deprecated field wins over append_action
    (None, 1, ADD_IF_ABSENT, ADD_IF_ABSENT),
    (None, 2, SET, SET),
    (None, 3, SET_IF_EXISTS, SET_IF_EXISTS),
])
def test_mutation_op(append, action, request_op, response_op):
    assert mutation_op(append, action, response=False) == request_op
    assert mutation_op(append, action, response=True) == response_op


def test_unknown_append_action_is_a_bad_answer():
    with pytest.raises(BadAnswer):
        mutation_op(None, 9, response=False)


def test_apply_mutations():
    h = Headers([("a", "1"), ("b", "x"), ("b", "y"), ("c", "")])
    apply_mutations(h, [("b", "z", SET), ("a", "2", APPEND), ("c", "v", APPEND), ("d", "new", APPEND),
                        ("a", "3", ADD), ("a", "no", ADD_IF_ABSENT), ("e", "yes", ADD_IF_ABSENT),
                        ("f", "no", SET_IF_EXISTS), ("e", "over", SET_IF_EXISTS)])
    assert h.items == [("a", "1,2"), ("c", "v"), ("b", "z"), ("d", "new"), ("a", "3"), ("e", "over")]


def test_edit_query_keeps_the_other_parameters_as_sent():
    req = RequestHead("GET", "/p?a=%41&drop=1&x=old&drop=2&b", Headers(), "http", "h", "HTTP/1.1")
    edit_query(req, (("x", "new value"), ("y", "&=")), frozenset({"drop"}))
    assert req.target == "/p?a=%41&b&x=new%20value&y=%26%3D"
    req = RequestHead("GET", "/p?drop=1", Headers(), "http", "h", "HTTP/1.1")
    edit_query(req, (), frozenset({"drop"}))
    assert req.target == "/p"
    req = RequestHead("GET", "/p?dr%6Fp=1&k=v", Headers(), "http", "h", "HTTP/1.1")
    edit_query(req, (), frozenset({"drop"}))      # the name as decoded
    assert req.target == "/p?k=v"


# -- CheckResponse → Decision ----------------------------------------------------------------------

def test_ok_with_mutations():
    resp = ext.CheckResponse(status=status_pb2.Status(code=0), ok_response=ext.OkHttpResponse(
        headers=[hvo("X-User", "alice"), hvo("host", "evil"), hvo(":path", "/x"), hvo("content-length", "1"),
                 hvo("x-list", "b", append=True)],
        headers_to_remove=["x-secret", "Host", ":authority", "transfer-encoding"],
        response_headers_to_add=[hvo("x-r", "1"), hvo("set-cookie", "a", append=True)],
        query_parameters_to_set=[base_pb2.QueryParameter(key="k", value="v"),
                                 base_pb2.QueryParameter(key="", value="ignored")],
        query_parameters_to_remove=["q"]))
    d = decide(resp)
    assert d.allowed and d.reply is None
    assert d.request_mutations == (("x-user", "alice", SET), ("x-list", "b", APPEND))
    assert d.remove == frozenset({"x-secret"})
    assert d.response_mutations == (("x-r", "1", APPEND), ("set-cookie", "a", ADD))
    assert (d.query_set, d.query_remove) == ((("k", "v"),), frozenset({"q"}))
    assert d.metadata is None


def test_metadata_ok_response_wins_as_in_envoy():
    outer, inner = struct_pb2.Struct(), struct_pb2.Struct()
    outer.update({"who": "outer"})
    inner.update({"who": "inner", "n": 2})
    resp = ext.CheckResponse(status=status_pb2.Status(code=0), dynamic_metadata=outer)
    assert decide(resp).metadata == {"who": "outer"}
    resp.ok_response.dynamic_metadata.CopyFrom(inner)
    assert decide(resp).metadata == {"who": "inner", "n": 2.0}


@pytest.mark.parametrize("value", ["a\r\nx-admin: 1", "a\x00b", "x" * 16385])
def test_invalid_header_values_are_bad_answers(value):
    resp = ext.CheckResponse(status=status_pb2.Status(code=0),
                             ok_response=ext.OkHttpResponse(headers=[hvo("x-user", value)]))
    with pytest.raises(BadAnswer):
        decide(resp)


@pytest.mark.parametrize("name", ["bad name", "x(y)", "é"])
def test_invalid_header_names_are_bad_answers(name):
    resp = ext.CheckResponse(status=status_pb2.Status(code=0),
                             ok_response=ext.OkHttpResponse(headers=[hvo(name, "v")]))
    with pytest.raises(BadAnswer):
        decide(resp)


def test_denials():
    d = decide(ext.CheckResponse(status=status_pb2.Status(code=7)))
    assert not d.allowed and (d.reply.status, d.reply.body, d.reply.headers.items) == (403, b"", [])
    resp = ext.CheckResponse(status=status_pb2.Status(code=16))
    resp.denied_response.status.code = 0          # unset: 403
    resp.denied_response.body = "go away"
    resp.denied_response.headers.append(hvo("www-authenticate", "Bearer"))
    d = decide(resp)
    assert (d.reply.status, d.reply.body) == (403, b"go away")
    assert d.reply.headers.items == [("content-type", "text/plain"), ("www-authenticate", "Bearer")]
    resp.denied_response.status.code = 1000
    with pytest.raises(BadAnswer):
        decide(resp)


def test_error_response_is_an_error_answer():
    resp = ext.CheckResponse(status=status_pb2.Status(code=14))
    resp.error_response.status.code = 503
    resp.error_response.body = "busy"
    with pytest.raises(ErrorAnswer) as info:
        decide(resp)
    assert (info.value.status, info.value.body, info.value.failure) == (503, b"busy", "error")


def test_answers_are_decided_once_per_distinct_bytes(monkeypatch):
    monkeypatch.setattr(Answer, "_memo", {})
    allow = ext.CheckResponse(status=status_pb2.Status(code=0), ok_response=ext.OkHttpResponse(
        headers=[hvo("x-user", "alice")])).SerializeToString()
    first = Answer.FromString(allow)
    assert first.allowed and Answer.FromString(allow) is first
    bad = ext.CheckResponse(status=status_pb2.Status(code=0), ok_response=ext.OkHttpResponse(
        headers=[hvo("x-user", "a\nb")])).SerializeToString()
    assert type(Answer.FromString(bad)) is BadAnswer          # returned: the caller raises it
    assert len(Answer._memo) == 1                             # failures are not remembered
    monkeypatch.setattr(Answer, "MEMO_ENTRIES", 1)
    other = ext.CheckResponse(status=status_pb2.Status(code=7)).SerializeToString()
    assert not Answer.FromString(other).allowed and len(Answer._memo) == 1   # full: decided each time
    with pytest.raises(Exception):
        Answer.FromString(b"\xff\xff\xff")                    # not protobuf: the client's garbage


# -- the cache ---------------------------------------------------------------------------------------

def test_cache_ttl_and_bound():
    now = [100.0]
    cache = DecisionCache(ttl=10.0, max_entries=2, clock=lambda: now[0])
    a, b, c = Decision(True), Decision(False), Decision(True)
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a and cache.get("b") is b
    cache.put("c", c)                     # full: the oldest ("a") goes
    assert cache.get("a") is None and cache.get("c") is c and len(cache) == 2
    now[0] = 109.9
    assert cache.get("b") is b
    now[0] = 110.0                        # expired: dropped when found
    assert cache.get("b") is None and len(cache) == 1
    cache.put("k" * 2000, a)              # a huge key is not cached
    assert len(cache) == 1


# -- BodyReader.peek ---------------------------------------------------------------------------------

def test_peek_waits_for_n_bytes_and_leaves_them_to_read():
    async def main():
        paused = []
        body = BodyReader(pause=lambda: paused.append("pause"), resume=lambda: paused.append("resume"),
                          high_water=4)
        task = asyncio.ensure_future(body.peek(10))
        body.feed(b"01234")          # over high_water: the adapter would pause, but the peek asks for 10
        await asyncio.sleep(0)
        assert not task.done() and paused == ["pause", "resume"]
        body.feed(b"56789ab")
        assert await task == b"0123456789"
        assert paused[-1] == "pause"           # back to the reader's own high water mark
        body.feed_eof()
        assert await body.read_all(100) == b"0123456789ab"

        short = BodyReader()
        task = asyncio.ensure_future(short.peek(10))
        short.feed(b"abc")
        short.feed_eof()
        assert await task == b"abc" and await short.read() == b"abc"

        over = BodyReader()
        over.limit = 3
        task = asyncio.ensure_future(over.peek(10))
        over.feed(b"abcd")
        with pytest.raises(BodyTooLarge):
            await task
    uvloop.run(main())


# -- configuration ---------------------------------------------------------------------------------

BASE = """
[[listener]]
name = "main"
bind = "127.0.0.1:0"
[backend.echo]
type = "http"
url = "http://127.0.0.1:9"
[[route]]
name = "r"
backend = "echo"
[route.ext_authz]
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        build_runtime(parse(tomllib.loads(BASE + text), "<inline>"))
    return info.value.problems


def test_config_problems_by_toml_path():
    assert problems('''
address = "127.0.0.1:9191"
protocol = "grpcc"
status_on_error = 99
include_headers = ["ok", "bad name"]
path_prefix = "/x"
cache = { key = "request.path +", ttl = "0s" }
''') == [
        "route[0].ext_authz.protocol: must be one of 'grpc', 'http', got 'grpcc'",
        "route[0].ext_authz.status_on_error: must be >= 200, got 99",
        "route[0].ext_authz.include_headers[1]: invalid header name 'bad name'",
        "route[0].ext_authz.path_prefix: only for protocol = 'http'",
        "route[0].ext_authz.cache.key: invalid CEL: " + problems_cel("request.path +"),
        "route[0].ext_authz.cache.ttl: must be more than 0",
    ]
    assert problems('''
address = "127.0.0.1:9191"
path_prefix = "/x"
include_body = { max_bytes = 0, partial = true }
''') == [
        "route[0].ext_authz.path_prefix: only for protocol = 'http'",
        "route[0].ext_authz.include_body.max_bytes: must be >= 1, got 0",
        'route[0].ext_authz.include_body.partial: unknown key (did you mean "allow_partial"?)',
    ]
    assert problems('''
protocol = "http"
address = "ftp://authz"
include_body = { max_bytes = 10 }
''') == [
        "route[0].ext_authz.include_body: only for protocol = 'grpc'",
    ]
    assert problems('''
protocol = "http"
address = "ftp://authz"
''') == ["route[0].ext_authz.address: unsupported URL scheme 'ftp' in 'ftp://authz' (use http:// or https://)"]
    assert problems('address = "authz"') == ["route[0].ext_authz.address: expected host:port, got 'authz'"]
    assert problems('address = "127.0.0.1:1"\ncache = { ttl = "0s" }') == [
        "route[0].ext_authz.cache.key: required", "route[0].ext_authz.cache.ttl: must be more than 0"]


def problems_cel(source: str) -> str:
    from agproxy.cel import CelCompileError, compile_expression
    try:
        compile_expression(source)
    except CelCompileError as exc:
        return str(exc)
    raise AssertionError("expected a compile error")



def test_metadata_context_config_problems():
    assert problems('address = "127.0.0.1:1"\nmetadata_context = { namespace = "" }') == [
        "route[0].ext_authz.metadata_context.jwt_payload: required",
        "route[0].ext_authz.metadata_context.namespace: must not be empty"]
    assert problems('address = "127.0.0.1:1"\nmetadata_context = { jwt_payload = "" }') == [
        "route[0].ext_authz.metadata_context.jwt_payload: must not be empty"]
    assert problems('address = "127.0.0.1:1"\nmetadata_context = { jwt_payload = "p", payload = 1 }') == [
        'route[0].ext_authz.metadata_context.payload: unknown key (did you mean "jwt_payload"?)']
    assert problems('protocol = "http"\naddress = "http://127.0.0.1:1"\nmetadata_context = { jwt_payload = "p" }') == [
        "route[0].ext_authz.metadata_context: only for protocol = 'grpc'"]
