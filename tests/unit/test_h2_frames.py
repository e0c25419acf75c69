"""The HTTP/2 server codec (http/h2_frames.py) at the byte level, against the h2 library.

The `h2` library plays the client: its bytes go into `ServerCodec.receive`, the
codec's output goes back into the client, and both sides' views are checked
(callbacks recorded by a fake application; the client's events). Frames h2 would
refuse to build are written with hyperframe or by hand.
"""

from __future__ import annotations

import struct

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import hpack
import pytest
from hyperframe.frame import DataFrame, HeadersFrame, PingFrame, RstStreamFrame

from agproxy.http import h2_frames as fr
from agproxy.http.h2_frames import ConnectionFailed, ServerCodec

E = h2.errors.ErrorCodes
REQ = [(":method", "GET"), (":scheme", "http"), (":authority", "x"), (":path", "/")]


class App:
    """Records the codec's callbacks; answers nothing by itself."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        if not name.startswith("on_"):
            raise AttributeError(name)
        return lambda *args: self.calls.append((name[3:],) + args)

    def of(self, kind):
        return [c[1:] for c in self.calls if c[0] == kind]


class Pair:
    def __init__(self, client_settings=None, stream_window=65535, conn_window=65535):
        self.app = App()
        self.codec = ServerCodec(self.app, max_concurrent_streams=7, stream_window=stream_window,
                                 conn_window=conn_window, max_header_list=8192)
        self.codec.initiate()
        cfg = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.client = h2.connection.H2Connection(cfg)
        if client_settings:
            self.client.local_settings = h2.settings.Settings(client=True, initial_values=client_settings)
        self.client.initiate_connection()
        self.events = []
        self.pump()

    def to_server(self, data: bytes) -> None:
        self.codec.receive(data)

    def pump(self) -> list:
        """Client output → codec, codec output → client; the client's new events."""
        data = self.client.data_to_send()
        if data:
            self.to_server(data)
        out = self.codec.data_to_send()
        new = self.client.receive_data(bytes(out)) if out else []
        self.events += new
        return new

    def raw(self, data: bytes) -> list:
        """Bytes the h2 client would not send → codec; the client's events from the answer."""
        try:
            self.to_server(data)
        except ConnectionFailed:
            pass
        out = self.codec.data_to_send()
        new = self.client.receive_data(bytes(out)) if out else []
        self.events += new
        return new

    def request(self, headers=REQ, end=True) -> int:
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, headers, end_stream=end)
        self.pump()
        return sid

    def goaway(self):
        ends = [e for e in self.events if isinstance(e, h2.events.ConnectionTerminated)]
        return ends[-1].error_code if ends else None

    def resets(self):
        return {e.stream_id: e.error_code for e in self.events if isinstance(e, h2.events.StreamReset)}


def fail_code(p: Pair, data: bytes) -> int:
    with pytest.raises(ConnectionFailed) as e:
        p.to_server(data)
    out = p.codec.data_to_send()
    events = p.client.receive_data(bytes(out))
    assert any(isinstance(ev, h2.events.ConnectionTerminated) and ev.error_code == e.value.code
               for ev in events)
    return e.value.code


def frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return fr.frame_header(len(payload), ftype, flags, sid) + payload


# -- connection setup -----------------------------------------------------------------------

def test_settings_exchange_both_ways():
    p = Pair(client_settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1000,
                              h2.settings.SettingCodes.MAX_FRAME_SIZE: 20000})
    changed = [e for e in p.events if isinstance(e, h2.events.RemoteSettingsChanged)][0].changed_settings
    assert changed[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS].new_value == 7
    assert changed[h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE].new_value == 8192
    assert any(isinstance(e, h2.events.SettingsAcknowledged) for e in p.events)   # ours were ACKed
    assert p.codec.peer_initial_window == 1000 and p.codec.max_outbound_frame_size == 20000
    p.pump()                                                                   # client ACKs ours


def test_bad_preface_and_missing_settings_are_connection_errors():
    codec = ServerCodec(App(), max_concurrent_streams=1, stream_window=65535, conn_window=65535,
                        max_header_list=None)
    with pytest.raises(ConnectionFailed):
        codec.receive(b"GET / HTTP/1.1\r\n")
    codec = ServerCodec(App(), max_concurrent_streams=1, stream_window=65535, conn_window=65535,
                        max_header_list=None)
    codec.receive(fr.PREFACE[:10])                 # split preface: waits for more
    with pytest.raises(ConnectionFailed):
        codec.receive(fr.PREFACE[10:] + frame(fr.PING, 0, 0, b"\0" * 8))


