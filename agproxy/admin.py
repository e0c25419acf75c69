"""The admin endpoints: /healthz, /readyz, /metrics, /config (secrets redacted)."""

from __future__ import annotations

from typing import Callable

import orjson

from agproxy.http.messages import Headers, ServerStream
from agproxy.telemetry.redact import redact


class Admin:
    def __init__(self, get_runtime: Callable, metrics, is_ready: Callable[[], list[str]]):
        self.get_runtime = get_runtime
        self.metrics = metrics
        self.is_ready = is_ready

    async def handle(self, stream: ServerStream) -> None:
        path = stream.request.path
        if stream.request.method not in ("GET", "HEAD"):
            await _send(stream, 405, b'{"error":"method_not_allowed"}\n', "application/json")
        elif path == "/healthz":
            await _send(stream, 200, b"ok\n", "text/plain")
        elif path == "/readyz":
            reasons = self.is_ready()
            if reasons:
                await _send(stream, 503, orjson.dumps({"ready": False, "reasons": reasons}) + b"\n",
                            "application/json")
            else:
                await _send(stream, 200, b'{"ready":true}\n', "application/json")
        elif path == "/metrics":
            await _send(stream, 200, self.metrics.expose(), "text/plain; version=0.0.4; charset=utf-8")
        elif path == "/config":
            rt = self.get_runtime()
            # Redacted whole, by key and by shape: a describe() that shows a URL or a
            # header value cannot leak the credential in it.
            body = orjson.dumps(redact(rt.describe()), option=orjson.OPT_INDENT_2) + b"\n"
            await _send(stream, 200, body, "application/json")
        else:
            await _send(stream, 404, b'{"error":"not_found"}\n', "application/json")


async def _send(stream: ServerStream, status: int, body: bytes, ctype: str) -> None:
    stream.send_head(status, Headers([("content-type", ctype), ("content-length", str(len(body))),
                                      ("cache-control", "no-store")]))
    if stream.request.method != "HEAD":
        await stream.send_data(body)
    await stream.end()
