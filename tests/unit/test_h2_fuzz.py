"""Frame-sequence fuzzing of the HTTP/2 server (http/h2_frames.py + http/h2.py), with hypothesis.

Generated sequences of frames, valid and invalid (every type and unknown ones, any
flags, bad lengths, stream ids that are idle, even, closed or huge, padding and
priority fields right and wrong, window increments of 0 and 2^31-1, SETTINGS
values in and out of range, header blocks split and interleaved), are written to
a real `H2Connection` over a socketpair, followed by a PING. The run ends when
that PING is acknowledged (everything before it was handled) or the server
closes; never on a timer. Then:

- nothing escaped the codec (the event loop's exception handler and the
  gateway's error log stayed silent);
- every frame the server sent is valid: framing, types, stream ids it may use,
  header blocks a real HPACK decoder accepts, DATA within the windows the client
  granted, nothing on a stream after the server ended or reset it, nothing after
  an error GOAWAY;
- the connection's state stays bounded (buffers, header-block fragments, closed
  stream memory, streams);
- and, for sequences made only of what RFC 9113 calls stream errors, the
  connection survives: no GOAWAY, and a fresh request is answered 200.

The suite runs a fixed, derandomised set of examples in a few seconds; set
H2_FUZZ_EXAMPLES=100000 for a long random campaign.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct

import hpack
import pytest
import uvloop
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from agproxy.http import h2_budget
from agproxy.http import h2_frames as fr
from agproxy.http.h1 import Limits
from agproxy.http.h2 import H2Connection
from agproxy.http.messages import BodyAborted, ConnInfo, Headers
from tests.support.h2raw import PREFACE, ProtocolViolation, frame, parse_frames

LONG = int(os.environ.get("H2_FUZZ_EXAMPLES", "0"))
MARK = b"fuzz-end"
MARK2 = b"fuzz-fin"
MAX_STREAMS = 8
LIMITS = Limits(max_concurrent_streams=MAX_STREAMS, body_high_water=32768)
REQ = [(":method", "POST"), (":scheme", "http"), (":authority", "f"), (":path", "/f")]


def fuzz_settings(n: int):
    return settings(max_examples=LONG or n, deadline=None, database=None, derandomize=not LONG,
                    suppress_health_check=list(HealthCheck))


# -- the server under test --------------------------------------------------------------------

async def _handler(stream) -> None:
    try:
        body = await stream.body.read_all(1 << 20)
        if stream.request.path == "/trailers":
            stream.send_head(200, Headers([("content-type", "text/plain")]))
            await stream.send_data(body[:100] or b"x")
            await stream.end(Headers([("x-done", "1")]))
            return
        out = b"ok %d" % len(body)
        stream.send_head(200, Headers([("content-length", str(len(out)))]))
        await stream.send_data(out)
        await stream.end()
    except (BodyAborted, ConnectionError):
        pass


class _Tracker:
    def __init__(self):
        self.conns: set = set()
        self.last = None
        self.empty: asyncio.Event | None = None

    def add(self, conn) -> None:
        self.conns.add(conn)
        self.last = conn

    def discard(self, conn) -> None:
        self.conns.discard(conn)
        if not self.conns and self.empty is not None:
            self.empty.set()


class _Errors(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record) -> None:
        self.records.append(record.getMessage())


@pytest.fixture(scope="module")
def rig():
    loop = uvloop.new_event_loop()
    problems: list[str] = []
    loop.set_exception_handler(lambda _loop, ctx: problems.append(
        f"{ctx.get('message')}: {ctx.get('exception')!r}"))
    errors = _Errors()
    logging.getLogger("agproxy").addHandler(errors)
    yield loop, problems, errors
    logging.getLogger("agproxy").removeHandler(errors)
    loop.close()


# -- what the client sent: enough to judge the server's answers ---------------------------------

class _Sent:
    def __init__(self):
        self.max_sid = 0
        self.conn_credit = 65535
        self.initial = 65535
        self.stream_credit: dict[int, int] = {}
        self.table_size = 4096
        self.max_frame = 16384

    def note(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if ftype == fr.HEADERS and sid & 1:
            self.max_sid = max(self.max_sid, sid)
        elif ftype == fr.WINDOW_UPDATE and len(payload) == 4:
            inc = struct.unpack(">L", payload)[0] & 0x7FFFFFFF
            if sid:
                self.stream_credit[sid] = self.stream_credit.get(sid, 0) + inc
            else:
                self.conn_credit += inc
        elif ftype == fr.SETTINGS and not flags & 1 and len(payload) % 6 == 0:
            for off in range(0, len(payload), 6):
                key, value = struct.unpack_from(">HL", payload, off)
                if key == fr.S_INITIAL_WINDOW_SIZE and value <= fr.MAX_WINDOW:
                    self.initial = max(self.initial, value)
                elif key == fr.S_HEADER_TABLE_SIZE:
                    self.table_size = max(self.table_size, value)
                elif key == fr.S_MAX_FRAME_SIZE and 16384 <= value <= 0xFFFFFF:
                    self.max_frame = max(self.max_frame, value)


class _Answers:
    """The server's frames, checked one by one."""

    def __init__(self, sent: _Sent):
        self.sent = sent
        self.buf = bytearray()
        self.decoder = hpack.Decoder()
        self.block: tuple[int, int, bytearray] | None = None
        self.ended: set[int] = set()
        self.data: dict[int, int] = {}
        self.data_total = 0
        self.statuses: dict[int, int] = {}
        self.goaway: tuple[int, int] | None = None
        self.error_goaway = False
        self.marked = False
        self.marked2 = False

    def feed(self, chunk: bytes) -> None:
        self.decoder.max_allowed_table_size = self.sent.table_size
        self.buf += chunk
        for f in parse_frames(self.buf, self.sent.max_frame):
            self._check(*f)

    def _check(self, ftype, flags, sid, payload) -> None:
        if self.error_goaway:
            raise ProtocolViolation(f"frame type {ftype} after GOAWAY with an error code")
        if self.block is not None and (ftype != fr.CONTINUATION or sid != self.block[0]):
            raise ProtocolViolation("frame interleaved with the server's header block")
        if ftype in (fr.HEADERS, fr.DATA, fr.RST_STREAM, fr.CONTINUATION, fr.WINDOW_UPDATE) and sid:
            if not sid & 1 or sid > self.sent.max_sid:
                raise ProtocolViolation(f"frame type {ftype} on stream {sid}, never opened by the client")
        if ftype in (fr.HEADERS, fr.DATA) and sid in self.ended:
            raise ProtocolViolation(f"frame type {ftype} on stream {sid} after the server closed it")
        if ftype == fr.HEADERS:
            if flags & (fr.PADDED | fr.PRIORITY_FLAG):
                raise ProtocolViolation("the server padded or prioritised HEADERS")
            self.block = (sid, flags, bytearray(payload))
        elif ftype == fr.CONTINUATION:
            if self.block is None:
                raise ProtocolViolation("CONTINUATION without HEADERS")
            self.block[2].extend(payload)
        elif ftype == fr.DATA:
            n = len(payload)
            self.data[sid] = self.data.get(sid, 0) + n
            self.data_total += n
            if self.data_total > self.sent.conn_credit:
                raise ProtocolViolation("DATA beyond the connection window")
            if self.data[sid] > self.sent.initial + self.sent.stream_credit.get(sid, 0):
                raise ProtocolViolation(f"DATA beyond stream {sid}'s window")
            if sid not in self.statuses:
                raise ProtocolViolation("DATA before a response head")
            if flags & fr.END_STREAM:
                self.ended.add(sid)
        elif ftype == fr.RST_STREAM:
            self.ended.add(sid)
        elif ftype == fr.PING:
            if not flags & fr.ACK:
                raise ProtocolViolation("the server sent a PING")
            if payload == MARK:
                self.marked = True
            elif payload == MARK2:
                self.marked2 = True
        elif ftype == fr.GOAWAY:
            last, code = struct.unpack_from(">LL", payload)
            if self.goaway is not None and last > self.goaway[0]:
                raise ProtocolViolation("GOAWAY's last stream id went up")
            self.goaway = (last, code)
            self.error_goaway = code != fr.NO_ERROR
        if ftype in (fr.HEADERS, fr.CONTINUATION) and flags & fr.END_HEADERS:
            bsid, bflags, block = self.block
            self.block = None
            try:
                fields = self.decoder.decode(bytes(block), raw=True)
            except hpack.HPACKError as exc:
                raise ProtocolViolation(f"the server's header block does not decode: {exc}") from None
            if bsid not in self.statuses:
                status = dict(fields).get(b":status")
                if status is None or not status.isdigit():
                    raise ProtocolViolation(f"response head without :status: {fields}")
                self.statuses[bsid] = int(status)
            if bflags & fr.END_STREAM:
                self.ended.add(bsid)


