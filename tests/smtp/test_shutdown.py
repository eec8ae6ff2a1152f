"""Stopping the server: idle sessions hear 421 at once, transactions in flight finish."""

from __future__ import annotations

import asyncio
import time

import pytest

from mailrelay.config import load_config
from mailrelay.errors import ConfigError
from mailrelay.server import Server
from tests.support.client import RawSMTP
from tests.support.relay import USER, wait_for


async def test_idle_session_gets_421_and_transaction_in_flight_completes(env):
    await env.start()
    idle = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
    assert (await idle.cmd("EHLO idle.test"))[0] == 250
    busy = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
    assert (await busy.cmd("EHLO busy.test"))[0] == 250
    assert (await busy.cmd("MAIL FROM:<someone@elsewhere.test>"))[0] == 250
    assert (await busy.cmd(f"RCPT TO:<{USER}>"))[0] == 250

    started = time.monotonic()
    stopping = asyncio.create_task(env.server.stop(grace=20))
    code, text = await idle.reply(timeout=5)
    assert code == 421 and "shutting down" in text[0]
    assert await idle.at_eof()
    assert time.monotonic() - started < 3, "an idle session does not hold up the stop"

    # The transaction that had begun may finish; then it is closed the same way.
    assert (await busy.cmd("DATA"))[0] == 354
    assert (await busy.cmd(b"Subject: in flight\r\n\r\nbody\r\n."))[0] == 250
    code, _ = await busy.reply(timeout=5)
    assert code == 421
    await asyncio.wait_for(stopping, 20)
    env.server = None
    assert time.monotonic() - started < 10


async def test_what_is_still_open_at_the_end_of_the_grace_is_cut_within_it(env, tmp_path,
                                                                          caplog):
    """Sessions and delivery attempts drain side by side within one grace: a transaction
    that does not finish is told 421, an MDA still running is killed and its message
    stays queued; one line each says so."""
    started_file = tmp_path / "mda-started"
    env.write_config(delivery={"local_mda": f"sh -c 'touch {started_file}; exec sleep 60'"})
    await env.start()
    sender = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
    assert (await sender.cmd("EHLO sender.test"))[0] == 250
    assert (await sender.cmd("MAIL FROM:<someone@elsewhere.test>"))[0] == 250
    assert (await sender.cmd(f"RCPT TO:<{USER}>"))[0] == 250
    assert (await sender.cmd("DATA"))[0] == 354
    assert (await sender.cmd(b"Subject: stuck MDA\r\n\r\nbody\r\n."))[0] == 250
    await wait_for(started_file.exists, what="the MDA's start")
    silent = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
    assert (await silent.cmd("EHLO silent.test"))[0] == 250
    assert (await silent.cmd("MAIL FROM:<someone@elsewhere.test>"))[0] == 250

    started = time.monotonic()
    stopping = asyncio.create_task(env.server.stop(grace=1.5))
    await asyncio.sleep(0.3)
    # Still delivering: the pid file is still there, and a second server on this
    # data_dir is refused (it would deliver the same queue).
    assert (env.data_dir / "mailrelay.pid").exists()
    second = Server(load_config(env.config_dir))
    with pytest.raises(ConfigError, match="another mailrelay is running"):
        await second.start()
    await asyncio.wait_for(stopping, 10)
    env.server = None
    took = time.monotonic() - started
    assert not (env.data_dir / "mailrelay.pid").exists()
    assert 1.4 < took < 2.7, f"one grace for both, not one after the other: {took:.1f}s"
    code, text = await silent.reply(timeout=5)
    assert code == 421 and "shutting down" in text[0]
    queued = [p for p in (env.data_dir / "queue").iterdir() if p.suffix == ".msg"]
    assert len(queued) == 1, "the message whose MDA was killed stays queued"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stopping:")]
    assert any("1 session(s) still open" in line for line in lines), lines
    assert any("1 delivery attempt(s) still running" in line for line in lines), lines


async def test_recipients_delivered_before_a_stop_cuts_the_attempt_are_not_delivered_again(
        env, tmp_path):
    """An attempt to many local recipients, one MDA run after another, and a remote one is
    cut by the stop: those already delivered (the remote one too) are recorded, and the
    restart delivers only the rest."""
    runs = tmp_path / "runs"
    env.write_config(delivery={
        "local_mda": f"sh -c 'echo {{address}} >> {runs}; sleep 0.2'"})
    users = [f"user{n}@{USER.split('@')[1]}" for n in range(12)]
    for user in users:
        env.add_user(user, "pw-of-a-user")
    # And one remote recipient, whose MX takes the message in the same attempt.
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.9"))
    sink = env.add_sink("127.0.0.9")
    await env.start()
    await env.submit([*users, "friend@remote.test"],
                     b"From: " + USER.encode() + b"\r\nSubject: to many\r\n\r\nbody\r\n")
    await sink.until(1)
    await wait_for(lambda: runs.exists() and len(runs.read_text().split()) >= 3,
                   what="a few deliveries (most not yet)")
    await asyncio.wait_for(env.server.stop(grace=0.1), 10)
    env.server = None
    before = runs.read_text().split()
    assert 3 <= len(before) < len(users)
    await env.start()
    await wait_for(lambda: len(runs.read_text().split()) >= len(users),
                   what="the other deliveries")
    await env.wait_queue_empty()
    delivered = runs.read_text().split()
    # Each recipient once; the one whose MDA the stop killed may run again (at least once).
    assert sorted(set(delivered)) == sorted(users)
    assert len(delivered) <= len(users) + 1, delivered
    assert len(sink.messages) == 1, "the remote recipient got it once"
