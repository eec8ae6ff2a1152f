"""The retry schedule with shortened intervals: timing, give-up, delay warnings."""

from __future__ import annotations

import asyncio
import email
import email.policy
import itertools
import time

import aiosmtplib

from tests.delivery.test_delivery_flow import MESSAGE, parse_dsn
from tests.support.relay import PASSWORD, USER
from tests.support.sink import SinkBehaviour


def refuse_and_record(times: list[float], reply: str = "451 4.2.1 mailbox busy"):
    def rcpt(address: str) -> str:
        times.append(time.monotonic())
        return reply
    return SinkBehaviour(rcpt=rcpt)


async def held_env(env, **delivery) -> list[float]:
    env.add_mx("remote.test", (10, "mx.remote.test", "127.0.0.2"))
    sink = env.add_sink("127.0.0.2")
    times: list[float] = []
    sink.behaviour = refuse_and_record(times)
    env.sink = sink
    env.write_config(delivery=delivery)
    await env.start()
    return times


async def wait_for(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def subject_of(data: bytes) -> str:
    return email.message_from_bytes(data, policy=email.policy.default)["Subject"]


async def test_retry_intervals_follow_the_schedule_and_the_last_repeats(env):
    times = await held_env(env, retry_intervals=["1s", "2s"], give_up_after="1h")
    await env.submit(["friend@remote.test"], MESSAGE)
    await wait_for(lambda: len(times) >= 4, timeout=15)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # 10% jitter, plus a little scheduling slack; the last interval repeats.
    assert 0.85 <= gaps[0] <= 1.5, gaps
    assert 1.75 <= gaps[1] <= 2.6, gaps
    assert 1.75 <= gaps[2] <= 2.6, gaps
    item = next(iter(env.server.queue.items.values()))
    assert item.recipients[0].last_error == "451 4.2.1 mailbox busy"
    assert env.mailbox() == [], "no DSN while retrying (no delay warning configured)"


async def test_give_up_sends_one_dsn_with_expiry_status_and_last_reply(env):
    times = await held_env(env, retry_intervals=["300ms"], give_up_after="1500ms",
                           delay_warning_after="0s")
    await env.submit(["friend@remote.test"], MESSAGE)
    [dsn] = await env.wait_mailbox(1, timeout=15)
    await env.wait_queue_empty()
    assert len(times) >= 3, "retried until the give-up age"
    message, blocks = parse_dsn(dsn.split(b"\r\n", 2)[2])
    assert message["From"].addresses[0].addr_spec == "MAILER-DAEMON@example.com"
    recipient = blocks[1]
    assert recipient["Action"] == "failed"
    assert recipient["Status"] == "4.4.7"  # delivery time expired
    assert recipient["Diagnostic-Code"].startswith("smtp; 451 4.2.1 mailbox busy")
    assert recipient["Remote-MTA"] == "dns; mx.remote.test"
    await asyncio.sleep(1)
    assert len(env.mailbox()) == 1, "exactly one DSN"


async def test_delay_warning_is_sent_once_and_survives_a_restart(env):
    times = await held_env(env, retry_intervals=["300ms"], give_up_after="1h",
                           delay_warning_after="1s")
    await env.submit(["friend@remote.test"], MESSAGE)
    [warning] = await env.wait_mailbox(1, timeout=15)
    assert subject_of(warning.split(b"\r\n", 2)[2]).startswith("Delayed Mail")
    _, blocks = parse_dsn(warning.split(b"\r\n", 2)[2])
    assert blocks[1]["Action"] == "delayed"
    assert blocks[1]["Status"] == "4.2.1"
    assert "mailbox busy" in blocks[1]["Diagnostic-Code"]

    # Still held, across a restart: no second warning (the flag and the age are on disk).
    await env.restart()
    seen = len(times)
    await wait_for(lambda: len(times) >= seen + 3, timeout=15)
    assert len(env.mailbox()) == 1

    env.sink.behaviour = SinkBehaviour()
    [received] = await env.sink.until(1, timeout=15)
    assert received.recipients == ["friend@remote.test"]
    await env.wait_queue_empty()
    assert len(env.mailbox()) == 1, "delivery after a delay warning sends nothing more"


async def test_notify_without_delay_gets_no_delay_warning(env):
    times = await held_env(env, retry_intervals=["300ms"], give_up_after="1h",
                           delay_warning_after="500ms")
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=env.ports["submission"],
                           tls_context=env.client_tls(), start_tls=True)
    await smtp.connect()
    await smtp.ehlo()
    await smtp.auth_plain(USER, PASSWORD)
    await smtp.mail(USER)
    await smtp.rcpt("friend@remote.test", options=["NOTIFY=FAILURE"])
    await smtp.data(MESSAGE)
    await smtp.quit()
    await wait_for(lambda: len(times) >= 5, timeout=15)
    assert env.mailbox() == []
