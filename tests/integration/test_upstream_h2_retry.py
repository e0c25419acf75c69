"""When the pool sends a request to an HTTP/2 upstream again, and when it must not.

A stream the upstream never processed (REFUSED_STREAM, or above the last stream id of
its GOAWAY) is sent again, whatever the method; a request the upstream read and then
dropped with the connection is not. The upstream is a real h2 (the python-hyper
library) server on 127.0.0.1, one thread per connection, recording every request.
"""

from __future__ import annotations

import socket
import threading

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import httpx
import pytest

from tests.integration.test_upstream_h1 import RawClient


def post_in_one_write(port: int) -> tuple[int, bytes]:
    """A POST whose body arrives with its head (so the gateway holds it in memory)."""
    c = RawClient(port)
    try:
        c.send(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\ndata")
        status, _, body = c.response()
        return status, body
    finally:
        c.close()


class ScriptedH2Upstream:
    """h2c server: `first` says what its first connection does with a request
    ("goaway": GOAWAY with last_stream_id 0 and close; "refuse": RST_STREAM
    REFUSED_STREAM; "drop": read the whole request, then close). Every later
    request, and later connections, get `200 ok`."""

    def __init__(self, first: str):
        self.first = first
        self.seen: list[tuple[int, str, str]] = []      # (connection, method, path)
        self.lock = threading.Lock()
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._used = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                index = self.connections
            threading.Thread(target=self._serve, args=(sock, index), daemon=True).start()

    def _act(self) -> str:
        """The scripted action for the first request of all, "answer" for the others."""
        with self.lock:
            if self._used:
                return "answer"
            self._used = True
            return self.first

    def _serve(self, sock: socket.socket, index: int) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        acts: dict[int, str] = {}
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        h = dict(ev.headers)
                        with self.lock:
                            self.seen.append((index, h[":method"], h[":path"]))
                        act = acts[ev.stream_id] = self._act()
                        if act == "goaway":
                            conn.close_connection(last_stream_id=0)
                            sock.sendall(conn.data_to_send())
                            return
                        if act == "refuse":
                            conn.reset_stream(ev.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                    elif isinstance(ev, h2.events.DataReceived):
                        if acts.get(ev.stream_id) != "refuse":
                            conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, h2.events.StreamEnded):
                        act = acts.get(ev.stream_id)
                        if act == "drop":
                            return      # read it all, answer nothing, close
                        if act == "answer":
                            conn.send_headers(ev.stream_id, [(":status", "200"), ("content-length", "2")])
                            conn.send_data(ev.stream_id, b"ok", end_stream=True)
                sock.sendall(conn.data_to_send())
        except (OSError, h2.exceptions.ProtocolError):
            return
        finally:
            sock.close()

    def close(self) -> None:
        self.listener.close()


def route_to(url: str) -> str:
    return f'''
[[route]]
name = "up"
match = {{ path_prefix = "/" }}
backend = "up"
timeout = "5s"

[backend.up]
type = "http"
url = "{url}"
http2 = true
'''


@pytest.mark.parametrize("first", ["goaway", "refuse"])
def test_stream_the_upstream_never_processed_is_sent_again_even_a_post(start_gateway, first):
    up = ScriptedH2Upstream(first)
    try:
        gw = start_gateway(route_to(up.url))
        assert post_in_one_write(gw.port) == (200, b"ok")
        assert [(m, p) for _, m, p in up.seen] == [("POST", "/p"), ("POST", "/p")]
        if first == "goaway":
            assert [c for c, _, _ in up.seen] == [1, 2]      # on a new connection
    finally:
        up.close()


def test_post_read_then_dropped_by_an_http2_upstream_is_not_sent_again(start_gateway):
    up = ScriptedH2Upstream("drop")
    try:
        gw = start_gateway(route_to(up.url))
        assert post_in_one_write(gw.port)[0] == 502
        assert [(m, p) for _, m, p in up.seen] == [("POST", "/p")]
        assert httpx.get(gw.url("/after")).status_code == 200
    finally:
        up.close()