def test_input_split_at_every_byte_gives_the_same_callbacks():
    p = Pair()
    p.client.send_headers(1, REQ + [("x-a", "1")], end_stream=False)
    p.client.send_data(1, b"hello", end_stream=True)
    data = p.client.data_to_send()
    for i in range(len(data)):
        p.to_server(data[i:i + 1])
    (sid, fields, ended), = p.app.of("request")
    assert sid == 1 and not ended and (b"x-a", b"1") in fields
    assert p.app.of("data") == [(1, b"hello", 5)] and p.app.of("end") == [(1,)]


def test_ping_is_acknowledged_with_its_payload():
    p = Pair()
    p.client.ping(b"12345678")
    p.pump()
    assert any(isinstance(e, h2.events.PingAckReceived) and e.ping_data == b"12345678" for e in p.events)


# -- requests and responses -----------------------------------------------------------------

def test_request_and_response_in_one_headers_and_one_data_frame():
    p = Pair()
    sid = p.request()
    assert p.app.of("request") == [(sid, [(k.encode(), v.encode()) for k, v in REQ], True)]
    p.codec.send_headers(sid, [(b":status", b"200"), (b"content-type", b"text/plain")])
    p.codec.send_data(sid, b"body", end_stream=True)
    out = bytes(p.codec.data_to_send())
    assert out[3] == fr.HEADERS and out.count(b"body") == 1
    ev = p.client.receive_data(out)
    assert [type(e) for e in ev] == [h2.events.ResponseReceived, h2.events.DataReceived, h2.events.StreamEnded]
    assert sid not in p.codec.streams            # closed both ways
    with pytest.raises(fr.StreamClosed):
        p.codec.send_data(sid, b"late")


def test_continuation_both_ways():
    p = Pair()
    big = "v" * 40000                             # > 16,384: the client splits it in CONTINUATIONs
    sid = p.request(REQ + [("x-big", big)])
    (_, fields, _), = p.app.of("request")
    assert (b"x-big", big.encode()) in fields
    p.codec.send_headers(sid, [(b":status", b"200"), (b"x-big", big.encode())], end_stream=True)
    out = bytes(p.codec.data_to_send())
    ev = p.client.receive_data(out)
    assert dict(ev[0].headers)["x-big"] == big and isinstance(ev[1], h2.events.StreamEnded)
    assert out.count(bytes([fr.CONTINUATION])) >= 2


def test_nothing_may_interleave_a_header_block():
    p = Pair()
    block = hpack.Encoder().encode(REQ)
    first = HeadersFrame(1, data=block[:5]).serialize()
    assert fail_code(p, first + PingFrame(0, opaque_data=b"\0" * 8).serialize()) == E.PROTOCOL_ERROR


def test_padded_and_prioritised_headers_and_padded_data():
    p = Pair()
    block = hpack.Encoder().encode(REQ)
    hf = HeadersFrame(1, data=block, pad_length=7, depends_on=0, stream_weight=16,
                      flags=["END_HEADERS", "PADDED", "PRIORITY"])
    df = DataFrame(1, data=b"abc", pad_length=10, flags=["PADDED", "END_STREAM"])
    p.to_server(hf.serialize() + df.serialize())
    assert p.app.of("request")[0][1] == [(k.encode(), v.encode()) for k, v in REQ]
    assert p.app.of("data") == [(1, b"abc", 14)]        # flow control counts the padding
    assert p.app.of("end") == [(1,)]


def test_padding_longer_than_the_frame_is_a_protocol_error():
    p = Pair()
    p.request(end=False)
    bad = frame(fr.DATA, fr.PADDED, 1, bytes([9]) + b"abc")
    assert fail_code(p, bad) == E.PROTOCOL_ERROR


def test_trailers_end_the_stream():
    p = Pair()
    sid = p.request(end=False)
    p.client.send_data(sid, b"x")
    p.client.send_headers(sid, [("grpc-status", "0")], end_stream=True)
    p.pump()
    assert p.app.of("trailers") == [(sid, [(b"grpc-status", b"0")])] and p.app.of("end") == [(sid,)]


# -- flow control ---------------------------------------------------------------------------

def test_consumed_data_is_acknowledged_after_half_a_window():
    p = Pair()
    sid = p.request(end=False)
    p.client.send_data(sid, b"x" * 16384)
    p.pump()
    p.codec.ack(16384, sid)
    assert not p.codec.data_to_send()              # a quarter of the window: not yet
    p.client.send_data(sid, b"x" * 16384)
    p.pump()
    p.codec.ack(16384, sid)
    ev = p.client.receive_data(bytes(p.codec.data_to_send()))
    ups = {e.stream_id: e.delta for e in ev if isinstance(e, h2.events.WindowUpdated)}
    assert ups == {0: 32768, sid: 32768}


def test_client_exceeding_our_window_is_a_flow_control_error():
    p = Pair()
    p.request(end=False)
    data = b"".join(frame(fr.DATA, 0, 1, b"x" * 16384) for _ in range(5))   # 81,920 > 65,535
    assert fail_code(p, data) == E.FLOW_CONTROL_ERROR


