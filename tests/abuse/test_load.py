"""Load and connection limits (issue 7): many idle connections, total and per-IP caps.

Real sockets on loopback against the in-process server; client sockets can be bound to
other loopback source addresses (127.0.0.2, ...) to stand for other client IPs.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import ssl
import time

import pytest

from mailrelay.smtp.session import Port
from tests.support.client import RawSMTP
from tests.support.relay import HOSTNAME

IDLE_CONNECTIONS = 1000
# Both ends of every connection live in this process, plus the server's own files.
NEEDED_FILES = 2 * IDLE_CONNECTIONS + 100


async def connect(port: int, source: str | None = None, greeting: bool = True,
                  tls=None) -> RawSMTP:
    """RawSMTP.connect, optionally from another loopback source address."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, local_addr=(source, 0) if source else None,
        ssl=tls, server_hostname=HOSTNAME if tls else None)
    client = RawSMTP(reader, writer)
    if greeting:
        code, lines = await client.reply()
        assert code == 220, (code, lines)
    return client


async def close_all(clients: list[RawSMTP]) -> None:
    for client in clients:
        client.writer.close()
    for client in clients:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.writer.wait_closed(), 5)


async def wait_no_sessions(env, timeout: float = 10.0) -> None:
    """The server's connection counters are back to zero (every slot released)."""
    limits = env.server.listeners.limits
    deadline = time.monotonic() + timeout
    while limits.total or limits.per_ip:
        assert time.monotonic() < deadline, (limits.total, dict(limits.per_ip))
        await asyncio.sleep(0.05)


async def refused(client: RawSMTP) -> None:
    code, lines = await client.reply()
    assert code == 421 and lines[0].startswith("4.7.0"), (code, lines)
    assert await client.at_eof(), "a refused connection is closed by the server"


@pytest.fixture
def many_files():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < NEEDED_FILES:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {NEEDED_FILES}: cannot hold "
                    f"{IDLE_CONNECTIONS} connections (both ends) in one process")
    wanted = 4 * NEEDED_FILES if hard == resource.RLIM_INFINITY else min(hard, 4 * NEEDED_FILES)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield
    with contextlib.suppress(ValueError, OSError):  # fails only while files are still open
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.timeout(60)
async def test_thousand_idle_connections_do_not_starve_a_new_client(env, many_files):
    env.write_config(limits={"max_connections": IDLE_CONNECTIONS + 100,
                             "max_connections_per_ip": IDLE_CONNECTIONS + 100,
                             "command_timeout": "2m", "auth_failure_delay": "0s"})
    env.add_user()
    await env.start()
    port = env.ports["smtp"]
    idle: list[RawSMTP] = []
    gate = asyncio.Semaphore(100)  # stay well inside the listen backlog

    async def open_one() -> None:
        async with gate:
            idle.append(await connect(port))

    try:
        started = time.monotonic()
        results = await asyncio.gather(*(open_one() for _ in range(IDLE_CONNECTIONS)),
                                       return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        assert not failures, f"{len(failures)} connections failed, e.g. {failures[0]!r}"
        assert len(idle) == IDLE_CONNECTIONS
        assert env.server.listeners.limits.total == IDLE_CONNECTIONS
        opened_in = time.monotonic() - started

        # A new client is served at once, idle ones notwithstanding.
        t0 = time.monotonic()
        fresh = await connect(port)
        code, lines = await fresh.cmd("EHLO client.test")
        elapsed = time.monotonic() - t0
        assert code == 250 and lines[0] == HOSTNAME
        assert elapsed < 1.0, f"greeting + EHLO took {elapsed:.3f}s with 1000 idle clients"
        code = await fresh.send_message("a@elsewhere.test", ["me@example.com"],
                                        b"Subject: under load\r\n\r\nhello\r\n")
        assert code == 250
        assert (await fresh.cmd("QUIT"))[0] == 221
        await fresh.close()

        # The idle ones are still alive and answer (the first, the last, a sample).
        for client in [*idle[:: IDLE_CONNECTIONS // 10], idle[-1]]:
            assert (await client.cmd("NOOP"))[0] == 250
        print(f"opened {IDLE_CONNECTIONS} connections in {opened_in:.2f}s; "
              f"new client's greeting + EHLO in {elapsed * 1000:.1f} ms")
    finally:
        await close_all(idle)
    await wait_no_sessions(env)


async def test_connection_limits_per_listener_kind(env):
    """Each listener kind has its own pool (issue 16, row 8): idle port-25 clients fill
    port 25's and leave submission alone."""
    env.write_config(limits={"max_connections": 20, "max_connections_per_ip": 100,
                             "submission_tls": {"max_connections": 5},
                             "auth_failure_delay": "0s"})
    env.add_user()
    await env.start()
    ports = env.ports
    pools = env.server.listeners.limits.pools
    clients: list[RawSMTP] = []
    try:
        for index in range(20):  # from two addresses: the limit is the kind's, in all
            clients.append(await connect(ports["smtp"], source=f"127.0.0.{1 + index % 2}"))
        assert pools[Port.SMTP].total == 20
        await refused(await connect(ports["smtp"], greeting=False))
        await refused(await connect(ports["smtp"], source="127.0.0.3", greeting=False))
        # Submission is not starved: its own 20, then refused too.
        for _ in range(20):
            clients.append(await connect(ports["submission"]))
        await refused(await connect(ports["submission"], greeting=False))
        # 465 has 5 (limits.submission_tls); the 6th is closed before any TLS handshake
        # (a handshake is what a flood of silent connections wants from us).
        for _ in range(5):
            clients.append(await connect(ports["submission_tls"], tls=env.client_tls()))
        with pytest.raises((ConnectionError, ssl.SSLError)):
            await connect(ports["submission_tls"], tls=env.client_tls())
        assert env.server.listeners.limits.total == 45
        # The slots taken are still fine.
        assert (await clients[0].cmd("NOOP"))[0] == 250
        assert (await clients[-1].cmd("NOOP"))[0] == 250
        # One leaves: its slot is free again.
        await clients.pop(0).close()
        await asyncio.sleep(0.2)
        clients.append(await connect(ports["smtp"]))
        await refused(await connect(ports["smtp"], greeting=False))
    finally:
        await close_all(clients)
    await wait_no_sessions(env)


async def test_per_ip_connection_limit_spares_other_addresses(env):
    env.write_config(limits={"max_connections": 100, "max_connections_per_ip": 5,
                             "auth_failure_delay": "0s"})
    env.add_user()
    await env.start()
    port = env.ports["smtp"]
    clients: list[RawSMTP] = []
    try:
        for _ in range(5):
            clients.append(await connect(port))
        for _ in range(3):  # every further one, not just the 6th
            await refused(await connect(port, greeting=False))
        # Another address is not affected, up to its own 5.
        for _ in range(5):
            other = await connect(port, source="127.0.0.2")
            clients.append(other)
        assert (await other.cmd("EHLO other.test"))[0] == 250
        await refused(await connect(port, source="127.0.0.2", greeting=False))
        assert dict(env.server.listeners.limits.per_ip) == {"127.0.0.1": 5, "127.0.0.2": 5}
        # The refusals did not leak slots: closing one from 127.0.0.1 admits one more.
        await clients.pop(0).close()
        await asyncio.sleep(0.2)
        clients.append(await connect(port))
        await refused(await connect(port, greeting=False))
    finally:
        await close_all(clients)
    await wait_no_sessions(env)
