"""Shared fixtures: real upstreams and the real gateway binary on 127.0.0.1."""

from __future__ import annotations

import pytest

from tests.support.echo import EchoServer
from tests.support.gateway import GatewayProcess
from tests.support.ports import free_port  # noqa: F401  (re-exported for tests)


@pytest.fixture
def upstream_echo():
    server = EchoServer().start()
    yield server
    server.stop()


@pytest.fixture
def start_gateway(tmp_path):
    started: list[GatewayProcess] = []

    def start(toml: str, **kw) -> GatewayProcess:
        gw = GatewayProcess(toml, tmp_path, name=f"gateway{len(started)}", **kw)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture
def certs(tmp_path):
    from tests.support.certs import make_certs
    return make_certs(tmp_path / "certs")
