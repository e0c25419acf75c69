"""A strict HTTP/1.1 upstream that counts requests in flight: it holds them, or streams big bodies.

Requests are parsed with httptools (llhttp, Node's parser): a framing mistake by the
gateway is a parse error here, recorded in `errors` and answered by a close. A
request is "in flight" from its complete head until its response is complete or
its connection closes, whichever comes first; `max_in_flight` is the most at once.

Paths:
  /hold/...        never answered (the gateway must give up on it: a reset, a timeout)
  /big?n=N         200 with N bytes, written as fast as the gateway reads them
State changes notify `cond`; `wait_for(predicate, timeout)` waits on it (no sleeps).
"""

from __future__ import annotations

import asyncio
import threading
from urllib.parse import parse_qs, urlsplit

import httptools
import uvloop


class HoldingUpstream:
    def __init__(self):
        self.loop = uvloop.new_event_loop()
        self.cond = threading.Condition()
        self.port = 0
        self.seen = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.connections = 0
        self.open_connections = 0
        self.errors: list[str] = []
        self.body_bytes_sent = 0
        self._server = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "HoldingUpstream":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("upstream did not start")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def start():
            self._server = await self.loop.create_server(lambda: _Conn(self), "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
        self.loop.run_until_complete(start())
        self._ready.set()
        self.loop.run_forever()
        self.loop.close()        # an open loop is never freed, nor what it holds

    def stop(self) -> None:
        def close():
            self._server.close()
            self.loop.call_soon(self.loop.stop)
        self.loop.call_soon_threadsafe(close)
        self._thread.join(10)

    def wait_for(self, predicate, timeout: float = 10.0) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: predicate(self), timeout):
                raise AssertionError(f"upstream condition not met within {timeout}s: seen={self.seen} "
                                     f"in_flight={self.in_flight} max={self.max_in_flight} "
                                     f"open={self.open_connections} errors={self.errors}")

    def _change(self, **delta) -> None:
        with self.cond:
            for k, v in delta.items():
                setattr(self, k, getattr(self, k) + v)
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.cond.notify_all()


class _Conn(asyncio.Protocol):
    def __init__(self, server: HoldingUpstream):
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport = None
        self.url = b""
        self.active = False       # a request of this connection is in flight
        self.can_write = asyncio.Event()
        self.can_write.set()

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.server._change(connections=1, open_connections=1)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            with self.server.cond:
                self.server.errors.append(f"{type(exc).__name__}: {exc}")
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        url, self.url = self.url.decode(), b""
        parts = urlsplit(url)
        self.active = True
        self.server._change(seen=1, in_flight=1)
        if parts.path.startswith("/big"):
            n = int(parse_qs(parts.query).get("n", ["1000000"])[0])
            asyncio.get_running_loop().create_task(self._send_big(n))

    async def _send_big(self, n: int) -> None:
        t = self.transport
        t.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                b"content-length: %d\r\n\r\n" % n)
        chunk = b"x" * 16384
        sent = 0
        while sent < n and not t.is_closing():
            await self.can_write.wait()
            if t.is_closing():
                break
            piece = chunk[:min(len(chunk), n - sent)]
            t.write(piece)
            sent += len(piece)
            self.server._change(body_bytes_sent=len(piece))
        if sent >= n and self.active:
            self.active = False
            self.server._change(in_flight=-1)

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def connection_lost(self, exc) -> None:
        self.can_write.set()
        delta = {"open_connections": -1}
        if self.active:
            self.active = False
            delta["in_flight"] = -1
        self.server._change(**delta)