# -- one run -------------------------------------------------------------------------------------

async def _exchange(loop, frames: list[tuple[int, int, int, bytes]], encoder: hpack.Encoder,
                    probe: bool):
    tracker = _Tracker()
    tracker.empty = asyncio.Event()
    info = ConnInfo("127.0.0.1", 1, 2, False, listener="fuzz")
    a, b = socket.socketpair()
    a.setblocking(False)
    await loop.connect_accepted_socket(lambda: H2Connection(_handler, info, LIMITS, tracker=tracker), b)
    conn = tracker.last
    sent = _Sent()
    answers = _Answers(sent)
    out = bytearray(PREFACE + frame(fr.SETTINGS, 0))
    for f in frames:
        sent.note(*f)
        ftype, flags, sid, payload = f
        out += struct.pack(">BHBBI", len(payload) >> 16, len(payload) & 0xFFFF, ftype, flags, sid) + payload
    probe_sid = (sent.max_sid | 1) + 2 if probe else 0
    if probe:
        sent.max_sid = probe_sid
    out += frame(fr.PING, 0, MARK)

    async def write() -> None:
        try:
            await loop.sock_sendall(a, bytes(out))
        except (BrokenPipeError, ConnectionResetError):
            pass

    writer = loop.create_task(write())
    closed = False

    async def read_until(done) -> None:
        nonlocal closed
        while not done() and not closed:
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(a, 1 << 16), 10)
            except ConnectionResetError:
                chunk = b""
            except asyncio.TimeoutError:
                raise AssertionError("the server neither answered nor closed (a hang)") from None
            if not chunk:
                closed = True
            else:
                answers.feed(chunk)
    try:
        await read_until(lambda: answers.marked)
        if not closed:
            # Let the handler tasks (on this same loop) answer what they can, then a second
            # PING: whatever they wrote before its acknowledgement is checked too.
            for _ in range(8):
                await asyncio.sleep(0)
            try:
                await loop.sock_sendall(a, frame(fr.PING, 0, MARK2))
            except (BrokenPipeError, ConnectionResetError):
                pass
            await read_until(lambda: answers.marked2)
        state = _state(conn)
        served = None
        if probe and not closed:
            # Encoded with the run's own encoder, so both HPACK tables agree.
            request = encoder.encode(REQ[:3] + [(":path", "/probe")])
            await loop.sock_sendall(a, frame(fr.HEADERS, fr.END_HEADERS | fr.END_STREAM, request, probe_sid))
            await read_until(lambda: probe_sid in answers.ended)
            served = answers.statuses.get(probe_sid)
    finally:
        writer.cancel()
        a.close()
        await asyncio.wait_for(tracker.empty.wait(), 10)
    return answers, state, served, closed


