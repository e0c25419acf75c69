"""ext_authz when the authorization service fails, under failure_mode closed and open.

For every remote dependency shape (gRPC and HTTP mode) and every way it can fail
(not listening, accepting then never answering, answering UNAVAILABLE / 503, answering
garbage, dying in the middle of a run and coming back): the client's status, whether the
request reached the upstream (it must not, when closed), the outcome in the metrics and
the access log, and that the gateway recovers once the service answers again.
"""

from __future__ import annotations

import re
import threading

import grpc
import pytest

from tests.support.authz_peers import HANG, HttpAuthServer, h1_request
from tests.support.grpc_peers import GrpcPeerProcess, RawPeer, authorization_peer
from tests.support.ports import free_port
from tests.support.recorder import RecordingUpstream


def route(name: str, address: str, failure_mode: str, *, protocol: str = "grpc", timeout: str = "2s",
          extra: str = "") -> str:
    return f'''
[[route]]
name = "{name}"
match = {{ path_prefix = "/{name}" }}
backend = "app"
[route.ext_authz]
protocol = "{protocol}"
address = "{address}"
timeout = "{timeout}"
failure_mode = "{failure_mode}"
{extra}
'''


def config(upstream: str, routes: list[str]) -> str:
    return "\n".join(routes) + f'''
[backend.app]
type = "http"
url = "{upstream}"
'''


@pytest.fixture
def upstream():
    up = RecordingUpstream()
    yield up
    up.close()


def outcomes(gw) -> dict[tuple[str, str], float]:
    out = {}
    for m in re.finditer(r'agproxy_ext_authz_decisions_total\{result="(\w+)",route="([\w-]+)"\} (\S+)',
                         gw.metrics()):
        out[(m.group(2), m.group(1))] = float(m.group(3))
    return out


def unavailable(request, context):
    context.abort(grpc.StatusCode.UNAVAILABLE, "the policy engine is restarting")


