"""A peer that sends PINGs (or SETTINGS) and never reads the acknowledgements.

Each PING obliges the server to answer; a peer that does not read makes the
answers pile up in the server's memory (CVE-2019-9512, "ping flood"). The
server counts acknowledgements owed while its output is blocked and cuts the
connection off with GOAWAY ENHANCE_YOUR_CALM past a limit. Over a loopback
socket with a tiny receive buffer, against the real HTTP/2 connection class.
"""

import asyncio
import socket
import struct

from agproxy.http import h2_frames
from agproxy.http.h1 import Limits
from agproxy.http.h2 import H2Connection
from agproxy.http.messages import ConnInfo, Headers

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(ftype: int, flags: int, payload: bytes, sid: int = 0) -> bytes:
    return struct.pack(">BHBBI", 0, len(payload), ftype, flags, sid) + payload


async def _handler(stream):
    stream.send_head(200, Headers([("content-length", "0")]))
    await stream.end()


def _flood(port: int, payload: bytes, max_bytes: int) -> int | None:
    """Bytes sent before the server cut the connection, or None if it never did."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))
        s.sendall(PREFACE + frame(h2_frames.SETTINGS, 0, b""))
        batch = payload * 2000
        sent = 0
        try:
            while sent < max_bytes:
                s.sendall(batch)
                sent += len(batch)
        except (BrokenPipeError, ConnectionResetError):
            return sent
        return None


def _serve_and_flood(payload: bytes, max_bytes: int) -> int | None:
    async def main():
        loop = asyncio.get_running_loop()
        info = ConnInfo("127.0.0.1", 1, 2, False, listener="main")
        server = await loop.create_server(lambda: H2Connection(_handler, info, Limits()), "127.0.0.1", 0)
        try:
            port = server.sockets[0].getsockname()[1]
            return await loop.run_in_executor(None, _flood, port, payload, max_bytes)
        finally:
            server.close()
    return asyncio.run(main())


def test_ping_flood_from_a_peer_that_does_not_read_is_cut_off():
    ping = frame(h2_frames.PING, 0, b"12345678")
    sent = _serve_and_flood(ping, max_bytes=64 << 20)
    assert sent is not None, "the server kept acknowledging 64 MB of PINGs nobody read"
    assert sent < 32 << 20


def test_settings_flood_from_a_peer_that_does_not_read_is_cut_off():
    settings = frame(h2_frames.SETTINGS, 0, b"")
    assert _serve_and_flood(settings, max_bytes=64 << 20) is not None
