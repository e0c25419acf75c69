"""Differential framing test: generated HTTP/1.1 request streams through the gateway.

Each example is one client connection carrying a few requests — valid, borderline
and hostile (Content-Length / Transfer-Encoding variants, obs-fold, chunk
extensions, bare LF, whitespace before a colon, duplicate and overflowing
sizes, control characters, HTTP/1.0...) — then a closing request, sent in
pieces split at generated offsets; after some heads the sender waits until the
upstream has that head, so the body certainly follows a forwarded head. The same
bytes are parsed by strict llhttp (the reference). What the gateway forwards to the strict recording upstream must
be a faithful subset of the reference:

- the upstream never receives a request it refuses (the gateway's framing is
  always well formed);
- every request that reaches the upstream is one the reference parsed there,
  same method, same target, byte-identical body, in order;
- a request the gateway answered itself (4xx) never reaches the upstream;
- every response the client reads parses strictly and answers the request in
  its position; a stream of only valid requests is answered in full by the
  upstream.

Bounded: 200 derandomized examples (reproducible in CI), each with a read
deadline, and a 1s route timeout so that no example can wait longer.
"""

from __future__ import annotations

import json
import select
import socket
import time

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.echo import EchoServer
from tests.support.strict_http import RequestReader, StrictResponseReader

SENTINEL_TARGET = "/end"
SENTINEL = b"GET /end HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"


# -- generation ------------------------------------------------------------------------

@st.composite
def chunked_body(draw) -> tuple[bytes, bytes, bool]:
    """(wire bytes, decoded body, valid) for a chunked body with its terminating chunk."""
    pieces = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=4))
    wire = b""
    valid = True
    for p in pieces:
        size = b"%x" % len(p)
        style = draw(st.sampled_from(["plain"] * 4 + ["upper", "ext", "quoted-ext", "leading-zero",
                                                     "bad-space", "no-crlf"]))
        if style == "upper":
            size = size.upper()
        elif style == "leading-zero":
            size = b"000" + size
        elif style == "ext":
            size += b";name=value"
        elif style == "quoted-ext":
            size += b';name="a;b"'
        elif style == "bad-space":
            size += b" "
            valid = False
        wire += size + b"\r\n" + p + (b"XX" if style == "no-crlf" else b"\r\n")
        valid = valid and style != "no-crlf"
    last = draw(st.sampled_from(["plain"] * 5 + ["trailer"] * 3 + ["overflow", "bad-size"]))
    if last == "overflow":
        wire += b"ffffffffffffffffffff\r\n"
        valid = False
    elif last == "bad-size":
        wire += b"zz\r\n"
        valid = False
    elif last == "trailer":
        wire += b"0\r\nx-trailer: t\r\n\r\n"
    else:
        wire += b"0\r\n\r\n"
    return wire, b"".join(pieces), valid