def test_every_grpc_fault_closed_and_open(start_gateway, upstream):
    silent = RawPeer(None).start()
    http_bytes = RawPeer(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi").start()
    peer, servicer = authorization_peer(unavailable)
    peer.start()
    nothing = f"127.0.0.1:{free_port()}"
    faults = {"refused": (nothing, "unreachable"), "silent": (silent.address, "timeout"),
              "unavailable": (peer.address, "error"), "garbage": (http_bytes.address, "garbage")}
    try:
        routes = []
        for fault, (address, _) in faults.items():
            timeout = "300ms" if fault == "silent" else "2s"
            routes.append(route(f"{fault}-closed", address, "closed", timeout=timeout,
                                extra="status_on_error = 503" if fault == "refused" else ""))
            routes.append(route(f"{fault}-open", address, "open", timeout=timeout))
        gw = start_gateway(config(upstream.url, routes))
        for fault, (_, failure) in faults.items():
            r = h1_request(gw.port, "GET", f"/{fault}-closed")
            assert (r.status, r.body) == ((503 if fault == "refused" else 403), b""), fault
            r = h1_request(gw.port, "GET", f"/{fault}-open")
            assert r.status == 200, fault
        # only the open routes' requests reached the upstream
        assert sorted(s["target"] for s in upstream.wait_for(4)) == sorted(f"/{f}-open" for f in faults)
        got = outcomes(gw)
        for fault in faults:
            assert got[(f"{fault}-closed", "error_denied")] == 1.0
            assert got[(f"{fault}-open", "error_allowed")] == 1.0
            assert (f"{fault}-closed", "allowed") not in got
        records = {rec["route"]: rec for rec in gw.access_log(8)}
        for fault, (_, failure) in faults.items():
            assert records[f"{fault}-closed"]["error"] == f"ext_authz: {failure} (failure_mode closed)"
            assert (records[f"{fault}-open"]["ext_authz"], records[f"{fault}-open"]["ext_authz_failure"]) == \
                ("error_allowed", failure)
            assert (records[f"{fault}-closed"]["ext_authz"], records[f"{fault}-closed"]["ext_authz_failure"]) == \
                ("error_denied", failure)
        assert peer.server is not None and len(servicer.calls) == 2
        metrics = gw.metrics()
        for failure in ("unreachable", "timeout", "error", "garbage"):
            assert f'agproxy_remote_calls_total{{dependency="ext_authz",outcome="{failure}"}} 2.0' in metrics
    finally:
        silent.stop()
        http_bytes.stop()
        peer.stop(0)


@pytest.mark.parametrize("failure_mode", ["closed", "open"])
def test_grpc_service_dying_mid_call_and_coming_back(start_gateway, upstream, failure_mode):
    port = free_port()
    proc = GrpcPeerProcess(port).start()     # a child process: SIGKILL, no goodbye on the wire
    try:
        gw = start_gateway(config(upstream.url, [route("r", proc.address, failure_mode)]).replace(
            'path_prefix = "/r"', 'path_prefix = "/"'))
        assert h1_request(gw.port, "GET", "/before").status == 200
        # The check of /hang is inside the server when the server is killed.
        result: dict = {}
        t = threading.Thread(target=lambda: result.setdefault("r", h1_request(gw.port, "GET", "/hang")))
        t.start()
        proc.wait_line("hang")
        proc.kill()
        t.join(10)
        expected = 403 if failure_mode == "closed" else 200
        assert result["r"].status == expected
        assert h1_request(gw.port, "GET", "/while-dead").status == expected
        proc.start()                                           # back on the same port
        assert h1_request(gw.port, "GET", "/after").status == 200
        targets = [s["target"] for s in upstream.seen]
        assert targets == (["/before", "/after"] if failure_mode == "closed"
                           else ["/before", "/hang", "/while-dead", "/after"])
        got = outcomes(gw)
        result_name = "error_denied" if failure_mode == "closed" else "error_allowed"
        assert got[("r", result_name)] == 2.0 and got[("r", "allowed")] == 2.0
        assert "ext_authz 127.0.0.1:%d failed: unreachable" % port in gw.logs()   # said once, not per request
    finally:
        proc.stop()


@pytest.mark.parametrize("failure_mode", ["closed", "open"])
def test_every_http_fault_and_recovery(start_gateway, upstream, failure_mode):
    silent = HttpAuthServer(lambda req: HANG)
    down = HttpAuthServer(lambda req: (503, [("content-type", "text/plain")], b"down"))
    garbage = HttpAuthServer(lambda req: b"SSH-2.0-OpenSSH_9.6\r\n")
    flaky = HttpAuthServer(lambda req: (204, [], b""))     # answers, dies, comes back
    faults = {"refused": (f"127.0.0.1:{free_port()}", "unreachable"), "silent": (silent.url, "timeout"),
              "down": (down.url, "error"), "garbage": (garbage.url, "garbage")}
    servers = [silent, down, garbage, flaky]
    try:
        gw = start_gateway(config(upstream.url, [
            route(f, address, failure_mode, protocol="http", timeout="300ms" if f == "silent" else "2s")
            for f, (address, _) in list(faults.items()) + [("flaky", (flaky.url, None))]]))
        expected = 403 if failure_mode == "closed" else 200
        for fault in faults:
            r = h1_request(gw.port, "GET", f"/{fault}/x")
            assert r.status == expected, fault
            if failure_mode == "closed":
                assert r.body == b"", fault          # never the service's own 503 page
        assert len(down.seen) == 1 and len(silent.seen) == 1
        assert h1_request(gw.port, "GET", "/flaky/before").status == 200
        flaky.stop()                                  # dies (its kept-alive connection too)
        assert h1_request(gw.port, "GET", "/flaky/x").status == expected
        flaky = HttpAuthServer(lambda req: (204, [], b""), port=flaky.port)   # back on its port
        servers.append(flaky)
        assert h1_request(gw.port, "GET", "/flaky/after").status == 200
        opened = [f"/{f}/x" for f in faults] + ["/flaky/x"]
        targets = sorted(s["target"] for s in upstream.seen)
        assert targets == sorted(["/flaky/before", "/flaky/after"] + ([] if failure_mode == "closed" else opened))
        got = outcomes(gw)
        for fault in list(faults) + ["flaky"]:
            assert got[(fault, f"error_{'denied' if failure_mode == 'closed' else 'allowed'}")] == 1.0
        assert got[("flaky", "allowed")] == 2.0
        records = gw.access_log(len(faults) + 3)
        failures = {rec["route"]: rec.get("ext_authz_failure") for rec in records if rec["path"].endswith("/x")}
        assert failures == {**{f: failure for f, (_, failure) in faults.items()}, "flaky": "unreachable"}
    finally:
        for server in servers:
            server.stop()


def test_outcomes_are_counted_across_workers(start_gateway, upstream):
    # Two worker processes: prometheus-client's multiprocess files, written by each worker.
    gw = start_gateway('''
[gateway]
workers = 2
admin = "127.0.0.1:{admin_port}"
access_log = "off"
''' + config(upstream.url, [route("closed", f"127.0.0.1:{free_port()}", "closed"),
                             route("open", f"127.0.0.1:{free_port()}", "open")]))
    statuses = [h1_request(gw.port, "GET", p).status for p in ["/closed/x"] * 5 + ["/open/y"] * 3]
    assert statuses == [403] * 5 + [200] * 3
    got = outcomes(gw)
    assert (got[("closed", "error_denied")], got[("open", "error_allowed")]) == (5.0, 3.0)
    assert 'agproxy_remote_calls_total{dependency="ext_authz",outcome="unreachable"} 8.0' in gw.metrics()
