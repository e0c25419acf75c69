"""docs/metrics.md is the truth about /metrics.

A real gateway (TLS + plaintext on one port, a JWT route, a static route, tracing on, a
reload) is driven over HTTP/1.1, HTTP/2 and TLS; /metrics is parsed with
prometheus_client's parser and compared with the catalogue's table: a series, label or
type on /metrics that the catalogue does not list fails, and so does a catalogue row
whose name no code in agproxy/ defines (it cannot exist). Label values must stay
bounded: no raw path or user id appears as a label value.
"""

from __future__ import annotations

import re
import signal
import ssl
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.gateway import ROOT
from tests.support.grpc_peers import authorization_peer
from tests.support.idp import IdP
from tests.support.otlp import OtlpReceiver

CATALOGUE = ROOT / "docs" / "metrics.md"
ROW = re.compile(r"^\| `([a-z_:][a-z0-9_:]*)` \| (counter|gauge|histogram) \| ([^|]*) \|")
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "gauge": ("",)}


def catalogue() -> dict[str, tuple[str, frozenset | None]]:
    """name -> (type, labels or None for "any": target_info's resource attributes)."""
    out = {}
    for line in CATALOGUE.read_text().splitlines():
        m = ROW.match(line)
        if m:
            name, kind, labels = m.groups()
            labels = labels.strip()
            names = None if "resource" in labels else frozenset(re.findall(r"`([a-z_]+)`", labels))
            out[name] = (kind, names)
    return out


def exposed(text: str) -> dict[str, tuple[str, set[str], set[str]]]:
    """Family as the catalogue names it (counters with _total) -> (type, labels, sample names)."""
    out = {}
    created = []
    for fam in text_string_to_metric_families(text):
        if fam.name.endswith("_created") and fam.type in ("gauge", "unknown"):
            created.append(fam)    # the text parser splits a counter's or histogram's _created off
            continue
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        labels = {k for s in fam.samples for k in s.labels if k != "le"}
        out[name] = (fam.type, labels, {s.name for s in fam.samples})
    for fam in created:
        base = fam.name.removesuffix("_created")
        owner = next((n for n in (base + "_total", base) if n in out and out[n][0] != "gauge"), None)
        if owner is None:
            out[fam.name] = (fam.type, set(), {s.name for s in fam.samples})   # not ours: must be listed
        else:
            out[owner][1].update(k for s in fam.samples for k in s.labels)
            out[owner][2].update(s.name for s in fam.samples)
    return out


def test_catalogue_rows_name_series_the_code_defines():
    rows = catalogue()
    assert len(rows) >= 10
    source = "\n".join(p.read_text() for p in (ROOT / "agproxy").rglob("*.py"))
    for name in rows:
        if name == "target_info":
            assert 'InfoMetricFamily("target"' in source
            continue
        base = name.removeprefix("agproxy_").removesuffix("_total")
        # f"{prefix}_name", or a module's own family: metrics.family(Kind, "name", ...)
        assert f'_{base}"' in source or f'"{base}"' in source, \
            f"docs/metrics.md lists {name}, which no code in agproxy/ defines"


