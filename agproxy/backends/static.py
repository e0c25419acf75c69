"""`type = "static"`: the gateway answers itself (demo routes, health checks, maintenance)."""

from __future__ import annotations

from agproxy.config.reader import Section
from agproxy.http.messages import Headers
from agproxy.proxy.build import BuildContext
from agproxy.proxy.contract import Backend, Response

TYPE = "static"


class StaticBackend(Backend):
    kind = TYPE

    def __init__(self, status: int, body: bytes, headers: list[tuple[str, str]]):
        self.status = status
        self.body = body
        self.headers = headers

    async def respond(self, ex) -> Response:
        return Response(self.status, Headers(self.headers), self.body)

    def describe(self) -> dict:
        return {"type": self.kind, "status": self.status}


def build(name: str, sec: Section, ctx: BuildContext) -> StaticBackend:
    sec.str("type")
    status = sec.int("status", 200, min=100, max=599)
    body = sec.str("body", "")
    headers = sec.str_map("headers", {}) or {}
    sec.done()
    from agproxy.filters import check_header_name, header_value_ok
    from agproxy.http.messages import text_field_value
    items = []
    for k, v in headers.items():
        path = f"{sec.sub('headers')}.{k}"
        name = check_header_name(sec.problems, path, k)
        if name is None:
            continue
        if not header_value_ok(v):
            sec.problems.add(path, "invalid header value (control characters)")
            continue
        items.append((name, text_field_value(v)))
    if not any(k == "content-type" for k, _ in items):
        items.append(("content-type", "text/plain; charset=utf-8"))
    return StaticBackend(status, (body or "").encode(), items)