def _state(conn) -> dict:
    h = conn.h2
    return {"buf": len(h._buf), "block": len(h._block), "closed": len(h.closed),
            "codec_streams": len(h.streams), "streams": len(conn.streams), "out": len(h.out)}


def _assert_bounded(state: dict) -> None:
    assert state["buf"] <= 9 + (1 << 24), state
    assert state["block"] <= h2_budget.MAX_CONTINUATIONS + 1, state
    assert state["closed"] <= fr.CLOSED_MEMORY, state
    assert state["streams"] <= MAX_STREAMS and state["codec_streams"] <= MAX_STREAMS, state
    assert state["out"] <= 1 << 20, state


# -- frame strategies ------------------------------------------------------------------------------

# A stream id: the next new client stream, one opened earlier in the sequence (by index),
# or a literal (0, idle, even, the largest, the reserved bit): resolved by _build.
LITERAL_SIDS = st.sampled_from([0, 1, 3, 5, 7, 9, 11, 2, 4, 0x7FFFFFFF, 0x80000001])
SIDS = st.one_of(st.just("new"), st.tuples(st.just("open"), st.integers(0, 7)), LITERAL_SIDS)
FLAGS = st.one_of(st.sampled_from([0, fr.END_STREAM, fr.END_HEADERS, fr.END_STREAM | fr.END_HEADERS,
                                   fr.PADDED, fr.PRIORITY_FLAG, fr.PADDED | fr.PRIORITY_FLAG | fr.END_HEADERS]),
                  st.integers(0, 255))
