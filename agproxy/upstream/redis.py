"""Redis for per-request calls: commands of concurrent requests share one round trip.

Theory of operation: a `RedisClient` names one Redis (`redis://host:port/db`,
`rediss://` for TLS, `unix:///path?db=N`) and owns a redis.asyncio client,
created on the first call, in the serving event loop (a config is built in the
supervisor too, which never calls). `call(*command)` queues the command and
returns its reply; the first call of an event-loop iteration schedules a flush
(`call_soon`) that writes every command queued by then as one pipeline (no
MULTI: one write, then the replies in order) on one connection. At most
`MAX_IN_FLIGHT` pipelines are out at once; commands queued meanwhile go in the
next one, so under load a batch grows instead of connections multiplying.
`script(...)` runs a Lua script by EVALSHA and loads it on NOSCRIPT (a Redis
that restarted or was flushed), once.

Errors: a pipeline that fails (connection refused or lost, a reply that does not
parse, no answer within the socket timeout) fails every command in it with that
exception; an error reply fails its own command (`redis.exceptions.ResponseError`).
The next batch connects again: recovery needs no action. The per-request
deadline belongs to the caller; the socket timeout only bounds how long a dead
connection holds a pipeline slot. `classify()` maps the exceptions to the
failure kinds of a remote dependency (timeout, unreachable, error, garbage).

Clients are shared per process by address and credentials (`client_for`): a
config reload that keeps the Redis keeps its connections, and in-flight
requests of the old config are not cut off.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
from redis import exceptions as _errors
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

__all__ = ["RedisClient", "RedisTarget", "classify", "client_for", "parse_address"]

MAX_IN_FLIGHT = 4


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


class RedisClient:
    __slots__ = ("target", "password", "tls_ca_file", "socket_timeout", "connect_timeout", "_redis",
                 "_queue", "_scheduled", "_in_flight", "_pending", "_loading", "_loads")

    def __init__(self, target: RedisTarget, *, password: str | None = None, tls_ca_file: str | None = None,
                 socket_timeout: float = 1.0, connect_timeout: float = 1.0):
        self.target = target
        self.password = password
        self.tls_ca_file = tls_ca_file
        self.socket_timeout = socket_timeout
        self.connect_timeout = connect_timeout
        self._redis = None
        self._queue: list = []            # [(command tuple, future)]
        self._scheduled = False
        self._in_flight = 0
        self._pending: set = set()        # the flush tasks running (a reference keeps them alive)
        self._loading = None              # the SCRIPT LOAD in flight, shared by who met NOSCRIPT
        self._loads = 0                   # SCRIPT LOADs done

    # -- per request -----------------------------------------------------------------------
    def call(self, *command: Any) -> "asyncio.Future":
        """The reply to `command` (a future); raises what the pipeline or the reply raised."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.append((command, fut))
        if not self._scheduled and self._in_flight < MAX_IN_FLIGHT:
            self._scheduled = True
            loop.call_soon(self._flush)
        return fut

    async def script(self, script: Script, keys: list, args: list) -> Any:
        loads = self._loads
        try:
            return await self.call("EVALSHA", script.sha, len(keys), *keys, *args)
        except _errors.NoScriptError:
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
        if not self._queue or self._in_flight >= MAX_IN_FLIGHT:
            return
        batch, self._queue = self._queue, []
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _send(self, batch: list) -> None:
        try:
            pipe = self._client().pipeline(transaction=False)
            for command, _ in batch:
                pipe.execute_command(*command)
            try:
                replies = await pipe.execute(raise_on_error=False)
            except BaseException as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc if isinstance(exc, Exception) else ConnectionError("cancelled"))
                if not isinstance(exc, Exception):
                    raise
                return
            for (_, fut), reply in zip(batch, replies):
                if fut.done():
                    continue              # the request gave up (its deadline)
                if isinstance(reply, Exception):
                    fut.set_exception(reply)
                else:
                    fut.set_result(reply)
        finally:
            self._in_flight -= 1
            if self._queue and not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)

    def _client(self):
        r = self._redis
        if r is None:
            t = self.target
            kw: dict[str, Any] = dict(
                db=t.db, password=self.password, socket_timeout=self.socket_timeout,
                socket_connect_timeout=self.connect_timeout, max_connections=MAX_IN_FLIGHT + 1,
                # The caller decides what a failure means (failure_mode); no silent retries.
                retry=Retry(NoBackoff(), 0), decode_responses=False)
            if t.scheme == "unix":
                kw["unix_socket_path"] = t.path
            else:
                kw.update(host=t.host, port=t.port)
                if t.scheme == "rediss":
                    kw.update(ssl=True, ssl_cert_reqs=ssl.CERT_REQUIRED, ssl_ca_certs=self.tls_ca_file,
                              ssl_check_hostname=True)
            r = self._redis = aioredis.Redis(**kw)
        return r

    async def close(self) -> None:
        if self._redis is not None:
            r, self._redis = self._redis, None
            try:
                await r.aclose()
            except Exception:
                pass


def classify(exc: BaseException) -> str | None:
    """The remote-dependency failure kind of a Redis client exception."""
    e = _errors
    if isinstance(exc, e.TimeoutError):
        return "timeout"
    if isinstance(exc, (e.InvalidResponse, e.DataError)):
        return "garbage"
    if isinstance(exc, e.ResponseError):
        return "error"
    if isinstance(exc, (e.ConnectionError, e.AuthenticationError)):
        return "unreachable" if not isinstance(exc, e.AuthenticationError) else "error"
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
