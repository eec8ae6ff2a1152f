"""DATA on the real server (issue 16, rows 11, 13, 14, 20): NUL bytes refused, a time
limit for the whole payload, RCPT TO:<postmaster> without a domain, and a bound on the
message bytes all sessions hold in memory."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path

from tests.support.client import RawSMTP
from tests.support.process import start_server
from tests.support.relay import USER


async def mx_client(env, source: str = "127.0.0.1") -> RawSMTP:
    reader, writer = await asyncio.open_connection("127.0.0.1", env.ports["smtp"],
                                                   local_addr=(source, 0))
    client = RawSMTP(reader, writer)
    assert (await client.reply())[0] == 220
    assert (await client.cmd("EHLO client.test"))[0] == 250
    return client


async def start_data(client: RawSMTP, recipient: str = USER) -> None:
    assert (await client.cmd("MAIL FROM:<a@elsewhere.test>"))[0] == 250
    assert (await client.cmd(f"RCPT TO:<{recipient}>"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354


def body(size: int, subject: str) -> bytes:
    line = b"x" * 98 + b"\r\n"
    return f"Subject: {subject}\r\n\r\n".encode() + line * (size // len(line))


async def test_a_nul_byte_in_data_is_refused(env, caplog):
    """Row 13: refused with 554 5.6.0 (RFC 5322 forbids NUL; stripping it would change
    the message and break signatures), logged in one line; the session goes on."""
    await env.start()
    caplog.set_level(logging.INFO)
    client = await mx_client(env)
    await start_data(client)
    client.writer.write(b"Subject: nul\r\n\r\nbefore\x00after\r\n.\r\n")
    code, lines = await client.reply()
    assert code == 554 and lines[0].startswith("5.6.0"), (code, lines)
    rejects = [r.getMessage() for r in caplog.records
               if r.getMessage().startswith("reject ") and "cmd=DATA" in r.getMessage()]
    assert len(rejects) == 1 and 'reply="554 5.6.0' in rejects[0]
    assert len([r for r in caplog.records if "NUL byte" in r.getMessage()]) == 1
    # The same session sends a clean message.
    assert await client.send_message("a@elsewhere.test", [USER],
                                     b"Subject: clean\r\n\r\nfine\r\n") == 250
    await client.close()
    [stored] = await env.wait_mailbox(1)
    assert b"Subject: clean" in stored
    assert not env.server.queue.items or all(
        b"\x00" not in item.read_data() for item in env.server.queue.items.values())


async def test_postmaster_without_a_domain(env):
    """Row 14: RCPT TO:<postmaster> (any case, RFC 5321 4.5.1) is the postmaster of the
    primary domain (the first one), here an alias to me@example.com."""
    env.add_domain("example.org")
    (env.config_dir / "domains" / "example.com" / "aliases").write_text("postmaster: me\n")
    await env.start()
    client = await mx_client(env)
    assert (await client.cmd("MAIL FROM:<a@elsewhere.test>"))[0] == 250
    for rcpt in ("<postmaster>", "<PostMaster> NOTIFY=NEVER"):
        code, lines = await client.cmd(f"RCPT TO:{rcpt}")
        assert code == 250, (rcpt, code, lines)
    code, _ = await client.cmd("RCPT TO:<postmasterx>")
    assert code == 501
    assert (await client.cmd("DATA"))[0] == 354
    client.writer.write(b"Subject: to the postmaster\r\n\r\nhello\r\n.\r\n")
    assert (await client.reply())[0] == 250
    await client.close()
    [stored] = await env.wait_mailbox(1)
    assert b"Subject: to the postmaster" in stored


async def test_the_whole_data_phase_has_a_time_limit(env, caplog):
    """Row 11: each read waits at most command_timeout; the whole payload at most
    limits.data_timeout, so a drip of a byte now and then cannot hold a session."""
    env.write_config(limits={"data_timeout": "1s", "command_timeout": "30s",
                             "auth_failure_delay": "0s"})
    env.add_user()
    await env.start()
    caplog.set_level(logging.INFO)
    client = await mx_client(env)
    await start_data(client)
    started = time.monotonic()
    with_reply = asyncio.ensure_future(client.reply(timeout=5))
    while not with_reply.done():
        client.writer.write(b"x")
        await asyncio.sleep(0.1)
    code, lines = with_reply.result()
    assert code == 421 and lines[0].startswith("4.4.2"), (code, lines)
    assert 0.9 < time.monotonic() - started < 3
    assert await client.at_eof()
    assert any("DATA from 127.0.0.1 not complete within 1s" in r.getMessage()
               for r in caplog.records)
    assert env.mailbox() == []


async def test_messages_in_flight_share_a_memory_budget(env, caplog):
    """Row 20: limits.max_data_in_flight bounds what all sessions hold. Over it: 452
    4.3.1 at MAIL (SIZE= too big for what is left), at DATA (under 64 KiB left), or
    after the message (it outgrew what was left); the other sessions go on."""
    env.write_config(limits={"max_message_size": "250KiB", "max_data_in_flight": "300KiB",
                             "auth_failure_delay": "0s"})
    env.add_user()
    await env.start()
    caplog.set_level(logging.INFO)
    budget = env.server.listeners.data_budget
    first, second, third = [await mx_client(env, f"127.0.0.{n}") for n in (1, 2, 3)]

    async def hold(client: RawSMTP, size: int) -> None:
        await start_data(client)
        client.writer.write(body(size, "held"))
        await client.writer.drain()

    await hold(first, 150_000)
    await hold(third, 100_000)
    deadline = time.monotonic() + 5
    while budget.used < 250_000:
        assert time.monotonic() < deadline, budget.used
        await asyncio.sleep(0.05)
    # Under 64 KiB left: refused at DATA, before the client sends anything.
    assert (await second.cmd("MAIL FROM:<a@elsewhere.test>"))[0] == 250
    assert (await second.cmd(f"RCPT TO:<{USER}>"))[0] == 250
    code, lines = await second.cmd("DATA")
    assert code == 452 and lines[0].startswith("4.3.1"), (code, lines)
    assert (await second.cmd("RSET"))[0] == 250
    # The first one ends: 250, and its share comes back.
    first.writer.write(b".\r\n")
    assert (await first.reply())[0] == 250
    assert budget.used < 110_000
    # SIZE= more than is left: 452 at MAIL (RFC 1870).
    code, lines = await second.cmd("MAIL FROM:<a@elsewhere.test> SIZE=220000")
    assert code == 452 and lines[0].startswith("4.3.1"), (code, lines)
    # Without SIZE, a message that outgrows what is left: read to its end, then 452.
    code = await second.send_message("a@elsewhere.test", [USER], body(220_000, "big"))
    assert code == 452
    third.writer.write(b".\r\n")
    assert (await third.reply())[0] == 250
    assert budget.used == 0
    assert (await second.cmd("RSET"))[0] == 250
    assert await second.send_message("a@elsewhere.test", [USER], body(220_000, "big")) == 250
    assert budget.used == 0
    for client in (first, second, third):
        await client.close()
    assert len(await env.wait_mailbox(3)) == 3
    refusals = [r for r in caplog.records if "limits.max_data_in_flight" in r.getMessage()]
    assert len(refusals) == 3


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_parallel_big_messages_stay_within_the_budget(env, tmp_path):
    """Row 20, the figure: 20 clients send a 5 MiB message each at once. With a budget of
    24 MiB some get 452 and retry; the server's memory stays bounded."""
    env.write_config(limits={"max_message_size": "6MiB", "max_data_in_flight": "24MiB",
                             "auth_failure_delay": "0s"})
    env.add_user()
    log = tmp_path / "server.log"
    server = await start_server(env, log_file=log)
    peak = 0.0
    sampling = True

    async def sample() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, rss_mib(server.pid))
            await asyncio.sleep(0.02)

    message = body(5 * 1024 * 1024, "big")
    outcomes: list[int] = []

    async def send(n: int) -> None:
        for _ in range(20):
            client = await mx_client(env, f"127.0.1.{n}")
            code = await client.send_message("a@elsewhere.test", [USER], message)
            await client.close()
            outcomes.append(code)
            if code == 250:
                return
            assert code == 452, code
            await asyncio.sleep(0.2)
        raise AssertionError("never accepted")

    try:
        before = rss_mib(server.pid)
        sampler = asyncio.ensure_future(sample())
        await asyncio.gather(*(send(n) for n in range(1, 21)))
        sampling = False
        await sampler
    finally:
        server.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(server.wait(), 60) == 0
    print(f"\nRSS {before:.0f} MiB -> peak {peak:.0f} MiB; 20 x 5 MiB, budget 24 MiB: "
          f"{outcomes.count(452)} times 452, {outcomes.count(250)} accepted")
    assert outcomes.count(250) == 20
    assert outcomes.count(452) > 0
    # The budget's 24 MiB, about as much again while each is queued, and the rest.
    assert peak - before < 150, (before, peak)