FIELDS = st.lists(st.sampled_from([
    (":method", "GET"), (":method", "POST"), (":method", "CONNECT"), (":method", "bad method"),
    (":path", "/f"), (":path", "/trailers"), (":path", ""), (":path", "no-slash"),
    (":scheme", "http"), (":scheme", "gopher"), (":authority", "f"), (":status", "200"),
    (":unknown", "x"), ("content-length", "0"), ("content-length", "5"), ("content-length", "x"),
    ("te", "trailers"), ("te", "gzip"), ("connection", "close"), ("X-Upper", "1"),
    ("x_under", "1"), ("cookie", "a=1"), ("x-bad", "a\r\nb"), ("x-big", "v" * 5000), ("", "empty"),
]), max_size=8)
SETTING = st.tuples(st.sampled_from([1, 2, 3, 4, 5, 6, 8, 0, 9, 0xFFFF]),
                    st.one_of(st.sampled_from([0, 1, 2, 16383, 16384, 65535, 1 << 20, 0x7FFFFFFF,
                                               0x80000000, 0xFFFFFF, 0x1000000, 0xFFFFFFFF]),
                              st.integers(0, 0xFFFFFFFF)))


GOOD_FIELDS = st.tuples(st.sampled_from(["GET", "POST"]), st.sampled_from(["/f", "/trailers", "/f?q=1"]),
                        st.lists(st.sampled_from([("x-a", "1"), ("te", "trailers"), ("cookie", "c=1"),
                                                  ("content-type", "text/plain")]), max_size=3)).map(
    lambda t: [(":method", t[0]), (":scheme", "http"), (":authority", "f"), (":path", t[1]), *t[2]])


@st.composite
def valid_frame(draw):
    """A frame a well-behaved client could send at that point (mostly)."""
    kind = draw(st.sampled_from(["request", "request", "data", "data", "trailers", "window",
                                 "ping", "settings", "priority", "reset"]))
    pad = draw(st.integers(0, 10))
    padded = fr.PADDED if draw(st.booleans()) else 0
    if kind == "request":
        end = fr.END_STREAM if draw(st.booleans()) else 0
        prio = fr.PRIORITY_FLAG if draw(st.booleans()) else 0
        flags = fr.END_HEADERS | end | padded | prio
        return (fr.HEADERS, flags, "new", ("hpack", draw(GOOD_FIELDS), flags, pad,
                                           struct.pack(">LB", 0, 15), False))
    sid = ("open", draw(st.integers(0, 7)))
    if kind == "data":
        flags = (fr.END_STREAM if draw(st.booleans()) else 0) | padded
        return (fr.DATA, flags, sid, ("raw", _wrap(flags, draw(st.binary(min_size=1, max_size=300)),
                                                  pad, b"", False)))
    if kind == "trailers":
        flags = fr.END_HEADERS | fr.END_STREAM
        return (fr.HEADERS, flags, sid, ("hpack", [("x-sum", "1")], flags, 0, b"", False))
    if kind == "window":
        return (fr.WINDOW_UPDATE, 0, draw(st.sampled_from([0, sid])),
                ("raw", struct.pack(">L", draw(st.integers(1, 65535)))))
    if kind == "ping":
        return (fr.PING, 0, 0, ("raw", b"p" * 8))
    if kind == "settings":
        return (fr.SETTINGS, 0, 0, ("raw", struct.pack(">HLHL", fr.S_INITIAL_WINDOW_SIZE,
                                                        draw(st.integers(0, 1 << 20)), fr.S_MAX_FRAME_SIZE,
                                                        draw(st.integers(16384, 65536)))))
    if kind == "priority":
        return (fr.PRIORITY, 0, sid, ("raw", struct.pack(">LB", 0, 7)))
    return (fr.RST_STREAM, 0, sid, ("raw", struct.pack(">L", fr.CANCEL)))


