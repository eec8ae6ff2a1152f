"""Faults around the server: DNS trouble, remote errors at every stage, a full disk,
broken files on reload. Nothing accepted is lost; every failure is retried or bounced."""

from __future__ import annotations

import asyncio
import email
import email.policy
import resource

import pytest

from tests.support.client import RawSMTP
from tests.support.process import start_server
from tests.support.relay import PASSWORD, USER
from tests.support.sink import SinkBehaviour

MESSAGE = b"From: me@example.com\r\nTo: friend@remote.test\r\nSubject: f\r\n\r\nbody\r\n"


async def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def only_item(env):
    [item] = env.server.queue.items.values()
    return item


@pytest.mark.parametrize("trouble", ["down", "servfail"])
async def test_dns_trouble_is_temporary_then_delivered(env, trouble):
    env.write_config(dns={"nameservers": [f"127.0.0.1:{env.dns.port}"], "timeout": "0.5s"},
                     limits={"auth_failure_delay": "0s"})
    env.add_user()
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    sink = env.add_sink("127.0.0.2")
    await env.start()
    if trouble == "down":
        env.dns.set_down(True)
    else:
        env.dns.set_servfail("remote.test")
    await env.submit(["friend@remote.test"], MESSAGE)
    item = only_item(env)
    await wait_for(lambda: item.attempts >= 1)
    assert item.recipients[0].last_error.startswith("451 4.4.3"), item.recipients[0].last_error
    assert env.mailbox() == [], "DNS trouble must not bounce"
    env.dns.set_down(False)
    env.dns.set_servfail("remote.test", False)
    await sink.until(1, timeout=15)
    await env.wait_queue_empty()


class Greeter:
    """A remote MX that answers the connection itself with an error, then hangs up."""

    def __init__(self, host: str, port: int, reply: bytes):
        self.host, self.port, self.reply = host, port, reply
        self.connections = 0

    async def __aenter__(self):
        async def handle(reader, writer):
            self.connections += 1
            writer.write(self.reply + b"\r\n")
            await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(handle, self.host, self.port)
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()


@pytest.mark.parametrize("greeting", [b"421 4.3.2 busy", b"554 5.7.1 go away"])
async def test_error_at_connect_is_retried(env, greeting):
    """A refusal in the greeting is about this connection, not the message: retry."""
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.9"))
    await env.start()
    async with Greeter("127.0.0.9", env.sink_port, greeting) as greeter:
        await env.submit(["friend@remote.test"], MESSAGE)
        item = only_item(env)
        await wait_for(lambda: item.attempts >= 1)
        assert greeter.connections >= 1
        assert item.recipients[0].status == "pending"
        assert greeting.decode()[:3] in item.recipients[0].last_error
    assert env.mailbox() == []


CASES = [
    # stage, reply, outcome: retried (4xx) or bounced (5xx)
    ("mail", "421 4.3.2 closing", "retry"),
    ("mail", "451 4.3.0 local problem", "retry"),
    ("mail", "452 4.3.1 no space", "retry"),
    ("mail", "550 5.7.1 sender refused", "bounce"),
    ("mail", "554 5.7.1 transaction failed", "bounce"),
    ("rcpt", "450 4.2.0 mailbox busy", "retry"),
    ("rcpt", "452 4.2.2 over quota", "retry"),
    ("rcpt", "550 5.1.1 no such user", "bounce"),
    ("rcpt", "554 5.7.1 relay denied", "bounce"),
    ("data", "421 4.3.2 shutting down", "retry"),
    ("data", "451 4.3.0 try later", "retry"),
    ("data", "452 4.3.1 no space", "retry"),
    ("data", "550 5.6.0 content rejected", "bounce"),
    ("data", "554 5.7.1 spam", "bounce"),
]


