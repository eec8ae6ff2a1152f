"""Password guessing (issue 7): failed AUTH is slowed down, then refused per client IP
for a while; other IPs, and the attacked user elsewhere, are not locked out."""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time

import pytest

from tests.support.client import RawSMTP
from tests.support.relay import HOSTNAME, PASSWORD, USER

OTHER_USER = "other@example.com"
OTHER_PASSWORD = "another long passphrase"
GUESSES = ["hunter2", "Password1!", "letmein-please"]
DELAY = 0.2
MAX_FAILURES = 3
BLOCK_TIME = 3.0


async def timed(coro) -> tuple[int, list[str], float]:
    started = time.monotonic()
    code, lines = await coro
    return code, lines, time.monotonic() - started


async def auth_login(client: RawSMTP, user: str, password: str) -> tuple[int, list[str]]:
    code, lines = await client.cmd("AUTH LOGIN")
    if code != 334:
        return code, lines
    code, lines = await client.cmd(base64.b64encode(user.encode()).decode())
    if code != 334:
        return code, lines
    return await client.cmd(base64.b64encode(password.encode()).decode())


def assert_no_secrets(caplog) -> None:
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    for secret in [PASSWORD, OTHER_PASSWORD, *GUESSES]:
        assert secret not in text, f"a password is in the log: {secret!r}"
        for blob in (f"\0{USER}\0{secret}", secret):
            assert base64.b64encode(blob.encode()).decode() not in text


@pytest.fixture
async def guarded(env):
    env.write_config(limits={"auth_failure_delay": f"{DELAY}s",
                             "auth_failures_per_ip": MAX_FAILURES,
                             "auth_block_time": f"{BLOCK_TIME}s"})
    env.add_user()
    env.add_user(OTHER_USER, OTHER_PASSWORD)
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    env.sink = env.add_sink("127.0.0.2")
    await env.start()
    return env


@pytest.mark.parametrize("port", ["submission", "submission_tls"])
async def test_guessing_is_slowed_then_blocked_per_ip(guarded, port, caplog):
    env = guarded
    caplog.set_level(logging.DEBUG)
    attacker = await env.submission_client(port)

    # Each failure is answered later than the one before.
    times = []
    for guess in GUESSES:
        code, lines, took = await timed(attacker.auth_plain(USER, guess))
        assert code == 535 and lines[0].startswith("5.7.8"), (code, lines)
        times.append(took)
    last_failure = time.monotonic()
    assert times[0] >= DELAY * 0.9, times
    assert times[2] >= 2 * DELAY, f"the 3rd failure was answered after {times[2]:.3f}s"
    assert times[2] > times[0], times

    # auth_failures_per_ip reached: even the right password is refused, at once, by
    # either mechanism, on this connection and on new ones from the same IP.
    code, lines, took = await timed(attacker.auth_plain(USER, PASSWORD))
    assert code == 454 and lines[0].startswith("4.7.0"), (code, lines)
    assert took < 2 * DELAY, "a blocked attempt is not slowed down (no password check)"
    code, lines = await auth_login(attacker, USER, PASSWORD)
    assert code == 454 and lines[0].startswith("4.7.0"), (code, lines)
    assert (await attacker.cmd(f"MAIL FROM:<{USER}>"))[0] == 530
    second = await env.submission_client(port)
    assert (await second.auth_plain(OTHER_USER, OTHER_PASSWORD))[0] == 454
    assert (await second.cmd(f"MAIL FROM:<{USER}>"))[0] == 530

    # Another IP is not affected: the attacked user logs in from there at once and sends.
    elsewhere = await env.submission_client(port, source="127.0.0.3")
    code, lines, took = await timed(elsewhere.auth_plain(USER, PASSWORD))
    assert code == 235, (code, lines)
    assert took < 1.0
    code = await elsewhere.send_message(USER, ["friend@remote.test"],
                                        b"Subject: still here\r\n\r\nhello\r\n")
    assert code == 250
    third_ip = await env.submission_client(port, source="127.0.0.4")
    assert (await auth_login(third_ip, OTHER_USER, OTHER_PASSWORD))[0] == 235

    # Still blocked well into the window (not a one-off refusal). The block began when
    # the 3rd failure was counted, before its delay: it ends 2.4 s after last_failure.
    await asyncio.sleep(max(0.0, last_failure + 1.5 - time.monotonic()))
    assert (await second.auth_plain(USER, PASSWORD))[0] == 454
    await env.sink.until(1)

    # The refusal is in the mail log (README, "Mail log"), with the IP and never a password.
    def auth_failed(reason: str) -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "mailrelay.mail"
                and r.getMessage().startswith("auth-failed ")
                and f'reason="{reason}"' in r.getMessage()]

    # Every blocked attempt above used a right password: the log says so (README).
    blocked = auth_failed("454 4.7.0 right-password")
    assert blocked and all(r.levelno >= logging.WARNING for r in blocked)
    assert all(" ip=127.0.0.1 " in r.getMessage() for r in blocked)
    assert not auth_failed("454 4.7.0")
    assert len(auth_failed("535 5.7.8")) == MAX_FAILURES
    assert_no_secrets(caplog)

    # After auth_block_time the IP may log in again.
    await asyncio.sleep(max(0.0, last_failure + BLOCK_TIME + 0.1 - time.monotonic()))
    again = await env.submission_client(port)
    code, lines, took = await timed(again.auth_plain(USER, PASSWORD))
    assert code == 235, (code, lines)
    assert took < 1.0
    for client in (attacker, second, elsewhere, third_ip, again):
        await client.close()