def _wrap(flags: int, body: bytes, pad: int, prio: bytes, bad_pad: bool) -> bytes:
    out = b""
    if flags & fr.PADDED:
        out += bytes([min(255, pad + (len(body) + len(prio) + 1 if bad_pad else 0))])
    if flags & fr.PRIORITY_FLAG:
        out += prio
    return out + body + b"\0" * (pad if flags & fr.PADDED else 0)


@st.composite
def any_frame(draw):
    """One frame as (type, flags, sid, payload spec); header blocks are encoded later."""
    kind = draw(st.sampled_from(["data", "headers", "continuation", "priority", "rst", "settings",
                                 "push", "ping", "goaway", "window", "unknown", "oversize"]))
    flags = draw(FLAGS)
    sid = draw(SIDS)
    pad = draw(st.integers(0, 20))
    bad_pad = draw(st.booleans()) and draw(st.booleans())
    prio = struct.pack(">LB", draw(st.sampled_from([0, 1, 3, 0x80000000 | 1])), 15)
    if kind == "data":
        return (fr.DATA, flags, sid, ("raw", _wrap(flags, draw(st.binary(max_size=300)), pad, b"", bad_pad)))
    if kind in ("headers", "continuation"):
        ftype = fr.HEADERS if kind == "headers" else fr.CONTINUATION
        if draw(st.booleans()):
            spec = ("hpack", draw(FIELDS), flags, pad, prio, bad_pad)
        else:
            spec = ("raw", _wrap(flags, draw(st.binary(max_size=64)), pad, prio, bad_pad))
        return (ftype, flags, sid, spec)
    if kind == "priority":
        size = draw(st.sampled_from([5, 5, 5, 0, 4, 6]))
        return (fr.PRIORITY, flags, sid, ("raw", (prio + b"\0")[:size].ljust(size, b"\0")))
    if kind == "rst":
        size = draw(st.sampled_from([4, 4, 0, 3, 5]))
        return (fr.RST_STREAM, flags, sid, ("raw", struct.pack(">L", draw(st.integers(0, 20)))[:size].ljust(size, b"\0")))
    if kind == "settings":
        payload = b"".join(struct.pack(">HL", k, v) for k, v in draw(st.lists(SETTING, max_size=4)))
        if draw(st.booleans()) and draw(st.booleans()):
            payload = payload[:-1]
        return (fr.SETTINGS, flags & 1 if draw(st.booleans()) else flags, draw(st.sampled_from([0, 0, 1])),
                ("raw", payload))
    if kind == "push":
        return (fr.PUSH_PROMISE, flags, sid, ("raw", b"\0\0\0\2"))
    if kind == "ping":
        payload = draw(st.binary(min_size=8, max_size=8).filter(lambda p: p not in (MARK, MARK2)))
        size = draw(st.sampled_from([8, 8, 8, 0, 7, 9]))
        return (fr.PING, flags, draw(st.sampled_from([0, 0, 0, 1])), ("raw", (payload * 2)[:size]))
    if kind == "goaway":
        code = draw(st.sampled_from([0, 0, 1, 2, 11, 0xFFFF]))
        return (fr.GOAWAY, flags, draw(st.sampled_from([0, 0, 1])),
                ("raw", struct.pack(">LL", draw(st.integers(0, 0x7FFFFFFF)), code)[:draw(st.sampled_from([8, 8, 4]))]))
    if kind == "window":
        inc = draw(st.sampled_from([0, 1, 1000, 65535, 1 << 20, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]))
        size = draw(st.sampled_from([4, 4, 4, 3, 5]))
        return (fr.WINDOW_UPDATE, flags, draw(st.sampled_from([0, 0, sid, sid])),
                ("raw", struct.pack(">L", inc)[:size].ljust(size, b"\0")))
    if kind == "unknown":
        return (draw(st.sampled_from([10, 11, 0x42, 0xFF])), flags, sid, ("raw", draw(st.binary(max_size=32))))
    return (fr.DATA, 0, 1, ("raw", b"\0" * 16385))     # over SETTINGS_MAX_FRAME_SIZE


