"""The access log as a user reads it: JSON lines in a file, rotated with SIGUSR1, with the
fields users correlate on and CEL-computed extra fields."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest


def route(upstream_url: str) -> str:
    return f'''
[[route]]
name = "echo"
match = {{ path_prefix = "/" }}
backend = "echo"

[backend.echo]
type = "http"
url = "{upstream_url}"
'''


def lines(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def wait_lines(path: Path, n: int, timeout: float = 5.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        got = lines(path)
        if len(got) >= n or time.monotonic() > deadline:
            return got
        time.sleep(0.05)   # polling a condition (the batched flush) with a deadline


def wait_exists(path: Path, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.parametrize("workers", [1, 2])
def test_sigusr1_reopens_the_file_after_rotation(start_gateway, upstream_echo, tmp_path, workers):
    log_path = tmp_path / "access.log"
    gw = start_gateway(f'[gateway]\nworkers = {workers}\nadmin = "127.0.0.1:{{admin_port}}"\n'
                       f'access_log = "{log_path}"\n' + route(upstream_echo.url))
    with httpx.Client() as c:
        assert c.get(gw.url("/before")).status_code == 200
        assert [l["path"] for l in wait_lines(log_path, 1)] == ["/before"]
        rotated = tmp_path / "access.log.1"
        os.rename(log_path, rotated)
        gw.signal(signal.SIGUSR1)
        assert wait_exists(log_path), "the gateway did not reopen its access log"
        if workers > 1:   # every worker reopens: wait until no one still holds the old file
            deadline = time.monotonic() + 5
            while _holders(rotated) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not _holders(rotated)
    with httpx.Client() as c:   # a new connection: any worker may serve it
        assert c.get(gw.url("/after")).status_code == 200
    assert [l["path"] for l in wait_lines(log_path, 1)] == ["/after"]
    assert [l["path"] for l in lines(rotated)] == ["/before"]
    assert gw.proc.poll() is None and "restarting" not in gw.logs()   # no worker died of the signal


def _holders(path: Path) -> list[int]:
    """Processes with `path` open (via /proc): the old file must be released by all."""
    target = os.stat(path)
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    st = os.stat(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                    out.append(int(pid))
        except OSError:
            continue
    return out


def test_correlation_fields_and_cel_fields(start_gateway, upstream_echo):
    gw = start_gateway('''
[telemetry]
access_log_fields = { agent = 'request.headers["x-agent"]', tenant = 'jwt.tenant', scheme = "request.scheme", plain = "1 + 2" }
''' + route(upstream_echo.url))
    with httpx.Client() as c:
        assert c.get(gw.url("/a?x=1"), headers={"x-agent": "planner"}).status_code == 200
        assert c.get(gw.url("/b"), headers={"x-agent": "z" * 5000}).status_code == 200
    first, second = gw.access_log(2)
    assert first["route"] == "echo" and first["backend"] == "echo" and first["status"] == 200
    assert first["path"] == "/a" and first["method"] == "GET" and len(first["request_id"]) == 32
    assert isinstance(first["duration_ms"], float) and isinstance(first["upstream_ms"], float)
    assert first["bytes_out"] > 0 and first["upstream"] == f"127.0.0.1:{upstream_echo.port}"
    assert first["agent"] == "planner" and first["scheme"] == "http" and first["plain"] == 3
    assert "tenant" not in first          # jwt has no tenant here: a failing expression adds nothing
    assert "trace_id" not in first        # tracing is off
    assert second["agent"] == "z" * 256   # client input is bounded
    warnings = [l for l in gw.logs().splitlines() if "access_log_fields.tenant" in l]
    assert len(warnings) == 1             # logged once, not per request
