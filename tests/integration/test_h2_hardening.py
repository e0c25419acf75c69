"""HTTP/2 server hardening (issue 8): the attacks of the HTTP/2 flood classes, and deadlines.

The real `H2Connection` on a loopback socket (tests/integration/test_h2_helpers.py's
H2TestServer records which handlers started, finished and were cancelled), driven by
tests/support/h2raw.py, a client that writes whatever frames a test needs and
parses every frame of the answer strictly. Each attack ends the way a user can see
(a RST_STREAM or GOAWAY code, a closed socket, a 400) and leaves other streams and
connections working; each budget trip is counted for /metrics (h2_budget.TRIPS).
"""

from __future__ import annotations

import asyncio
import json
import struct
import time

import pytest

from agproxy.http import h2_budget
from agproxy.http.h1 import Limits
from agproxy.http.messages import Headers
from tests.integration.test_h2_helpers import H2TestServer
from tests.support import h2raw
from tests.support.h2raw import (ACK, CANCEL, CONTINUATION, DATA, END_HEADERS, END_STREAM,
                                 ENHANCE_YOUR_CALM, FLOW_CONTROL_ERROR, HEADERS, NO_ERROR, PING,
                                 PRIORITY, PROTOCOL_ERROR, SETTINGS, RawH2,
                                 frame, request_fields, window_update)


@pytest.fixture
def server():
    with H2TestServer() as s:
        yield s


def handshake(c: RawH2) -> None:
    c.read_until(lambda: any(f[0] == SETTINGS and not f[1] & ACK for f in c.frames))


def served(c: RawH2, path: str = "/echo") -> bool:
    """A fresh request on the same connection is answered: the connection survived."""
    sid = c.request(path)
    c.read_until(lambda: sid in c.ended or sid in c.resets)
    return c.status(sid) == 200 and sid in c.ended


def trips(kind: str) -> int:
    return h2_budget.TRIPS[kind]


# -- MadeYouReset (CVE-2025-8671): resets the server is made to send ----------------------------

def _window_update_zero(c: RawH2, sid: int) -> None:
    c.send(window_update(sid, 0))


def _content_length_overrun(c: RawH2, sid: int) -> None:
    c.send(frame(DATA, 0, b"more than declared", sid))


def _trailers_without_end_stream(c: RawH2, sid: int) -> None:
    c.send(frame(HEADERS, END_HEADERS, c.encoder.encode([("x-t", "1")]), sid))


def _send_window_overflow(c: RawH2, sid: int) -> None:
    c.send(window_update(sid, 0x7FFFFFFF))


def _self_dependency(c: RawH2, sid: int) -> None:
    c.send(frame(PRIORITY, 0, struct.pack(">LB", sid, 16), sid))


@pytest.mark.parametrize("trigger, code", [
    (_window_update_zero, PROTOCOL_ERROR),
    (_content_length_overrun, PROTOCOL_ERROR),
    (_trailers_without_end_stream, PROTOCOL_ERROR),
    (_send_window_overflow, FLOW_CONTROL_ERROR),
    (_self_dependency, PROTOCOL_ERROR),
])
def test_a_stream_the_server_resets_has_its_handler_cancelled(server, trigger, code):
    c = RawH2(server.port)
    handshake(c)
    sid, f = c.headers_frame(request_fields("/gate/never", method="POST",
                                            extra=[("content-length", "1")]), end_stream=False)
    c.send(f)
    server.wait_until(lambda: "/gate/never" in server.started)
    trigger(c, sid)
    c.read_until(lambda: sid in c.resets)
    assert c.resets[sid] == code
    # The handler (and so whatever it has upstream) stops, not only the stream's slot.
    server.wait_until(lambda: "/gate/never" in server.cancelled and server.active == 0)
    assert served(c) and c.goaway is None
    c.close()


def test_made_you_reset_flood_is_cut_off_with_enhance_your_calm():
    limits = Limits(max_concurrent_streams=100)
    with H2TestServer(limits=limits) as srv:
        c = RawH2(srv.port)
        handshake(c)
        before = trips("reset")
        sent = 0
        for _ in range(10):                  # up to 1,000 streams, 100 at a time
            sids = []
            heads = b""
            for _ in range(100):
                sid, f = c.headers_frame(request_fields("/gate/held"))
                heads += f
                sids.append(sid)
            if not c.send(heads):
                break
            # Every handler is running (holding its slot) before the resets are drawn.
            srv.wait_until(lambda: len(srv.started) >= sent + 100)
            sent += len(sids)
            if not c.send(b"".join(window_update(sid, 0) for sid in sids)):
                break
            c.read_until(lambda: c.goaway is not None or all(s in c.resets for s in sids))
            assert srv.max_active <= 100, f"{srv.max_active} handlers running at once"
            if c.goaway is not None:
                break
        assert c.goaway is not None and c.goaway[1] == ENHANCE_YOUR_CALM, f"{sent} streams reset, no GOAWAY"
        assert sent <= 200
        c.read_until_closed()
        srv.wait_until(lambda: srv.active == 0 and not srv.conns)
        assert len(srv.cancelled) == len(srv.started)     # no handler outlived its stream
        assert trips("reset") == before + 1
        c.close()


