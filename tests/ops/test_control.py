"""The control socket's bounds (issue 16, row 17): linear, depth-checked parsing, a size
cap, an idle timeout, a cap on connections; against the real server's socket."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from mailrelay.ops import control
from mailrelay.ops.control import MAX_DEPTH, SOCKET_NAME, json_depth


async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes) -> dict:
    writer.write(line + b"\n")
    await writer.drain()
    return json.loads(await asyncio.wait_for(reader.readline(), 10))


async def open_control(relay):
    return await asyncio.open_unix_connection(str(relay.data_dir / SOCKET_NAME),
                                              limit=1 << 20)


async def test_deep_nesting_gets_an_error_reply_not_a_recursion_error(relay, caplog):
    reader, writer = await open_control(relay)
    try:
        for line in (b"[" * 60_000, b"{" * 60_000, b'{"cmd": ' + b"[" * 60_000 + b"]",
                     b'{"cmd": "list", "x": [[[[[1]]]]]}'):
            response = await ask(reader, writer, line)
            assert response == {"ok": False,
                                "error": f"bad request: JSON nested more than {MAX_DEPTH} deep"}
        # Brackets inside strings are text, not nesting.
        assert await ask(reader, writer, b'{"cmd": "[[[[[[[[[[[["}') == {
            "ok": False, "error": "unknown command '[[[[[[[[[[[[' (list, show, flush, remove, "
                                  "users, auth_blocks, auth_unblock)"}
        # The connection still serves.
        assert await ask(reader, writer, b'{"cmd": "list"}') == {"ok": True, "messages": []}
    finally:
        writer.close()
    assert not [r for r in caplog.records if r.exc_info], "no traceback in the log"


@pytest.mark.parametrize("size", [640, 6_400])  # 100x: up to 10x MAX_REQUEST
def test_depth_check_is_linear(size):
    """1x, 10x and 100x the input take about 1x, 10x and 100x the time (milliseconds)."""
    timings = []
    for factor in (1, 10, 100):
        # Brackets in a string (and an escaped quote): scanned, not counted.
        data = b'{"a": "\\"' + b"[" * (size * factor) + b'"}'
        deep = b"[" * (size * factor // 10)
        best = float("inf")
        for _ in range(3):  # this thread's CPU time, the best of 3: other work on the
            started = time.thread_time()  # machine (parallel tests) does not count
            assert json_depth(data) == 1
            assert json_depth(deep) > MAX_DEPTH
            best = min(best, time.thread_time() - started)
        timings.append(best)
    assert timings[2] < 0.5, timings
    assert timings[2] < 300 * max(timings[0], 1e-4), timings


async def test_oversized_request_and_idle_timeout(relay, monkeypatch):
    monkeypatch.setattr(control, "IDLE_TIMEOUT", 0.5)
    reader, writer = await open_control(relay)
    try:
        assert await ask(reader, writer, b"x" * 100_000) == \
            {"ok": False, "error": "request too long"}
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
    reader, writer = await open_control(relay)
    try:
        started = time.monotonic()
        line = await asyncio.wait_for(reader.readline(), 5)
        assert json.loads(line) == {"ok": False, "error": "idle for 0.5s, closing"}
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert 0.4 < time.monotonic() - started < 3
    finally:
        writer.close()


async def test_connections_are_capped(relay, monkeypatch):
    monkeypatch.setattr(control, "MAX_CLIENTS", 3)
    held = [await open_control(relay) for _ in range(3)]
    try:
        for reader, writer in held:
            assert (await ask(reader, writer, b'{"cmd": "list"}'))["ok"]
        reader, writer = await open_control(relay)
        line = await asyncio.wait_for(reader.readline(), 5)
        assert json.loads(line) == {"ok": False, "error": "too many control connections"}
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    finally:
        for _, writer in held:
            writer.close()
    await asyncio.sleep(0.2)
    reader, writer = await open_control(relay)
    assert (await ask(reader, writer, b'{"cmd": "list"}'))["ok"]
    writer.close()