@st.composite
def request(draw, k: int) -> tuple[bytes, bytes, bool]:
    """One request (head, body) and whether it is plainly valid (then the upstream must
    answer it)."""
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]))
    target = f"/r{k}?q={draw(st.sampled_from(['a', 'b%20c', '1', 'x=y']))}"
    version = draw(st.sampled_from(["HTTP/1.1"] * 6 + ["HTTP/1.0"]))
    headers: list[bytes] = []
    valid = True
    host = draw(st.sampled_from(["one"] * 12 + ["none", "two", "space-before-colon"]))
    if host == "one":
        headers.append(b"Host: h")
    elif host == "two":
        headers += [b"Host: h", b"Host: other"]
        valid = False
    elif host == "space-before-colon":
        headers.append(b"Host : h")
        valid = False
    elif version == "HTTP/1.1":
        valid = False
    extras = draw(st.lists(st.sampled_from([
        b"X-A: 1", b"X-Dup: a", b"X-Dup: b", b"x_user: admin", b"Accept: */*", b"X-Empty:",
        b"X-Tab: a\tb", b"X-Obs: caf\xe9", b"X-Long: " + b"v" * 2000, b"X-Trail: v  ",
        b"X-Fold: a\r\n folded",          # obs-fold
        b"X-Nul: a\x00b", b"X-Ctl: a\x01b",
    ]), max_size=3))
    for e in extras:
        if e.startswith((b"X-Fold", b"X-Nul", b"X-Ctl")):
            valid = False
    headers += extras
    framing = draw(st.sampled_from(["none"] * 4 + ["cl"] * 6 + ["chunked"] * 6 + [
        "cl+te", "te+cl", "dup-cl-same", "dup-cl-diff", "cl-list", "cl-plus", "cl-space",
        "cl-overflow", "te-xchunked", "te-chunked-identity", "te-case", "te-twice", "te-http10"]))
    body_bytes = draw(st.binary(max_size=64))
    body = b""
    if framing == "none":
        pass
    elif framing == "cl":
        headers.append(b"Content-Length: %d" % len(body_bytes))
        body = body_bytes
    elif framing == "chunked":
        wire, _, ok = draw(chunked_body())
        headers.append(b"Transfer-Encoding: chunked")
        body = wire
        valid = valid and ok and version == "HTTP/1.1"
    else:
        valid = valid and framing == "cl-space"      # OWS around a value is allowed
        wire, _, _ = draw(chunked_body())
        n = len(body_bytes)
        if framing == "cl+te":
            headers += [b"Content-Length: %d" % len(wire), b"Transfer-Encoding: chunked"]
            body = wire
        elif framing == "te+cl":
            headers += [b"Transfer-Encoding: chunked", b"Content-Length: %d" % len(wire)]
            body = wire
        elif framing == "dup-cl-same":
            headers += [b"Content-Length: %d" % n] * 2
            body = body_bytes
        elif framing == "dup-cl-diff":
            headers += [b"Content-Length: %d" % n, b"Content-Length: 0"]
            body = body_bytes
        elif framing == "cl-list":
            headers.append(b"Content-Length: %d, %d" % (n, n))
            body = body_bytes
        elif framing == "cl-plus":
            headers.append(b"Content-Length: +%d" % n)
            body = body_bytes
        elif framing == "cl-space":
            headers.append(b"Content-Length:  %d " % n)
            body = body_bytes
        elif framing == "cl-overflow":
            headers.append(b"Content-Length: 99999999999999999999999")
        elif framing == "te-xchunked":
            headers.append(b"Transfer-Encoding: xchunked")
            body = wire
        elif framing == "te-chunked-identity":
            headers.append(b"Transfer-Encoding: chunked, identity")
            body = wire
        elif framing == "te-case":
            headers.append(b"Transfer-Encoding: Chunked")
            body = wire
        elif framing == "te-twice":
            headers += [b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"]
            body = wire
        elif framing == "te-http10":
            version = "HTTP/1.0"
            headers.append(b"Transfer-Encoding: chunked")
            body = wire
    if version == "HTTP/1.0":
        headers.append(b"Connection: keep-alive")
    eol = b"\r\n"
    if draw(st.integers(0, 29)) == 0:
        eol = b"\n"               # bare LF
        valid = False
    head = eol.join([f"{method} {target} {version}".encode()] + headers) + eol + eol
    return head, body, valid


@st.composite
def stream(draw) -> tuple[bytes, bool, list[int], dict[int, tuple[int, bytes]]]:
    """The bytes, whether every request is valid, split offsets, and pauses: offsets
    (a head's end) after which the sender waits until the upstream has that head, so
    the body certainly follows a head already forwarded."""
    n = draw(st.integers(1, 3))
    data = b""
    valid = True
    pauses: dict[int, tuple[int, bytes]] = {}
    for k in range(n):
        head, body, ok = draw(request(k))
        data += head
        if body and draw(st.booleans()):
            pauses[len(data)] = (k, b" /r%d?" % k)
        data += body
        valid = valid and ok
    data += SENTINEL
    splits = sorted(set(draw(st.lists(st.integers(1, len(data) - 1), max_size=3))))
    return data, valid, splits, pauses


# -- the reference -----------------------------------------------------------------------

def reference(data: bytes) -> tuple[list, bool]:
    """Requests strict llhttp parses from `data`, and whether it stopped on an error."""
    r = RequestReader(0)
    r.add(data)
    out = []
    try:
        while True:
            req = r.next()
            if req is None:
                return out, False
            out.append(req)
            if not req.keep_alive:
                return out, False
    except httptools.HttpParserError:
        return out, True


# -- the test ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    from tests.support.gateway import GatewayProcess
    echo = EchoServer().start()
    gw = GatewayProcess(f'''
[gateway]
admin = "127.0.0.1:{{admin_port}}"
access_log = "off"

[[route]]
name = "all"
match = {{ path_prefix = "/" }}
backend = "echo"
timeout = "1s"

[backend.echo]
type = "http"
url = "{echo.url}"
''', tmp_path_factory.mktemp("differential"))
    yield gw, echo
    gw.stop()
    echo.stop()


def wait_forwarded(echo: EchoServer, s: socket.socket, reader: StrictResponseReader, out: list,
                   k: int, marker: bytes, timeout: float = 5.0) -> None:
    """Until the upstream has (part of) request k (its target is `marker`), or the
    gateway answered it itself or closed; responses read meanwhile go to `out`."""
    server = echo.server
    deadline = time.monotonic() + timeout
    while True:
        if any(marker in p for p in server.in_progress()) or any(marker in r.raw for r in server.received):
            return
        if reader.eof or len(out) > k:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the gateway neither forwarded {marker!r} nor answered in {timeout}s")
        if select.select([s], [], [], 0.005)[0]:
            try:
                out.append(reader.read(s, 0.05))
            except TimeoutError:
                pass                   # part of a response: the rest comes later
            except (ConnectionError, OSError):
                return
        else:
            with server.changed:
                server.changed.wait(0.005)


def exchange(port: int, echo: EchoServer, data: bytes, splits: list[int],
             pauses: dict[int, tuple[int, bytes]], deadline: float = 5.0) -> list:
    """Send `data` in pieces; the strictly parsed responses until the gateway closes."""
    reader = StrictResponseReader()
    out: list = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        last = 0
        for cut in sorted(set(splits) | set(pauses)) + [len(data)]:
            try:
                s.sendall(data[last:cut])
            except OSError:
                break          # the gateway refused and closed: what was sent is enough
            last = cut
            if cut in pauses:
                wait_forwarded(echo, s, reader, out, *pauses[cut])
        end = time.monotonic() + deadline
        while True:               # read() hands out what is parsed before reporting the close
            try:
                out.append(reader.read(s, max(0.01, end - time.monotonic())))
            except TimeoutError:
                raise AssertionError(f"no close from the gateway within {deadline}s; "
                                     f"responses so far: {[r[0] for r in out]}") from None
            except (ConnectionError, OSError):
                break
        return out


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(case=stream())
def test_what_the_gateway_forwards_is_what_a_strict_parser_reads(rig, case):
    gw, echo = rig
    data, valid, splits, pauses = case
    before = len(echo.received)
    responses = exchange(gw.port, echo, data, splits, pauses)
    # The upstream records a request before answering it: all of this example's are in.
    upstream = echo.received[before:]
    ref, _ = reference(data)
    by_target = {r.target: (i, r) for i, r in enumerate(ref)}

    assert echo.rejected == [], echo.rejected[-1]          # the gateway's framing is always valid
    last = -1
    for u in upstream:
        assert u.target in by_target, f"the gateway forwarded {u.target!r}, which llhttp never parsed"
        i, r = by_target[u.target]
        assert i > last, "forwarded out of order"
        last = i
        assert (u.method, u.body) == (r.method, r.body), (u.target, u.body, r.body)
    forwarded = {u.target for u in upstream}
    for i, (status, headers, body) in enumerate(responses):
        from_upstream = ("x-upstream", "echo") in headers
        if i < len(ref):
            if from_upstream:
                seen = json.loads(body)
                assert seen["path"] == ref[i].target and seen["body"].encode("latin-1") == ref[i].body
            elif status >= 400:
                assert ref[i].target not in forwarded, f"refused {ref[i].target} reached the upstream"
    if valid:
        assert [s for s, _, _ in responses] == [200] * len(ref), (responses, ref)
        assert [u.target for u in upstream] == [r.target for r in ref]
        assert ref[-1].target == SENTINEL_TARGET
