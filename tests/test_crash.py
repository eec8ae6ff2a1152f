"""Nothing accepted is lost: kill -9 the server in the middle of a load, start it again."""

from __future__ import annotations

import asyncio
import random
import re
import signal

import pytest

from tests.support.client import RawSMTP
from tests.support.process import start_server
from tests.support.relay import USER

CLIENTS = 6
MESSAGES_PER_CLIENT = 15


async def client_load(env, client_number: int, acked: set[str]) -> None:
    try:
        client = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
        await client.cmd("EHLO load.test")
        for n in range(MESSAGES_PER_CLIENT):
            token = f"c{client_number}m{n}"
            code = await client.send_message(
                "sender@elsewhere.test", [USER], f"Subject: {token}\r\n\r\n{token}\r\n".encode())
            if code == 250:
                acked.add(token)
    except (ConnectionError, AssertionError, TimeoutError):
        pass  # the server was killed under us; what was acknowledged is what counts


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_kill_9_mid_load_loses_nothing(env, seed):
    acked: set[str] = set()
    server = await start_server(env)
    load = asyncio.gather(*(client_load(env, c, acked) for c in range(CLIENTS)))
    rng = random.Random(seed)
    await asyncio.sleep(rng.uniform(0.05, 0.6))
    server.send_signal(signal.SIGKILL)
    await server.wait()
    await load
    assert acked, "the load should have had some messages accepted before the kill"

    server = await start_server(env)
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            delivered = [re.search(rb"Subject: (\S+)", m).group(1).decode()
                         for m in env.mailbox()]
            if acked <= set(delivered) or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.1)
        lost = acked - set(delivered)
        duplicates = len(delivered) - len(set(delivered))
        print(f"seed={seed} acked={len(acked)} delivered={len(delivered)} lost={len(lost)} "
              f"duplicates={duplicates}")
        assert not lost, f"accepted but lost: {sorted(lost)}"
    finally:
        server.send_signal(signal.SIGTERM)
        await asyncio.wait_for(server.wait(), 30)