def test_send_window_follows_window_update_and_initial_window_changes():
    p = Pair()
    sid = p.request()
    assert p.codec.send_window(sid) == 65535
    p.codec.send_headers(sid, [(b":status", b"200")])
    p.codec.send_data(sid, b"x" * 16384)
    p.codec.send_data(sid, b"x" * 16384)
    p.codec.send_data(sid, b"x" * 16384)
    p.codec.send_data(sid, b"x" * 16383)
    assert p.codec.send_window(sid) == 0
    with pytest.raises(fr.H2Error):
        p.codec.send_data(sid, b"x")
    p.client.receive_data(bytes(p.codec.data_to_send()))
    p.client.increment_flow_control_window(100, stream_id=sid)
    p.client.increment_flow_control_window(50)
    p.pump()
    assert p.codec.send_window(sid) == 50 and p.app.of("window") == [(sid,), (0,)]
    p.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65535 + 1000})
    p.pump()
    assert p.codec.streams[sid].send_window == 1100 and p.app.of("window")[-1] == (0,)


def test_window_update_errors():
    p = Pair()
    assert fail_code(p, frame(fr.WINDOW_UPDATE, 0, 0, struct.pack(">L", 0))) == E.PROTOCOL_ERROR
    p = Pair()
    assert fail_code(p, frame(fr.WINDOW_UPDATE, 0, 0, struct.pack(">L", 2 ** 31 - 1))) == \
        E.FLOW_CONTROL_ERROR
    p = Pair()
    sid = p.request()
    p.raw(frame(fr.WINDOW_UPDATE, 0, sid, struct.pack(">L", 2 ** 31 - 1)))  # a stream error
    assert p.app.of("stream_error") == [(sid, E.FLOW_CONTROL_ERROR)]
    assert p.resets() == {sid: E.FLOW_CONTROL_ERROR} and p.goaway() is None


# -- stream rules ---------------------------------------------------------------------------

def test_stream_ids_must_be_odd_and_increasing():
    p = Pair()
    block = hpack.Encoder().encode(REQ)
    assert fail_code(p, HeadersFrame(2, data=block, flags=["END_HEADERS"]).serialize()) == E.PROTOCOL_ERROR
    p = Pair()
    enc = hpack.Encoder()
    p.to_server(HeadersFrame(5, data=enc.encode(REQ), flags=["END_HEADERS", "END_STREAM"]).serialize())
    bad = HeadersFrame(3, data=enc.encode(REQ), flags=["END_HEADERS", "END_STREAM"]).serialize()
    assert fail_code(p, bad) == E.PROTOCOL_ERROR


def test_frames_on_idle_streams_are_connection_errors():
    for f in (DataFrame(1, data=b"x"), RstStreamFrame(1, error_code=0)):
        p = Pair()
        assert fail_code(p, f.serialize()) == E.PROTOCOL_ERROR
    p = Pair()
    assert fail_code(p, frame(fr.WINDOW_UPDATE, 0, 9, struct.pack(">L", 1))) == E.PROTOCOL_ERROR


def test_data_after_end_stream_is_a_stream_error_only():
    p = Pair()
    sid = p.request()                              # END_STREAM: half-closed (remote)
    p.raw(DataFrame(sid, data=b"late").serialize())
    assert p.app.of("stream_error") == [(sid, E.STREAM_CLOSED)]
    assert p.resets() == {sid: E.STREAM_CLOSED} and p.goaway() is None
    sid2 = p.request()
    assert p.app.of("request")[-1][0] == sid2


def test_frames_on_a_stream_we_reset_are_ignored():
    p = Pair()
    sid = p.request(end=False)
    p.codec.reset_stream(sid, fr.CANCEL)
    p.codec.reset_stream(sid, fr.CANCEL)           # already closed: nothing more is sent
    assert bytes(p.codec.data_to_send()).count(bytes([fr.RST_STREAM])) == 1
    p.raw(DataFrame(sid, data=b"in flight").serialize() + DataFrame(sid, data=b"", flags=["END_STREAM"]).serialize())
    assert not p.app.of("data") and p.goaway() is None and not p.app.of("stream_error")


def test_client_reset_is_reported_and_closes_the_stream():
    p = Pair()
    sid = p.request(end=False)
    p.client.reset_stream(sid, E.CANCEL)
    p.pump()
    assert p.app.of("reset") == [(sid, E.CANCEL)] and sid not in p.codec.streams


def test_frame_larger_than_our_max_is_a_frame_size_error():
    p = Pair()
    p.request(end=False)
    assert fail_code(p, frame(fr.DATA, 0, 1, b"x" * 16385)) == E.FRAME_SIZE_ERROR