def _resolve(sid, state: dict) -> int:
    if sid == "new":
        state["next"] += 2
        state["opened"].append(state["next"] - 2)
        return state["next"] - 2
    if isinstance(sid, tuple):
        opened = state["opened"]
        return opened[sid[1] % len(opened)] if opened else 1
    return sid


def _build(encoder: hpack.Encoder, frames: list) -> list[tuple[int, int, int, bytes]]:
    out = []
    ids = {"next": 1, "opened": []}
    for ftype, flags, sid, spec in frames:
        if sid == "new" and ftype != fr.HEADERS:
            sid = ("open", 0)
        sid = _resolve(sid, ids)
        if spec[0] == "hpack":
            _, fields, fflags, pad, prio, bad_pad = spec
            try:
                body = encoder.encode([(k.encode(), v.encode()) for k, v in fields])
            except Exception:
                body = b""
            payload = _wrap(fflags, body, pad, prio, bad_pad) if ftype == fr.HEADERS else body
        else:
            payload = spec[1]
        out.append((ftype, flags, sid, payload))
    return out


def _run(loop, encoder, frames, probe=False):
    return loop.run_until_complete(_exchange(loop, frames, encoder, probe))


@fuzz_settings(200)
@given(st.lists(st.one_of(valid_frame(), valid_frame(), valid_frame(), any_frame()), max_size=24))
def test_arbitrary_frame_sequences(rig, frames):
    loop, problems, errors = rig
    encoder = hpack.Encoder()
    answers, state, _, _ = _run(loop, encoder, _build(encoder, frames))
    # (--hypothesis-show-statistics: how runs ended)
    event("answered the final PING" if answers.marked else
          f"GOAWAY {answers.goaway[1] if answers.goaway else None} and closed")
    event(f"{len(answers.statuses)} responses")
    assert not problems, problems
    assert not errors.records, errors.records
    _assert_bounded(state)


# -- stream errors only: the connection must survive -------------------------------------------------

@st.composite
def stream_error_case(draw):
    """A fresh stream and what makes the server reset it (RFC 9113 calls each a stream error),
    or a well-formed request; as (abstract) steps."""
    return draw(st.sampled_from([
        "window_update_zero", "window_overflow", "data_after_end", "headers_after_end",
        "self_dependent_priority", "priority_wrong_length", "self_dependent_headers",
        "trailers_without_end_stream", "content_length_over", "content_length_under",
        "uppercase_name", "connection_header", "missing_path", "te_gzip", "pseudo_in_trailers",
        "client_reset", "valid_get", "valid_post_padded", "valid_split_headers", "valid_trailers",
        "ping", "settings", "connection_window_update",
    ]))


