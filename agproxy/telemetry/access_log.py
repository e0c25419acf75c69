"""One JSON line per request, written in batches.

Lines are collected in memory and written once per event-loop tick batch
(`flush_interval`), so a busy worker makes one write() per flush rather than one
per request; the log is flushed on shutdown. A file target is opened O_APPEND (several
workers share it: each write lands whole at the end) and reopened by `reopen()`, which
the worker calls on SIGUSR1: rotate by renaming the file, then signal; lines already
buffered go to the old file, the next ones to a new file at the configured path.

`CORE_FIELDS` are the keys every line may carry (docs/configuration.md lists them);
`[telemetry].access_log_fields` adds CEL-computed ones (`LogFields`), whose values are
bounded (strings cut at `MAX_FIELD_CHARS`) since they may come from client input.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import logging

import orjson

log = logging.getLogger("agproxy.telemetry")

CORE_FIELDS = frozenset({
    "time", "route", "method", "path", "status", "duration_ms", "bytes_in", "bytes_out",
    "upstream", "upstream_ms", "request_id", "protocol", "tls", "client", "error", "user",
    "backend", "trace_id", "span_id",
})
MAX_FIELD_CHARS = 256


class AccessLog:
    def __init__(self, target: str, flush_interval: float = 0.2):
        self.enabled = target not in ("off", "", "none")
        self.target = target
        self._fd: int | None = None
        if self.enabled:
            if target == "stdout":
                self._fd = sys.stdout.fileno()
            elif target == "stderr":
                self._fd = sys.stderr.fileno()
            else:
                self._fd = self._open()
        self._own_fd = self.enabled and target not in ("stdout", "stderr")
        self._buf: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self.flush_interval = flush_interval

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._buf.append(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.flush_interval, self.flush)
        elif len(self._buf) >= 512:
            self.flush()

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buf or self._fd is None:
            return
        data = b"".join(self._buf)
        self._buf = []
        try:
            while data:
                n = os.write(self._fd, data)
                data = data[n:]
        except BlockingIOError:
            pass
        except OSError:
            pass

    def _open(self) -> int:
        return os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def reopen(self) -> None:
        """Log rotation: flush to the file as it is, then open the path anew."""
        if not self._own_fd:
            return
        self.flush()
        try:
            fd = self._open()
        except OSError as exc:
            log.error("access log: cannot reopen %s (%s); still writing to the old file", self.target, exc)
            return
        old, self._fd = self._fd, fd
        if old is not None:
            os.close(old)

    def close(self) -> None:
        self.flush()
        if self._own_fd and self._fd is not None:
            os.close(self._fd)
            self._fd = None


class LogFields:
    """`[telemetry].access_log_fields`: name → compiled CEL, evaluated once per line.
    A failing expression leaves its field out (logged at most once a minute)."""

    __slots__ = ("fields", "_last_error")

    def __init__(self, fields: list[tuple[str, object]]):
        self.fields = fields
        self._last_error = 0.0

    def add_to(self, record: dict, activation) -> None:
        for name, expr in self.fields:
            try:
                value = expr.evaluate(activation)
            except Exception as exc:
                now = time.monotonic()
                if now - self._last_error > 60:
                    self._last_error = now
                    log.warning("access_log_fields.%s: %s", name, exc)
                continue
            record[name] = bounded(value)


def bounded(value):
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if not isinstance(value, str):
        try:
            value = orjson.dumps(value).decode()
        except TypeError:
            value = str(value)
    return value if len(value) <= MAX_FIELD_CHARS else value[:MAX_FIELD_CHARS]


_second = -1
_prefix = ""
_last_ms = -1
_last_text = ""


def now_iso() -> str:
    """UTC timestamp with milliseconds. The seconds part is formatted once per
    second, the whole text once per millisecond (a busy worker logs several
    requests per millisecond)."""
    global _second, _prefix, _last_ms, _last_text
    ms = int(time.time() * 1000)
    if ms == _last_ms:
        return _last_text
    s = ms // 1000
    if s != _second:
        _second = s
        _prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s))
    _last_ms = ms
    _last_text = text = f"{_prefix}.{ms % 1000:03d}Z"
    return text
