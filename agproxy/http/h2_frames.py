"""HTTP/2 server connection (RFC 9113): frames in, callbacks out; frames out as bytes.

Theory of operation: `ServerCodec` is the protocol engine behind http/h2.py's
`H2Connection`, written for the hot path instead of the `h2` library (which
builds a frame object, a set of flag enums, an event object and walks two state
machines for every frame). `receive(data)` appends to what is left of the last
read, then walks the buffer frame by frame: each 9-byte header is read with one
`struct.unpack_from`, the payload is sliced out of the buffer only when the
application keeps it (a DATA payload, a header block for HPACK), and the frame is
handled by a small method per type. What the application must know is reported
by calling its methods directly (`on_request`, `on_data`, `on_end`, `on_trailers`,
`on_reset`, `on_window`, `on_goaway`, `on_stream_error`); there are no event
objects. Output (`send_headers`, `send_data`, `reset_stream`, WINDOW_UPDATE,
SETTINGS ACK, PING ACK, GOAWAY) is appended to one bytearray (`out`) that the
connection hands to the transport once per flush (`data_to_send`).

State kept, and nothing more:
- per open stream (`StreamState`): whether each side may still send, our send
  window, the client's remaining window and the bytes consumed but not yet
  acknowledged with WINDOW_UPDATE;
- per connection: both connection windows, the peer's SETTINGS that matter to a
  server (initial window, max frame size, header table size), the highest stream
  id the client opened, a bounded record of recently closed streams (to tell
  "closed" from "never opened" and to ignore frames on streams we reset, §5.1),
  and a pending header block while CONTINUATION frames arrive.

Errors: a connection error queues GOAWAY with its code and raises `ConnectionFailed`
(the caller sends what is queued and closes). A stream error on a stream the
application knows is reported with `on_stream_error` (the application resets it:
its handler must learn of it); on any other stream the codec sends RST_STREAM itself.
Concurrency limits and request validation are policy and live in http/h2.py;
HPACK is http/hpack_codec.py.

Floods: frames that cost work without moving a request forward (PING, SETTINGS,
PRIORITY, empty DATA, CONTINUATION, stream resets either way) are counted by the
connection's `FloodBudget` (http/h2_budget.py, where the limits are documented);
a spent budget ends the connection with GOAWAY ENHANCE_YOUR_CALM. A header block
must also complete within `header_timeout` (checked on each CONTINUATION here and,
for a block that stalls, by the server's sweep through `header_block_expired`).

Flow control on receipt mirrors h2's window manager: bytes the application has
consumed (`ack`) are returned with WINDOW_UPDATE once half a window has been
consumed, or when the window is empty and more than a little was consumed.
"""

from __future__ import annotations

import struct
import time

import hpack.exceptions

from agproxy.http import h2_budget
from agproxy.http.h2_budget import FloodBudget, FloodSpent
from agproxy.http.hpack_codec import FastDecoder, FastEncoder

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: PING/SETTINGS acknowledgements that may pile up while the peer reads nothing
MAX_ACKS_WHILE_BLOCKED = 10_000

# Frame types
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, \
    CONTINUATION = range(10)
# Flags
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
# Error codes (RFC 9113 §7)
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR, SETTINGS_TIMEOUT, STREAM_CLOSED, \
    FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, CONNECT_ERROR, \
    ENHANCE_YOUR_CALM, INADEQUATE_SECURITY, HTTP_1_1_REQUIRED = range(14)
# Settings
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS, S_INITIAL_WINDOW_SIZE, \
    S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = range(1, 7)
S_ENABLE_CONNECT_PROTOCOL = 8

MAX_WINDOW = (1 << 31) - 1
DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME = 16384
#: closed streams remembered (to answer late frames per §5.1)
CLOSED_MEMORY = 4096

# length (24 bits as 16 + 8), type, flags, stream id
_HEADER = struct.Struct(">HBBBL")
_pack_header = _HEADER.pack
_unpack_header = _HEADER.unpack_from
_U32 = struct.Struct(">L")
_SETTING = struct.Struct(">HL")
_GOAWAY = struct.Struct(">LL")


class H2Error(Exception):
    """Base of what this module raises."""