def _steps(case: str, sid: int, enc: hpack.Encoder) -> list[tuple[int, int, int, bytes]]:
    EH, ES = fr.END_HEADERS, fr.END_STREAM

    def head(fields, flags=EH):
        return (fr.HEADERS, flags, sid, enc.encode(fields))
    post = REQ
    get = [(":method", "GET")] + REQ[1:]
    if case == "window_update_zero":
        return [head(post), (fr.WINDOW_UPDATE, 0, sid, struct.pack(">L", 0))]
    if case == "window_overflow":
        return [head(post), (fr.WINDOW_UPDATE, 0, sid, struct.pack(">L", 0x7FFFFFFF))]
    if case == "data_after_end":
        return [head(get, EH | ES), (fr.DATA, 0, sid, b"late")]
    if case == "headers_after_end":
        return [head(get, EH | ES), (fr.HEADERS, EH | ES, sid, enc.encode([("x-late", "1")]))]
    if case == "self_dependent_priority":
        return [head(post), (fr.PRIORITY, 0, sid, struct.pack(">LB", sid, 1))]
    if case == "priority_wrong_length":
        return [head(post), (fr.PRIORITY, 0, sid, b"\0\0\0")]
    if case == "self_dependent_headers":
        return [(fr.HEADERS, EH | ES | fr.PRIORITY_FLAG, sid, struct.pack(">LB", sid, 1) + enc.encode(get))]
    if case == "trailers_without_end_stream":
        return [head(post), (fr.HEADERS, EH, sid, enc.encode([("x-t", "1")]))]
    if case == "content_length_over":
        return [head(post + [("content-length", "2")]), (fr.DATA, ES, sid, b"too long")]
    if case == "content_length_under":
        return [head(post + [("content-length", "20")]), (fr.DATA, ES, sid, b"short")]
    if case == "uppercase_name":
        return [head(get + [("X-Upper", "1")], EH | ES)]
    if case == "connection_header":
        return [head(get + [("connection", "close")], EH | ES)]
    if case == "missing_path":
        return [head(get[:3], EH | ES)]
    if case == "te_gzip":
        return [head(get + [("te", "gzip")], EH | ES)]
    if case == "pseudo_in_trailers":
        return [head(post), (fr.DATA, 0, sid, b"body"), (fr.HEADERS, EH | ES, sid, enc.encode([(":path", "/x")]))]
    if case == "client_reset":
        return [head(post), (fr.RST_STREAM, 0, sid, struct.pack(">L", fr.CANCEL))]
    if case == "valid_get":
        return [head(get, EH | ES)]
    if case == "valid_post_padded":
        return [head(post), (fr.DATA, fr.PADDED | ES, sid, b"\x05hello" + b"\0" * 5)]
    if case == "valid_split_headers":
        block = enc.encode(get + [("x-long", "y" * 40)])
        return [(fr.HEADERS, ES, sid, block[:10]), (fr.CONTINUATION, 0, sid, b""),
                (fr.CONTINUATION, EH, sid, block[10:])]
    if case == "valid_trailers":
        return [head(post), (fr.DATA, 0, sid, b"abc"), (fr.HEADERS, EH | ES, sid, enc.encode([("x-sum", "1")]))]
    if case == "ping":
        return [(fr.PING, 0, 0, b"pingpong")]
    if case == "settings":
        return [(fr.SETTINGS, 0, 0, struct.pack(">HLHL", fr.S_INITIAL_WINDOW_SIZE, 100000,
                                                 fr.S_MAX_FRAME_SIZE, 20000))]
    return [(fr.WINDOW_UPDATE, 0, 0, struct.pack(">L", 100000))]


@fuzz_settings(100)
@given(st.lists(stream_error_case(), min_size=1, max_size=12))
def test_stream_errors_never_end_the_connection(rig, cases):
    loop, problems, errors = rig
    encoder = hpack.Encoder()
    frames = []
    sid = 1
    for case in cases:
        frames += _steps(case, sid, encoder)
        sid += 2
    answers, state, served, closed = _run(loop, encoder, frames, probe=True)
    assert not problems, problems
    assert not errors.records, errors.records
    _assert_bounded(state)
    assert answers.goaway is None and not closed, (cases, answers.goaway)
    assert served == 200, cases