def test_resets_for_malformed_requests_count_toward_the_same_budget(server):
    c = RawH2(server.port)
    handshake(c)
    missing_path = [(":method", "GET"), (":scheme", "http"), (":authority", "x")]
    sids = []
    batch = b""
    for _ in range(h2_budget.RESET_MIN + 20):
        sid, f = c.headers_frame(missing_path)
        batch += f
        sids.append(sid)
    c.send(batch)
    c.read_until_closed()
    assert c.status(sids[0]) == 400
    assert c.goaway is not None and c.goaway[1] == ENHANCE_YOUR_CALM


def test_answered_streams_earn_room_for_resets(server):
    # A client that mostly completes its requests may cancel many too (a browser
    # navigating away): resets are only a flood when they outnumber answers.
    c = RawH2(server.port)
    handshake(c)
    for _ in range(h2_budget.RESET_MIN + 50):
        assert served(c)
    for _ in range(h2_budget.RESET_MIN + 20):
        sid, f = c.headers_frame(request_fields("/gate/never"))
        c.send(f + window_update(sid, 0))
        c.read_until(lambda: sid in c.resets)
    assert c.goaway is None and served(c)
    c.close()


# -- CONTINUATION flood (CVE-2024-27316 class) ----------------------------------------------------

@pytest.mark.parametrize("fragment", [b"", b"\x00"], ids=["empty", "one-byte"])
def test_continuation_flood_is_cut_off_by_frame_count(server, fragment):
    c = RawH2(server.port)
    handshake(c)
    before = trips("continuation")
    sid, head = c.headers_frame(request_fields("/echo"), end_headers=False)
    flood = frame(CONTINUATION, 0, fragment, sid) * 10_000
    sent = 0
    while sent < 100 and c.send(flood if sent else head + flood):
        sent += 1
    c.read_until_closed()
    assert sent < 100, "the server took a million CONTINUATION frames"
    # (The GOAWAY may be lost to the TCP reset of a close with unread input.)
    assert c.goaway is None or c.goaway[1] == ENHANCE_YOUR_CALM
    assert trips("continuation") == before + 1
    server.wait_until(lambda: not server.conns)


def test_continuation_frame_cap_is_exact(server):
    cap = h2_budget.MAX_CONTINUATIONS
    c = RawH2(server.port)
    handshake(c)
    # cap CONTINUATION frames, the last ending the block: served.
    sid, head = c.headers_frame(request_fields("/echo"), end_headers=False)
    c.send(head + frame(CONTINUATION, 0, b"", sid) * (cap - 1) + frame(CONTINUATION, END_HEADERS, b"", sid))
    c.read_until(lambda: sid in c.ended)
    assert c.status(sid) == 200
    # One more: a connection error, GOAWAY ENHANCE_YOUR_CALM.
    sid, head = c.headers_frame(request_fields("/echo"), end_headers=False)
    c.send(head + frame(CONTINUATION, 0, b"", sid) * (cap + 1))
    c.read_until_closed()
    assert c.goaway is not None and c.goaway[1] == ENHANCE_YOUR_CALM
    c.close()


def test_a_header_block_in_many_fragments_is_served(server):
    c = RawH2(server.port)
    handshake(c)
    block = c.encoder.encode(request_fields("/echo", extra=[("x-pad", "p" * 3000)]))
    step = len(block) // 20 + 1
    parts = [block[i:i + step] for i in range(0, len(block), step)]
    sid = c.next_sid
    c.next_sid += 2
    out = frame(HEADERS, END_STREAM, parts[0], sid)
    for i, part in enumerate(parts[1:]):
        out += frame(CONTINUATION, END_HEADERS if i == len(parts) - 2 else 0, part, sid)
    c.send(out)
    c.read_until(lambda: sid in c.ended)
    assert c.status(sid) == 200 and served(c)
    c.close()


