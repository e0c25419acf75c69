"""One JSON line per request, written in batches.

Lines are collected in memory and written once per event-loop tick batch
(`flush_interval`), so a busy worker makes one write() per flush rather than one
per request; the log is flushed on shutdown.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import orjson


class AccessLog:
    def __init__(self, target: str, flush_interval: float = 0.2):
        self.enabled = target not in ("off", "", "none")
        self._fd: int | None = None
        if self.enabled:
            if target == "stdout":
                self._fd = sys.stdout.fileno()
            elif target == "stderr":
                self._fd = sys.stderr.fileno()
            else:
                self._fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
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

    def close(self) -> None:
        self.flush()
        if self._own_fd and self._fd is not None:
            os.close(self._fd)
            self._fd = None


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
