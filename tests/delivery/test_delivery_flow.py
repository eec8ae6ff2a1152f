"""Outbound delivery through the test DNS to sinks: MX order, fallbacks, retries, bounces."""

from __future__ import annotations

import asyncio
import email
import email.policy

from tests.support.sink import SinkBehaviour

MESSAGE = b"From: me@example.com\r\nTo: x@remote.test\r\nSubject: t\r\n\r\nbody\r\n"


def parse_dsn(data: bytes) -> tuple[email.message.Message, list]:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    status_part = next(p for p in message.walk()
                       if p.get_content_type() == "message/delivery-status")
    return message, status_part.get_payload()


async def test_first_mx_refuses_connections_second_receives(env):
    # Nothing listens on 127.0.0.3: connection refused, so the next MX is tried.
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.3"),
               (20, "mx2.remote.test", "127.0.0.4"))
    sink = env.add_sink("127.0.0.4")
    await env.start()
    await env.submit(["friend@remote.test"], MESSAGE)
    [received] = await sink.until(1)
    assert received.recipients == ["friend@remote.test"]
    await env.wait_queue_empty()


async def test_a_record_fallback_without_mx(env):
    env.dns.add("nomx.test", "A", "127.0.0.5")
    sink = env.add_sink("127.0.0.5")
    await env.start()
    await env.submit(["friend@nomx.test"], MESSAGE)
    [received] = await sink.until(1)
    assert received.recipients == ["friend@nomx.test"]


async def test_recipients_of_one_domain_share_a_transaction(relay):
    await relay.submit(["a@remote.test", "b@remote.test"], MESSAGE)
    [received] = await relay.sink.until(1)
    assert sorted(received.recipients) == ["a@remote.test", "b@remote.test"]


async def test_null_mx_bounces_at_once(env):
    env.dns.add("nullmx.test", "MX", (0, "."))
    await env.start()
    await env.submit(["friend@nullmx.test"], MESSAGE)
    [dsn] = await env.wait_mailbox(1, timeout=5)
    _, blocks = parse_dsn(dsn.split(b"\r\n", 2)[2])  # skip Return-Path/Delivered-To
    recipient = blocks[1]
    assert recipient["Final-Recipient"].endswith("friend@nullmx.test")
    assert recipient["Action"] == "failed"
    assert recipient["Status"] == "5.1.10"
    await env.wait_queue_empty()
    assert env.dns.queries.count(("nullmx.test", "MX")) == 1, "null MX must not be retried"


async def test_5xx_from_remote_bounces_to_sender(relay):
    relay.sink.behaviour = SinkBehaviour(
        rcpt=lambda addr: "550 5.1.1 no such mailbox" if addr.startswith("bad") else None)
    await relay.submit(["bad@remote.test", "good@remote.test"], MESSAGE)
    [received] = await relay.sink.until(1)
    assert received.recipients == ["good@remote.test"]
    [dsn] = await relay.wait_mailbox(1)
    assert b"Return-Path: <>" in dsn
    _, blocks = parse_dsn(dsn.split(b"\r\n", 2)[2])
    assert blocks[1]["Status"] == "5.1.1"
    assert "no such mailbox" in blocks[1]["Diagnostic-Code"]
    assert blocks[1]["Final-Recipient"].endswith("bad@remote.test")
    assert len(blocks) == 2, "only the failed recipient is reported"
    await relay.wait_queue_empty()


async def test_4xx_is_retried_and_delivered_later(relay):
    relay.sink.behaviour = SinkBehaviour(data="451 4.3.0 try again later")
    await relay.submit(["friend@remote.test"], MESSAGE)
    item = next(iter(relay.server.queue.items.values()))
    # Wait for the first (failed) attempt to be recorded on disk.
    for _ in range(200):
        if item.attempts >= 1:
            break
        await asyncio.sleep(0.05)
    assert item.attempts >= 1
    assert item.recipients[0].last_error.startswith("451")
    assert relay.server.queue.state_path(item).exists(), "status is persisted after an attempt"
    relay.sink.behaviour = SinkBehaviour()
    [received] = await relay.sink.until(1, timeout=15)
    assert received.recipients == ["friend@remote.test"]
    await relay.wait_queue_empty()
    assert relay.mailbox() == [], "a retried delivery produces no bounce"


async def test_no_dsn_for_null_sender(env):
    """A bounce that bounces is dropped, never sent back to <>."""
    env.dns.add("nullmx.test", "MX", (0, "."))
    await env.start()
    item = await env.server.intake.generated("", ["someone@nullmx.test"], MESSAGE)
    await env.wait_queue_empty()
    assert env.mailbox() == []
    assert not item.path.exists()


async def test_queue_survives_restart(env):
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.6"))
    await env.start()  # no sink yet: connections to 127.0.0.6 are refused
    for n in range(3):
        await env.submit([f"friend{n}@remote.test"], MESSAGE + f"n={n}\r\n".encode())
    assert len(env.server.queue.items) == 3
    await env.stop()
    queue_dir = env.data_dir / "queue"
    assert len(list(queue_dir.glob("*.msg"))) == 3
    sink = env.add_sink("127.0.0.6")
    await env.start()
    received = await sink.until(3)
    await env.wait_queue_empty()
    assert sorted(r.recipients[0] for r in received) == [
        "friend0@remote.test", "friend1@remote.test", "friend2@remote.test"]
    assert len(sink.messages) == 3, "every item is delivered exactly once"
    assert list(queue_dir.glob("*.msg")) == []


async def test_ipv6_only_mx(env):
    env.add_mx("v6.test", (10, "mx.v6.test", "::1"))
    sink = env.add_sink("::1")
    await env.start()
    await env.submit(["friend@v6.test"], MESSAGE)
    [received] = await sink.until(1)
    assert received.recipients == ["friend@v6.test"]
    assert received.peer == "::1"
