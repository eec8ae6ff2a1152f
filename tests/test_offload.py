"""SerialThread: blocking calls off the event loop, one at a time, results and errors back."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from mailrelay.offload import SerialThread


async def test_calls_run_off_the_loop_in_order_one_at_a_time():
    worker = SerialThread("test-serial")
    running: list[int] = []
    order: list[int] = []

    def call(n: int) -> str:
        running.append(n)
        assert len(running) == 1, "one call at a time"
        assert threading.current_thread().name == "test-serial"
        time.sleep(0.01)
        order.append(n)
        running.pop()
        return f"r{n}"

    results = await asyncio.gather(*(worker.run(call, n) for n in range(10)))
    assert results == [f"r{n}" for n in range(10)] and order == list(range(10))


async def test_an_error_reaches_its_caller_and_the_thread_goes_on():
    worker = SerialThread("test-serial")

    def broken() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        await worker.run(broken)
    assert await worker.run(lambda: 42) == 42


async def test_a_cancelled_caller_does_not_break_the_next_call():
    worker = SerialThread("test-serial")
    slow = asyncio.ensure_future(worker.run(time.sleep, 0.2))
    await asyncio.sleep(0.05)
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow
    assert await worker.run(lambda: "after") == "after"
