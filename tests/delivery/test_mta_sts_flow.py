"""MTA-STS through the whole server: policies fetched over real HTTPS on loopback decide
which MX hosts of remote.test may get mail, and with what TLS."""

from __future__ import annotations

import asyncio
import logging

import pytest
import trustme

from mailrelay.queue import PENDING
from tests.support.https_server import PolicyServer
from tests.support.relay import RelayEnv
from tests.support.sink import Sink

MESSAGE = b"From: me@example.com\r\nTo: friend@remote.test\r\nSubject: sts\r\n\r\nbody\r\n"


def policy(mode: str, *mx: str) -> str:
    return "version: STSv1\nmode: {}\n{}max_age: 86400\n".format(
        mode, "".join(f"mx: {m}\n" for m in mx))


@pytest.fixture
def https(ca):
    with PolicyServer(ca, ["remote.test"], host="127.0.0.1") as server:
        yield server


@pytest.fixture
def sts_env(env: RelayEnv, https: PolicyServer) -> RelayEnv:
    """The server's policy fetches go to our HTTPS server; remote.test publishes a record."""
    env.write_config(delivery={"mta_sts_port": https.port})
    env.dns.add("_mta-sts.remote.test", "TXT", "v=STSv1; id=1")
    env.dns.add("mta-sts.remote.test", "A", https.host)
    return env


def untrusted_sink(env: RelayEnv, ip: str, hostname: str) -> Sink:
    """An MX whose certificate names it correctly but comes from a CA nobody trusts."""
    return env.add_sink(ip, hostname=hostname, ca=trustme.CA())


async def wait_attempted(env: RelayEnv, timeout: float = 10.0) -> str:
    """The last error of the queued message's recipient once an attempt has failed."""
    assert env.server is not None
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        for item in list(env.server.queue.items.values()):
            for rcpt in item.recipients:
                if rcpt.attempts and rcpt.last_error:
                    return rcpt.last_error
        await asyncio.sleep(0.05)
    raise AssertionError("no failed delivery attempt")


async def test_enforce_skips_mx_not_in_policy(sts_env, https, caplog):
    caplog.set_level(logging.INFO, logger="mailrelay")
    https.set("remote.test", policy("enforce", "mx2.remote.test"))
    # The preferred MX is not in the policy: enforce must not even try it.
    sts_env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"),
                   (20, "mx2.remote.test", "127.0.0.3"))
    outside = sts_env.add_sink("127.0.0.2", hostname="mx1.remote.test")
    listed = sts_env.add_sink("127.0.0.3", hostname="mx2.remote.test")
    await sts_env.start()
    await sts_env.submit(["friend@remote.test"], MESSAGE)
    [received] = await listed.until(1)
    assert received.recipients == ["friend@remote.test"]
    assert received.tls
    await sts_env.wait_queue_empty()
    assert outside.messages == []
    assert https.count("remote.test") == 1
    assert "mx1.remote.test" in caplog.text and "not in the policy" in caplog.text
    # The policy is kept on disk for the next start.
    assert (sts_env.data_dir / "mta-sts" / "remote.test.json").is_file()


async def test_enforce_refuses_untrusted_certificate(sts_env, https, caplog):
    caplog.set_level(logging.INFO, logger="mailrelay")
    https.set("remote.test", policy("enforce", "mx1.remote.test"))
    sts_env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    sink = untrusted_sink(sts_env, "127.0.0.2", "mx1.remote.test")
    await sts_env.start()
    await sts_env.submit(["friend@remote.test"], MESSAGE)
    error = await wait_attempted(sts_env)
    assert error.startswith("451 4.7.5") and "MTA-STS" in error
    assert "certificate" in error
    # Kept for a retry (a temporary failure), and never handed over without verification.
    assert sts_env.server is not None
    [item] = sts_env.server.queue.items.values()
    assert [r.status for r in item.recipients] == [PENDING]
    assert sink.messages == []
    assert "MTA-STS" in caplog.text and "mx1.remote.test" in caplog.text


async def test_testing_mode_delivers_to_untrusted_and_logs(sts_env, https, caplog):
    caplog.set_level(logging.INFO, logger="mailrelay")
    https.set("remote.test", policy("testing", "mx1.remote.test"))
    sts_env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    sink = untrusted_sink(sts_env, "127.0.0.2", "mx1.remote.test")
    await sts_env.start()
    await sts_env.submit(["friend@remote.test"], MESSAGE)
    [received] = await sink.until(1)
    assert received.recipients == ["friend@remote.test"]
    assert received.tls  # encrypted, just not verified
    await sts_env.wait_queue_empty()
    assert https.count("remote.test") == 1
    assert "MTA-STS testing" in caplog.text and "enforce would have refused" in caplog.text


async def test_enforce_with_trusted_certificate_delivers(sts_env, https):
    https.set("remote.test", policy("enforce", "*.remote.test"))
    sts_env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    sink = sts_env.add_sink("127.0.0.2", hostname="mx1.remote.test")
    await sts_env.start()
    await sts_env.submit(["friend@remote.test"], MESSAGE)
    [received] = await sink.until(1)
    assert received.tls
    await sts_env.wait_queue_empty()
