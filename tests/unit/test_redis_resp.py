"""RESP framing of upstream/redis.py: commands out, the five reply types in, byte by byte."""

from __future__ import annotations

import pytest

from agproxy.upstream.redis import (NoScriptError, RedisProtocolError, RedisReplyError, encode, parse,
                                    parse_address)
from agproxy.upstream import redis as r


def test_encode_is_an_array_of_bulk_strings():
    assert encode(("EVALSHA", "ab12", 1, "k:é", b"\x00\r\n")) == (
        b"*5\r\n$7\r\nEVALSHA\r\n$4\r\nab12\r\n$1\r\n1\r\n$4\r\nk:\xc3\xa9\r\n$3\r\n\x00\r\n\r\n")


REPLIES = [
    (b"+OK\r\n", b"OK"),
    (b":-42\r\n", -42),
    (b"$5\r\nhe\r\no\r\n", b"he\r\no"),
    (b"$-1\r\n", None),
    (b"*-1\r\n", None),
    (b"*3\r\n:1\r\n:1700000000000000\r\n*1\r\n$0\r\n\r\n", [1, 1700000000000000, [b""]]),
]


@pytest.mark.parametrize("data,value", REPLIES)
def test_each_reply_type_whole_and_cut_anywhere(data, value):
    assert parse(bytearray(data), 0) == (value, len(data))
    for cut in range(len(data)):
        got, pos = parse(bytearray(data[:cut]), 0)
        assert got is r._INCOMPLETE and pos == 0


def test_error_replies_are_values_not_exceptions():
    err, end = parse(bytearray(b"-WRONGTYPE Operation against a key\r\n"), 0)
    assert type(err) is RedisReplyError and str(err) == "WRONGTYPE Operation against a key" and end == 36
    err, _ = parse(bytearray(b"-NOSCRIPT No matching script.\r\n"), 0)
    assert type(err) is NoScriptError and err.failure == "error"


@pytest.mark.parametrize("data", [b"HTTP/1.1 400 Bad Request\r\n", b":12x\r\n", b"$abc\r\n",
                                  b"$3\r\nabcXY", b"$2000000\r\n", b"*100000\r\n", b"x" * 70000])
def test_garbage_is_a_protocol_error(data):
    with pytest.raises(RedisProtocolError) as info:
        parse(bytearray(data), 0)
    assert info.value.failure == "garbage"


def test_addresses():
    t = parse_address("redis://10.0.0.1:6380/2")
    assert (t.scheme, t.host, t.port, t.db, str(t)) == ("redis", "10.0.0.1", 6380, 2, "redis://10.0.0.1:6380/2")
    t = parse_address("unix:///run/redis.sock?db=3")
    assert (t.scheme, t.path, t.db) == ("unix", "/run/redis.sock", 3)
    assert parse_address("rediss://cache.internal").port == 6379
    for bad in ("http://x:1", "redis://:pw@x:1", "redis://x:1/db", "unix://rel.sock", "redis://"):
        with pytest.raises(ValueError):
            parse_address(bad)
