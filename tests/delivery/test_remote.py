"""Outbound SMTP: TLS states, MTA-STS enforcement, connection limits and reuse.

Real sinks (aiosmtpd) on 127.0.0.x, the real test DNS server and certificates from the
test CA; only the MTA-STS policy source is a stand-in here (fetching policies over HTTPS
is tested in test_mta_sts.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import trustme

from mailrelay.config import DNSSettings
from mailrelay.delivery.remote import RemoteDelivery
from mailrelay.delivery.results import Outcome, verifying_tls_context
from mailrelay.dnsresolver import make_resolver
from tests.support.sink import SinkBehaviour

MESSAGE = b"From: me@example.com\r\nTo: x@remote.test\r\nSubject: t\r\n\r\nbody\r\n"
SENDER = "me@example.com"


@pytest.fixture(scope="module")
def other_ca() -> trustme.CA:
    """A CA the relay does not trust."""
    return trustme.CA()


@contextlib.asynccontextmanager
async def remote_delivery(env, **kwargs) -> AsyncIterator[RemoteDelivery]:
    resolver = make_resolver(DNSSettings(nameservers=[("127.0.0.1", env.dns.port)],
                                         timeout=2.0))
    settings = {"smtp_port": env.sink_port, "connect_timeout": 3.0, "command_timeout": 10.0,
                "verify_context": verifying_tls_context(env.config_dir / "test-ca.pem"),
                **kwargs}
    remote = RemoteDelivery("mail.example.com", resolver, **settings)
    try:
        yield remote
    finally:
        await remote.close()


@dataclass(frozen=True)
class Policy:
    mode: str
    mx: tuple[str, ...]

    def matches(self, mx_host: str) -> bool:
        for pattern in self.mx:
            if pattern.startswith("*."):
                head, _, rest = mx_host.partition(".")
                if head and rest == pattern[2:]:
                    return True
            elif pattern == mx_host:
                return True
        return False


class Policies:
    def __init__(self, **by_domain: Policy):
        self.by_domain = {d.replace("_", "."): p for d, p in by_domain.items()}

    async def policy_for(self, domain: str) -> Policy | None:
        return self.by_domain.get(domain)


# -- TLS states ---------------------------------------------------------------------


async def test_verified_when_the_certificate_names_the_mx_host(env):
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    sink = env.add_sink("127.0.0.2", hostname="mx1.remote.test")
    async with remote_delivery(env) as remote:
        [result] = await remote.deliver("remote.test", SENDER, ["a@remote.test"], MESSAGE)
    assert (result.outcome, result.tls, result.remote_host) == (
        Outcome.SENT, "verified", "mx1.remote.test")
    assert result.tls_version == "TLSv1.3"
    assert sink.messages[0].tls
    assert sink.connections == 1


async def test_unverified_with_a_certificate_from_an_unknown_ca(env, other_ca, caplog):
    caplog.set_level(logging.INFO, "mailrelay.delivery")
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    sink = env.add_sink("127.0.0.2", hostname="mx1.remote.test", ca=other_ca)
    async with remote_delivery(env, connection_idle_time=0) as remote:
        [result] = await remote.deliver("remote.test", SENDER, ["a@remote.test"], MESSAGE)
        assert (result.outcome, result.tls) == (Outcome.SENT, "unverified")
        assert sink.messages[0].tls, "still encrypted"
        assert sink.connections == 2, "one verifying handshake, then one without"
        assert "certificate does not verify" in caplog.text
        # The host is remembered: the next message goes straight to unverified TLS.
        [result] = await remote.deliver("remote.test", SENDER, ["b@remote.test"], MESSAGE)
        assert result.tls == "unverified"
        assert sink.connections == 3


async def test_unverified_when_the_certificate_names_another_host(env):
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    sink = env.add_sink("127.0.0.2", hostname="somewhere-else.test")
    async with remote_delivery(env) as remote:
        [result] = await remote.deliver("remote.test", SENDER, ["a@remote.test"], MESSAGE)
    assert (result.outcome, result.tls) == (Outcome.SENT, "unverified")
    assert sink.messages[0].tls


async def test_plain_without_starttls(env):
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    sink = env.add_sink("127.0.0.2", tls=False)
    async with remote_delivery(env) as remote:
        [result] = await remote.deliver("remote.test", SENDER, ["a@remote.test"], MESSAGE)
    assert (result.outcome, result.tls) == (Outcome.SENT, "plain")
    assert result.tls_version is None
    assert not sink.messages[0].tls
    assert sink.connections == 1


async def test_failed_handshake_falls_back_to_plain_when_allowed(env):
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    sink = env.add_sink("127.0.0.2", hostname="mx1.remote.test")
    sink.behaviour = SinkBehaviour(break_tls=True)
    async with remote_delivery(env, tls_fallback_plain=True) as remote:
        [result] = await remote.deliver("remote.test", SENDER, ["a@remote.test"], MESSAGE)
    assert (result.outcome, result.tls) == (Outcome.SENT, "plain")
    assert not sink.messages[0].tls
    assert sink.connections == 2, "the broken handshake, then a new connection in the clear"


async def test_failed_handshake_is_temporary_without_fallback(env):
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    sink = env.add_sink("127.0.0.2", hostname="mx1.remote.test")
    sink.behaviour = SinkBehaviour(break_tls=True)
    async with remote_delivery(env, tls_fallback_plain=False) as remote:
        [result] = await remote.deliver("remote.test", SENDER, ["a@remote.test"], MESSAGE)
    assert result.outcome is Outcome.TEMPORARY
    assert result.reply.startswith("451 4.7.5 ")
    assert "TLS handshake failed" in result.reply
    assert sink.messages == []
    assert sink.connections == 1


async def test_relay_records_tls_state_and_obeys_fallback_setting(env, caplog):
    """Through the server: the settings reach delivery and the state is logged."""
    caplog.set_level(logging.INFO, "mailrelay.delivery")
    env.write_config(delivery={"tls_fallback_plain": False})
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    env.add_mx("broken.test", (10, "mx.broken.test", "127.0.0.3"))
    good = env.add_sink("127.0.0.2", hostname="mx1.remote.test")
    broken = env.add_sink("127.0.0.3", hostname="mx.broken.test")
    broken.behaviour = SinkBehaviour(break_tls=True)
    await env.start()
    await env.submit(["friend@remote.test"], MESSAGE)
    await good.until(1)
    await env.submit(["friend@broken.test"], MESSAGE)
    item = next(iter(env.server.queue.items.values()))
    for _ in range(200):
        if item.attempts >= 1:
            break
        await asyncio.sleep(0.05)
    assert item.recipients[0].last_error.startswith("451 4.7.5")
    assert broken.messages == [], "no delivery in the clear when tls_fallback_plain is false"
    assert "mx1.remote.test [127.0.0.2] for remote.test: tls=verified" in caplog.text


# -- connection reuse and limits ---------------------------------------------------


async def test_a_burst_to_one_domain_reuses_connections(env):
    env.write_config(delivery={"connection_idle_time": "30s"})
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    sink = env.add_sink("127.0.0.2", hostname="mx1.remote.test")
    await env.start()
    count = 8
    for n in range(count):
        await env.submit([f"friend{n}@remote.test"], MESSAGE + f"n={n}\r\n".encode())
    await sink.until(count)
    await env.wait_queue_empty()
    assert sink.connections < count
    assert all(m.tls for m in sink.messages)
    await env.stop()  # closes the idle connections
    await asyncio.to_thread(sink.wait_idle, 5)


async def test_sequential_messages_share_one_connection(env):
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    sink = env.add_sink("127.0.0.2", hostname="mx1.remote.test")
    async with remote_delivery(env, connection_idle_time=30) as remote:
        for n in range(3):
            [result] = await remote.deliver("remote.test", SENDER, [f"r{n}@remote.test"],
                                            MESSAGE)
            assert (result.outcome, result.tls) == (Outcome.SENT, "verified")
        assert sink.connections == 1
        assert sink.state.active == 1, "kept open while idle"
    await asyncio.to_thread(sink.wait_idle, 5)  # close() ended it


async def test_idle_connections_are_closed_after_the_idle_time(env):
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    sink = env.add_sink("127.0.0.2", hostname="mx1.remote.test")
    async with remote_delivery(env, connection_idle_time=0.3) as remote:
        await remote.deliver("remote.test", SENDER, ["a@remote.test"], MESSAGE)
        await asyncio.to_thread(sink.wait_idle, 5)
        [result] = await remote.deliver("remote.test", SENDER, ["b@remote.test"], MESSAGE)
        assert result.outcome is Outcome.SENT
        assert sink.connections == 2


async def test_a_stale_pooled_connection_is_replaced_silently(env):
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    sink = env.add_sink("127.0.0.2", hostname="mx1.remote.test")
    async with remote_delivery(env, connection_idle_time=30) as remote:
        await remote.deliver("remote.test", SENDER, ["a@remote.test"], MESSAGE)
        sink.behaviour = SinkBehaviour(rset="421 4.3.2 going away")
        [result] = await remote.deliver("remote.test", SENDER, ["b@remote.test"], MESSAGE)
        assert (result.outcome, result.tls) == (Outcome.SENT, "verified")
        assert sink.connections == 2
        assert len(sink.messages) == 2


async def test_a_pooled_connection_serves_another_domain_with_the_same_mx(env):
    env.add_mx("one.test", (10, "mx.shared.test", "127.0.0.2"))
    env.add_mx("two.test", (10, "mx.shared.test", "127.0.0.2"))
    sink = env.add_sink("127.0.0.2", hostname="mx.shared.test")
    async with remote_delivery(env, connection_idle_time=30) as remote:
        await remote.deliver("one.test", SENDER, ["a@one.test"], MESSAGE)
        [result] = await remote.deliver("two.test", SENDER, ["b@two.test"], MESSAGE)
        assert result.outcome is Outcome.SENT
        assert sink.connections == 1


async def test_per_domain_limit_with_a_slow_sink(env):
    env.write_config(delivery={"max_connections_per_domain": 2, "connection_idle_time": "30s",
                               "concurrency": 20})
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    sink = env.add_sink("127.0.0.2", hostname="mx1.remote.test")
    sink.behaviour = SinkBehaviour(delay=0.5)
    await env.start()
    count = 6
    await asyncio.gather(*(env.submit([f"friend{n}@remote.test"], MESSAGE + f"n={n}\r\n".encode())
                           for n in range(count)))
    await sink.until(count, timeout=20)
    await env.wait_queue_empty(timeout=20)
    assert sink.max_active == 2, "at most (and here: exactly) 2 connections at once"
    assert sink.connections == 2, "the two connections were reused"


async def test_total_limit_across_domains(env):
    # Three domains, three MX names, one sink: only the total limit applies.
    for n in range(3):
        env.add_mx(f"d{n}.test", (10, f"mx.d{n}.test", "127.0.0.2"))
    sink = env.add_sink("127.0.0.2", tls=False)
    sink.behaviour = SinkBehaviour(delay=0.3)
    async with remote_delivery(env, max_connections=2, max_connections_per_domain=10,
                               connection_idle_time=30) as remote:
        jobs = [remote.deliver(f"d{n % 3}.test", SENDER, [f"r{n}@d{n % 3}.test"], MESSAGE)
                for n in range(6)]
        results = await asyncio.gather(*jobs)
    assert all(r.outcome is Outcome.SENT for [r] in results)
    assert sink.max_active == 2


async def test_an_idle_connection_makes_room_for_a_waiting_delivery(env):
    env.add_mx("one.test", (10, "mx.one.test", "127.0.0.2"))
    env.add_mx("two.test", (10, "mx.two.test", "127.0.0.3"))
    one = env.add_sink("127.0.0.2", tls=False)
    two = env.add_sink("127.0.0.3", tls=False)
    async with remote_delivery(env, max_connections=1, connection_idle_time=60) as remote:
        await remote.deliver("one.test", SENDER, ["a@one.test"], MESSAGE)
        started = time.monotonic()
        [result] = await asyncio.wait_for(
            remote.deliver("two.test", SENDER, ["b@two.test"], MESSAGE), 10)
        assert result.outcome is Outcome.SENT
        assert time.monotonic() - started < 5, "did not wait for the idle time"
        await asyncio.to_thread(one.wait_idle, 5)
        assert two.connections == 1


# -- MX selection (unchanged behaviour) ----------------------------------------------


async def test_ipv6_address_tried_before_ipv4(env):
    # Nothing listens on [::1] at the sink port: refused, then the IPv4 address works.
    env.dns.add("remote.test", "MX", (10, "mx1.remote.test"))
    env.dns.add("mx1.remote.test", "AAAA", "::1")
    env.dns.add("mx1.remote.test", "A", "127.0.0.2")
    sink = env.add_sink("127.0.0.2", hostname="mx1.remote.test")
    async with remote_delivery(env) as remote:
        [result] = await remote.deliver("remote.test", SENDER, ["a@remote.test"], MESSAGE)
    assert result.outcome is Outcome.SENT
    assert sink.connections == 1


async def test_dns_failures(env):
    env.dns.add("remote.test", "MX", (10, "mx1.remote.test"))
    env.dns.set_servfail("remote.test")
    env.dns.add("nullmx.test", "MX", (0, "."))
    async with remote_delivery(env) as remote:
        [servfail] = await remote.deliver("remote.test", SENDER, ["a@remote.test"], MESSAGE)
        [nxdomain] = await remote.deliver("nowhere.test", SENDER, ["a@nowhere.test"], MESSAGE)
        [null] = await remote.deliver("nullmx.test", SENDER, ["a@nullmx.test"], MESSAGE)
    assert servfail.outcome is Outcome.TEMPORARY and servfail.reply.startswith("451 4.4.3")
    assert nxdomain.outcome is Outcome.PERMANENT and nxdomain.reply.startswith("550 5.1.2")
    assert null.outcome is Outcome.PERMANENT and null.reply.startswith("556 5.1.10")


# -- MTA-STS ----------------------------------------------------------------------------


ENFORCE = Policy("enforce", ("mx1.remote.test",))
TESTING = Policy("testing", ("mx1.remote.test",))


async def test_enforce_delivers_over_verified_tls(env):
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    sink = env.add_sink("127.0.0.2", hostname="mx1.remote.test")
    async with remote_delivery(env, policies=Policies(remote_test=ENFORCE)) as remote:
        [result] = await remote.deliver("remote.test", SENDER, ["a@remote.test"], MESSAGE)
    assert (result.outcome, result.tls) == (Outcome.SENT, "verified")
    assert sink.messages[0].tls


async def test_enforce_refuses_a_certificate_that_does_not_verify(env, other_ca, caplog):
    caplog.set_level(logging.INFO, "mailrelay.delivery")
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    sink = env.add_sink("127.0.0.2", hostname="mx1.remote.test", ca=other_ca)
    async with remote_delivery(env, policies=Policies(remote_test=ENFORCE)) as remote:
        [result] = await remote.deliver("remote.test", SENDER, ["a@remote.test"], MESSAGE)
    assert result.outcome is Outcome.TEMPORARY
    assert result.reply.startswith("451 4.7.5 MTA-STS: ")
    assert "certificate does not verify" in result.reply
    assert sink.messages == []
    assert sink.connections == 1, "no second try without verification"
    assert "MTA-STS" in caplog.text


async def test_enforce_refuses_a_host_without_starttls(env):
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    sink = env.add_sink("127.0.0.2", tls=False)
    async with remote_delivery(env, policies=Policies(remote_test=ENFORCE)) as remote:
        [result] = await remote.deliver("remote.test", SENDER, ["a@remote.test"], MESSAGE)
    assert result.outcome is Outcome.TEMPORARY
    assert result.reply.startswith("451 4.7.5 MTA-STS: ")
    assert "STARTTLS" in result.reply
    assert sink.messages == []


async def test_enforce_never_falls_back_to_plain(env):
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    sink = env.add_sink("127.0.0.2", hostname="mx1.remote.test")
    sink.behaviour = SinkBehaviour(break_tls=True)
    async with remote_delivery(env, tls_fallback_plain=True,
                               policies=Policies(remote_test=ENFORCE)) as remote:
        [result] = await remote.deliver("remote.test", SENDER, ["a@remote.test"], MESSAGE)
    assert result.outcome is Outcome.TEMPORARY
    assert result.reply.startswith("451 4.7.5 MTA-STS: ")
    assert sink.messages == []
    assert sink.connections == 1


async def test_enforce_skips_mx_hosts_outside_the_policy(env):
    env.add_mx("remote.test", (10, "mx0.remote.test", "127.0.0.2"),
               (20, "mx1.remote.test", "127.0.0.3"))
    outside = env.add_sink("127.0.0.2", hostname="mx0.remote.test")
    inside = env.add_sink("127.0.0.3", hostname="mx1.remote.test")
    async with remote_delivery(env, policies=Policies(remote_test=ENFORCE)) as remote:
        [result] = await remote.deliver("remote.test", SENDER, ["a@remote.test"], MESSAGE)
    assert (result.outcome, result.remote_host, result.tls) == (
        Outcome.SENT, "mx1.remote.test", "verified")
    assert outside.connections == 0
    assert len(inside.messages) == 1


async def test_enforce_with_no_matching_mx_is_temporary(env):
    env.add_mx("remote.test", (10, "mx0.remote.test", "127.0.0.2"))
    sink = env.add_sink("127.0.0.2", hostname="mx0.remote.test")
    async with remote_delivery(env, policies=Policies(remote_test=ENFORCE)) as remote:
        [result] = await remote.deliver("remote.test", SENDER, ["a@remote.test"], MESSAGE)
    assert result.outcome is Outcome.TEMPORARY
    assert result.reply.startswith("451 4.7.5 MTA-STS: no MX host of remote.test")
    assert sink.connections == 0


async def test_enforce_does_not_reuse_an_unverified_connection(env, other_ca):
    # other.test has no policy and leaves an unverified connection to the shared MX idle.
    env.add_mx("other.test", (10, "mx1.remote.test", "127.0.0.2"))
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    sink = env.add_sink("127.0.0.2", hostname="mx1.remote.test", ca=other_ca)
    async with remote_delivery(env, connection_idle_time=30,
                               policies=Policies(remote_test=ENFORCE)) as remote:
        [first] = await remote.deliver("other.test", SENDER, ["a@other.test"], MESSAGE)
        assert first.tls == "unverified"
        [result] = await remote.deliver("remote.test", SENDER, ["b@remote.test"], MESSAGE)
    assert result.outcome is Outcome.TEMPORARY
    assert result.reply.startswith("451 4.7.5 MTA-STS: ")
    assert len(sink.messages) == 1


async def test_testing_mode_delivers_and_warns(env, other_ca, caplog):
    caplog.set_level(logging.INFO, "mailrelay.delivery")
    env.add_mx("remote.test", (10, "mx0.remote.test", "127.0.0.2"),
               (20, "mx1.remote.test", "127.0.0.3"))
    env.add_sink("127.0.0.2", hostname="mx0.remote.test", ca=other_ca)
    async with remote_delivery(env, policies=Policies(remote_test=TESTING)) as remote:
        [result] = await remote.deliver("remote.test", SENDER, ["a@remote.test"], MESSAGE)
    assert (result.outcome, result.remote_host, result.tls) == (
        Outcome.SENT, "mx0.remote.test", "unverified")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("MTA-STS testing" in w and "mx0.remote.test" in w and "not in the policy" in w
               for w in warnings)
    assert any("enforce would have refused" in w for w in warnings)


async def test_testing_mode_is_quiet_when_enforce_would_agree(env, caplog):
    caplog.set_level(logging.INFO, "mailrelay.delivery")
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    env.add_sink("127.0.0.2", hostname="mx1.remote.test")
    async with remote_delivery(env, policies=Policies(remote_test=TESTING)) as remote:
        [result] = await remote.deliver("remote.test", SENDER, ["a@remote.test"], MESSAGE)
    assert (result.outcome, result.tls) == (Outcome.SENT, "verified")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
