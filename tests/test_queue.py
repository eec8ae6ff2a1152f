"""The durable queue on its own: what is on disk after put, load after a crash, cleanup."""

from __future__ import annotations

import asyncio
import json
import stat
import time

import pytest

from mailrelay.queue import FAILED, SENT, GroupSync, Queue, QueueFullError, Recipient


async def test_put_is_on_disk_and_loads_back(tmp_path):
    queue = Queue(tmp_path / "q")
    queue.load()
    recipients = ["b@y.test", Recipient("c@y.test", params={"NOTIFY": "NEVER"})]
    item = await queue.put("a@x.test", recipients, [b"Subject: hi\r\n", b"\r\nbody\r\n"],
                           {"user": "a@x.test"})
    assert item.path.exists()
    assert stat.S_IMODE(item.path.stat().st_mode) == 0o600
    assert item.read_data() == b"Subject: hi\r\n\r\nbody\r\n"
    assert item.size == len(item.read_data())

    reloaded = Queue(tmp_path / "q")
    [again] = reloaded.load()
    assert again.id == item.id
    assert again.sender == "a@x.test"
    assert [r.address for r in again.recipients] == ["b@y.test", "c@y.test"]
    assert again.recipients[1].params == {"NOTIFY": "NEVER"}
    assert again.meta == {"user": "a@x.test"}
    assert again.read_data() == item.read_data()


async def test_state_survives_reload(tmp_path):
    queue = Queue(tmp_path)
    queue.load()
    item = await queue.put("a@x.test", ["b@y.test", "c@y.test"], b"data\r\n")
    item.recipients[0].status = SENT
    item.recipients[1].status = FAILED
    item.recipients[1].last_error = "550 5.1.1 nope"
    item.attempts = 2
    item.next_attempt = 12345.0
    await queue.save_state(item)
    [again] = Queue(tmp_path).load()
    assert [r.status for r in again.recipients] == [SENT, FAILED]
    assert again.recipients[1].last_error == "550 5.1.1 nope"
    assert again.attempts == 2 and again.next_attempt == 12345.0
    assert again.pending == []


async def test_load_cleans_up_interrupted_writes(tmp_path):
    queue = Queue(tmp_path)
    queue.load()
    item = await queue.put("a@x.test", ["b@y.test"], b"kept\r\n")
    (tmp_path / ".0000half-written.msg").write_bytes(b"MAILRELAY1 {")  # never acknowledged
    (tmp_path / "0000gone.state").write_text(json.dumps({"attempts": 1}))  # its .msg was removed
    (tmp_path / "0000garbage.msg").write_bytes(b"not a queue file")
    loaded = Queue(tmp_path).load()
    assert [i.id for i in loaded] == [item.id]
    assert not (tmp_path / ".0000half-written.msg").exists()
    assert not (tmp_path / "0000gone.state").exists()
    # Unreadable files are kept for a human, out of the way, never deleted.
    assert (tmp_path / "corrupt" / "0000garbage.msg").read_bytes() == b"not a queue file"


async def test_remove_deletes_message_and_state(tmp_path):
    queue = Queue(tmp_path)
    queue.load()
    item = await queue.put("a@x.test", ["b@y.test"], b"x\r\n")
    await queue.save_state(item)
    await queue.remove(item)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert queue.items == {}


async def test_queue_size_cap(tmp_path):
    queue = Queue(tmp_path, max_items=2)
    queue.load()
    await queue.put("a@x.test", ["b@y.test"], b"1\r\n")
    await queue.put("a@x.test", ["b@y.test"], b"2\r\n")
    with pytest.raises(QueueFullError):
        await queue.put("a@x.test", ["b@y.test"], b"3\r\n")
    assert len(list(tmp_path.glob("*.msg"))) == 2


async def test_group_sync_coalesces_and_covers_every_caller():
    runs: list[int] = []

    def slow_sync() -> None:
        runs.append(len(runs))
        time.sleep(0.05)

    group = GroupSync(slow_sync)
    # 50 concurrent callers share a handful of runs, and each waits for a full run
    # that started after it called.
    await asyncio.gather(*(group() for _ in range(50)))
    assert 1 <= len(runs) <= 3
    before = len(runs)
    await group()
    assert len(runs) == before + 1, "a later caller gets a run of its own"


async def test_group_sync_propagates_failure():
    def broken() -> None:
        raise OSError(28, "No space left on device")

    group = GroupSync(broken)
    results = await asyncio.gather(group(), group(), return_exceptions=True)
    assert all(isinstance(r, OSError) for r in results)