# -- header_timeout ------------------------------------------------------------------------------

def test_a_header_block_that_never_ends_is_cut_off_after_header_timeout():
    with H2TestServer(limits=Limits(header_timeout=0.3)) as srv:
        c = RawH2(srv.port)
        handshake(c)
        before = trips("header_timeout")
        sid, head = c.headers_frame(request_fields("/echo"), end_headers=False)
        start = time.monotonic()
        c.send(head)
        c.read_until_closed(timeout=10)
        assert c.goaway is not None and c.goaway[1] == ENHANCE_YOUR_CALM
        assert 0.3 <= time.monotonic() - start < 5
        assert trips("header_timeout") == before + 1
        assert not srv.started


def test_a_header_block_trickled_in_fragments_is_cut_off_after_header_timeout():
    with H2TestServer(limits=Limits(header_timeout=0.3)) as srv:
        c = RawH2(srv.port)
        handshake(c)
        sid, head = c.headers_frame(request_fields("/echo"), end_headers=False)
        c.send(head)
        deadline = time.monotonic() + 10
        while not c.closed and time.monotonic() < deadline:
            # one empty CONTINUATION per 100 ms: well under the frame cap, never ending
            if not c.send(frame(CONTINUATION, 0, b"", sid)):
                break
            c.read_once(timeout=0.1)
        c.read_until_closed()
        assert c.goaway is not None and c.goaway[1] == ENHANCE_YOUR_CALM


# -- idle: only streams are activity --------------------------------------------------------------

def test_pings_and_control_frames_do_not_keep_an_idle_connection_open():
    with H2TestServer(limits=Limits(idle_timeout=0.5)) as srv:
        c = RawH2(srv.port)
        handshake(c)
        assert served(c)
        keepalive = [frame(PING, 0, b"k" * 8), frame(SETTINGS, 0), window_update(0, 1),
                     frame(PRIORITY, 0, struct.pack(">LB", 0, 16), 99)]
        start = time.monotonic()
        i = 0
        while not c.closed and time.monotonic() - start < 10:
            if not c.send(keepalive[i % len(keepalive)]):
                break
            i += 1
            c.read_once(timeout=0.1)          # a control frame every 100 ms
        c.read_until_closed()
        assert c.goaway is not None and c.goaway[1] == NO_ERROR
        assert time.monotonic() - start < 5
        srv.wait_until(lambda: not srv.conns)


def test_an_open_stream_keeps_the_connection_open_past_idle_timeout():
    with H2TestServer(limits=Limits(idle_timeout=0.3)) as srv:
        c = RawH2(srv.port)
        handshake(c)
        sid = c.request("/gate/long")
        srv.wait_until(lambda: "/gate/long" in srv.started)
        until = time.monotonic() + 0.8        # longer than idle_timeout, with the stream open
        while time.monotonic() < until and not c.closed:
            c.read_once(timeout=max(0.01, until - time.monotonic()))
        assert not c.closed and c.goaway is None
        srv.release("long")
        c.read_until(lambda: sid in c.ended)
        assert c.status(sid) == 200
        c.read_until_closed()                 # and idle once it is done
        assert c.goaway[1] == NO_ERROR


def test_an_idle_timeout_of_zero_is_no_limit():
    with H2TestServer(limits=Limits(idle_timeout=0, header_timeout=0.4)) as srv:   # sweeps every 50 ms
        c = RawH2(srv.port)
        handshake(c)
        assert served(c)
        until = time.monotonic() + 0.5        # ten sweeps with the connection idle
        while time.monotonic() < until and not c.closed:
            c.read_once(timeout=max(0.01, until - time.monotonic()))
        assert c.goaway is None and served(c)
        c.close()


# -- stream_idle_timeout ----------------------------------------------------------------------------

async def _trickle_or_default(server, stream):
    if stream.request.path == "/trickle":
        stream.send_head(200, Headers([("content-type", "text/plain")]))
        for _ in range(12):                   # 1.2 s in all, a chunk every 100 ms
            await stream.send_data(b"tick\n")
            await asyncio.sleep(0.1)          # the handler's own pace, not synchronisation
        await stream.end()
    else:
        await H2TestServer.default_route(server, stream)