def test_every_series_on_metrics_is_in_the_catalogue(start_gateway, upstream_echo, certs, tmp_path):
    idp = IdP()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(idp.jwks_json())
    idp.close()
    receiver = OtlpReceiver().start()
    authz, _ = authorization_peer()             # allows everything
    authz.start()
    toml = f'''
[telemetry]
tracing = {{ otlp_endpoint = "{receiver.url}", sampling = 1.0 }}

[[listener]]
name = "main"
bind = "127.0.0.1:{{port}}"
tls = {{ cert_file = "{certs['cert']}", key_file = "{certs['key']}" }}

[[route]]
name = "secure"
match = {{ path_prefix = "/secure" }}
backend = "echo"
[route.jwt]
issuer = "{idp.issuer}"
audiences = ["agents"]
jwks = {{ file = "{jwks}" }}

[[route]]
name = "demo"
match = {{ path = "/demo" }}
backend = "demo"

[[route]]
name = "echo"
match = {{ path_prefix = "/api" }}
backend = "echo"

[[route]]
name = "authz"
match = {{ path_prefix = "/authz" }}
backend = "echo"
[route.ext_authz]
address = "{authz.address}"
timeout = "5s"
cache = {{ key = "request.path", ttl = "60s" }}

[backend.echo]
type = "http"
url = "{upstream_echo.url}"

[backend.demo]
type = "static"
body = "hi"
'''
    try:
        gw = start_gateway(toml, env={"OTEL_BSP_SCHEDULE_DELAY": "50",
                                      "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=ci"})
        token = idp.mint(sub="alice-the-user")
        with httpx.Client() as h1:                                           # plaintext HTTP/1.1
            assert h1.get(gw.url("/api/raw-path-7f3a?q=1")).status_code == 200
            assert h1.get(gw.url("/demo")).status_code == 200
            assert h1.get(gw.url("/nothing-here-9c1d")).status_code == 404
            assert h1.get(gw.url("/secure/x"), headers={"authorization": f"Bearer {token}"}).status_code == 200
            assert h1.get(gw.url("/secure/x"), headers={"authorization": "Bearer nope"}).status_code == 401
            for _ in range(2):                                               # ext_authz: a miss, a hit
                assert h1.get(gw.url("/authz/raw-path-7f3a")).status_code == 200
        ca = ssl.create_default_context(cafile=certs["ca"])
        with httpx.Client(http2=True, verify=ca) as tls:           # TLS, ALPN h2
            r = tls.get(gw.url("/api/over-tls", scheme="https"))
            assert r.status_code == 200 and r.http_version == "HTTP/2"
        with httpx.Client(verify=ca) as tls1:                       # TLS, HTTP/1.1
            assert tls1.post(gw.url("/api/tls1", scheme="https"), content=b"x").status_code == 200
        with httpx.Client(http2=True, http1=False) as h2c:                   # h2c prior knowledge
            assert h2c.request("PROPFIND", gw.url("/demo")).status_code == 200
        gw.signal(signal.SIGHUP)                                             # a reload: config_reloads
        deadline = time.monotonic() + 10
        while "config_reloads_total{" not in gw.metrics() and time.monotonic() < deadline:
            time.sleep(0.05)
        receiver.wait_for(lambda spans: len(spans) >= 8)
        deadline = time.monotonic() + 10
        while "agproxy_tracing_spans_exported_total 0.0" in gw.metrics() and time.monotonic() < deadline:
            time.sleep(0.05)
        text = gw.metrics()
    finally:
        receiver.stop()
        authz.stop(0)

    rows = catalogue()
    seen = exposed(text)
    missing = sorted(set(seen) - set(rows))
    assert not missing, f"on /metrics but not in docs/metrics.md: {missing}"
    for name, (kind, labels, samples) in seen.items():
        want_kind, want_labels = rows[name]
        assert kind == want_kind or (name == "target_info" and kind in ("gauge", "info")), (name, kind)
        if want_labels is not None:
            assert labels <= want_labels, f"{name}: labels {sorted(labels - want_labels)} not in the catalogue"
        base = name.removesuffix("_total")
        assert all(any(s == base + suffix for suffix in SUFFIXES[want_kind]) for s in samples), (name, samples)
    # What this traffic must have produced, so the comparison above saw them.
    for name in ("agproxy_requests_total", "agproxy_request_duration_seconds", "agproxy_active_connections",
                 "agproxy_upstream_request_duration_seconds", "agproxy_upstream_connect_duration_seconds",
                 "agproxy_config_reloads_total", "agproxy_tracing_spans_exported_total", "target_info",
                 "agproxy_ext_authz_decisions_total", "agproxy_ext_authz_cache_lookups_total",
                 "agproxy_remote_calls_total"):
        assert name in seen, f"{name} missing from /metrics"
    # Bounded labels: none of the client's paths, methods or identities is a label value.
    values = {v for fam in text_string_to_metric_families(text) for s in fam.samples for v in s.labels.values()}
    # (Methods outside the standard set as `_OTHER`: tests/integration/test_metric_labels.py.)
    for raw in ("/api/raw-path-7f3a", "/nothing-here-9c1d", "alice-the-user", "q=1"):
        assert not any(raw in v for v in values), f"{raw!r} appears as a label value"
