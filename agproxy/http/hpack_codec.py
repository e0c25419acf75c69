"""HPACK (RFC 7541) coders for the HTTP/2 adapters, written for the hot path.

The stock `hpack` coders cost a third to nearly half of the adapter's CPU per
request on this machine (benchmarks/results/h2.md): logging calls per field, a
memoryview and a HeaderTuple per field, a linear search of the dynamic table
per field encoded, Huffman-encoding every new literal, and a nibble-at-a-time
Huffman decoder (~0.45 µs per byte here: a 1 KB bearer JWT costs ~0.35 ms on
every request). These implement the same RFC 7541 with:
  decoder: a byte-at-a-time Huffman state machine (derived from hpack's nibble
           table; ~2.5x faster), a process-wide cache of
           decoded Huffman strings (the same token on every request costs a dict
           lookup), and a per-connection cache of whole header blocks that left
           the dynamic table untouched (a repeated request that is all indexes
           decodes to the same list);
  encoder: a dynamic table with O(1) lookups; fields that vary per message
           (paths, lengths, ids, dates) sent as literals without indexing and
           secrets as never-indexed literals (so a connection shared by several
           clients upstream never compresses one client's token against
           another's); no Huffman coding (some bytes on the wire for CPU).
The Huffman decoder walks hpack's 256-state automaton a byte at a time (two
nibble steps folded into one table entry: 65,536 entries, ~1 MB, built at import,
~30 ms here).

Written by hand because it is the measured hot spot of the HTTP/2 path (see
benchmarks/results/h2.md: 289 → 198 µs per request through the binary); the
tests check both coders against the reference `hpack` library.
"""

from __future__ import annotations

import collections

import hpack.exceptions as _hpack_exc
import hpack.huffman_table as _hpack_huffman
import hpack.table as _hpack_table

_STATIC_TABLE = _hpack_table.HeaderTable.STATIC_TABLE          # 61 (name, value) entries
_STATIC_PAIR = {}
_STATIC_NAME = {}
for _i, (_n, _v) in enumerate(_STATIC_TABLE, 1):
    _STATIC_PAIR.setdefault((_n, _v), _i)
    _STATIC_NAME.setdefault(_n, _i)
del _i, _n, _v

# Sent as never-indexed literals (RFC 7541 §7.1.3).
_SENSITIVE = frozenset({b"authorization", b"proxy-authorization", b"cookie", b"set-cookie",
                        b"x-api-key", b"api-key", b"x-amz-security-token", b"x-goog-api-key"})
# Values that change with every message: indexing them would only churn the table.
_VARYING = frozenset({b":path", b"content-length", b"date", b"etag", b"last-modified", b"location",
                      b"x-request-id", b"traceparent", b"tracestate", b"age", b"expires",
                      b"if-modified-since", b"if-none-match", b"x-forwarded-for", b"x-amz-date",
                      b"x-amz-content-sha256", b"grpc-timeout", b"grpc-message", b"x-amzn-requestid",
                      b"x-amzn-trace-id", b"content-range", b"link", b"referer", b"x-forwarded-host",
                      b"mcp-session-id"})