async def test_parallel_guesses_do_not_get_past_the_limit(guarded, caplog):
    """Guesses sent at once on many connections: once the IP is blocked, attempts still
    being checked are refused too, so no more than auth_failures_per_ip are answered."""
    env = guarded
    caplog.set_level(logging.INFO)
    clients = await asyncio.gather(*(env.submission_client("submission_tls") for _ in range(10)))
    replies = await asyncio.gather(*(c.auth_plain(USER, f"guess {i}")
                                     for i, c in enumerate(clients)))
    codes = sorted(code for code, _ in replies)
    assert codes == [454] * (10 - MAX_FAILURES) + [535] * MAX_FAILURES, codes
    # The right password now gets the same refusal: no oracle while blocked.
    assert (await clients[0].auth_plain(USER, PASSWORD))[0] == 454
    assert_no_secrets(caplog)
    for client in clients:
        await client.close()


async def test_the_per_ip_limit_holds_across_parallel_connections(guarded, caplog):
    """Issue 18: 6 connections from one IP guess at once, 5 guesses each, PLAIN and LOGIN
    in turn. At most auth_failures_per_ip guesses get an answer other than 454, whatever
    the interleaving; each connection's answers carry the time left."""
    env = guarded
    caplog.set_level(logging.INFO)
    clients = await asyncio.gather(*(env.submission_client("submission_tls") for _ in range(6)))

    async def guess_on(client: RawSMTP, number: int) -> list[tuple[int, list[str]]]:
        answers = []
        for guess in range(5):
            password = f"guess {number}.{guess}"
            if guess % 2:
                answers.append(await auth_login(client, USER, password))
            else:
                answers.append(await client.auth_plain(USER, password))
        return answers

    answers = [a for each in await asyncio.gather(*(guess_on(c, n)
                                                     for n, c in enumerate(clients)))
               for a in each]
    codes = [code for code, _ in answers]
    assert len(codes) == 30 and set(codes) <= {535, 454}, codes
    assert codes.count(535) == MAX_FAILURES, codes
    assert all(re.search(r"try again in \d+ seconds$", lines[0])
               for code, lines in answers if code == 454)
    counted = [r for r in caplog.records if r.getMessage().startswith("auth-failed ")
               and 'reason="535 5.7.8"' in r.getMessage()]
    assert len(counted) == MAX_FAILURES
    assert_no_secrets(caplog)
    for client in clients:
        await client.close()


async def test_one_wrong_password_with_two_mechanisms_counts_once(guarded, caplog):
    """Issue 18: smtplib tries PLAIN, then LOGIN, with the same wrong password: that is
    one guess for the throttle (and for fail2ban: the second is logged as "repeated")."""
    env = guarded
    caplog.set_level(logging.INFO)
    client = await env.submission_client("submission")
    for _ in range(MAX_FAILURES + 1):  # 8 refusals: under limits.max_errors (10)
        assert (await client.auth_plain(USER, "the old password"))[0] == 535
        assert (await auth_login(client, USER, "the old password"))[0] == 535
    # Still not blocked: it was one guess. The right one works.
    code, lines = await client.auth_plain(USER, PASSWORD)
    assert code == 235, (code, lines)
    reasons = [re.search(r'reason="([^"]*)"', r.getMessage()).group(1)
               for r in caplog.records if r.getMessage().startswith("auth-failed ")]
    assert reasons == ["535 5.7.8"] + ["535 5.7.8 repeated"] * (2 * MAX_FAILURES + 1)
    await client.close()


@pytest.mark.parametrize("starttls", [False, True])
async def test_no_auth_on_port_25(relay, starttls):
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.ports["smtp"])
    client = RawSMTP(reader, writer)
    assert (await client.reply())[0] == 220
    code, lines = await client.cmd("EHLO client.test")
    if starttls:
        await client.starttls(relay.client_tls(), HOSTNAME)
        code, lines = await client.cmd("EHLO client.test")
    assert code == 250
    assert not any(line.upper().startswith("AUTH") for line in lines), lines
    code, lines = await client.auth_plain(USER, PASSWORD)
    assert code == 503 and lines[0].startswith("5.5.1"), (code, lines)
    code, lines = await auth_login(client, USER, PASSWORD)
    assert code == 503, (code, lines)
    # And so no relaying either.
    assert (await client.cmd(f"MAIL FROM:<{USER}>"))[0] == 250
    code, lines = await client.cmd("RCPT TO:<friend@remote.test>")
    assert code == 554 and lines[0].startswith("5.7.1"), (code, lines)
    assert (await client.cmd("QUIT"))[0] == 221
    await client.close()
