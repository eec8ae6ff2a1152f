"""Nothing accepted is lost: kill -9 the server in the middle of a load, start it again.

Two paths: mail from outside on port 25 to a local user (Maildir), and submissions with
STARTTLS + AUTH to a remote domain, DKIM-signed and delivered to a sink as the remote MX.
Each runs with several kill points (seeds); duplicates (delivered, but killed before the
queue file was removed) are reported, losses fail the test.
"""

from __future__ import annotations

import asyncio
import random
import re
import signal

import pytest

from tests.support.client import RawSMTP
from tests.support.process import start_server
from tests.support.relay import PASSWORD, USER

CLIENTS = 6
MESSAGES_PER_CLIENT = 15


async def client_load(env, client_number: int, acked: set[str], submission: bool) -> None:
    try:
        if submission:
            client = await RawSMTP.connect("127.0.0.1", env.ports["submission"])
            await client.cmd("EHLO load.test")
            await client.starttls(env.client_tls(), "mail.example.com")
            await client.cmd("EHLO load.test")
            code, _ = await client.auth_plain(USER, PASSWORD)
            assert code == 235
            sender, recipients = USER, ["friend@remote.test"]
        else:
            client = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
            await client.cmd("EHLO load.test")
            sender, recipients = "sender@elsewhere.test", [USER]
        for n in range(MESSAGES_PER_CLIENT):
            token = f"c{client_number}m{n}"
            message = f"From: {sender}\r\nSubject: {token}\r\n\r\n{token}\r\n".encode()
            code = await client.send_message(sender, recipients, message)
            if code == 250:
                acked.add(token)
    except (ConnectionError, AssertionError, TimeoutError, OSError):
        pass  # the server was killed under us; what was acknowledged is what counts


def delivered_tokens(env, submission: bool) -> list[str]:
    messages = [m.data for m in env.sink.messages] if submission else env.mailbox()
    return [re.search(rb"Subject: (\S+)", m).group(1).decode() for m in messages]


@pytest.mark.parametrize("submission", [False, True], ids=["mx-to-maildir", "submit-to-sink"])
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_kill_9_mid_load_loses_nothing(env, seed, submission):
    env.add_mx("remote.test", (10, "mx.remote.test", "127.0.0.2"))
    env.sink = env.add_sink("127.0.0.2")
    acked: set[str] = set()
    server = await start_server(env)
    load = asyncio.gather(*(client_load(env, c, acked, submission) for c in range(CLIENTS)))
    # The kill point: after a random number of acknowledged messages, plus a random
    # sliver of time, so it lands anywhere in an accept, a delivery or a queue removal.
    rng = random.Random(seed)
    target = rng.randint(3, CLIENTS * MESSAGES_PER_CLIENT // 2)
    deadline = asyncio.get_running_loop().time() + 30
    while len(acked) < target and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.005)
    await asyncio.sleep(rng.uniform(0, 0.05))
    server.send_signal(signal.SIGKILL)
    await server.wait()
    await load
    assert acked, "the load should have had some messages accepted before the kill"

    server = await start_server(env)
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            delivered = delivered_tokens(env, submission)
            if acked <= set(delivered) or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.1)
        lost = acked - set(delivered)
        duplicates = len(delivered) - len(set(delivered))
        print(f"submission={submission} seed={seed} acked={len(acked)} "
              f"delivered={len(delivered)} lost={len(lost)} duplicates={duplicates}")
        assert not lost, f"accepted but lost: {sorted(lost)}"
    finally:
        server.send_signal(signal.SIGTERM)
        await asyncio.wait_for(server.wait(), 30)
