"""The agproxy process: validate, reload on SIGHUP, drain on SIGTERM, several workers."""

from __future__ import annotations

import json
import signal
import subprocess
import threading

import httpx

from tests.support.gateway import agproxy_cmd


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(agproxy_cmd() + list(args), capture_output=True, text=True, timeout=60)


def test_version():
    r = run_cli("version")
    assert r.returncode == 0 and r.stdout.startswith("agproxy ")


def test_validate_lists_every_problem_by_toml_path(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('''
[gateway]
workers = -1
drain_timout = "5s"

[[listener]]
name = "main"
bind = "127.0.0.1:notaport"

[[route]]
name = "a"
match = { path_prefix = "/a" }
backend = "echo"

[[route]]
name = "b"
match = { path_prefix = "b", methodz = ["GET"] }
backend = "x"
timeout = "soon"

[backend.echo]
type = "http"
url = "ftp://nope"

[backend.other]
type = "grpc-magic"
''')
    r = run_cli("validate", str(cfg))
    assert r.returncode == 1
    err = r.stderr
    assert "gateway.workers: must be >= 0" in err
    assert 'gateway.drain_timout: unknown key (did you mean "drain_timeout"?)' in err
    assert "listener[0].bind: invalid address" in err
    assert 'route[1].backend: unknown backend "x" (did you mean "echo"?)' in err or \
           "route[1].backend: unknown backend 'x'" in err
    assert "route[1].match.path_prefix: must start with '/'" in err
    assert "route[1].match.methodz: unknown key" in err
    assert "route[1].timeout: invalid duration" in err
    assert "backend.echo.url: unsupported URL scheme" in err
    assert "backend.other.type: unknown backend type" in err


def test_every_shipped_config_validates():
    import glob
    from tests.support.gateway import ROOT
    files = sorted(glob.glob(str(ROOT / "conf" / "*.toml")))
    assert files
    for f in files:
        r = run_cli("validate", f)
        assert r.returncode == 0, (f, r.stderr)


def test_sighup_reload_applies_good_config_and_keeps_running_one_on_bad(start_gateway, upstream_echo):
    base = f'''
[[route]]
name = "r1"
match = {{ path_prefix = "/one" }}
backend = "echo"

[backend.echo]
type = "http"
url = "{upstream_echo.url}"
'''
    gw = start_gateway(base)
    assert httpx.get(gw.url("/one")).status_code == 200
    assert httpx.get(gw.url("/two")).status_code == 404

    gw.config_path.write_text(gw.config_text.replace('path_prefix = "/one"', 'path_prefix = "/two"'))
    gw.signal(signal.SIGHUP)
    _wait_for_metric(gw, 'agproxy_config_reloads_total{result="ok"} 1.0')
    assert httpx.get(gw.url("/two")).status_code == 200
    assert httpx.get(gw.url("/one")).status_code == 404

    gw.config_path.write_text(gw.config_text + '\n[backend.broken]\ntype = "http"\n')
    gw.signal(signal.SIGHUP)
    _wait_for_metric(gw, 'agproxy_config_reloads_total{result="rejected"} 1.0')
    assert httpx.get(gw.url("/two")).status_code == 200   # still the last good config
    assert "backend.broken.url: required" in gw.logs()


def _wait_for_metric(gw, line: str, attempts: int = 200) -> None:
    import time
    for _ in range(attempts):
        if line in gw.metrics():
            return
        time.sleep(0.05)   # polling a condition (the reload counter), bounded
    raise AssertionError(f"{line!r} never appeared:\n{gw.logs()}")


def test_sigterm_drains_in_flight_requests(start_gateway, upstream_echo):
    gw = start_gateway(f'''
[[route]]
name = "echo"
match = {{ path_prefix = "/" }}
backend = "echo"

[backend.echo]
type = "http"
url = "{upstream_echo.url}"
''')
    result = {}
    started = threading.Event()

    def slow_call():
        with httpx.Client(timeout=10) as c:
            started.set()
            result["r"] = c.get(gw.url("/slow?delay=1"))
    t = threading.Thread(target=slow_call)
    t.start()
    started.wait()
    # Wait until the request is in flight at the upstream before signalling.
    import time
    for _ in range(200):
        if upstream_echo.requests:
            break
        time.sleep(0.01)
    gw.signal(signal.SIGTERM)
    t.join(10)
    assert result["r"].status_code == 200
    assert gw.proc.wait(10) == 0
    # After the drain the port is closed.
    try:
        httpx.get(gw.url("/after"), timeout=2)
        raise AssertionError("gateway still accepting after drain")
    except httpx.ConnectError:
        pass


def test_several_workers_share_the_port(start_gateway, upstream_echo):
    gw = start_gateway(f'''
[gateway]
workers = 2
admin = "127.0.0.1:{{admin_port}}"
access_log = "off"

[[route]]
name = "echo"
match = {{ path_prefix = "/" }}
backend = "echo"

[backend.echo]
type = "http"
url = "{upstream_echo.url}"
''')
    for i in range(20):
        assert httpx.get(gw.url(f"/w/{i}")).status_code == 200
    status, body = gw.admin_get("/readyz")
    assert status == 200, body
    metrics = gw.metrics()
    total = sum(float(l.rsplit(" ", 1)[1]) for l in metrics.splitlines()
                if l.startswith('agproxy_requests_total{method="GET",route="echo",status="200"}'))
    assert total == 20
    for family, label in (("agproxy_request_duration_seconds", 'route="echo"'),
                          ("agproxy_upstream_request_duration_seconds", 'backend="echo"')):
        counts = sum(float(l.rsplit(" ", 1)[1]) for l in metrics.splitlines()
                     if l.startswith(f"{family}_count{{{label}")
                     or (l.startswith(f"{family}_bucket{{") and label in l and 'le="+Inf"' in l))
        assert counts == 40, family    # _count and the +Inf bucket: 20 each, summed over workers
    assert json.loads(gw.admin_get("/config")[1])["routes"][0]["name"] == "echo"
