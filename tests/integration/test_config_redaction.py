"""/config and the gateway's own log lines never show a secret, wherever the config
holds it: a CEL literal with a Bearer token, a credential header value, static backend
auth headers, URL userinfo, a secret-named query parameter. Redaction is by what the
value is, not only by key name; what is not secret stays readable.

Real gateway binary (the admin port is what `conf/sidecar.toml` exposes on 0.0.0.0),
a real SIGHUP reload, the real `agproxy validate`.
"""

from __future__ import annotations

import signal
import subprocess
import time

from tests.support.gateway import ROOT, agproxy_cmd
from tests.support.ports import free_port

SECRETS = [
    "sk-live-4f9a8b7c6d5e4f3a2b1c",          # in a transform CEL literal, under a plain header name
    "hunter2",                                # URL userinfo password
    "opensesame",                             # x-api-key value (CEL literal)
    "dXNlcjpwYXNzd29yZA==",                   # static backend Basic credential
    "statictok123",                           # static backend x-auth-token
    "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl",   # a JWT inside a match header
    "qs-secret-value",                        # ?api_key= in a URL
    "cookievalue42",                          # a Cookie header set by a transform
]


def config(upstream_port: int) -> str:
    return f'''
[[route]]
name = "api"
match = {{ path_prefix = "/api", headers = {{ "x-probe" = "Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl" }} }}
backend = "upstream"
[route.transform.request]
set = {{ "x-upstream-auth" = '"Bearer sk-live-4f9a8b7c6d5e4f3a2b1c"', "x-api-key" = '"opensesame"', "x-user" = "request.headers['x-who']", "cookie" = '"sid=cookievalue42"' }}
add = {{ "x-link" = '"https://example.com/hook?api_key=qs-secret-value&team=blue"' }}

[[route]]
name = "hello"
match = {{ path_prefix = "/" }}
backend = "hello"

[backend.upstream]
type = "http"
url = "http://svc:hunter2@127.0.0.1:{upstream_port}"

[backend.hello]
type = "static"
body = "hi"
headers = {{ authorization = "Basic dXNlcjpwYXNzd29yZA==", "x-auth-token" = "statictok123", "content-type" = "text/plain" }}
'''


def test_config_endpoint_redacts_secrets_by_what_they_are(start_gateway):
    gw = start_gateway(config(free_port()))
    status, body = gw.admin_get("/config")
    assert status == 200
    text = body.decode()
    for secret in SECRETS:
        assert secret not in text, secret
    assert "<redacted>" in text
    # what is not a secret stays readable
    assert "request.headers['x-who']" in text                        # a CEL expression
    assert '"Bearer <redacted>"' in text                             # the shape is kept, the token is not
    assert "http://<redacted>@127.0.0.1:" in text                    # host and port are kept
    assert "team=blue" in text and "api_key=<redacted>" in text
    assert '"content-type": "text/plain"' in text
    assert '"name": "api"' in text and '"name": "hello"' in text


def test_logs_at_load_and_rejected_reload_show_no_secret(start_gateway):
    gw = start_gateway(config(free_port()))
    # a reload whose error quotes a value holding a password
    gw.config_path.write_text(gw.config_text.replace('url = "http://svc:hunter2@',
                                                     'url = "ftp://svc:hunter2@'))
    gw.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while 'agproxy_config_reloads_total{result="rejected"} 1.0' not in gw.metrics():
        assert time.monotonic() < deadline, "the reload was not rejected"
        time.sleep(0.05)   # polling a condition (the metric), not waiting for time
    logs = gw.logs()
    assert "reload of" in logs and "rejected" in logs and "unsupported URL scheme" in logs
    for secret in SECRETS:
        assert secret not in logs, secret
    # `agproxy validate` prints the same problems, redacted
    out = subprocess.run(agproxy_cmd() + ["validate", str(gw.config_path)], capture_output=True,
                         text=True, cwd=str(ROOT), timeout=60)
    assert out.returncode == 1 and "unsupported URL scheme" in out.stderr
    assert "hunter2" not in out.stderr + out.stdout