@pytest.mark.parametrize(("stage", "reply", "outcome"), CASES)
async def test_remote_errors_per_stage(relay, stage, reply, outcome):
    if stage == "rcpt":
        relay.sink.behaviour = SinkBehaviour(rcpt=lambda addr: reply)
    else:
        relay.sink.behaviour = SinkBehaviour(**{stage: reply})
    await relay.submit(["friend@remote.test"], MESSAGE)
    if outcome == "bounce":
        [dsn] = await relay.wait_mailbox(1)
        parsed = email.message_from_bytes(dsn.split(b"\r\n", 2)[2], policy=email.policy.default)
        status = next(p for p in parsed.walk()
                      if p.get_content_type() == "message/delivery-status").get_payload()
        assert status[1]["Status"] == reply.split()[1]
        assert reply.split(maxsplit=2)[2] in status[1]["Diagnostic-Code"]
        await relay.wait_queue_empty()
    else:
        item = only_item(relay)
        await wait_for(lambda: item.attempts >= 1)
        assert item.recipients[0].status == "pending"
        assert item.recipients[0].last_error.startswith(reply[:3])
        relay.sink.behaviour = SinkBehaviour()
        await relay.sink.until(1, timeout=15)
        await relay.wait_queue_empty()
        assert relay.mailbox() == []


async def test_mixed_recipients_each_get_their_own_fate(relay):
    replies = {"bad@remote.test": "550 5.1.1 no such user", "later@remote.test": "451 4.2.0 busy"}
    relay.sink.behaviour = SinkBehaviour(rcpt=lambda addr: replies.get(addr))
    await relay.submit(["bad@remote.test", "later@remote.test", "good@remote.test"], MESSAGE)
    [first] = await relay.sink.until(1)
    assert first.recipients == ["good@remote.test"]
    [dsn] = await relay.wait_mailbox(1)
    assert b"bad@remote.test" in dsn and b"later@remote.test" not in dsn
    item = only_item(relay)
    assert [r.status for r in item.recipients] == ["failed", "pending", "sent"]
    relay.sink.behaviour = SinkBehaviour()
    await relay.sink.until(2, timeout=15)
    assert relay.sink.messages[1].recipients == ["later@remote.test"]
    await relay.wait_queue_empty()


async def test_low_disk_space_gets_452_and_service_returns(relay):
    queue = relay.server.queue
    floor = queue.min_free_bytes
    queue.min_free_bytes = 1 << 62  # more free space than any disk has: "disk full"
    client = await RawSMTP.connect("127.0.0.1", relay.ports["smtp"])
    await client.cmd("EHLO client.test")
    code, lines = await client.cmd("MAIL FROM:<a@elsewhere.test>")
    assert code == 452 and lines[0].startswith("4.3.1")
    queue.min_free_bytes = floor  # space is back
    assert await client.send_message("a@elsewhere.test", [USER], b"Subject: x\r\n\r\nok\r\n") == 250
    await client.close()
    assert not [p for p in queue.directory.iterdir() if p.name.startswith(".")]


async def test_write_failure_gets_452_and_leaves_no_partial_file(env):
    """A real failed write (the file-size limit of the server process): no 250, no
    half-written queue file, and smaller messages are still accepted."""
    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    process = await start_server(env, preexec_fn=limit_file_size)
    try:
        client = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
        await client.cmd("EHLO client.test")
        big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 100
        assert await client.send_message("a@elsewhere.test", [USER], big) == 452
        small = b"Subject: small\r\n\r\nfits\r\n"
        assert await client.send_message("a@elsewhere.test", [USER], small) == 250
        await client.cmd("QUIT")
        await client.close()
        queue_dir = env.data_dir / "queue"
        await wait_for(lambda: len(env.mailbox()) == 1)
        assert not [p for p in queue_dir.iterdir() if p.name.startswith(".")]
    finally:
        process.terminate()
        await process.wait()


async def test_broken_users_file_on_reload_keeps_the_last_good_users(relay):
    users = relay.config_dir / "domains" / "example.com" / "users"
    good = users.read_text()
    users.write_text(good + "broken-line-without-hash\n")
    assert relay.server.reload() is False
    client = await RawSMTP.connect("127.0.0.1", relay.ports["submission"])
    await client.cmd("EHLO client.test")
    await client.starttls(relay.client_tls(), "mail.example.com")
    await client.cmd("EHLO client.test")
    code, _ = await client.auth_plain(USER, PASSWORD)
    assert code == 235
    await client.close()


async def test_broken_certificate_on_reload_keeps_serving_the_old_one(relay):
    key = relay.config_dir / "certs" / "mail.example.com" / "privkey.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    assert relay.server.reload() is False
    await relay.submit(["friend@remote.test"], MESSAGE)  # STARTTLS still works
    await relay.sink.until(1)
