"""The HPACK coders in agproxy/http/h2.py against the reference `hpack` library."""

from __future__ import annotations

import random

import hpack
import pytest
from hpack.exceptions import HPACKDecodingError, InvalidTableIndexError, OversizedHeaderListError
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH

from agproxy.http.hpack_codec import FastDecoder, FastEncoder, huffman_decode

_huff = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)


def random_headers(rng: random.Random, n: int) -> list[tuple[bytes, bytes]]:
    names = [b"content-type", b"x-custom", b"authorization", b"accept", b"x-request-id", b":path",
             b"user-agent", b"cookie", b"x-" + bytes(rng.choice(b"abcdef") for _ in range(5)), b"date"]
    out = []
    for _ in range(n):
        name = rng.choice(names)
        if rng.random() < 0.5:
            value = rng.choice([b"application/json", b"*/*", b"gzip", b"1", b""])
        else:
            value = bytes(rng.randrange(32, 127) for _ in range(rng.randrange(0, 300)))
        out.append((name, value))
    return out


def test_huffman_decodes_every_symbol_and_rejects_bad_padding():
    every = bytes(range(256))
    for s in (b"", b"a", every, every[::-1] * 3, b"www.example.com", b"no-cache", b"custom-value"):
        assert huffman_decode(_huff.encode(s)) == s
    with pytest.raises(HPACKDecodingError):
        huffman_decode(b"\x00")          # '0000 0' = '0', then padding '000' is not all ones
    with pytest.raises(HPACKDecodingError):
        huffman_decode(b"\xff\xff\xff\xff")   # EOS inside the string


def test_rfc7541_appendix_c4_requests_with_huffman():
    d = FastDecoder()
    c41 = bytes.fromhex("828684418cf1e3c2e5f23a6ba0ab90f4ff")
    c42 = bytes.fromhex("828684be5886a8eb10649cbf")
    c43 = bytes.fromhex("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf")
    assert d.decode(c41) == [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                             (b":authority", b"www.example.com")]
    assert d.decode(c42) == [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                             (b":authority", b"www.example.com"), (b"cache-control", b"no-cache")]
    assert d.decode(c43) == [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/index.html"),
                             (b":authority", b"www.example.com"), (b"custom-key", b"custom-value")]
    assert d._size == 164


def test_decoder_matches_reference_encoder_with_table_churn_and_resizes():
    rng = random.Random(7)
    ref = hpack.Encoder()
    fast = FastDecoder()
    for i in range(400):
        if i % 97 == 50:
            ref.header_table_size = rng.choice([0, 256, 4096])
        headers = random_headers(rng, rng.randrange(1, 12))
        block = ref.encode(headers, huffman=rng.random() < 0.7)
        assert fast.decode(block) == headers


def test_encoder_output_decodes_with_reference_decoder():
    rng = random.Random(11)
    enc = FastEncoder()
    ref = hpack.Decoder()
    for i in range(400):
        if i == 200:
            enc.header_table_size = 512       # the peer shrank its table: size update goes out
        headers = random_headers(rng, rng.randrange(1, 12))
        block = enc.encode(headers)
        assert [(bytes(n), bytes(v)) for n, v in ref.decode(block, raw=True)] == headers
    assert enc._size <= 512


def test_encoder_indexes_repeats_but_not_secrets_or_varying_fields():
    enc = FastEncoder()
    first = enc.encode([(b"content-type", b"application/json"), (b"authorization", b"Bearer t"),
                        (b"x-request-id", b"1")])
    second = enc.encode([(b"content-type", b"application/json"), (b"authorization", b"Bearer t"),
                         (b"x-request-id", b"2")])
    assert len(second) < len(first)
    assert second[0] == 0x80 | 62                      # the repeated field is one index byte
    assert b"Bearer t" in second and b"2" in second     # literal, not indexed
    dec = hpack.Decoder()
    dec.decode(first)
    out = dec.decode(second)
    assert isinstance(out[1], hpack.NeverIndexedHeaderTuple)


def test_block_cache_is_not_stale_after_table_changes():
    ref = hpack.Encoder()
    d = FastDecoder()
    h1 = [(b"x-a", b"1")]
    b1 = ref.encode(h1)                 # literal with indexing: x-a: 1 at index 62
    assert d.decode(b1) == h1
    idx = ref.encode(h1)                # now fully indexed (b"\xbe")
    assert d.decode(idx) == h1 and d.decode(idx) == h1
    h2 = [(b"x-b", b"2")]
    assert d.decode(ref.encode(h2)) == h2   # index 62 now means x-b: 2
    assert d.decode(idx) == [(b"x-b", b"2")]   # same bytes, new table: re-decoded, not cached


def test_decoder_errors():
    d = FastDecoder()
    with pytest.raises(InvalidTableIndexError):
        d.decode(b"\xff\x10")                 # index 142, table empty
    with pytest.raises(HPACKDecodingError):
        FastDecoder().decode(b"\x40\x05ab")   # truncated name
    with pytest.raises(HPACKDecodingError):
        FastDecoder().decode(b"\x82\x20")     # size update after a field
    with pytest.raises(HPACKDecodingError):
        FastDecoder().decode(b"\x3f\xe1\x7f")  # size update above the allowed 4096
    d = FastDecoder()
    d.max_header_list_size = 100
    with pytest.raises(OversizedHeaderListError):
        d.decode(hpack.Encoder().encode([(b"x", b"y" * 200)]))
