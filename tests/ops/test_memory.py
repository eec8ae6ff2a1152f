"""mailrelay.ops.memory on the real server: after a burst of message data, once nothing
is being received or delivered, the heap is collected in full and handed back (outside
eyes: 20 messages of 10 MB left the idle server at 87 MiB, where it started at 40)."""

from __future__ import annotations

import asyncio
import time

from mailrelay import server as server_module
from mailrelay.ops import memory
from tests.support.client import RawSMTP


async def test_a_burst_of_messages_is_followed_by_a_full_trim(env, monkeypatch):
    calls: list[bool] = []
    real_trim = memory.trim

    def recording_trim(full: bool = False) -> None:
        calls.append(full)
        real_trim(full)

    monkeypatch.setattr(memory, "trim", recording_trim)
    monkeypatch.setattr(server_module, "BULK_BYTES", 256 * 1024)
    await env.start()
    body = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 100  # 100 KB
    client = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
    assert (await client.cmd("EHLO client.test"))[0] == 250
    assert await client.send_message("a@remote.test", ["me@example.com"], body) == 250
    await env.wait_mailbox(1)
    await asyncio.sleep(2.5)  # one turn of the watcher: under BULK_BYTES, no trim
    assert True not in calls
    for _ in range(2):
        assert await client.send_message("a@remote.test", ["me@example.com"], body) == 250
    await env.wait_mailbox(3)
    deadline = time.monotonic() + 6
    while True not in calls:
        assert time.monotonic() < deadline, "no full trim after 300 KB of messages"
        await asyncio.sleep(0.1)
    # Once: the next bytes count from there.
    await asyncio.sleep(2.5)
    assert calls.count(True) == 1
    await client.close()


async def test_many_small_messages_are_followed_by_a_full_trim(env, monkeypatch):
    """The count counts too: a thousand small submissions leave TLS buffers in the heap."""
    calls: list[bool] = []
    monkeypatch.setattr(memory, "trim", lambda full=False: calls.append(full))
    monkeypatch.setattr(server_module, "BULK_MESSAGES", 3)
    await env.start()
    client = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
    assert (await client.cmd("EHLO client.test"))[0] == 250
    for _ in range(3):
        assert await client.send_message("a@remote.test", ["me@example.com"],
                                         b"Subject: small\r\n\r\nhi\r\n") == 250
    await env.wait_mailbox(3)
    deadline = time.monotonic() + 6
    while True not in calls:
        assert time.monotonic() < deadline, "no full trim after 3 messages"
        await asyncio.sleep(0.1)
    await client.close()
