"""Run the real `agproxy` binary as a subprocess for tests.

`GatewayProcess(toml, tmp_path)` writes the config (replacing `{port}` and
`{admin_port}` with fresh ephemeral ports; adding a default [gateway] and
[[listener]] when the text has none), starts `agproxy run`, and waits until
/readyz answers 200 (a readiness condition, polled; no fixed sleeps).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parents[2]


def agproxy_cmd() -> list[str]:
    venv = ROOT / ".venv" / "bin" / "agproxy"
    if venv.exists():
        return [str(venv)]
    return [sys.executable, "-m", "agproxy.cli"]


class GatewayProcess:
    def __init__(self, toml: str, tmp_path: Path, *, env: dict | None = None, wait_ready: bool = True,
                 name: str = "gateway"):
        self.port = free_port()
        self.admin_port = free_port()
        self.tmp = Path(tmp_path)
        self.access_log_path = self.tmp / f"{name}-access.log"
        text = toml.replace("{port}", str(self.port)).replace("{admin_port}", str(self.admin_port))
        text = text.replace("{tmp}", str(self.tmp))
        if "[gateway]" not in text:
            text = (f'[gateway]\nadmin = "127.0.0.1:{self.admin_port}"\n'
                    f'access_log = "{self.access_log_path}"\ndrain_timeout = "5s"\n\n') + text
        if "[[listener]]" not in text:
            text = f'[[listener]]\nname = "main"\nbind = "127.0.0.1:{self.port}"\n\n' + text
        self.config_text = text
        self.config_path = self.tmp / f"{name}.toml"
        self.config_path.write_text(text)
        self.stdout_path = self.tmp / f"{name}.stdout"
        self.stderr_path = self.tmp / f"{name}.stderr"
        full_env = dict(os.environ)
        full_env.setdefault("AWS_EC2_METADATA_DISABLED", "true")
        if env:
            full_env.update(env)
        self.proc = subprocess.Popen(
            agproxy_cmd() + ["run", "--config", str(self.config_path)],
            stdout=open(self.stdout_path, "wb"), stderr=open(self.stderr_path, "wb"),
            env=full_env, cwd=str(ROOT))
        if wait_ready:
            self.wait_ready()

    # -- lifecycle ------------------------------------------------------------------------
    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                with urllib.request.urlopen(self.admin_url("/readyz"), timeout=1) as r:
                    if r.status == 200:
                        return
            except Exception as exc:  # not up yet
                last = exc
            time.sleep(0.05)  # polling a readiness condition, not synchronising on time
        raise RuntimeError(f"gateway not ready after {timeout}s ({last}):\n{self.logs()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    # -- observation ------------------------------------------------------------------------
    def url(self, path: str = "/", scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def admin_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.admin_port}{path}"

    def admin_get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.admin_url(path), timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def metrics(self) -> str:
        return self.admin_get("/metrics")[1].decode()

    def logs(self) -> str:
        out = ""
        for p in (self.stderr_path, self.stdout_path):
            if p.exists():
                out += p.read_text(errors="replace")
        return out

    def access_log(self, min_lines: int = 1, timeout: float = 5.0) -> list[dict]:
        """Access-log records; waits (bounded) until at least `min_lines` were flushed."""
        deadline = time.monotonic() + timeout
        while True:
            lines = []
            if self.access_log_path.exists():
                lines = [json.loads(l) for l in self.access_log_path.read_text().splitlines() if l.strip()]
            if len(lines) >= min_lines or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)


def metric(text: str, name: str, **labels) -> float:
    """The sum of the samples of `name` in a /metrics text whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total
