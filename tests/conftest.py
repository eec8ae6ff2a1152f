"""Shared fixtures: the loopback test network (DNS, CA, sinks) and the server under test."""

from __future__ import annotations

import pytest
import trustme

from tests.support.relay import RelayEnv, free_port

pytest_plugins = ["tests.support.fixtures_dns"]


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def env(tmp_path, dns_server, ca):
    """Everything but a started server: tests adjust config, sinks and DNS first."""
    relay_env = RelayEnv(root=tmp_path, dns=dns_server, ca=ca, sink_port=free_port())
    relay_env.write_config()
    relay_env.add_user()
    yield relay_env
    await relay_env.stop()
    relay_env.close()


@pytest.fixture
async def relay(env):
    """A started server with remote.test's MX (127.0.0.2) answered by a sink."""
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    env.sink = env.add_sink("127.0.0.2")
    await env.start()
    return env
