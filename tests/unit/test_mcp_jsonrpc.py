"""agproxy/mcp/jsonrpc.py and call.py: parsing POST bodies and the 2026-07-28 header check."""

from __future__ import annotations

import base64

import orjson
import pytest

from agproxy.http.messages import Headers
from agproxy.mcp import jsonrpc
from agproxy.mcp.call import McpCall, check_headers, decode_header_value, item_call
from agproxy.mcp.jsonrpc import HEADER_MISMATCH, INVALID_REQUEST, PARSE_ERROR, RpcError, parse


def test_request_notification_response_and_batch():
    body = parse(b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"q","arguments":{"a":1}}}')
    assert not body.batch
    (m,) = body.messages
    assert (m.kind, m.id, m.method) == ("request", 7, "tools/call")
    call = McpCall.of(m)
    assert (call.tool, call.arguments) == ("q", {"a": 1})
    assert call.cel() == {"method": "tools/call", "id": 7, "tool": {"name": "q", "arguments": {"a": 1}}}

    b = parse(b'[{"jsonrpc":"2.0","method":"notifications/initialized"},'
              b'{"jsonrpc":"2.0","id":"s1","result":{}},{"jsonrpc":"2.0","id":2,"method":"ping"}]')
    assert b.batch and [m.kind for m in b.messages] == ["notification", "response", "request"]
    assert not b.only_notifications_or_responses
    assert parse(b'{"jsonrpc":"2.0","method":"notifications/initialized"}').only_notifications_or_responses
    assert parse(b'{"jsonrpc":"2.0","id":1,"error":{"code":-1,"message":"x"}}').messages[0].kind == "response"


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe", b"nul", b"[" * 2000 + b"]" * 2000,
                                 b'{"jsonrpc":"2.0","id":1,"method":"x","params":{"n":1' + b"0" * 400 + b"}}"])
def test_not_json_is_parse_error(raw):
    with pytest.raises(RpcError) as e:
        parse(raw)
    assert e.value.code == PARSE_ERROR and e.value.status == 400
    doc = orjson.loads(e.value.body())
    assert doc["id"] is None and doc["error"]["code"] == -32700


@pytest.mark.parametrize("raw,rid", [
    (b"[]", None), (b"3", None), (b'"x"', None), (b'{"id":1,"method":"ping"}', 1),
    (b'{"jsonrpc":"1.0","id":1,"method":"ping"}', 1), (b'{"jsonrpc":"2.0","id":true,"method":"ping"}', None),
    (b'{"jsonrpc":"2.0","id":null,"method":"ping"}', None), (b'{"jsonrpc":"2.0","id":1,"method":5}', 1),
    (b'{"jsonrpc":"2.0","id":1,"method":"x","params":3}', 1), (b'{"jsonrpc":"2.0","id":1}', 1),
    (b'{"jsonrpc":"2.0","id":1,"result":1,"error":{"code":1}}', 1), (b'[{"jsonrpc":"2.0","method":"a"},4]', None),
    (b'{"jsonrpc":"2.0","id":1,"error":"bad"}', 1),
])
def test_json_that_is_not_jsonrpc_is_invalid_request(raw, rid):
    with pytest.raises(RpcError) as e:
        parse(raw)
    assert e.value.code == INVALID_REQUEST and e.value.status == 400
    assert orjson.loads(e.value.body())["id"] == rid


def _h(**kw) -> Headers:
    return Headers([(k.replace("_", "-"), v) for k, v in kw.items()])


CALL = b'{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"read_file","arguments":{}}}'


@pytest.mark.parametrize("headers,ok", [
    ({}, True),                                                   # handshake era: nothing sent
    ({"mcp_method": "tools/call", "mcp_name": "read_file"}, True),
    ({"mcp_method": "tools/list"}, False),                       # a lying method
    ({"mcp_method": "tools/call", "mcp_name": "delete_all"}, False),   # a lying name
    ({"mcp_name": "read_file"}, True),
    ({"mcp_protocol_version": "2026-07-28"}, False),              # modern: Mcp-Method required
    ({"mcp_protocol_version": "2026-07-28", "mcp_method": "tools/call"}, False),   # and Mcp-Name
    ({"mcp_protocol_version": "2026-07-28", "mcp_method": "tools/call", "mcp_name": "read_file"}, True),
    ({"mcp_method": "tools/call", "mcp_name": "=?base64?" + base64.b64encode(b"read_file").decode() + "?="}, True),
    ({"mcp_method": "tools/call", "mcp_name": "=?base64?!!!?="}, False),
])
def test_header_agreement(headers, ok):
    err = check_headers(parse(CALL), _h(**headers))
    if ok:
        assert err is None
    else:
        assert err is not None and err.code == HEADER_MISMATCH and err.status == 400 and err.id == 3


def test_duplicated_routing_header_and_name_on_unnamed_method():
    h = Headers([("mcp-method", "tools/call"), ("mcp-method", "tools/call"), ("mcp-name", "read_file")])
    assert check_headers(parse(CALL), h).code == HEADER_MISMATCH
    ping = parse(b'{"jsonrpc":"2.0","id":1,"method":"ping"}')
    assert check_headers(ping, _h(mcp_method="ping", mcp_name="x")).code == HEADER_MISMATCH
    resp = parse(b'{"jsonrpc":"2.0","id":1,"result":{}}')
    assert check_headers(resp, _h(mcp_method="ping")).code == HEADER_MISMATCH
    assert check_headers(resp, _h(mcp_protocol_version="2026-07-28")) is None
    batch = parse(b'[' + CALL + b',{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"x"}}]')
    assert check_headers(batch, _h(mcp_method="tools/call", mcp_name="read_file")).id == 4


def test_calls_of_prompts_and_resources_and_list_items():
    p = McpCall.of(parse(b'{"jsonrpc":"2.0","id":1,"method":"prompts/get","params":{"name":"greet",'
                         b'"arguments":{"who":"x"}}}').messages[0])
    assert p.cel() == {"method": "prompts/get", "id": 1, "prompt": {"name": "greet", "arguments": {"who": "x"}}}
    r = McpCall.of(parse(b'{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"file:///a"}}')
                   .messages[0])
    assert r.cel()["resource"] == {"uri": "file:///a"} and "tool" not in r.cel()
    assert item_call("tools/list", {"name": "t"}).cel()["tool"] == {"name": "t", "arguments": {}}
    assert item_call("resources/list", {"uri": "u"}).cel()["resource"] == {"uri": "u"}
    assert item_call("tools/list", {"nope": 1}) is None
    assert decode_header_value("=?base64?" + base64.b64encode("é".encode()).decode() + "?=") == "é"


def test_reply_documents():
    assert orjson.loads(jsonrpc.result_body("a", {"x": 1})) == {"jsonrpc": "2.0", "id": "a", "result": {"x": 1}}
    assert orjson.loads(jsonrpc.error_body(None, -32601, "m", {"d": 1}))["error"] == {
        "code": -32601, "message": "m", "data": {"d": 1}}
