"""HTTP/1.1 server-side hardening (issue 8): deadlines, framing after the head, Host,
half-close, the h2c preface sniff, underscore header names, a second instance.

Real sockets on 127.0.0.1: raw clients → the agproxy binary → `StrictUpstream`, a
recording upstream on StrictHTTPServer (llhttp, as Node does) that reports
what it saw: request heads as they arrive, complete requests, connections closed and
whether a response it was writing was cut off. Tests wait on its events with
deadlines, never on time.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
import weakref

import h2.config
import h2.connection
import h2.events
import pytest

from tests.support.gateway import GatewayProcess
from tests.support.idp import IdP
from tests.support.strict_http import Conn, Request, StrictHTTPServer


class StrictUpstream:
    """A recording upstream on StrictHTTPServer (llhttp; a refused request gets 400 and closes
    its connection, and is listed in `errors`).

    `GET /big?n=N` answers N bytes (content-length) written in 64 KiB pieces; anything
    else answers 200 with a JSON echo of method, target, headers (names as the gateway
    wrote them) and body. `heads` are the request heads as soon as they are parsed.
    """

    def __init__(self) -> None:
        self.server = StrictHTTPServer(self._answer, name="h1-upstream").start()
        self.port = self.server.port
        self.url = self.server.url
        self.cond = self.server.changed
        self.cut_off: list[int] = []         # /big responses the peer stopped: bytes written

    @staticmethod
    def _record(r: Request) -> dict:
        return {"method": r.method, "target": r.target, "headers": list(r.raw_headers), "body": r.body}

    @property
    def heads(self) -> list[dict]:
        return [self._record(r) for r in self.server.heads]

    @property
    def requests(self) -> list[dict]:
        return [self._record(r) for r in self.server.received]

    @property
    def errors(self) -> list[str]:
        return [r.error for r in self.server.rejected]

    @property
    def connections(self) -> int:
        return self.server.connections

    @property
    def closed(self) -> int:
        """Connections that have ended."""
        return self.server.connections - self.server.open_connections

    def wait(self, predicate, timeout: float = 10.0, what: str = "condition") -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, timeout):
                raise AssertionError(f"upstream: {what} not reached in {timeout}s "
                                     f"(heads={self.heads}, requests={self.requests}, closed={self.closed})")

    def close(self) -> None:
        self.server.stop()

    def _answer(self, req: Request, conn: Conn) -> None:
        if req.target.startswith("/big?n="):
            n = int(req.target.split("=", 1)[1])
            conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % n)
            sent, piece = 0, b"x" * 65536
            while sent < n:
                chunk = piece[: n - sent]
                if not conn.send(chunk):
                    with self.cond:
                        self.cut_off.append(sent)
                        self.cond.notify_all()
                    conn.close()
                    return
                sent += len(chunk)
            return
        body = json.dumps(self._record(req) | {"body": req.body.decode("latin-1")}).encode()
        conn.respond(200, [("content-type", "application/json")], body)


@pytest.fixture
def upstream():
    up = StrictUpstream()
    yield up
    up.close()


def routes(url: str, timeout: str = "30s") -> str:
    return f'''
[[route]]
name = "up"
match = {{ path_prefix = "/" }}
backend = "up"
timeout = "{timeout}"

[backend.up]
type = "http"
url = "{url}"
'''


def route_to(url: str, gateway: str = "", timeout: str = "30s") -> str:
    return f'''
[gateway]
admin = "127.0.0.1:{{admin_port}}"
access_log = "{{tmp}}/h1-access.log"
{gateway}
''' + routes(url, timeout)


_LEFTOVER: "weakref.WeakKeyDictionary[socket.socket, bytes]" = weakref.WeakKeyDictionary()  # read past a response


def read_response(s: socket.socket, timeout: float = 10.0) -> tuple[bytes, bytes]:
    """One response (content-length or chunked framing) from a raw socket: (head, body).
    Bytes of the next pipelined response that arrived in the same read are kept for it."""
    s.settimeout(timeout)
    buf = _LEFTOVER.pop(s, b"")

    def more() -> bytes:
        data = s.recv(65536)
        if not data:
            raise AssertionError(f"connection closed mid-response: {buf!r}")
        return data

    while b"\r\n\r\n" not in buf:
        buf += more()
    head, _, rest = buf.partition(b"\r\n\r\n")
    fields = {}
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        fields[k.strip().lower()] = v.strip()
    if b"content-length" in fields:
        n = int(fields[b"content-length"])
        while len(rest) < n:
            rest += more()
        body, extra = rest[:n], rest[n:]
    elif fields.get(b"transfer-encoding") == b"chunked":
        while b"0\r\n\r\n" not in rest:
            rest += more()
        end = rest.index(b"0\r\n\r\n") + 5
        body, extra = rest[:end], rest[end:]
    else:
        body, extra = rest, b""
    if extra:
        _LEFTOVER[s] = extra
    return head, body


def closed_by_peer(s: socket.socket, timeout: float = 10.0) -> bool:
    """True once the peer closed (EOF or reset) within `timeout`, discarding anything else."""
    s.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not s.recv(65536):
                return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False
    return False


def connect(gw: GatewayProcess, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


class Trickle:
    """Sends `data` one byte every `interval` seconds from a thread until done or stopped:
    the shape of a slowloris client (the interval paces the attack, it synchronises nothing)."""

    def __init__(self, s: socket.socket, data: bytes, interval: float = 0.1):
        self.stop = threading.Event()
        self.sent = 0

        def run():
            for i in range(len(data)):
                if self.stop.wait(interval):
                    return
                try:
                    s.send(data[i:i + 1])
                except OSError:
                    return
                self.sent += 1
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def __enter__(self) -> "Trickle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(5)


# -- 1. head deadline -------------------------------------------------------------------------

def test_head_sent_byte_by_byte_gets_408_within_header_timeout(start_gateway, upstream):
    gw = start_gateway(route_to(upstream.url, gateway='header_timeout = "1s"'))
    # A slowloris head: every byte refreshes the connection's activity, so only a deadline
    # for the whole head ends it. 600 bytes at 10/s would take a minute.
    with connect(gw) as s, Trickle(s, b"GET /slow HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 560 + b"\r\n\r\n"):
        start = time.monotonic()
        head, body = read_response(s)
        elapsed = time.monotonic() - start
        assert head.startswith(b"HTTP/1.1 408 Request Timeout"), head
        assert b"connection: close" in head.lower()
        assert json.loads(body)["error"] == "request_timeout"
        assert closed_by_peer(s)
    assert elapsed < 4.0, elapsed
    assert upstream.heads == []
    # The deadline also runs from the connection's start: a silent client gets the same.
    with connect(gw) as s:
        head, _ = read_response(s)
        assert head.startswith(b"HTTP/1.1 408")
        assert closed_by_peer(s)


def test_head_deadline_applies_to_each_request_on_a_keep_alive_connection(start_gateway, upstream):
    gw = start_gateway(route_to(upstream.url, gateway='header_timeout = "1s"'))
    with connect(gw) as s:
        s.sendall(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        head, body = read_response(s)
        assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["target"] == "/first"
        # Idle between requests is the idle timeout's business (60s), not the head deadline's:
        # nothing arrives for longer than header_timeout.
        s.settimeout(2.5)
        with pytest.raises(socket.timeout):
            s.recv(1)
        s.sendall(b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n")
        head, body = read_response(s)
        assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["target"] == "/second"
        # The next head starts and never ends: 408 about header_timeout after its first byte.
        with Trickle(s, b"GET /third HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"b" * 500):
            head, _ = read_response(s)
            assert head.startswith(b"HTTP/1.1 408")
            assert closed_by_peer(s)
    assert [h["target"] for h in upstream.heads] == ["/first", "/second"]


def test_header_timeout_0s_is_no_limit(start_gateway, upstream):
    gw = start_gateway(route_to(upstream.url, gateway='header_timeout = "0s"\nidle_timeout = "2s"'))
    with connect(gw) as s:
        s.sendall(b"GET /x HTTP/1.1\r\n")
        s.settimeout(10)
        assert s.recv(100) == b""    # closed by idle_timeout's sweep, never answered 408


# -- 2. send deadline -------------------------------------------------------------------------

def test_client_that_stops_reading_is_cut_and_the_upstream_connection_released(start_gateway, upstream):
    gw = start_gateway(route_to(upstream.url, gateway='stream_idle_timeout = "1s"'))
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    s.connect(("127.0.0.1", gw.port))
    try:
        s.sendall(b"GET /big?n=200000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(10)
        assert s.recv(100).startswith(b"HTTP/1.1 200")
        # ... and never read again. Once nothing moves for stream_idle_timeout the gateway
        # aborts the client connection and the upstream one (never pooled mid-body).
        upstream.wait(lambda: upstream.cut_off and upstream.closed >= 1, 15, "upstream response cut off")
        assert upstream.cut_off[0] < 200_000_000
        assert closed_by_peer(s, 15)
    finally:
        s.close()
    # The gateway serves on, over a new upstream connection.
    with connect(gw) as c:
        c.sendall(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
        head, body = read_response(c)
        assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["target"] == "/after"
    assert upstream.connections == 2
    gw.access_log_path = gw.tmp / "h1-access.log"
    rec = [r for r in gw.access_log(min_lines=2) if r["path"] == "/big"][0]
    assert rec["error"] == "stream idle timeout", rec


def test_a_slow_stream_that_keeps_moving_is_not_cut(start_gateway, upstream_echo):
    gw = start_gateway(route_to(upstream_echo.url, gateway='stream_idle_timeout = "1s"'))
    # 8 events 0.3s apart: 2.4s in all, longer than stream_idle_timeout, but never idle that long.
    with connect(gw) as s:
        s.sendall(b"GET /sse?n=8&interval=0.3 HTTP/1.1\r\nHost: x\r\n\r\n")
        head, body = read_response(s)
    assert head.startswith(b"HTTP/1.1 200")
    assert body.count(b"data:") == 8, body


# -- 3. framing errors after the head was forwarded ---------------------------------------------

@pytest.mark.parametrize("bad", [b"zz\r\nhello\r\n", b"5\r\nhelloXX0\r\n\r\n"], ids=["chunk-size", "no-crlf"])
def test_malformed_chunked_body_gets_400_at_once_and_the_upstream_never_a_complete_request(
        start_gateway, upstream, bad):
    gw = start_gateway(route_to(upstream.url, timeout="30s"))
    with connect(gw) as s:
        s.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        upstream.wait(lambda: any(h["target"] == "/up" for h in upstream.heads), what="head forwarded")
        start = time.monotonic()
        s.sendall(bad)
        head, body = read_response(s)
        assert time.monotonic() - start < 5
        assert head.startswith(b"HTTP/1.1 400"), head
        assert b"connection: close" in head.lower()
        assert json.loads(body)["error"] == "bad_request"
        assert closed_by_peer(s)
    upstream.wait(lambda: upstream.closed >= 1, what="upstream connection aborted")
    assert upstream.requests == [] and upstream.errors == []
    gw.access_log_path = gw.tmp / "h1-access.log"
    rec = gw.access_log()[0]
    assert rec["status"] == 400 and rec["path"] == "/up"


@pytest.mark.parametrize("te,status", [
    (b"xchunked", b"400"), (b"chunked, gzip", b"400"), (b"gzip", b"400"),
    (b"gzip, chunked", b"501"), (b"chunked, chunked", b"400"),
])
def test_transfer_encoding_other_than_chunked_is_refused_before_forwarding(start_gateway, upstream, te, status):
    gw = start_gateway(route_to(upstream.url, timeout="30s"))
    with connect(gw) as s:
        s.sendall(b"POST /te HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + te + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        head, _ = read_response(s)
        assert head.startswith(b"HTTP/1.1 " + status), (te, head)
        assert closed_by_peer(s)
    # HTTP/1.0 has no Transfer-Encoding (RFC 9112 §6.1): faulty framing.
    with connect(gw) as s:
        s.sendall(b"POST /te10 HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        head, _ = read_response(s)
        assert head.startswith(b"HTTP/1.1 400"), head
    with connect(gw) as s:   # and the plain case still works
        s.sendall(b"POST /ok HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        head, body = read_response(s)
        assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["body"] == "hello"
    assert [h["target"] for h in upstream.heads] == ["/ok"]


# -- 4. Host -------------------------------------------------------------------------------------

HOST_ROUTES = '''
[gateway]
admin = "127.0.0.1:{{admin_port}}"
access_log = "off"

[[route]]
name = "api"
match = {{ host = "api.example.com" }}
backend = "up"

[[route]]
name = "h"
match = {{ host = "h" }}
backend = "up"

[backend.up]
type = "http"
url = "{url}"
'''


@pytest.mark.parametrize("request_bytes", [
    b"GET / HTTP/1.1\r\nHost: api.example.com\r\nHost: h\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a b/c\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h/../x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: user@h\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h:80x\r\n\r\n",
    b"GET http://user@h/ HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET http:///x HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET http://h/ HTTP/1.1\r\nHost: h\r\nHost: h\r\n\r\n",
    b"GET http://h/ HTTP/1.1\r\n\r\n",
], ids=["two-hosts", "space-slash", "path-in-host", "userinfo", "bad-port", "abs-userinfo",
        "abs-empty-host", "abs-two-hosts", "abs-no-host"])
def test_bad_host_is_400(start_gateway, upstream, request_bytes):
    gw = start_gateway(HOST_ROUTES.format(url=upstream.url))
    with connect(gw) as s:
        s.sendall(request_bytes)
        head, _ = read_response(s)
        assert head.startswith(b"HTTP/1.1 400"), head
    assert upstream.heads == []


def test_a_header_value_that_never_ends_gets_431_at_once(start_gateway, upstream):
    # httptools keeps a header's bytes until the header ends, so one endless value
    # grew the worker by every byte sent (30 MB of value: +88 MB RSS) until the head
    # deadline; a head still arriving past its limit is refused without waiting for it.
    gw = start_gateway(route_to(upstream.url, gateway='max_header_bytes = 8192\nheader_timeout = "60s"'))
    with connect(gw) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent, answer = 0, b""
        s.settimeout(0.2)
        deadline = time.monotonic() + 10
        while not answer and time.monotonic() < deadline and sent < (64 << 20):
            try:
                sent += s.send(b"a" * 16384)
            except (socket.timeout, BlockingIOError):
                pass
            except OSError:
                break      # reset by the gateway: its answer is in our receive buffer
            try:
                answer = s.recv(65536)
            except (socket.timeout, BlockingIOError):
                pass
        if not answer:
            s.settimeout(5)
            answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 431 "), (sent, answer[:200])
    assert sent < 4 << 20, sent          # cut within a few reads, not at the deadline
    assert upstream.heads == []


def test_heads_near_the_limit_are_judged_by_their_fields_not_their_reads(start_gateway, upstream):
    # max_header_bytes counts the target and each field (name + value + 4): a head
    # arriving with a large body in the same read is not refused for the read's size,
    # and one field over the limit is, wherever the reads split it.
    gw = start_gateway(route_to(upstream.url, gateway="max_header_bytes = 8192"))
    pad = 8192 - len("/") - (len("host") + 1 + 4) - (len("content-length") + 5 + 4) - (len("x-pad") + 4)
    ok = (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 50000\r\nX-Pad: " + b"p" * pad
          + b"\r\n\r\n" + b"b" * 50000)
    with connect(gw) as s:
        s.sendall(ok)
        head, body = read_response(s)
        assert head.startswith(b"HTTP/1.1 200"), head
        assert json.loads(body)["body"] == "b" * 50000
    over = ok.replace(b"X-Pad: ", b"X-Pad: q", 1)
    with connect(gw) as s:
        s.sendall(over[:4000])
        s.sendall(over[4000:])
        head, _ = read_response(s)
        assert head.startswith(b"HTTP/1.1 431"), head


def test_absolute_form_target_sets_the_authority_and_path(start_gateway, upstream):
    gw = start_gateway(HOST_ROUTES.format(url=upstream.url))
    with connect(gw) as s:
        s.sendall(b"GET http://h?q=1 HTTP/1.1\r\nHost: h\r\n\r\n"
                  b"GET HTTP://api.example.com/x?y HTTP/1.1\r\nHost: h\r\n\r\n"
                  b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n"
                  b"GET / HTTP/1.1\r\nHost: API.example.com:443\r\n\r\n")
        answers = [read_response(s) for _ in range(4)]
    first = json.loads(answers[0][1])
    assert first["target"] == "/?q=1"
    assert ["x-forwarded-host", "h"] in first["headers"]
    second = json.loads(answers[1][1])   # the URL's authority wins over Host (RFC 9112 §3.2.2)
    assert second["target"] == "/x?y"
    assert ["x-forwarded-host", "api.example.com"] in second["headers"]
    assert answers[2][0].startswith(b"HTTP/1.1 404")   # a valid IP-literal Host, no route for it
    assert answers[3][0].startswith(b"HTTP/1.1 200")
    assert [h["target"] for h in upstream.heads] == ["/?q=1", "/x?y", "/"]


# -- 5. half-close --------------------------------------------------------------------------------

def test_client_half_close_after_its_requests_gets_the_answers(start_gateway, upstream):
    gw = start_gateway(route_to(upstream.url))
    with connect(gw) as s:
        s.sendall(b"POST /one HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                  b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        first = read_response(s)
        second = read_response(s)
        assert closed_by_peer(s)
    assert json.loads(first[1])["body"] == "abc"
    assert json.loads(second[1])["target"] == "/two"
    assert b"connection: close" in second[0].lower()


# -- 6. HTTP/2 preface sniff -----------------------------------------------------------------------

def test_first_read_that_is_a_preface_prefix_loses_nothing(start_gateway, upstream):
    gw = start_gateway(route_to(upstream.url))
    with connect(gw) as s:
        s.sendall(b"P")
        time.sleep(0.3)   # so the gateway reads "P" alone (shapes the input; waits for no result)
        s.sendall(b"OST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        head, body = read_response(s)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert json.loads(body)["target"] == "/p" and json.loads(body)["body"] == "hi"


def test_preface_split_inside_pri_still_speaks_h2c(start_gateway, upstream):
    gw = start_gateway(route_to(upstream.url))
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    client.initiate_connection()
    client.send_headers(1, [(":method", "GET"), (":path", "/h2"), (":scheme", "http"),
                            (":authority", "x")], end_stream=True)
    data = client.data_to_send()
    with connect(gw) as s:
        s.sendall(data[:8])                 # b"PRI * HT"
        time.sleep(0.3)   # two reads (shapes the input)
        s.sendall(data[8:])
        s.settimeout(10)
        status, body, ended = None, b"", False
        while not ended:
            chunk = s.recv(65536)
            assert chunk, "connection closed"
            for ev in client.receive_data(chunk):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = dict(ev.headers)[":status"]
                elif isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                    client.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    ended = True
            s.sendall(client.data_to_send())
    assert status == "200"
    assert json.loads(body)["target"] == "/h2"


# -- 8. header names with underscores -----------------------------------------------------------------

def jwt_route(idp: IdP, url: str, mode: str | None) -> str:
    setting = f'headers_with_underscores = "{mode}"' if mode else ""
    return f'''
[gateway]
admin = "127.0.0.1:{{admin_port}}"
access_log = "off"
{setting}

[[route]]
name = "agents"
match = {{ path_prefix = "/" }}
backend = "up"
[route.jwt]
issuer = "{idp.issuer}"
audiences = ["agents"]
jwks = {{ discovery = "{idp.discovery_url}" }}
[route.claims_to_headers]
"x-user" = "jwt.sub"

[backend.up]
type = "http"
url = "{url}"
'''


@pytest.fixture
def idp():
    server = IdP()
    yield server
    server.close()


def spoofing_request(token: str) -> bytes:
    return (b"GET /who HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token.encode() +
            b"\r\nx_user: admin\r\nX_User: root\r\nx-user: forged\r\nx_other: 1\r\n\r\n")


def test_underscore_spelling_of_a_verified_header_never_reaches_the_upstream(start_gateway, upstream, idp):
    gw = start_gateway(jwt_route(idp, upstream.url, None))   # the default: drop
    with connect(gw) as s:
        s.sendall(spoofing_request(idp.mint(sub="alice")))
        head, body = read_response(s)
    assert head.startswith(b"HTTP/1.1 200"), head
    seen = json.loads(body)["headers"]
    assert [v for k, v in seen if k.lower().replace("_", "-") == "x-user"] == ["alice"]
    assert not any("_" in k for k, _ in seen), seen


def test_underscore_header_names_reject_and_allow(start_gateway, upstream, idp):
    gw = start_gateway(jwt_route(idp, upstream.url, "reject"))
    with connect(gw) as s:
        s.sendall(spoofing_request(idp.mint(sub="alice")))
        head, _ = read_response(s)
        assert head.startswith(b"HTTP/1.1 400"), head
    assert upstream.heads == []
    gw2 = start_gateway(jwt_route(idp, upstream.url, "allow"))
    with connect(gw2) as s:
        s.sendall(b"GET /allow HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + idp.mint(sub="bob").encode() +
                  b"\r\nx_other: 1\r\n\r\n")
        head, body = read_response(s)
    assert head.startswith(b"HTTP/1.1 200")
    assert ["x_other", "1"] in json.loads(body)["headers"]


# -- 9. a second instance on the same port ---------------------------------------------------------------

def test_second_instance_on_the_same_port_refuses_to_start(start_gateway, upstream, tmp_path):
    first = start_gateway(route_to(upstream.url, gateway="workers = 2"))
    second = GatewayProcess(f'''
[gateway]
admin = "127.0.0.1:{{admin_port}}"
access_log = "off"

[[listener]]
name = "main"
bind = "127.0.0.1:{first.port}"
''' + routes(upstream.url), tmp_path, wait_ready=False, name="second")
    try:
        code = second.proc.wait(20)
    except subprocess.TimeoutExpired:
        second.stop(signal.SIGKILL)
        raise AssertionError("the second instance kept running")
    assert code == 1, second.logs()
    assert f"127.0.0.1:{first.port}" in second.logs() and "in use" in second.logs()
    # The first one's own workers still share the port, and a reload does not trip over it.
    first.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while 'agproxy_config_reloads_total{result="ok"} 2.0' not in first.metrics():   # one per worker
        assert time.monotonic() < deadline, first.metrics()
        time.sleep(0.05)   # polling a condition
    for i in range(6):
        with connect(first) as s:
            s.sendall(b"GET /n/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
            assert read_response(s)[0].startswith(b"HTTP/1.1 200")
