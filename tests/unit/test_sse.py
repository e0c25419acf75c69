"""http/sse.py: the event splitter and the event parser, against the WHATWG rules."""

from __future__ import annotations

import pytest

from agproxy.http.sse import Event, SseError, SseSplitter, format_event, parse

STREAM = (
    b": heartbeat\r\n\r\n"                                   # a comment-only event
    b"event: tools\r\ndata: {\"a\": 1}\r\n\r\n"               # CRLF
    b"data: line one\rdata: line two\r\r"                      # bare CR, two data lines
    b"id: 7\ndata:no space\ndata:  two spaces\n\n"            # LF; one optional space only
    b"data: mixed\r\n\n"                                       # CRLF then LF
    b"data: cr-lf split\r\r\n"                                 # CR, then CRLF
    b"retry: 1500\ndata\n\n"                                   # field without colon: empty value
)
EVENTS = [
    b": heartbeat\r\n\r\n",
    b"event: tools\r\ndata: {\"a\": 1}\r\n\r\n",
    b"data: line one\rdata: line two\r\r",
    b"id: 7\ndata:no space\ndata:  two spaces\n\n",
    b"data: mixed\r\n\n",
    b"data: cr-lf split\r\r\n",
    b"retry: 1500\ndata\n\n",
]


def split_all(chunks: list[bytes], max_event: int = 1 << 20) -> tuple[list[bytes], bytes]:
    s = SseSplitter(max_event)
    out = []
    for c in chunks:
        out.extend(s.feed(c))
    return out, s.end()


def test_events_whole_stream_in_one_chunk():
    events, rest = split_all([STREAM])
    assert events == EVENTS and rest == b""


def test_events_one_byte_at_a_time():
    events, rest = split_all([STREAM[i:i + 1] for i in range(len(STREAM))])
    # The LF of a CRLF cut from its CR stays with the next event's bytes: joined, the
    # raw events are the stream, byte for byte, and every event parses the same.
    assert b"".join(events) + rest == STREAM
    assert [parse(e) and (parse(e).data, parse(e).event, parse(e).id) for e in events] == \
           [parse(e) and (parse(e).data, parse(e).event, parse(e).id) for e in EVENTS]


def test_events_at_every_split_point():
    for cut in range(len(STREAM) + 1):
        events, rest = split_all([STREAM[:cut], STREAM[cut:]])
        assert b"".join(events) + rest == STREAM, cut
        assert len([e for e in events if e.strip(b"\r\n")]) == len(EVENTS), cut


def test_crlf_split_across_chunks_is_one_line_end():
    # "data: a\r" + "\n" + "\n": CRLF then LF is the blank line, not two blank lines.
    events, rest = split_all([b"data: a\r", b"\n", b"\ndata: b\n\n"])
    assert [parse(e).data for e in events] == ["a", "b"]
    assert rest == b""
    # A CR that ends the blank line itself, its LF in the next chunk.
    events, rest = split_all([b"data: a\n\r", b"\ndata: b\n\n"])
    assert events == [b"data: a\n\r", b"\ndata: b\n\n"]
    assert parse(events[1]).data == "b"


def test_parse_fields():
    ev = parse(b"event: e\r\nid: 42\r\nretry: 300\r\n: note\r\ndata: x\r\ndata:\r\ndata: z\r\n\r\n")
    assert (ev.event, ev.id, ev.retry, ev.data, ev.comments) == ("e", "42", 300, "x\n\nz", [" note"])
    assert parse(b"data: a\n\n").type == "message"
    assert parse(b"event: only\n\n") is None                  # no data: nothing dispatched
    assert parse(b": comment\n\n") is None
    assert parse(b"\n") is None
    assert parse(b"id: a\x00b\ndata: x\n\n").id is None       # an id with NUL is ignored
    assert parse(b"retry: 1.5\ndata: x\n\n").retry is None    # digits only
    assert parse(b"retry: \xd9\xa3\ndata: x\n\n").retry is None   # not ASCII digits
    assert parse(b"unknown: 1\ndata: x\n\n").data == "x"
    assert parse(b"data:  two\n\n").data == " two"            # only one space is removed
    assert parse(b"\xef\xbb\xbfdata: bom\n\n").data == "bom"  # a leading BOM is not part of the name
    assert parse(b"data: \xff\n\n").data == "\ufffd"          # UTF-8 with replacement