class StreamClosed(H2Error):
    """The application sent on a stream that is closed (or closed for sending)."""


class ConnectionFailed(H2Error):
    """A connection error: GOAWAY with `code` is queued; the connection must close."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def frame_header(length: int, ftype: int, flags: int, sid: int) -> bytes:
    return _pack_header(length >> 8, length & 0xFF, ftype, flags, sid)


class StreamState:
    __slots__ = ("remote_open", "local_open", "send_window", "recv_window", "processed")

    def __init__(self, send_window: int, recv_window: int, remote_open: bool):
        self.remote_open = remote_open
        self.local_open = True
        self.send_window = send_window
        self.recv_window = recv_window
        self.processed = 0


class ServerCodec:
    """The server end of one HTTP/2 connection; `app` receives the callbacks."""

    # Slots: read on every frame, and past 30 attributes CPython 3.11 stops sharing
    # instance-dict keys, which unspecialises every attribute access (callgrind: +2.7k
    # instructions per HTTP/2 request when this class grew to 31 attributes).
    __slots__ = ("app", "budget", "header_timeout", "block_started", "out", "encoder", "decoder",
                 "streams", "closed", "highest_inbound_stream_id", "local_initial_window",
                 "recv_max", "recv_window", "recv_processed", "max_inbound_frame_size",
                 "_settings", "peer_initial_window", "send_window_conn", "max_outbound_frame_size",
                 "_buf", "_preface", "_stopped", "output_blocked", "acks_while_blocked",
                 "_block_sid", "_block", "_block_size", "_block_end", "_block_frames",
                 "_block_self_dependent", "_handlers")

    def __init__(self, app, *, max_concurrent_streams: int | None, stream_window: int,
                 conn_window: int, max_header_list: int | None, budget: FloodBudget | None = None,
                 header_timeout: float | None = None):
        self.app = app
        self.budget = budget if budget is not None else FloodBudget()
        #: seconds a header block may take from HEADERS to END_HEADERS (None: no limit)
        self.header_timeout = header_timeout
        #: time.monotonic() when the pending header block began; 0.0 when none is pending
        self.block_started = 0.0
        self.out = bytearray()
        self.encoder = FastEncoder()
        self.decoder = FastDecoder()
        self.streams: dict[int, StreamState] = {}
        self.closed: dict[int, bool] = {}        # sid → we reset it (frames then ignored)
        self.highest_inbound_stream_id = 0
        # ours
        self.local_initial_window = stream_window
        self.recv_max = max(conn_window, DEFAULT_WINDOW)
        self.recv_window = DEFAULT_WINDOW
        self.recv_processed = 0
        self.max_inbound_frame_size = DEFAULT_MAX_FRAME
        self._settings = [(S_INITIAL_WINDOW_SIZE, stream_window)]
        if max_concurrent_streams is not None:
            self._settings.append((S_MAX_CONCURRENT_STREAMS, max_concurrent_streams))
        if max_header_list is not None:
            self._settings.append((S_MAX_HEADER_LIST_SIZE, max_header_list))
        # the peer's
        self.peer_initial_window = DEFAULT_WINDOW
        self.send_window_conn = DEFAULT_WINDOW
        self.max_outbound_frame_size = DEFAULT_MAX_FRAME
        # receive state
        self._buf = b""
        self._preface = False           # magic and first SETTINGS seen
        self._stopped = False
        # Set by the connection while the transport will not take more output (the
        # peer is not reading): the PING and SETTINGS acknowledgements owed meanwhile
        # are counted, and past MAX_ACKS_WHILE_BLOCKED the peer is flooding us
        # (CVE-2019-9512/9515): ENHANCE_YOUR_CALM.
        self.output_blocked = False
        self.acks_while_blocked = 0
        self._block_sid = 0             # stream of a header block awaiting CONTINUATION
        self._block: list[bytes] = []
        self._block_size = 0
        self._block_end = 0
        self._block_frames = 0          # CONTINUATION frames in the pending block
        self._block_self_dependent = False
        # The class's functions, called with self: bound methods kept on the instance
        # would make every codec a reference cycle (freed only by the cyclic GC).
        cls = type(self)
        self._handlers = (cls._on_data, cls._on_headers, cls._on_priority, cls._on_rst_stream,
                          cls._on_settings, cls._on_push_promise, cls._on_ping, cls._on_goaway,
                          cls._on_window_update, cls._on_continuation)

    # -- output -------------------------------------------------------------------------
    def initiate(self) -> None:
        """Our SETTINGS (in effect at once for what we enforce) and connection window."""
        payload = b"".join(_SETTING.pack(k, v) for k, v in self._settings)
        self.out += frame_header(len(payload), SETTINGS, 0, 0) + payload
        if self.recv_max > DEFAULT_WINDOW:
            self._window_update(0, self.recv_max - DEFAULT_WINDOW)
            self.recv_window = self.recv_max

    def data_to_send(self) -> bytearray:
        out = self.out
        if out:
            self.out = bytearray()
        return out

    def send_window(self, sid: int) -> int:
        """What may be sent on the stream now (its window and the connection's)."""
        st = self.streams.get(sid)
        if st is None or not st.local_open:
            raise StreamClosed(f"stream {sid} is closed")
        w = st.send_window
        c = self.send_window_conn
        return w if w < c else c

    def send_headers(self, sid: int, fields: list, end_stream: bool = False) -> None:
        st = self.streams.get(sid)
        if st is None or not st.local_open:
            raise StreamClosed(f"stream {sid} is closed")
        block = self.encoder.encode(fields)
        flags = END_STREAM if end_stream else 0
        n = len(block)
        mfs = self.max_outbound_frame_size
        out = self.out
        if n <= mfs:
            out += _pack_header(n >> 8, n & 0xFF, HEADERS, flags | END_HEADERS, sid)
            out += block
        else:
            out += _pack_header(mfs >> 8, mfs & 0xFF, HEADERS, flags, sid)
            out += block[:mfs]
            pos = mfs
            while pos < n:
                size = min(mfs, n - pos)
                last = END_HEADERS if pos + size == n else 0
                out += _pack_header(size >> 8, size & 0xFF, CONTINUATION, last, sid)
                out += block[pos:pos + size]
                pos += size
        if end_stream:
            self._local_end(sid, st)

    def send_data(self, sid: int, data, end_stream: bool = False) -> None:
        """One DATA frame; the caller keeps within `send_window` and the max frame size."""
        st = self.streams.get(sid)
        if st is None or not st.local_open:
            raise StreamClosed(f"stream {sid} is closed")
        n = len(data)
        if n > st.send_window or n > self.send_window_conn or n > self.max_outbound_frame_size:
            raise H2Error(f"DATA of {n} bytes exceeds the window or frame size")
        st.send_window -= n
        self.send_window_conn -= n
        out = self.out
        out += _pack_header(n >> 8, n & 0xFF, DATA, END_STREAM if end_stream else 0, sid)
        out += data
        if end_stream:
            self._local_end(sid, st)

    def end_stream(self, sid: int) -> None:
        self.send_data(sid, b"", end_stream=True)

    def reset_stream(self, sid: int, code: int) -> None:
        """RST_STREAM, unless the stream is already closed (then nothing is sent)."""
        st = self.streams.pop(sid, None)
        if st is None:
            return
        self._remember(sid, True)
        self.out += _pack_header(0, 4, RST_STREAM, 0, sid) + _U32.pack(code)

    def close_connection(self, code: int, last_stream_id: int | None = None) -> None:
        """GOAWAY (the connection stays usable for streams up to last_stream_id)."""
        last = self.highest_inbound_stream_id if last_stream_id is None else last_stream_id
        self.out += _pack_header(0, 8, GOAWAY, 0, 0) + _GOAWAY.pack(last, code)

    def ack(self, n: int, sid: int) -> None:
        """The application consumed n flow-controlled bytes of `sid` (open or not)."""
        self._conn_consumed(n)
        st = self.streams.get(sid)
        if st is not None and st.remote_open:
            st.processed += n
            inc = _increment(st.recv_window, self.local_initial_window, st.processed)
            if inc:
                st.processed = 0
                st.recv_window += inc
                self._window_update(sid, inc)

    def stop(self) -> None:
        """Handle no more frames from the current read (the application closes)."""
        self._stopped = True

    def _conn_consumed(self, n: int) -> None:
        self.recv_processed += n
        inc = _increment(self.recv_window, self.recv_max, self.recv_processed)
        if inc:
            self.recv_processed = 0
            self.recv_window += inc
            self._window_update(0, inc)

    def _window_update(self, sid: int, inc: int) -> None:
        self.out += _pack_header(0, 4, WINDOW_UPDATE, 0, sid) + _U32.pack(inc)

    def _local_end(self, sid: int, st: StreamState) -> None:
        st.local_open = False
        if not st.remote_open:
            del self.streams[sid]
            self._remember(sid, False)

    def _remember(self, sid: int, reset_by_us: bool) -> None:
        closed = self.closed
        closed[sid] = reset_by_us
        if len(closed) > CLOSED_MEMORY:
            del closed[next(iter(closed))]

    # -- input --------------------------------------------------------------------------
    def receive(self, data: bytes) -> None:
        """Handle every complete frame in the buffer; raises ConnectionFailed."""
        if self._stopped:
            return
        if self._buf:
            data = self._buf + data
            self._buf = b""
        pos = 0
        if not self._preface:
            pos = self._check_preface(data)
            if pos < 0:
                self._buf = data
                return
        end = len(data)
        handlers = self._handlers
        max_size = self.max_inbound_frame_size
        try:
            while end - pos >= 9:
                hi, lo, ftype, flags, sid = _unpack_header(data, pos)
                length = hi << 8 | lo
                if length > max_size:
                    self._fail(FRAME_SIZE_ERROR, f"frame of {length} bytes")
                stop = pos + 9 + length
                if stop > end:
                    break
                sid &= 0x7FFFFFFF
                if self._block_sid and (ftype != CONTINUATION or sid != self._block_sid):
                    self._fail(PROTOCOL_ERROR, "frame interleaved with a header block")
                if ftype < 10:
                    handlers[ftype](self, data, pos + 9, stop, flags, sid)
                    if self._stopped:
                        return
                pos = stop
        except FloodSpent as exc:       # raised here or by the application's callbacks
            self._fail(ENHANCE_YOUR_CALM, str(exc))
        if pos < end:
            self._buf = data[pos:]

    def header_block_expired(self, now: float) -> bool:
        """A header block is pending for longer than header_timeout."""
        started = self.block_started
        return bool(started) and self.header_timeout is not None and \
            now - started > self.header_timeout

    def _check_preface(self, data: bytes) -> int:
        """Offset after the client preface, or -1 when more bytes are needed."""
        n = len(PREFACE)
        if data[:n] != PREFACE[:len(data)]:
            self._fail(PROTOCOL_ERROR, "invalid connection preface")
        if len(data) < n + 9:
            return -1
        if data[n + 3] != SETTINGS:
            self._fail(PROTOCOL_ERROR, "the preface must be followed by SETTINGS")
        self._preface = True
        return n

    def _fail(self, code: int, message: str):
        self.close_connection(code)
        self._stopped = True
        raise ConnectionFailed(code, message)

    def _stream_error(self, sid: int, code: int) -> None:
        # A reset the peer made us send (MadeYouReset): the same budget as its own resets.
        self.budget.reset()
        if sid in self.streams:
            self.app.on_stream_error(sid, code)
            if sid in self.streams:      # the application did not reset it
                self.reset_stream(sid, code)
        else:
            self.out += _pack_header(0, 4, RST_STREAM, 0, sid) + _U32.pack(code)

    def _unpad(self, data: bytes, pos: int, stop: int, flags: int) -> tuple[int, int]:
        if flags & PADDED:
            if stop <= pos:
                self._fail(FRAME_SIZE_ERROR, "padded frame without a pad length")
            stop -= data[pos]
            pos += 1
            if stop < pos:
                self._fail(PROTOCOL_ERROR, "padding exceeds the frame")
        return pos, stop

    def _closed_frame(self, sid: int) -> None:
        """DATA or HEADERS on a stream that is not open (RFC 9113 §5.1)."""
        if sid > self.highest_inbound_stream_id or not sid & 1:
            self._fail(PROTOCOL_ERROR, f"frame on idle stream {sid}")
        if not self.closed.get(sid, False):
            self._stream_error(sid, STREAM_CLOSED)

    def _on_data(self, data, pos, stop, flags, sid):
        if not sid:
            self._fail(PROTOCOL_ERROR, "DATA on stream 0")
        flow = stop - pos
        pos, stop = self._unpad(data, pos, stop, flags)
        if pos == stop and not flags & END_STREAM:
            self.budget.frame(h2_budget.EMPTY)
        self.recv_window -= flow
        if self.recv_window < 0:
            self._fail(FLOW_CONTROL_ERROR, "connection window exceeded")
        st = self.streams.get(sid)
        if st is None or not st.remote_open:
            self._conn_consumed(flow)
            self._closed_frame(sid)
            return
        st.recv_window -= flow
        if st.recv_window < 0:
            self._conn_consumed(flow)
            self._stream_error(sid, FLOW_CONTROL_ERROR)
            return
        ended = flags & END_STREAM
        if ended:
            st.remote_open = False
        self.app.on_data(sid, data[pos:stop], flow)
        if ended:
            self._remote_end(sid)

    def _remote_end(self, sid: int) -> None:
        st = self.streams.get(sid)
        if st is not None and not st.local_open:
            del self.streams[sid]
            self._remember(sid, False)
        self.app.on_end(sid)

    def _on_headers(self, data, pos, stop, flags, sid):
        if not sid:
            self._fail(PROTOCOL_ERROR, "HEADERS on stream 0")
        pos, stop = self._unpad(data, pos, stop, flags)
        self_dependent = False
        if flags & PRIORITY_FLAG:
            if stop < pos + 5:
                self._fail(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            # §5.3.1: a stream cannot depend on itself (a stream error).
            self_dependent = _U32.unpack_from(data, pos)[0] & 0x7FFFFFFF == sid
            pos += 5
        if flags & END_HEADERS:
            self._header_block(sid, data[pos:stop], flags & END_STREAM, self_dependent)
        else:
            if stop == pos:
                self.budget.frame(h2_budget.EMPTY)
            self._block_sid = sid
            self._block = [data[pos:stop]]
            self._block_size = stop - pos
            self._block_end = flags & END_STREAM
            self._block_frames = 0
            self._block_self_dependent = self_dependent
            self.block_started = time.monotonic()

    def _on_continuation(self, data, pos, stop, flags, sid):
        if not self._block_sid:
            self._fail(PROTOCOL_ERROR, "CONTINUATION without a header block")
        self._block_frames += 1
        if self._block_frames > h2_budget.MAX_CONTINUATIONS:
            # Counted, not only sized: empty CONTINUATION frames pass any byte cap.
            self.budget.trip("continuation", "too many CONTINUATION frames in one header block")
        if self.header_block_expired(time.monotonic()):
            self.budget.trip("header_timeout", "header block not complete within header_timeout")
        self._block.append(data[pos:stop])
        self._block_size += stop - pos
        if self._block_size > self.decoder.max_header_list_size:
            self._fail(ENHANCE_YOUR_CALM, "header block too large")
        if flags & END_HEADERS:
            block = b"".join(self._block)
            self._block = []
            self._block_sid = 0
            self.block_started = 0.0
            self._header_block(sid, block, self._block_end, self._block_self_dependent)

    def _header_block(self, sid: int, block: bytes, ended: int, self_dependent: bool = False) -> None:
        try:
            # Always decoded, even on a closed stream: the HPACK table must stay in step.
            fields = self.decoder.decode(block)
        except hpack.exceptions.OversizedHeaderListError:
            self._fail(ENHANCE_YOUR_CALM, "header list too large")
        except hpack.exceptions.HPACKError:
            self._fail(COMPRESSION_ERROR, "HPACK decoding failed")
        st = self.streams.get(sid)
        if st is None:
            if sid <= self.highest_inbound_stream_id or not sid & 1:
                if sid in self.closed:
                    self._closed_frame(sid)
                    return
                self._fail(PROTOCOL_ERROR, f"stream id {sid} is not a new client stream")
            self.highest_inbound_stream_id = sid
            if self_dependent:
                self._remember(sid, True)
                self._stream_error(sid, PROTOCOL_ERROR)
                return
            self.streams[sid] = StreamState(self.peer_initial_window, self.local_initial_window,
                                            not ended)
            self.app.on_request(sid, fields, bool(ended))
        elif not st.remote_open:
            self._stream_error(sid, STREAM_CLOSED)
        elif not ended or self_dependent:
            # §8.1: a second HEADERS without END_STREAM makes the request malformed (a
            # stream error, §8.1.1); the HPACK table is in step, the connection is fine.
            self._stream_error(sid, PROTOCOL_ERROR)
        else:
            st.remote_open = False
            self.app.on_trailers(sid, fields)
            self._remote_end(sid)

    def _on_priority(self, data, pos, stop, flags, sid):
        if not sid:
            self._fail(PROTOCOL_ERROR, "PRIORITY on stream 0")
        self.budget.frame(h2_budget.PRIORITY)
        # §6.3: the wrong length, or a stream depending on itself, is a stream error; but
        # no RST_STREAM may name an idle stream (§6.4), and PRIORITY has no effect here:
        # on an idle stream it is dropped.
        if sid > self.highest_inbound_stream_id or not sid & 1:
            return
        if stop - pos != 5:
            self._stream_error(sid, FRAME_SIZE_ERROR)
        elif _U32.unpack_from(data, pos)[0] & 0x7FFFFFFF == sid:
            self._stream_error(sid, PROTOCOL_ERROR)

    def _on_rst_stream(self, data, pos, stop, flags, sid):
        if not sid:
            self._fail(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if stop - pos != 4:
            self._fail(FRAME_SIZE_ERROR, "RST_STREAM of the wrong length")
        if sid > self.highest_inbound_stream_id:
            self._fail(PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
        st = self.streams.pop(sid, None)
        if st is None:
            return
        self._remember(sid, False)
        self.app.on_reset(sid, _U32.unpack_from(data, pos)[0])
        self.budget.reset()             # rapid reset (CVE-2023-44487)

    def _on_settings(self, data, pos, stop, flags, sid):
        if sid:
            self._fail(PROTOCOL_ERROR, "SETTINGS on a stream")
        self.budget.frame(h2_budget.SETTINGS)
        if flags & ACK:
            if stop != pos:
                self._fail(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if (stop - pos) % 6:
            self._fail(FRAME_SIZE_ERROR, "SETTINGS of the wrong length")
        window_changed = False
        for off in range(pos, stop, 6):
            key, value = _SETTING.unpack_from(data, off)
            if key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    self._fail(FLOW_CONTROL_ERROR, "initial window too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                if delta:
                    window_changed = True
                    for st in self.streams.values():
                        st.send_window += delta
                        if st.send_window > MAX_WINDOW:
                            self._fail(FLOW_CONTROL_ERROR, "stream window overflow")
            elif key == S_MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME <= value <= 0xFFFFFF:
                    self._fail(PROTOCOL_ERROR, "invalid max frame size")
                self.max_outbound_frame_size = value
            elif key == S_HEADER_TABLE_SIZE:
                self.encoder.header_table_size = value
            elif key in (S_ENABLE_PUSH, S_ENABLE_CONNECT_PROTOCOL):
                if value > 1:
                    self._fail(PROTOCOL_ERROR, "invalid boolean setting")
        self._owe_ack()
        self.out += _pack_header(0, 0, SETTINGS, ACK, 0)
        if window_changed:
            self.app.on_window(0)

    def _on_push_promise(self, data, pos, stop, flags, sid):
        self._fail(PROTOCOL_ERROR, "PUSH_PROMISE from a client")

    def _on_ping(self, data, pos, stop, flags, sid):
        if sid:
            self._fail(PROTOCOL_ERROR, "PING on a stream")
        if stop - pos != 8:
            self._fail(FRAME_SIZE_ERROR, "PING of the wrong length")
        self.budget.frame(h2_budget.PING)    # ACKs too: we never send a PING
        if not flags & ACK:
            self._owe_ack()
            self.out += _pack_header(0, 8, PING, ACK, 0) + data[pos:stop]

    def _owe_ack(self) -> None:
        if self.output_blocked:
            self.acks_while_blocked += 1
            if self.acks_while_blocked > MAX_ACKS_WHILE_BLOCKED:
                self.budget.trip("unread_acks", "PING/SETTINGS acknowledgements owed while not reading")

    def _on_goaway(self, data, pos, stop, flags, sid):
        if sid:
            self._fail(PROTOCOL_ERROR, "GOAWAY on a stream")
        if stop - pos < 8:
            self._fail(FRAME_SIZE_ERROR, "GOAWAY too short")
        _last, code = _GOAWAY.unpack_from(data, pos)
        self.app.on_goaway(code)

    def _on_window_update(self, data, pos, stop, flags, sid):
        if stop - pos != 4:
            self._fail(FRAME_SIZE_ERROR, "WINDOW_UPDATE of the wrong length")
        inc = _U32.unpack_from(data, pos)[0] & 0x7FFFFFFF
        if not sid:
            if not inc:
                self._fail(PROTOCOL_ERROR, "WINDOW_UPDATE of 0 on the connection")
            self.send_window_conn += inc
            if self.send_window_conn > MAX_WINDOW:
                self._fail(FLOW_CONTROL_ERROR, "connection window overflow")
            self.app.on_window(0)
            return
        st = self.streams.get(sid)
        if st is None:
            if sid > self.highest_inbound_stream_id:
                self._fail(PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
            return
        if not inc:
            self._stream_error(sid, PROTOCOL_ERROR)
            return
        st.send_window += inc
        if st.send_window > MAX_WINDOW:
            self._stream_error(sid, FLOW_CONTROL_ERROR)
            return
        self.app.on_window(sid)


def _increment(window: int, maximum: int, processed: int) -> int:
    """The WINDOW_UPDATE increment due after `processed` bytes were consumed (0: not yet)."""
    if processed >= maximum >> 1 or (window <= 0 and processed > min(1024, maximum >> 2)):
        inc = maximum - window
        return processed if processed < inc else inc
    return 0


# -- client mode (upstream/h2.py) --------------------------------------------------------------

_ERROR_NAMES = ("NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "FLOW_CONTROL_ERROR", "SETTINGS_TIMEOUT",
                "STREAM_CLOSED", "FRAME_SIZE_ERROR", "REFUSED_STREAM", "CANCEL", "COMPRESSION_ERROR",
                "CONNECT_ERROR", "ENHANCE_YOUR_CALM", "INADEQUATE_SECURITY", "HTTP_1_1_REQUIRED")


def error_name(code: int) -> str:
    """RFC 9113 §7 name of an error code (the number itself when unknown)."""
    return _ERROR_NAMES[code] if 0 <= code < len(_ERROR_NAMES) else str(code)


class PeerSettings:
    """The server's SETTINGS that a client acts on (RFC 9113 §6.5.2 initial values)."""

    __slots__ = ("max_concurrent_streams", "max_header_list_size")

    def __init__(self) -> None:
        self.max_concurrent_streams = 2**31 - 1     # unlimited until the server says otherwise
        self.max_header_list_size: int | None = None


class ClientCodec(ServerCodec):
    """The client end of one HTTP/2 connection (the upstream client, upstream/h2.py).

    Framing, flow control and the budgets on what the peer can make us do
    (acknowledgements owed while it reads nothing, header block size, HPACK) are
    ServerCodec's; what differs by role is here:
    - we send the preface (magic + SETTINGS with ENABLE_PUSH=0); the server's first
      frame must be SETTINGS (an HTTP/1.1 answer is a connection error at once);
    - streams are opened by us (`open_stream`, odd ids). `highest_inbound_stream_id`
      holds the highest id we opened, so the inherited "frame on an idle stream"
      checks are the client's;
    - every header block on an open stream is reported with
      `app.on_headers(sid, fields, ended)` (interim 1xx, the final head or
      trailers: the application knows which it expects), then `on_end` if it ended
      the stream;
    - the server's MAX_CONCURRENT_STREAMS is kept in `remote_settings`, and
      `app.on_settings()` is called after each SETTINGS it sends;
    - GOAWAY reports its last stream id: `app.on_goaway(code, last_stream_id)`;
    - PUSH_PROMISE is a connection error (push is disabled), and so is a header
      block spread over more than h2_budget.MAX_CONTINUATIONS frames (ServerCodec's
      count); the flood budget does not count resets (the server resetting streams
      we opened is no flood) and its trips are not the client connections' metric.
    """

    __slots__ = ("remote_settings", "next_stream_id")

    def __init__(self, app, *, stream_window: int, conn_window: int, max_header_list: int | None):
        super().__init__(app, max_concurrent_streams=None, stream_window=stream_window,
                         conn_window=conn_window, max_header_list=max_header_list,
                         budget=FloodBudget(count_resets=False, trips=None))
        self._settings.insert(0, (S_ENABLE_PUSH, 0))
        self.remote_settings = PeerSettings()
        self.next_stream_id = 1

    def initiate(self) -> None:
        self.out += PREFACE
        super().initiate()

    def open_stream(self) -> int:
        """A new stream (idle → open once its HEADERS is queued by send_headers)."""
        sid = self.next_stream_id
        self.next_stream_id = sid + 2
        self.highest_inbound_stream_id = sid
        self.streams[sid] = StreamState(self.peer_initial_window, self.local_initial_window, True)
        return sid

    def close_connection(self, code: int, last_stream_id: int | None = None) -> None:
        # The last stream id of a client's GOAWAY counts server-initiated streams: none.
        super().close_connection(code, 0 if last_stream_id is None else last_stream_id)

    def _check_preface(self, data: bytes) -> int:
        if len(data) >= 4 and data[3] != SETTINGS:
            self._fail(PROTOCOL_ERROR, "the server did not start with SETTINGS (not HTTP/2?)")
        if len(data) < 9:
            return -1
        if data[4] & ACK:
            self._fail(PROTOCOL_ERROR, "the server's preface is a SETTINGS ACK")
        self._preface = True
        return 0

    def _header_block(self, sid: int, block: bytes, ended: int, self_dependent: bool = False) -> None:
        try:
            # Always decoded, even on a closed stream: the HPACK table must stay in step.
            fields = self.decoder.decode(block)
        except hpack.exceptions.OversizedHeaderListError:
            self._fail(ENHANCE_YOUR_CALM, "header list too large")
        except hpack.exceptions.HPACKError:
            self._fail(COMPRESSION_ERROR, "HPACK decoding failed")
        st = self.streams.get(sid)
        if st is None:
            self._closed_frame(sid)     # idle or server-initiated: connection error
            return
        if not st.remote_open:
            self._stream_error(sid, STREAM_CLOSED)
            return
        if self_dependent:              # §5.3.1: a stream error
            self._stream_error(sid, PROTOCOL_ERROR)
            return
        if ended:
            st.remote_open = False
        self.app.on_headers(sid, fields, bool(ended))
        if ended:
            self._remote_end(sid)

    def _on_settings(self, data, pos, stop, flags, sid):
        super()._on_settings(data, pos, stop, flags, sid)    # validated, applied, ACK queued
        if flags & ACK:
            return
        rs = self.remote_settings
        for off in range(pos, stop, 6):
            key, value = _SETTING.unpack_from(data, off)
            if key == S_MAX_CONCURRENT_STREAMS:
                rs.max_concurrent_streams = value
            elif key == S_MAX_HEADER_LIST_SIZE:
                rs.max_header_list_size = value
        self.app.on_settings()

    def _on_push_promise(self, data, pos, stop, flags, sid):
        self._fail(PROTOCOL_ERROR, "PUSH_PROMISE while push is disabled")

    def _on_goaway(self, data, pos, stop, flags, sid):
        if sid:
            self._fail(PROTOCOL_ERROR, "GOAWAY on a stream")
        if stop - pos < 8:
            self._fail(FRAME_SIZE_ERROR, "GOAWAY too short")
        last, code = _GOAWAY.unpack_from(data, pos)
        self.app.on_goaway(code, last & 0x7FFFFFFF)