def _int_prefix(value: int, prefix_bits: int, flags: int) -> bytes:
    """RFC 7541 §5.1 integer with the first byte's high bits set to `flags`."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((flags | value,))
    out = bytearray((flags | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_LEN7 = [bytes((i,)) for i in range(127)]              # raw string lengths < 127
_INDEXED_STATIC = [b""] + [bytes((0x80 | i,)) for i in range(1, 62)]
_INDEXED = [bytes((0x80 | i,)) for i in range(127)]    # indexed field, index < 127
_NAME_NOIDX = [b""] + [_int_prefix(i, 4, 0x00) for i in range(1, 62)]
_NAME_NEVER = [b""] + [_int_prefix(i, 4, 0x10) for i in range(1, 62)]
_NAME_INCR = [b""] + [_int_prefix(i, 6, 0x40) for i in range(1, 62)]


def _raw_string(s: bytes) -> bytes:
    n = len(s)
    return (_LEN7[n] if n < 127 else _int_prefix(n, 7, 0)) + s


class FastEncoder:
    """HPACK encoder (no Huffman, O(1) table lookups). Input: (bytes, bytes) pairs."""

    __slots__ = ("_max", "_size", "_entries", "_index", "_seq", "_size_updates")

    def __init__(self) -> None:
        self._max = 4096                 # what we use; never above the peer's setting
        self._size = 0
        self._entries: collections.deque = collections.deque()   # (seq, key, size), oldest left
        self._index: dict[tuple[bytes, bytes], int] = {}         # key → insertion number
        self._seq = 0
        self._size_updates: list[int] = []

    @property
    def header_table_size(self) -> int:
        return self._max

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        # The peer's SETTINGS_HEADER_TABLE_SIZE: use min(it, 4096); announce changes.
        new = min(int(value), 4096)
        if new != self._max:
            self._max = new
            self._evict()
            self._size_updates.append(new)

    def _evict(self) -> None:
        entries = self._entries
        index = self._index
        while self._size > self._max and entries:
            seq, key, size = entries.popleft()
            self._size -= size
            if index.get(key) == seq:
                del index[key]

    def encode(self, headers) -> bytes:
        out = []
        if self._size_updates:
            ups = self._size_updates
            # RFC 7541 §4.2: the smallest size since the last block, then the current one.
            low = min(ups)
            if low != ups[-1]:
                out.append(_int_prefix(low, 5, 0x20))
            out.append(_int_prefix(ups[-1], 5, 0x20))
            ups.clear()
        index = self._index
        # Per field, measured hot: the common encodings come from tables, not calls
        # (_int_prefix for a dynamic index < 127, _raw_string for a value < 127 bytes).
        for name, value in headers:
            key = (name, value)
            i = _STATIC_PAIR.get(key)
            if i is not None:
                out.append(_INDEXED_STATIC[i])
                continue
            seq = index.get(key)
            if seq is not None:
                i = 62 + self._seq - seq
                out.append(_INDEXED[i] if i < 127 else _int_prefix(i, 7, 0x80))
                continue
            ni = _STATIC_NAME.get(name)
            if name in _SENSITIVE:
                out.append(_NAME_NEVER[ni] if ni else b"\x10" + _raw_string(name))
            elif name in _VARYING or len(name) + len(value) + 32 > self._max >> 1:
                out.append(_NAME_NOIDX[ni] if ni else b"\x00" + _raw_string(name))
            else:
                out.append(_NAME_INCR[ni] if ni else b"\x40" + _raw_string(name))
                size = len(name) + len(value) + 32
                self._seq += 1
                index[key] = self._seq
                self._entries.append((self._seq, key, size))
                self._size += size
                if self._size > self._max:
                    self._evict()
            n = len(value)
            out.append(_LEN7[n] if n < 127 else _int_prefix(n, 7, 0))
            out.append(value)
        return b"".join(out)


# Huffman: hpack's decoder walks a 256-state table a nibble at a time; this one
# walks the same automaton a byte at a time (two nibble steps folded into one
# table entry): 65,536 entries, ~1 MB, built at import (~30 ms on this machine).
_HUFF_NEXT: list[int] = []
_HUFF_EMIT: list[bytes] = []
_HUFF_ACCEPT: bytearray = bytearray()
_HUFF_CACHE: dict[bytes, bytes] = {}
_HUFF_CACHE_MAX = 1024
_HUFF_CACHE_MIN_LEN = 12


def _build_huffman() -> None:
    global _HUFF_NEXT, _HUFF_EMIT, _HUFF_ACCEPT
    table = _hpack_huffman.HUFFMAN_TABLE
    EMIT = _hpack_huffman.HUFFMAN_EMIT_SYMBOL
    FAIL = _hpack_huffman.HUFFMAN_FAIL
    COMPLETE = _hpack_huffman.HUFFMAN_COMPLETE
    singles = [bytes((i,)) for i in range(256)]
    # What the second (low) nibble does from each state: next state, emission, accept.
    lo_next, lo_emit, lo_accept = [], [], []
    for s1 in range(256):
        row = table[s1 * 16:s1 * 16 + 16]
        lo_next.append([-1 if f & FAIL else s2 for s2, f, _ in row])
        lo_emit.append([singles[o] if f & EMIT and not f & FAIL else b"" for _, f, o in row])
        lo_accept.append(bytes(1 if f & COMPLETE and not f & FAIL else 0 for _, f, _ in row))
    nxt = [-1] * 65536
    emit = [b""] * 65536
    accept = bytearray(65536)
    pairs: dict[bytes, bytes] = {}
    for state in range(256):
        for hi in range(16):
            s1, f1, o1 = table[state * 16 + hi]
            if f1 & FAIL:
                continue
            k = (state << 8) | (hi << 4)
            nxt[k:k + 16] = lo_next[s1]
            accept[k:k + 16] = lo_accept[s1]
            if f1 & EMIT:
                first = singles[o1]
                row = []
                for e in lo_emit[s1]:
                    if e:
                        pe = first + e
                        e = pairs.setdefault(pe, pe)
                    else:
                        e = first
                    row.append(e)
                emit[k:k + 16] = row
            else:
                emit[k:k + 16] = lo_emit[s1]
    _HUFF_EMIT, _HUFF_ACCEPT = emit, accept
    _HUFF_NEXT = nxt


_build_huffman()


def huffman_decode(data: bytes) -> bytes:
    """RFC 7541 Appendix B Huffman decoding; raises HPACKDecodingError."""
    if not data:
        return b""
    cached = _HUFF_CACHE.get(data)
    if cached is not None:
        return cached
    nxt = _HUFF_NEXT
    emit = _HUFF_EMIT
    out = bytearray()
    state = 0
    k = 0
    for b in data:
        k = (state << 8) | b
        state = nxt[k]
        if state < 0:
            raise _hpack_exc.HPACKDecodingError("invalid Huffman string")
        out += emit[k]
    if not _HUFF_ACCEPT[k]:
        raise _hpack_exc.HPACKDecodingError("incomplete Huffman string")
    result = bytes(out)
    if len(data) >= _HUFF_CACHE_MIN_LEN:
        if len(_HUFF_CACHE) >= _HUFF_CACHE_MAX:
            _HUFF_CACHE.clear()
        _HUFF_CACHE[data] = result
    return result


class FastDecoder:
    """HPACK decoder returning [(name bytes, value bytes)]; errors are hpack's exceptions."""

    __slots__ = ("max_header_list_size", "_max_allowed", "_max", "_size", "_dyn", "_version",
                 "_blocks")

    def __init__(self) -> None:
        self.max_header_list_size = 65536
        self._max_allowed = 4096         # our SETTINGS_HEADER_TABLE_SIZE
        self._max = 4096                 # what the peer's encoder currently uses
        self._size = 0
        self._dyn: collections.deque = collections.deque()    # (name, value), newest left
        self._version = 0                                     # bumped on every table change
        self._blocks: dict[bytes, tuple[int, list]] = {}

    @property
    def max_allowed_table_size(self) -> int:
        return self._max_allowed

    @max_allowed_table_size.setter
    def max_allowed_table_size(self, value: int) -> None:
        self._max_allowed = value

    @property
    def header_table_size(self) -> int:
        return self._max

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self._resize(value)

    def _resize(self, size: int) -> None:
        self._max = size
        dyn = self._dyn
        while self._size > size and dyn:
            n, v = dyn.pop()
            self._size -= len(n) + len(v) + 32
        self._version += 1

    def _get(self, index: int) -> tuple[bytes, bytes]:
        if 0 < index <= 61:
            return _STATIC_TABLE[index - 1]
        i = index - 62
        if i < 0 or i >= len(self._dyn):
            raise _hpack_exc.InvalidTableIndexError(f"invalid table index {index}")
        return self._dyn[i]

    def _add(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value) + 32
        self._version += 1
        dyn = self._dyn
        if size > self._max:
            dyn.clear()
            self._size = 0
            return
        dyn.appendleft((name, value))
        self._size += size
        while self._size > self._max:
            n, v = dyn.pop()
            self._size -= len(n) + len(v) + 32

    def decode(self, data: bytes, raw: bool = True) -> list:
        hit = self._blocks.get(data)
        if hit is not None and hit[0] == self._version:
            return hit[1]
        version = self._version
        headers = self._decode(data)
        if self._version == version and len(data) <= 2048:
            blocks = self._blocks
            if len(blocks) >= 64:
                blocks.clear()
            blocks[data] = (version, headers)
        return headers

    def _decode(self, data: bytes) -> list:
        headers: list[tuple[bytes, bytes]] = []
        append = headers.append
        pos = 0
        end = len(data)
        total = 0
        limit = self.max_header_list_size
        try:
            while pos < end:
                b = data[pos]
                if b & 0x80:                                   # indexed field
                    index = b & 0x7F
                    pos += 1
                    if index == 0x7F:
                        index, pos = _int_rest(data, pos, index)
                    field = self._get(index)
                elif b & 0x40:                                 # literal, incremental indexing
                    index = b & 0x3F
                    pos += 1
                    if index == 0x3F:
                        index, pos = _int_rest(data, pos, index)
                    if index:
                        name = self._get(index)[0]
                    else:
                        name, pos = _string(data, pos)
                    value, pos = _string(data, pos)
                    field = (name, value)
                    self._add(name, value)
                elif b & 0x20:                                 # dynamic table size update
                    if headers:
                        raise _hpack_exc.HPACKDecodingError("table size update after a field")
                    size = b & 0x1F
                    pos += 1
                    if size == 0x1F:
                        size, pos = _int_rest(data, pos, size)
                    if size > self._max_allowed:
                        raise _hpack_exc.InvalidTableSizeError("table size above the allowed maximum")
                    self._resize(size)
                    continue
                else:                                          # literal without / never indexed
                    index = b & 0x0F
                    pos += 1
                    if index == 0x0F:
                        index, pos = _int_rest(data, pos, index)
                    if index:
                        name = self._get(index)[0]
                    else:
                        name, pos = _string(data, pos)
                    value, pos = _string(data, pos)
                    field = (name, value)
                append(field)
                total += len(field[0]) + len(field[1]) + 32
                if total > limit:
                    raise _hpack_exc.OversizedHeaderListError(
                        f"a header list larger than {limit} bytes was received")
        except IndexError:
            raise _hpack_exc.HPACKDecodingError("truncated header block") from None
        if self._max > self._max_allowed:
            raise _hpack_exc.InvalidTableSizeError("the peer did not shrink its table")
        return headers


def _int_rest(data: bytes, pos: int, value: int) -> tuple[int, int]:
    shift = 0
    while True:
        b = data[pos]
        pos += 1
        value += (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 28:
            raise _hpack_exc.HPACKDecodingError("integer too large")


def _string(data: bytes, pos: int) -> tuple[bytes, int]:
    b = data[pos]
    n = b & 0x7F
    pos += 1
    if n == 0x7F:
        n, pos = _int_rest(data, pos, n)
    stop = pos + n
    if stop > len(data):
        raise _hpack_exc.HPACKDecodingError("truncated string")
    s = data[pos:stop]
    if b & 0x80:
        s = huffman_decode(s)
    return s, stop
