"""Backscatter (issue 16, row 6): port-25 mail with a forged ``MAIL FROM:<victim@…>
RET=FULL`` to an alias that forwards elsewhere, whose target answers 550. The DSN goes
back through the SRS address to the address in MAIL FROM; with a sender the inbound checks
did not verify (no SPF or DMARC pass), it carries only the headers, never the content."""

from __future__ import annotations

import email
import email.policy

import pytest

from tests.support.client import RawSMTP
from tests.support.dkim_dns import publish_new_key
from tests.support.sink import SinkBehaviour

SPAM = (b"From: Someone <someone@spam.test>\r\n"
        b"To: anything@example.com\r\n"
        b"Subject: cheap pills\r\n"
        b"Message-ID: <spam1@spam.test>\r\n"
        b"\r\n"
        b"BUY CHEAP PILLS AT http://spam.test/\r\n")


@pytest.fixture
async def forwarding(env):
    """example.com forwards everything to me@gmail.test, which refuses it (550);
    victim.test publishes nothing; sender.test passes SPF for 127.0.0.1."""
    directory = env.config_dir / "domains" / "example.com"
    (directory / "aliases").write_text("postmaster: me\n*: me@gmail.test\n")
    publish_new_key(env.dns, directory, "example.com", "rsa1", "rsa2048")
    env.add_mx("gmail.test", (10, "mx.gmail.test", "127.0.0.7"))
    env.add_mx("victim.test", (10, "mx.victim.test", "127.0.0.8"))
    env.add_mx("sender.test", (10, "mx.sender.test", "127.0.0.9"))
    env.dns.add("sender.test", "TXT", "v=spf1 ip4:127.0.0.1 -all")
    env.gmail = env.add_sink("127.0.0.7", hostname="mx.gmail.test")
    env.gmail.behaviour = SinkBehaviour(rcpt=lambda a: "550 5.7.1 this message is spam")
    env.victim = env.add_sink("127.0.0.8", hostname="mx.victim.test")
    env.sender_mx = env.add_sink("127.0.0.9", hostname="mx.sender.test")
    await env.start()
    return env


async def send(env, sender: str, data: bytes) -> None:
    client = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
    await client.cmd("EHLO mx.elsewhere.test")
    assert (await client.cmd(f"MAIL FROM:<{sender}> RET=FULL"))[0] == 250
    assert (await client.cmd("RCPT TO:<random@example.com>"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354
    client.writer.write(data + b".\r\n")
    assert (await client.reply())[0] == 250
    await client.cmd("QUIT")
    await client.close()


def returned_part(dsn: bytes) -> email.message.Message:
    message = email.message_from_bytes(dsn, policy=email.policy.default)
    assert message.get_content_type() == "multipart/report"
    parts = message.get_payload()
    assert len(parts) == 3
    return parts[2]


async def test_unverified_sender_gets_headers_only(forwarding):
    env = forwarding
    await send(env, "victim@victim.test", SPAM)
    [dsn] = await env.victim.until(1)
    assert dsn.recipients == ["victim@victim.test"]
    returned = returned_part(dsn.data)
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"Subject: cheap pills" in dsn.data
    assert b"BUY CHEAP PILLS" not in dsn.data, "the content goes back to no unverified sender"
    notice = email.message_from_bytes(dsn.data, policy=email.policy.default).get_payload()[0]
    assert "could not be verified" in " ".join(notice.get_content().split())  # the reason
    await env.wait_queue_empty()


async def test_verified_sender_gets_the_full_message(forwarding):
    """SPF passes for sender.test: its RET=FULL is honoured."""
    env = forwarding
    await send(env, "alice@sender.test", SPAM.replace(b"spam.test>", b"sender.test>"))
    [dsn] = await env.sender_mx.until(1)
    assert dsn.recipients == ["alice@sender.test"]
    returned = returned_part(dsn.data)
    assert returned.get_content_type() == "message/rfc822"
    assert b"BUY CHEAP PILLS" in dsn.data
    await env.wait_queue_empty()
