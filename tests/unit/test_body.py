"""proxy/body.py: how body hooks chain, and the SSE-event hook."""

from __future__ import annotations

from agproxy.http.messages import Headers
from agproxy.http.sse import SseSplitter, format_event, parse
from agproxy.proxy.body import HookChain, SseHook, content_coding
from agproxy.proxy.contract import BodyHook


class Upper(BodyHook):
    def __init__(self):
        self.seen = []

    def feed(self, chunk):
        self.seen.append(chunk)
        return chunk.upper()

    def end(self):
        return b"<end-upper>"


class Hold(BodyHook):
    """Keeps everything until the end."""

    def __init__(self):
        self.parts = []

    def feed(self, chunk):
        self.parts.append(chunk)
        return b""

    def end(self):
        return b"[" + b"".join(self.parts) + b"]"


class Watch(BodyHook):
    transforms = False

    def __init__(self):
        self.seen = []
        self.ended = False

    def feed(self, chunk):
        self.seen.append(chunk)
        return b"ignored"

    def end(self):
        self.ended = True
        return b"ignored"


def test_observe_only_chain_passes_the_same_objects():
    w1, w2 = Watch(), Watch()
    chain = HookChain([w1, w2])
    assert not chain.transforms
    chunk = bytes(range(256)) * 100
    assert chain.feed(chunk) is chunk          # no copy, whatever the hooks return
    assert w1.seen[0] is chunk and w2.seen[0] is chunk
    assert chain.end() == b"" and w1.ended and w2.ended


def test_hooks_chain_in_order_and_ends_flow_through_later_hooks():
    up, hold, watch = Upper(), Hold(), Watch()
    chain = HookChain([up, hold, watch])       # upstream bytes → Upper → Hold → Watch → client
    assert chain.transforms
    assert chain.feed(b"ab") == b"" and chain.feed(b"c") == b""
    assert watch.seen == []                    # Hold let nothing through yet
    # Upper's tail goes through Hold before Hold ends; Watch sees the final bytes.
    assert chain.end() == b"[ABC<end-upper>]"
    assert watch.seen == [b"[ABC<end-upper>]"] and watch.ended


def test_a_hook_that_returns_nothing_stops_the_chunk():
    hold, up = Hold(), Upper()
    chain = HookChain([hold, up])
    assert chain.feed(b"x") == b""
    assert up.seen == []                       # nothing was let through to it
    assert chain.end() == b"[X]<end-upper>"


def _rewrite(raw: bytes) -> bytes:
    ev = parse(raw)
    if ev is None:
        return raw
    if ev.data == "drop":
        return b""
    ev.data = ev.data.upper()
    return format_event(ev)


def _through(stream: bytes, size: int) -> bytes:
    hook = SseHook(_rewrite)
    return b"".join(hook.feed(stream[i:i + size]) for i in range(0, len(stream), size)) + hook.end()


def test_sse_hook_rewrites_per_event_whatever_the_chunking():
    stream = b"data: a\n\n: keep\n\ndata: drop\n\ndata: b\rdata: c\r\rdata: cut"
    for size in (1, 2, 3, 7, len(stream)):
        assert _through(stream, size) == b"data: A\n\n: keep\n\ndata: B\ndata: C\n\ndata: cut", size


def test_sse_hook_with_crlf_cut_between_cr_and_lf():
    # An event ends at a CR the moment it arrives; the LF that completes the CRLF comes
    # with the next chunk and stays in front of the next event: an empty line before
    # any field, which a client reads as nothing. The events are the same.
    stream = b"data: a\r\n\r\n: keep\r\n\r\ndata: b\r\n\r\n"
    whole = _through(stream, len(stream))
    assert whole == b"data: A\n\n: keep\r\n\r\ndata: B\n\n"
    one = _through(stream, 1)
    assert one == b"data: A\n\n\n: keep\r\n\rdata: B\n\n\n"
    for out in (whole, one, _through(stream, 2), _through(stream, 3)):
        events = [parse(e) for e in SseSplitter().feed(out)]
        assert [e.data for e in events if e is not None] == ["A", "B"]


def test_content_coding():
    assert content_coding(Headers()) is None
    assert content_coding(Headers([("content-encoding", "identity")])) is None
    assert content_coding(Headers([("content-encoding", " GZIP ")])) == "gzip"