def test_a_stream_with_a_zero_window_is_reset_after_stream_idle_timeout():
    with H2TestServer(limits=Limits(stream_idle_timeout=0.4)) as srv:
        c = RawH2(srv.port, client_settings=h2raw.settings(initial_window_size=0))
        handshake(c)
        sid = c.request("/bytes?n=100000")
        c.read_until(lambda: c.status(sid) == 200)     # the head needs no window
        start = time.monotonic()
        c.read_until(lambda: sid in c.resets, timeout=10)
        assert c.resets[sid] == CANCEL and sid not in c.data
        assert 0.3 <= time.monotonic() - start < 5
        srv.wait_until(lambda: "/bytes" in srv.cancelled and srv.active == 0)
        # Other streams on the connection still work.
        sid2 = c.request("/echo")
        c.send(window_update(sid2, 1 << 20))
        c.read_until(lambda: sid2 in c.ended)
        assert c.status(sid2) == 200 and c.goaway is None
        c.close()


def test_a_stream_waiting_on_nothing_is_reset_but_a_slow_one_that_moves_is_not():
    with H2TestServer(limits=Limits(stream_idle_timeout=0.4), handler=_trickle_or_default) as srv:
        c = RawH2(srv.port)
        handshake(c)
        stalled = c.request("/gate/stalled")
        slow = c.request("/trickle")
        c.read_until(lambda: stalled in c.resets and slow in c.ended, timeout=10)
        assert c.resets[stalled] == CANCEL
        assert slow not in c.resets and bytes(c.data[slow]) == b"tick\n" * 12
        srv.wait_until(lambda: "/gate/stalled" in srv.cancelled and "/trickle" in srv.finished)
        c.close()


# -- header names with underscores ------------------------------------------------------------------

def _echo_headers(srv, extra):
    c = RawH2(srv.port)
    handshake(c)
    sid = c.request("/echo", extra=extra)
    c.read_until(lambda: sid in c.ended or sid in c.resets)
    status = c.status(sid)
    body = bytes(c.data.get(sid, b""))
    alive = served(c)
    c.close()
    return status, body, alive


def test_header_names_with_underscores_are_dropped_by_default(server):
    status, body, _ = _echo_headers(server, [("x_user", "admin"), ("x-user", "bob")])
    assert status == 200
    names = [k for k, _ in json.loads(body)["headers"]]
    assert "x-user" in names and "x_user" not in names


def test_header_names_with_underscores_can_be_refused():
    with H2TestServer(limits=Limits(headers_with_underscores="reject")) as srv:
        status, body, alive = _echo_headers(srv, [("x_user", "admin")])
        assert status == 400 and b"underscore" in body and alive
        assert "/echo" in srv.started       # only the fresh, clean request reached a handler
        assert srv.started.count("/echo") == 1


def test_header_names_with_underscores_can_be_allowed():
    with H2TestServer(limits=Limits(headers_with_underscores="allow")) as srv:
        status, body, _ = _echo_headers(srv, [("x_user", "admin")])
        assert status == 200 and ["x_user", "admin"] in json.loads(body)["headers"]


# -- rate budgets: PING, SETTINGS, PRIORITY, empty frames ----------------------------------------------

def _flood(c: RawH2, one: bytes, n: int) -> None:
    # One write, a little past the budget: the server reads all of it before it closes,
    # so its GOAWAY is not lost to the TCP reset of a close with unread input.
    c.send(one * n)


@pytest.mark.parametrize("kind, make", [
    ("ping", lambda sid: frame(PING, 0, b"12345678")),
    ("settings", lambda sid: frame(SETTINGS, 0)),
    ("priority", lambda sid: frame(PRIORITY, 0, struct.pack(">LB", 0, 16), sid)),
    ("empty_frame", lambda sid: frame(DATA, 0, b"", sid)),
])
def test_control_and_empty_frame_floods_are_cut_off_even_when_the_peer_reads(server, kind, make):
    c = RawH2(server.port)
    handshake(c)
    sid = c.request("/read-forever", end_stream=False)
    before = trips(kind)
    _flood(c, make(sid), h2_budget.RATE_FRAMES + 20)
    c.read_until_closed()
    assert c.goaway is not None and c.goaway[1] == ENHANCE_YOUR_CALM
    assert trips(kind) == before + 1
    server.wait_until(lambda: not server.conns and server.active == 0)


def test_control_frames_below_the_budget_are_answered(server):
    c = RawH2(server.port)
    handshake(c)
    for i in range(h2_budget.RATE_FRAMES // 2):
        c.send(frame(PING, 0, struct.pack(">Q", i)))
    c.read_until(lambda: len(c.pings) == h2_budget.RATE_FRAMES // 2)
    assert c.pings[-1] == struct.pack(">Q", h2_budget.RATE_FRAMES // 2 - 1)
    assert served(c) and c.goaway is None
    c.close()