def test_unterminated_event_is_the_remainder():
    events, rest = split_all([b"data: done\n\n", b"data: cut"])
    assert events == [b"data: done\n\n"] and rest == b"data: cut"


def test_event_size_is_bounded():
    s = SseSplitter(max_event=64)
    assert s.feed(b"data: " + b"x" * 40 + b"\n\n")
    with pytest.raises(SseError):
        for _ in range(100):          # an event that never ends, a byte at a time
            s.feed(b"y")
    s = SseSplitter(max_event=64)
    with pytest.raises(SseError):     # a complete event over the bound, in one chunk
        s.feed(b"data: " + b"x" * 100 + b"\n\n")


def test_format_round_trip():
    ev = Event("a\nb", event="e", id="1", retry=5, comments=["c"])
    raw = format_event(ev)
    assert raw == b":c\nevent: e\nid: 1\nretry: 5\ndata: a\ndata: b\n\n"
    back = parse(raw)
    assert (back.data, back.event, back.id, back.retry, back.comments) == ("a\nb", "e", "1", 5, ["c"])
    # Line ends inside data become data lines (a CR must never end the field early).
    assert format_event(Event("x\r\ny\rz")) == b"data: x\ndata: y\ndata: z\n\n"


LF_STREAM = (b"\ndata: a\n\n\ndata: b\nid: 1\n\n: c\n\n\n\ndata: {\"x\": 1}\n\n"
             b"event: e\ndata: 2\ndata: 3\n\ndata: cut")


def _reference(stream: bytes) -> tuple[list[bytes], bytes]:
    """The WHATWG rule for an LF-only stream, byte by byte: an event ends at a line end
    that starts a line (an empty line)."""
    events, start, line_start = [], 0, 0
    for i, b in enumerate(stream):
        if b == 10:
            if i == line_start:
                events.append(stream[start:i + 1])
                start = i + 1
            line_start = i + 1
    return events, stream[start:]


def test_lf_only_streams_split_as_the_rule_says_at_every_cut():
    # LF-only streams take a memchr path of their own; it must agree with the rule.
    want = _reference(LF_STREAM)
    assert want[1] == b"data: cut" and len(want[0]) == 9
    assert split_all([LF_STREAM]) == want
    assert split_all([LF_STREAM[i:i + 1] for i in range(len(LF_STREAM))]) == want
    for a in range(len(LF_STREAM) + 1):
        for b in range(a, len(LF_STREAM) + 1, 7):
            assert split_all([LF_STREAM[:a], LF_STREAM[a:b], LF_STREAM[b:]]) == want, (a, b)


def test_a_stream_that_turns_to_cr_line_ends_midway_splits_the_same():
    # The LF path, then CRs arrive: the general path takes over from the same state.
    stream = b"data: a\n\ndata: b\n" + b"data: c\r\n\r\ndata: d\r\rdata: e\n\n"
    whole = split_all([stream])
    assert [parse(e).data for e in whole[0]] == ["a", "b\nc", "d", "e"]
    for cut in range(len(stream) + 1):
        events, rest = split_all([stream[:cut], stream[cut:]])
        assert b"".join(events) + rest == stream, cut
        assert [parse(e).data for e in events if parse(e)] == ["a", "b\nc", "d", "e"], cut


def test_lf_only_event_size_is_bounded():
    s = SseSplitter(max_event=64)
    with pytest.raises(SseError):
        s.feed(b"data: " + b"x" * 100 + b"\n\n")
    s = SseSplitter(max_event=64)
    with pytest.raises(SseError):
        for _ in range(100):
            s.feed(b"data: yy\n")       # lines, never an empty one


def test_lf_only_streams_without_blank_line_runs_split_as_the_rule_says():
    # No event opening with an empty line: a chunk that starts on an event boundary is
    # split in one call; the rest (carried-over bytes, extra blank lines) by the loop.
    stream = (b"data: {\"a\": 1}\n\ndata: b\nid: 2\n\n: note\n\ndata: [DONE]\n\n"
              b"data: x\n\n\ndata: after a blank line\n\ndata: cut")
    want = _reference(stream)
    assert len(want[0]) == 7 and want[1] == b"data: cut"
    assert split_all([stream]) == want
    for a in range(len(stream) + 1):
        for b in range(a, len(stream) + 1, 5):
            assert split_all([stream[:a], stream[a:b], stream[b:]]) == want, (a, b)
