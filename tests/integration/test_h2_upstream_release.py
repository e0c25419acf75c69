"""Through the gateway binary: a stream the gateway resets must release its upstream request.

The real `agproxy run` relays to tests/support/holding_upstream.py, a strict
(httptools) HTTP/1.1 upstream that counts the requests in flight at once. The
client (tests/support/h2raw.py) writes frames no library would: WINDOW_UPDATE of
0 on each stream (MadeYouReset, CVE-2025-8671), or a zero window that never
opens. What the upstream sees is the verdict: how many requests were ever in
flight together, and whether they all ended once the gateway gave up on them.
"""

from __future__ import annotations

import time

import pytest

from tests.support.h2raw import (ACK, CANCEL, ENHANCE_YOUR_CALM, SETTINGS, RawH2, frame,
                                 request_fields, settings, window_update)
from tests.support.holding_upstream import HoldingUpstream

CONFIG = """
[gateway]
admin = "127.0.0.1:{admin_port}"
access_log = "{tmp}/access.log"
max_concurrent_streams = 100
stream_idle_timeout = "%(stream_idle)s"
workers = %(workers)d

[[listener]]
name = "main"
bind = "127.0.0.1:{port}"

[[route]]
name = "up"
match = { path_prefix = "/" }
backend = "up"
timeout = "60s"

[backend.up]
type = "http"
url = "%(upstream)s"
"""


@pytest.fixture
def upstream():
    u = HoldingUpstream().start()
    yield u
    u.stop()


def _gateway(start_gateway, upstream, stream_idle="300s", workers=1):
    return start_gateway(CONFIG % {"upstream": upstream.url, "stream_idle": stream_idle,
                                   "workers": workers})


def _handshake(c: RawH2) -> None:
    c.read_until(lambda: any(f[0] == SETTINGS and not f[1] & ACK for f in c.frames))


def _metric(gw, name: str, labels: str) -> float | None:
    for line in gw.metrics().splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return float(line.split()[-1])
    return None


def test_made_you_reset_never_holds_more_upstream_requests_than_the_stream_limit(start_gateway, upstream):
    gw = _gateway(start_gateway, upstream)
    c = RawH2(gw.port)
    _handshake(c)
    batch_size = 50
    opened = 0
    while opened < 1000 and c.goaway is None and not c.closed:
        sids = []
        heads = b""
        for _ in range(batch_size):
            sid, f = c.headers_frame(request_fields("/hold/x"))
            heads += f
            sids.append(sid)
        if not c.send(heads):
            break
        # The requests are upstream (the handlers run) before the resets are drawn.
        upstream.wait_for(lambda u: u.seen >= opened + batch_size)
        opened += batch_size
        if not c.send(b"".join(window_update(sid, 0) for sid in sids)):
            break
        c.read_until(lambda: c.goaway is not None or all(s in c.resets for s in sids))
        assert upstream.max_in_flight <= 100, (
            f"{upstream.max_in_flight} upstream requests in flight from one connection "
            f"with max_concurrent_streams = 100")
    assert c.goaway is not None and c.goaway[1] == ENHANCE_YOUR_CALM, f"{opened} streams reset, no GOAWAY"
    # Every upstream request the reset streams had started is aborted.
    upstream.wait_for(lambda u: u.in_flight == 0 and u.open_connections == 0)
    assert not upstream.errors
    assert _metric(gw, "agproxy_http2_flood_total", 'kind="reset"') == 1.0
    c.close()


def test_a_zero_window_stream_is_reset_and_its_upstream_request_released(start_gateway, upstream):
    gw = _gateway(start_gateway, upstream, stream_idle="1s")
    c = RawH2(gw.port, client_settings=settings(initial_window_size=0))
    _handshake(c)
    sid = c.request("/big?n=20000000")
    c.read_until(lambda: c.status(sid) == 200)           # a head needs no window
    upstream.wait_for(lambda u: u.in_flight == 1 and u.body_bytes_sent > 0)
    start = time.monotonic()
    c.read_until(lambda: sid in c.resets, timeout=15)
    assert c.resets[sid] == CANCEL and sid not in c.data
    assert time.monotonic() - start < 5
    # The upstream connection is closed, not left mid-response in the pool.
    upstream.wait_for(lambda u: u.in_flight == 0 and u.open_connections == 0)
    # The client connection goes on.
    sid2 = c.request("/big?n=10")
    c.send(window_update(sid2, 100))
    c.read_until(lambda: sid2 in c.ended)
    assert c.status(sid2) == 200 and bytes(c.data[sid2]) == b"x" * 10 and c.goaway is None
    assert not upstream.errors
    c.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_flood_trips_are_counted_in_metrics(start_gateway, upstream, workers):
    gw = _gateway(start_gateway, upstream, workers=workers)
    assert _metric(gw, "agproxy_http2_flood_total", 'kind="continuation"') == 0.0
    c = RawH2(gw.port)
    _handshake(c)
    sid, head = c.headers_frame(request_fields("/hold/x"), end_headers=False)
    c.send(head + frame(9, 0, b"", sid) * 40)      # 40 empty CONTINUATION frames
    c.read_until_closed()
    assert c.goaway is not None and c.goaway[1] == ENHANCE_YOUR_CALM
    deadline = time.monotonic() + 10
    while _metric(gw, "agproxy_http2_flood_total", 'kind="continuation"') != 1.0:
        assert time.monotonic() < deadline, gw.metrics()
        time.sleep(0.05)           # polling the exposition for a condition
    assert upstream.seen == 0
    c.close()
