"""Stopping the server: idle sessions hear 421 at once, transactions in flight finish."""

from __future__ import annotations

import asyncio
import time

from tests.support.client import RawSMTP
from tests.support.relay import USER


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
