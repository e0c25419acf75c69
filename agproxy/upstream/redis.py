"""Redis for per-request calls: one connection per worker, every command pipelined.

Theory of operation: a `RedisClient` names one Redis (`redis://host:port/db`,
`rediss://` for TLS, `unix:///path?db=N`) and keeps one connection to it, opened
on the first call in the serving event loop (a config is also built in the
supervisor, which never calls). `call(*command)` queues the command and returns
a future for its reply; the first call of an event-loop iteration schedules a
flush (`call_soon`) that writes every command queued by then in one write. Redis
answers in order, so replies are matched to futures first in, first out, and any
number of batches may be in flight on the one connection: N concurrent requests
cost one write and one read, not N round trips, and never more connections.
`script(...)` runs a Lua script by EVALSHA; the requests that meet NOSCRIPT (a
Redis that restarted or was flushed) share one SCRIPT LOAD.

Why not redis.asyncio: measured through the gateway (benchmarks/results/ratelimit.md,
callgrind, one limit per request, 16 concurrent clients) a route limited in Redis
cost 557k instructions per request with redis.asyncio (506k with hiredis) against
248k for the plain route: its pipeline object, connection-pool lock and per-command
bookkeeping cost more than the whole relay. This client only needs RESP2 framing
of commands and of the five reply types, which is what it implements.

Failures, each an exception carrying `failure` (upstream/remote.py's vocabulary):
- `RedisConnectionError` ("unreachable"): cannot connect (refused, TLS
  verification, connect timeout), or the connection was lost or closed because
  replies stopped coming for `socket_timeout` while commands waited. Every
  command pending on the connection fails; the next flush reconnects.
- `RedisReplyError` ("error"): an error reply (`-ERR ...`, `-WRONGTYPE ...`); only
  that command fails. `NoScriptError` is the NOSCRIPT one. An AUTH or SELECT
  refused while connecting fails the batch with it and closes the connection.
- `RedisProtocolError` ("garbage"): bytes that are not RESP, or a reply over the
  size caps; the connection is closed.
The per-request deadline belongs to the caller (a timed-out request's future is
cancelled; its reply is still read and dropped, in order).

Clients are shared per process by address and credentials (`client_for`): a
config reload that keeps the Redis keeps its connection.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
from collections import deque
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from agproxy.upstream.deadline import within

__all__ = ["NoScriptError", "RedisClient", "RedisConnectionError", "RedisProtocolError", "RedisReplyError",
           "RedisTarget", "Script", "classify", "client_for", "parse_address"]

MAX_BULK = 1 << 20          # a bulk reply over 1 MiB is not one of ours: garbage
MAX_ARRAY = 1 << 16


class RedisConnectionError(ConnectionError):
    failure = "unreachable"


class RedisReplyError(Exception):
    failure = "error"


class NoScriptError(RedisReplyError):
    pass


class RedisProtocolError(Exception):
    failure = "garbage"


class RedisTarget:
    __slots__ = ("scheme", "host", "port", "path", "db")

    def __init__(self, scheme: str, host: str = "", port: int = 6379, path: str = "", db: int = 0):
        self.scheme = scheme
        self.host = host
        self.port = port
        self.path = path
        self.db = db

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        return f"{self.scheme}://{self.host}:{self.port}/{self.db}"

    def key(self) -> tuple:
        return (self.scheme, self.host, self.port, self.path, self.db)


def parse_address(text: str) -> RedisTarget:
    """`redis://host:port[/db]`, `rediss://...` (TLS), `unix:///path[?db=N]`; raises ValueError.
    Credentials do not belong in the address (`password_env`)."""
    u = urlsplit(text)
    if u.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"invalid Redis address {text!r} (expected redis://host:port, rediss://... or unix:///path)")
    if u.username or u.password:
        raise ValueError("put no credentials in the address: use password_env")
    if u.scheme == "unix":
        if not u.path.startswith("/"):
            raise ValueError(f"invalid unix socket address {text!r} (expected unix:///absolute/path)")
        db = parse_qs(u.query).get("db", ["0"])[0]
        if not db.isdigit():
            raise ValueError(f"invalid db {db!r}")
        return RedisTarget("unix", path=unquote(u.path), db=int(db))
    if not u.hostname:
        raise ValueError(f"invalid Redis address {text!r}: no host")
    try:
        port = u.port or 6379
    except ValueError:
        raise ValueError(f"invalid port in {text!r}") from None
    db = u.path.strip("/") or "0"
    if not db.isdigit():
        raise ValueError(f"invalid db {db!r} in {text!r}")
    return RedisTarget(u.scheme, u.hostname, port, db=int(db))


class Script:
    __slots__ = ("source", "sha")

    def __init__(self, source: str):
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


def encode(command: tuple) -> bytes:
    """One command in RESP: an array of bulk strings."""
    out = [b"*%d\r\n" % len(command)]
    for arg in command:
        b = arg if type(arg) is bytes else str(arg).encode()
        out.append(b"$%d\r\n" % len(b))
        out.append(b)
        out.append(b"\r\n")
    return b"".join(out)


_INCOMPLETE = object()


def parse(buf: bytearray, pos: int) -> tuple[Any, int]:
    """One reply at `pos`: (value, end), or (_INCOMPLETE, pos) when more bytes are needed.
    Error replies are returned as RedisReplyError instances; raises RedisProtocolError."""
    if pos >= len(buf):
        return _INCOMPLETE, pos
    eol = buf.find(b"\r\n", pos)
    if eol < 0:
        if len(buf) - pos > 64 * 1024:
            raise RedisProtocolError("a reply line over 64 KiB")
        return _INCOMPLETE, pos
    kind = buf[pos]
    line = bytes(buf[pos + 1:eol])
    end = eol + 2
    if kind == 0x3A:                                  # ':' integer
        try:
            return int(line), end
        except ValueError:
            raise RedisProtocolError(f"bad integer reply {line[:40]!r}") from None
    if kind == 0x24:                                  # '$' bulk string
        n = _length(line, MAX_BULK)
        if n < 0:
            return None, end
        if len(buf) < end + n + 2:
            return _INCOMPLETE, pos
        if buf[end + n:end + n + 2] != b"\r\n":
            raise RedisProtocolError("a bulk reply not ended by CRLF")
        return bytes(buf[end:end + n]), end + n + 2
    if kind == 0x2A:                                  # '*' array
        n = _length(line, MAX_ARRAY)
        if n < 0:
            return None, end
        items = []
        for _ in range(n):
            item, end = parse(buf, end)
            if item is _INCOMPLETE:
                return _INCOMPLETE, pos
            items.append(item)
        return items, end
    if kind == 0x2B:                                  # '+' simple string
        return line, end
    if kind == 0x2D:                                  # '-' error
        text = line.decode("utf-8", "replace")
        return (NoScriptError if text.startswith("NOSCRIPT") else RedisReplyError)(text[:300]), end
    raise RedisProtocolError(f"not a Redis reply: {bytes(buf[pos:pos + 40])!r}")


def _length(line: bytes, cap: int) -> int:
    try:
        n = int(line)
    except ValueError:
        raise RedisProtocolError(f"bad length {line[:40]!r}") from None
    if n > cap:
        raise RedisProtocolError(f"a reply of {n} items/bytes (cap {cap})")
    return n


class _Connection(asyncio.Protocol):
    """One connection: writes batches, hands replies to the waiting futures in order."""

    def __init__(self, client: "RedisClient"):
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiting: deque = deque()
        self.closed = False
        self.last_progress = time.monotonic()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        self.last_progress = time.monotonic()
        pos = 0
        waiting = self.waiting
        try:
            while True:
                value, end = parse(buf, pos)
                if value is _INCOMPLETE:
                    break
                pos = end
                if not waiting:
                    raise RedisProtocolError("a reply nobody asked for")
                fut = waiting.popleft()
                if fut.done():
                    continue                  # its request gave up (deadline)
                if isinstance(value, RedisReplyError):
                    fut.set_exception(value)
                else:
                    fut.set_result(value)
        except RedisProtocolError as exc:
            self.fail(exc)
            return
        if pos:
            del buf[:pos]

    def connection_lost(self, exc) -> None:
        self.fail(RedisConnectionError(f"connection lost: {exc}" if exc else "connection closed by Redis"))

    def send(self, payload: bytes, futures: list) -> None:
        if not self.waiting:
            self.last_progress = time.monotonic()
        self.waiting.extend(futures)
        self.transport.write(payload)

    def fail(self, exc: BaseException) -> None:
        if not self.closed:
            self.closed = True
            if self.client._conn is self:
                self.client._conn = None
            if self.transport is not None:
                self.transport.abort()
        waiting, self.waiting = self.waiting, deque()
        for fut in waiting:
            if not fut.done():
                fut.set_exception(exc)


class RedisClient:
    __slots__ = ("target", "password", "tls_ca_file", "socket_timeout", "connect_timeout", "_conn",
                 "_connecting", "_queue", "_scheduled", "_loading", "_loads", "_watch")

    def __init__(self, target: RedisTarget, *, password: str | None = None, tls_ca_file: str | None = None,
                 socket_timeout: float = 1.0, connect_timeout: float = 1.0):
        self.target = target
        self.password = password
        self.tls_ca_file = tls_ca_file
        self.socket_timeout = socket_timeout
        self.connect_timeout = connect_timeout
        self._conn: _Connection | None = None
        self._connecting: asyncio.Task | None = None
        self._queue: list = []            # [(command, future)] not written yet
        self._scheduled = False
        self._loading = None              # the SCRIPT LOAD in flight, shared by who met NOSCRIPT
        self._loads = 0                   # SCRIPT LOADs done
        self._watch = None                # the no-progress check's timer

    # -- per request -----------------------------------------------------------------------
    def call(self, *command: Any) -> "asyncio.Future":
        """A future for the reply to `command` (bytes, int, list, None), or its failure."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.append((command, fut))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return fut

    async def script(self, script: Script, keys: list, args: list) -> Any:
        loads = self._loads
        try:
            return await self.call("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            pass
        # The requests that met NOSCRIPT share one SCRIPT LOAD; one that was sent before
        # a load finished just tries again.
        if self._loads == loads:
            loading = self._loading
            if loading is None:
                loading = self._loading = asyncio.ensure_future(self._load(script))
            await asyncio.shield(loading)
        return await self.call("EVALSHA", script.sha, len(keys), *keys, *args)

    async def _load(self, script: Script) -> None:
        try:
            await self.call("SCRIPT", "LOAD", script.source)
            self._loads += 1
        finally:
            self._loading = None

    # -- batching --------------------------------------------------------------------------
    def _flush(self) -> None:
        self._scheduled = False
        conn = self._conn
        if conn is None or conn.closed:
            if self._connecting is None:
                self._connecting = asyncio.get_running_loop().create_task(self._connect())
            return                          # written once connected
        batch, self._queue = self._queue, []
        live = [(c, f) for c, f in batch if not f.done()]
        if live:
            conn.send(b"".join(encode(c) for c, _ in live), [f for _, f in live])
            self._arm_watch()

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        conn = _Connection(self)
        t = self.target
        try:
            if t.scheme == "unix":
                opening = loop.create_unix_connection(lambda: conn, t.path)
            else:
                ctx = None
                if t.scheme == "rediss":
                    ctx = ssl.create_default_context(cafile=self.tls_ca_file)
                opening = loop.create_connection(lambda: conn, t.host, t.port, ssl=ctx,
                                                 server_hostname=t.host if ctx else None)
            await within(self.connect_timeout, opening)
            hello = []
            if self.password:
                hello.append(("AUTH", self.password))
            if t.db:
                hello.append(("SELECT", t.db))
            futures = [loop.create_future() for _ in hello]
            if hello:
                conn.send(b"".join(encode(c) for c in hello), futures)
            self._conn = conn
        except Exception as exc:
            self._connecting = None
            err = exc if isinstance(exc, RedisConnectionError) else RedisConnectionError(
                f"cannot connect to {t}: {'no answer in time' if isinstance(exc, TimeoutError) else exc}")
            conn.fail(err)
            batch, self._queue = self._queue, []
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(err)
            return
        self._connecting = None
        self._flush()                       # what queued up meanwhile, right behind AUTH/SELECT
        for fut in futures:
            try:
                await fut
            except RedisReplyError as exc:  # wrong password, no such db: the connection is useless
                conn.fail(RedisReplyError(f"connecting to {t}: {exc}"))
                return
            except Exception:
                return

    def _arm_watch(self) -> None:
        """Close a connection whose replies stopped coming while commands wait (a Redis
        that accepted and hung): its commands fail, and the next batch reconnects."""
        if self._watch is not None:
            return
        loop = asyncio.get_running_loop()

        def check() -> None:
            self._watch = None
            conn = self._conn
            if conn is None or not conn.waiting:
                return
            if time.monotonic() - conn.last_progress >= self.socket_timeout:
                conn.fail(RedisConnectionError(f"no reply from {self.target} for {self.socket_timeout:g}s"))
                return
            self._arm_watch()

        self._watch = loop.call_later(self.socket_timeout / 2, check)

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.fail(RedisConnectionError("client closed"))


def classify(exc: BaseException) -> str | None:
    """The remote-dependency failure kind of an exception from this client."""
    failure = getattr(exc, "failure", None)
    if failure is not None:
        return failure
    if isinstance(exc, ssl.SSLError):
        return "unreachable"
    return None


_CLIENTS: dict[tuple, RedisClient] = {}


def client_for(target: RedisTarget, *, password: str | None, tls_ca_file: str | None,
               socket_timeout: float, connect_timeout: float) -> RedisClient:
    """This process's client for that Redis and those credentials (shared across reloads)."""
    key = (target.key(), password, tls_ca_file, socket_timeout, connect_timeout)
    c = _CLIENTS.get(key)
    if c is None:
        c = _CLIENTS[key] = RedisClient(target, password=password, tls_ca_file=tls_ca_file,
                                        socket_timeout=socket_timeout, connect_timeout=connect_timeout)
    return c
