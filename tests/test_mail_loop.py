"""Issue 16 row 3: a mail loop between two real mailrelay servers on loopback.

a@a.test forwards to b@b.test and b@b.test back to a@a.test. Each server listens on
port 25 (the same port number on its own loopback address, which is what
delivery.smtp_port reaches), finds the other through the test DNS server's MX records,
and forwards with SRS. The loop ends when one of them is offered the message with
max_hops Received: fields (its own included): it answers 554 5.4.6 at DATA, so the
server that tried gives up on that one recipient and its bounce travels back through
the SRS addresses to the original sender, once.
"""

from __future__ import annotations

import asyncio
import logging
import re

import pytest

from bench.ports import free_port
from mailrelay.message.headers import count, parse_headers
from tests.support.client import RawSMTP
from tests.support.relay import RelayEnv

MAX_HOPS = 12  # small, to keep the test quick; the default (50) is tested in one server
IPS = {"a.test": "127.0.0.10", "b.test": "127.0.0.11", "sender.test": "127.0.0.12"}


@pytest.fixture
async def pair(tmp_path, dns_server, ca):
    port = free_port()
    servers = {}
    for domain, target in (("a.test", "b@b.test"), ("b.test", "a@a.test")):
        env = RelayEnv(root=tmp_path / domain, dns=dns_server, ca=ca, sink_port=port)
        env.write_config(listen={"smtp": [f"{IPS[domain]}:{port}"]},
                         limits={"max_hops": MAX_HOPS, "auth_failure_delay": "0s"})
        env.add_domain(domain)
        (env.config_dir / "domains" / domain / "aliases").write_text(
            f"{domain[0]}: {target}\n")
        env.add_mx(domain, (10, f"mx.{domain}", IPS[domain]))
        servers[domain] = env
    env_a = servers["a.test"]
    env_a.add_mx("sender.test", (10, "mx.sender.test", IPS["sender.test"]))
    alice = env_a.add_sink(IPS["sender.test"], hostname="mx.sender.test")
    for env in servers.values():
        await env.start()
    yield servers, alice, port
    for env in servers.values():
        await env.stop()
        env.close()


async def test_a_loop_between_two_servers_ends_with_one_bounce(pair, caplog):
    (servers, alice, port) = pair
    caplog.set_level(logging.INFO, "mailrelay.mail")
    client = await RawSMTP.connect(IPS["a.test"], port)
    await client.cmd("EHLO mx.sender.test")
    message = (b"From: Alice <alice@sender.test>\r\nTo: a@a.test\r\nSubject: round\r\n"
               b"Message-ID: <loop@sender.test>\r\n\r\nand round\r\n")
    assert await client.send_message("alice@sender.test", ["a@a.test"], message) == 250
    await client.close()

    [bounce] = await alice.until(1, timeout=30)
    assert bounce.sender == "<>" and bounce.recipients == ["alice@sender.test"]
    assert b"multipart/report" in bounce.data
    assert re.search(rb"Status: 5\.4\.6", bounce.data), bounce.data[:2000]
    # The returned message carries the hops it made: one short of the limit, the next
    # server refused it.
    part = re.search(rb"Content-Type: (?:message/rfc822|text/rfc822-headers)\r\n"
                     rb"(?:[^\r\n]+\r\n)*\r\n", bounce.data)
    assert part, bounce.data[:2000]
    returned = bounce.data[part.end():]
    hops = count(parse_headers(returned), "Received")
    assert hops == MAX_HOPS - 1, hops
    # The refusal, in the log of the server that tried: one permanent delivery failure.
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("delivery ")
               and "result=permanent" in r.getMessage()]
    assert len(refused) == 1 and '"554 5.4.6' in refused[0], refused
    forwards = [r.getMessage() for r in caplog.records if r.getMessage().startswith("queued ")]
    print(f"\nhops: {hops} Received: fields when refused; {len(forwards)} messages queued "
          "in all (the first and the forwards)")

    for env in servers.values():
        await env.wait_queue_empty(timeout=30)
    await asyncio.sleep(1.5)  # a retry would come after 1s: there is none, and no 2nd bounce
    assert len(alice.messages) == 1