@pytest.mark.parametrize("ftype, payload", [(fr.PING, b"\0" * 7), (fr.SETTINGS, b"\0" * 5),
                                            (fr.RST_STREAM, b"\0" * 3)])
def test_wrong_fixed_lengths_are_frame_size_errors(ftype, payload):
    p = Pair()
    p.request(end=False)
    sid = 0 if ftype in (fr.PING, fr.SETTINGS) else 1
    assert fail_code(p, frame(ftype, 0, sid, payload)) == E.FRAME_SIZE_ERROR


def test_bad_priority_is_a_stream_error_only():
    # RFC 9113 §6.3: a PRIORITY of the wrong length, or one making a stream depend on
    # itself, is a stream error: that stream is reset, the connection goes on.
    p = Pair()
    a = p.request(end=False)
    p.raw(frame(fr.PRIORITY, 0, a, b"\0" * 4))
    b = p.request(end=False)
    p.raw(frame(fr.PRIORITY, 0, b, struct.pack(">LB", b, 16)))
    assert p.app.of("stream_error") == [(a, E.FRAME_SIZE_ERROR), (b, E.PROTOCOL_ERROR)]
    assert p.resets() == {a: E.FRAME_SIZE_ERROR, b: E.PROTOCOL_ERROR} and p.goaway() is None
    last = p.request()
    assert p.app.of("request")[-1][0] == last


def test_self_dependent_headers_and_trailers_without_end_stream_are_stream_errors():
    p = Pair()
    first = p.request()
    enc = p.client.encoder
    sid = p.client.get_next_available_stream_id()
    p.client.highest_outbound_stream_id = sid      # written by hand below
    block = enc.encode(REQ)
    p.to_server(frame(fr.HEADERS, fr.END_HEADERS | fr.END_STREAM | fr.PRIORITY_FLAG, sid,
                      struct.pack(">LB", sid, 16) + block))
    # (the h2 client ignores a reset of a stream it did not open itself: read the bytes)
    assert bytes(p.codec.data_to_send()) == frame(fr.RST_STREAM, 0, sid, struct.pack(">L", E.PROTOCOL_ERROR))
    assert [r[0] for r in p.app.of("request")] == [first]
    sid = p.request(end=False)                     # the HPACK table is still in step
    assert p.app.of("request")[-1][0] == sid
    p.raw(frame(fr.HEADERS, fr.END_HEADERS, sid, enc.encode([("x-trailer", "1")])))
    assert p.resets()[sid] == E.PROTOCOL_ERROR and p.goaway() is None
    last = p.request()
    assert p.app.of("request")[-1][0] == last


def test_unknown_frames_are_ignored_and_goaway_is_reported():
    p = Pair()
    p.to_server(frame(0x42, 0xFF, 0, b"whatever"))
    p.to_server(frame(fr.GOAWAY, 0, 0, struct.pack(">LL", 0, 0)))
    assert p.app.of("goaway") == [(0,)]


def test_goaway_carries_the_last_stream_id():
    p = Pair()
    p.request()
    sid = p.request()
    p.codec.close_connection(fr.NO_ERROR)
    ev = p.client.receive_data(bytes(p.codec.data_to_send()))
    assert ev[0].last_stream_id == sid and ev[0].error_code == E.NO_ERROR


def test_client_codec_counts_no_reset_flood_and_no_server_metric():
    # The server resetting streams we opened (an overloaded upstream refusing them) is
    # no flood: the client side's budget does not count resets, nor feed the metric.
    from agproxy.http import h2_budget
    before = dict(h2_budget.TRIPS)
    app = App()
    c = fr.ClientCodec(app, stream_window=65535, conn_window=65535, max_header_list=8192)
    c.initiate()
    c.receive(frame(fr.SETTINGS, 0, 0, b""))
    for _ in range(h2_budget.RESET_MIN + 50):
        sid = c.open_stream()
        c.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                             (b":authority", b"x")], end_stream=True)
        c.receive(frame(fr.RST_STREAM, 0, sid, struct.pack(">L", E.REFUSED_STREAM)))
    assert len(app.of("reset")) == h2_budget.RESET_MIN + 50
    assert not any(f == fr.GOAWAY for f in _frame_types(bytes(c.data_to_send())))
    # A CONTINUATION flood from the server is still cut, and not counted as the server's.
    sid = c.open_stream()
    c.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                         (b":authority", b"x")], end_stream=True)
    with pytest.raises(ConnectionFailed) as e:
        c.receive(frame(fr.HEADERS, 0, sid, b"") + frame(fr.CONTINUATION, 0, sid, b"") * 40)
    assert e.value.code == E.ENHANCE_YOUR_CALM
    assert h2_budget.TRIPS == before


def _frame_types(data: bytes) -> list[int]:
    out, pos = [], 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos:pos + 3], "big")
        out.append(data[pos + 3])
        pos += 9 + length
    return out
