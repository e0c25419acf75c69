"""A blocking HTTP/2 client that writes frames byte by byte and parses every answer strictly.

For what no well-behaved client library will send (WINDOW_UPDATE of 0, empty
CONTINUATION floods, PRIORITY storms, a header block that never ends). Every frame
the server sends is parsed and checked (`parse_frames`): a known type, a length
within our SETTINGS_MAX_FRAME_SIZE, fixed-size frames of the right size, control
frames on stream 0 and stream frames off it; header blocks are decoded with a
real HPACK decoder. Waiting is always for a condition with a deadline.
"""

from __future__ import annotations

import socket
import struct
import time

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, \
    CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR, SETTINGS_TIMEOUT, STREAM_CLOSED, \
    FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, CONNECT_ERROR, \
    ENHANCE_YOUR_CALM = range(12)
S_INITIAL_WINDOW_SIZE = 4

_FIXED = {PRIORITY: 5, RST_STREAM: 4, PING: 8, WINDOW_UPDATE: 4}


def frame(ftype: int, flags: int, payload: bytes = b"", sid: int = 0) -> bytes:
    return struct.pack(">BHBBI", len(payload) >> 16, len(payload) & 0xFFFF, ftype, flags, sid) + payload


def settings(**values: int) -> bytes:
    ids = {"initial_window_size": 4, "max_frame_size": 5, "max_concurrent_streams": 3}
    return frame(SETTINGS, 0, b"".join(struct.pack(">HL", ids[k], v) for k, v in values.items()))


def window_update(sid: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, struct.pack(">L", increment), sid)


def request_fields(path: str = "/", method: str = "GET", authority: str = "localhost",
                   extra=()) -> list:
    return [(":method", method), (":scheme", "http"), (":authority", authority), (":path", path),
            *extra]


class ProtocolViolation(AssertionError):
    """The server sent something RFC 9113 does not allow."""


def parse_frames(buf: bytearray, max_frame: int = 16384):
    """Complete frames at the start of buf (consumed): (type, flags, sid, payload)."""
    out = []
    while len(buf) >= 9:
        hi, lo, ftype, flags, sid = struct.unpack_from(">BHBBI", buf)
        length = hi << 16 | lo
        if length > max_frame:
            raise ProtocolViolation(f"frame of {length} bytes over SETTINGS_MAX_FRAME_SIZE")
        if len(buf) < 9 + length:
            break
        payload = bytes(buf[9:9 + length])
        del buf[:9 + length]
        if sid & 0x80000000:
            raise ProtocolViolation("reserved stream id bit set")
        if ftype > CONTINUATION or ftype == PUSH_PROMISE:
            raise ProtocolViolation(f"server sent frame type {ftype}")
        if ftype in _FIXED and length != _FIXED[ftype]:
            raise ProtocolViolation(f"frame type {ftype} of {length} bytes")
        if ftype in (SETTINGS, PING, GOAWAY) and sid:
            raise ProtocolViolation(f"frame type {ftype} on stream {sid}")
        if ftype in (DATA, HEADERS, PRIORITY, RST_STREAM, CONTINUATION) and not sid:
            raise ProtocolViolation(f"frame type {ftype} on stream 0")
        if ftype == SETTINGS and (length % 6 or (flags & ACK and length)):
            raise ProtocolViolation("bad SETTINGS")
        if ftype == GOAWAY and length < 8:
            raise ProtocolViolation("short GOAWAY")
        out.append((ftype, flags, sid, payload))
    return out


class RawH2:
    """One client connection; `events` keeps what the server sent, parsed."""

    def __init__(self, port: int, *, client_settings: bytes | None = None, rcvbuf: int | None = None,
                 timeout: float = 10.0):
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.buf = bytearray()
        self.frames: list[tuple] = []
        self.goaway: tuple[int, int] | None = None      # (last stream id, error code)
        self.resets: dict[int, int] = {}
        self.heads: dict[int, list] = {}
        self.data: dict[int, bytearray] = {}
        self.ended: set[int] = set()
        self.pings: list[bytes] = []
        self.closed = False
        self.next_sid = 1
        self._block: tuple[int, int, bytearray] | None = None
        self.sock.sendall(PREFACE + (client_settings if client_settings is not None else frame(SETTINGS, 0)))

    # -- sending -------------------------------------------------------------------------
    def send(self, data: bytes) -> bool:
        """False once the server has closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            self.closed = True
            return False

    def headers_frame(self, fields, sid: int | None = None, end_stream: bool = True,
                      end_headers: bool = True) -> tuple[int, bytes]:
        if sid is None:
            sid = self.next_sid
            self.next_sid += 2
        flags = (END_STREAM if end_stream else 0) | (END_HEADERS if end_headers else 0)
        return sid, frame(HEADERS, flags, self.encoder.encode(fields), sid)

    def request(self, path: str = "/", end_stream: bool = True, **kw) -> int:
        sid, f = self.headers_frame(request_fields(path, **kw), end_stream=end_stream)
        self.send(f)
        return sid

    # -- receiving -----------------------------------------------------------------------
    def read_once(self, timeout: float | None = None) -> bool:
        """Read what arrives (waiting up to `timeout`, or the socket's); False at EOF."""
        if self.closed:
            return False
        old = self.sock.gettimeout()
        if timeout is not None:
            self.sock.settimeout(timeout)
        try:
            chunk = self.sock.recv(1 << 16)
        except (socket.timeout, BlockingIOError):
            if timeout is not None:
                return True
            raise AssertionError("timed out waiting for the server") from None
        except ConnectionResetError:
            chunk = b""
        finally:
            self.sock.settimeout(old)
        if not chunk:
            self.closed = True
            return False
        self.buf += chunk
        for f in parse_frames(self.buf):
            self._handle(f)
        return True

    def _handle(self, f) -> None:
        ftype, flags, sid, payload = f
        self.frames.append(f)
        if self._block is not None and (ftype != CONTINUATION or sid != self._block[0]):
            raise ProtocolViolation("frame interleaved with a header block")
        if ftype == GOAWAY:
            self.goaway = struct.unpack_from(">LL", payload)
        elif ftype == RST_STREAM:
            self.resets[sid] = struct.unpack(">L", payload)[0]
        elif ftype == PING:
            if not flags & ACK:
                raise ProtocolViolation("the server sent a PING")
            self.pings.append(payload)
        elif ftype == SETTINGS and not flags & ACK:
            self.send(frame(SETTINGS, ACK))
        elif ftype == DATA:
            self.data.setdefault(sid, bytearray()).extend(payload)
            if flags & END_STREAM:
                self.ended.add(sid)
        elif ftype in (HEADERS, CONTINUATION):
            if ftype == HEADERS:
                self._block = (sid, flags, bytearray(payload))
            else:
                if self._block is None:
                    raise ProtocolViolation("CONTINUATION without HEADERS")
                self._block[2].extend(payload)
            if flags & END_HEADERS:
                bsid, bflags, block = self._block
                self._block = None
                fields = self.decoder.decode(bytes(block), raw=True)
                self.heads.setdefault(bsid, []).append(fields)
                if bflags & END_STREAM:
                    self.ended.add(bsid)

    def read_until(self, predicate, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("condition not met before the deadline")
            if not self.read_once(timeout=min(left, 1.0)) and not predicate():
                raise AssertionError("connection closed before the condition held")

    def read_until_closed(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("the server did not close the connection")
            self.read_once(timeout=min(left, 1.0))

    def status(self, sid: int) -> int | None:
        heads = self.heads.get(sid)
        if not heads:
            return None
        return int(dict(heads[0])[b":status"])

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
