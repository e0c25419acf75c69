"""A strict HTTP/2 server for client tests: the h2 library, driven by a script per connection.

`H2Peer(script)` listens on 127.0.0.1 (ephemeral port); each accepted connection
runs `script(conn)` in its own thread with a `PeerConn`: the h2 library as the
server (inbound validation on: a request agproxy sends that RFC 9113 forbids is
a ProtocolError, recorded in `peer.errors` and the connection dropped), plus
`raw()` / `frame()` for what a hostile or broken upstream sends and h2 would
refuse to produce. Every read has a deadline (`expect(..., timeout)`); what the
peer received is kept in `conn.seen` for assertions, and `peer.wait(predicate)`
blocks on a condition until the scripts have recorded what a test waits for.
"""

from __future__ import annotations

import collections
import socket
import struct
import threading
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

PING, SETTINGS, GOAWAY, WINDOW_UPDATE, CONTINUATION, HEADERS, DATA, PUSH_PROMISE = 6, 4, 7, 8, 9, 1, 0, 5


def frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return struct.pack(">BHBBI", len(payload) >> 16, len(payload) & 0xFFFF, ftype, flags, sid) + payload


def goaway(last_stream_id: int, code: int = 0) -> bytes:
    return frame(GOAWAY, 0, 0, struct.pack(">LL", last_stream_id, code))


class PeerConn:
    def __init__(self, peer: "H2Peer", sock: socket.socket, settings: dict | None):
        self.peer = peer
        self.sock = sock
        self.index = 0
        cfg = h2.config.H2Configuration(client_side=False, header_encoding=None,
                                        validate_inbound_headers=True, normalize_inbound_headers=True,
                                        validate_outbound_headers=False, normalize_outbound_headers=False)
        self.h2 = h2.connection.H2Connection(cfg)
        if settings:
            self.h2.local_settings = h2.settings.Settings(client=False, initial_values=settings)
        self.pending: collections.deque = collections.deque()
        self.seen: list = []
        self.closed = False

    # -- output ---------------------------------------------------------------------------
    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.sock.sendall(data)

    def raw(self, data: bytes) -> None:
        self.flush()
        self.sock.sendall(data)

    def respond(self, sid: int, status: int = 200, headers=(), body: bytes = b"", trailers=None) -> None:
        h = self.h2
        fields = [(b":status", str(status).encode())] + [(k.encode(), v.encode()) for k, v in headers]
        h.send_headers(sid, fields, end_stream=not body and not trailers)
        if body:
            h.send_data(sid, body, end_stream=not trailers)
        if trailers:
            h.send_headers(sid, [(k.encode(), v.encode()) for k, v in trailers], end_stream=True)
        self.flush()

    # -- input ----------------------------------------------------------------------------
    def _read(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the peer waited too long for the client")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError("the peer waited too long for the client") from None
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            raise EOFError("the client closed the connection")
        events = self.h2.receive_data(data)
        self.pending.extend(events)
        self.seen.extend(events)
        self.flush()
        self.peer._notify()

    def expect(self, cls, timeout: float = 10.0, **attrs):
        """The next event of type `cls` (with the given attribute values); others stay queued."""
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.pending:
                if isinstance(ev, cls) and all(getattr(ev, k) == v for k, v in attrs.items()):
                    self.pending.remove(ev)
                    return ev
            self._read(deadline)

    def request(self, timeout: float = 10.0) -> tuple[int, dict, bytes]:
        """The next request: (stream id, headers as a dict, body) once it ended."""
        ev = self.expect(h2.events.RequestReceived, timeout)
        sid = ev.stream_id
        headers = dict(ev.headers)
        body = bytearray()
        if not ev.stream_ended:
            deadline = time.monotonic() + timeout
            while True:
                found = None
                for e in self.pending:
                    if getattr(e, "stream_id", None) == sid and isinstance(
                            e, (h2.events.DataReceived, h2.events.StreamEnded)):
                        found = e
                        break
                if found is None:
                    self._read(deadline)
                    continue
                self.pending.remove(found)
                if isinstance(found, h2.events.StreamEnded):
                    break
                body += found.data
                self.h2.acknowledge_received_data(found.flow_controlled_length, sid)
                self.flush()
        return sid, headers, bytes(body)

    def read_until_closed(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        try:
            while True:
                self._read(deadline)
        except (EOFError, h2.exceptions.ProtocolError):
            self.closed = True

    def events(self, cls) -> list:
        return [e for e in self.seen if isinstance(e, cls)]


class H2Peer:
    def __init__(self, script, *, settings: dict | None = None, rcvbuf: int | None = None):
        self.script = script
        self.settings = settings
        self.lsock = socket.socket()
        if rcvbuf:
            self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self.conns: list[PeerConn] = []
        self.errors: list[str] = []
        self.done = 0
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._stopped = False
        self._acceptor = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "H2Peer":
        self._acceptor.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopped = True
        try:
            self.lsock.shutdown(socket.SHUT_RDWR)     # wakes the blocked accept()
        except OSError:
            pass
        self.lsock.close()
        self._acceptor.join(10)
        for c in list(self.conns):
            try:
                c.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(10)

    def _accept(self) -> None:
        while not self._stopped:
            try:
                sock, _ = self.lsock.accept()
            except OSError:
                return
            conn = PeerConn(self, sock, self.settings)
            with self._cond:
                conn.index = len(self.conns)
                self.conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: PeerConn) -> None:
        try:
            conn.h2.initiate_connection()
            conn.flush()
            self.script(conn)
        except h2.exceptions.ProtocolError as exc:
            self._record(f"connection {conn.index}: the client broke RFC 9113: {exc!r}")
        except TimeoutError as exc:
            self._record(f"connection {conn.index}: {exc}")
        except (EOFError, OSError):
            pass
        except Exception as exc:    # an assertion in the script: the test reports it
            self._record(f"connection {conn.index}: {exc!r}")
        finally:
            with self._cond:
                self.done += 1
                self._cond.notify_all()
            try:
                conn.sock.close()
            except OSError:
                pass

    def _record(self, message: str) -> None:
        with self._cond:
            self.errors.append(message)
            self._cond.notify_all()

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def wait(self, predicate, timeout: float = 10.0) -> None:
        """Block until predicate() holds (re-checked whenever a script reads or ends)."""
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise AssertionError(f"peer condition not reached; errors: {self.errors}")
