"""The durable queue on its own: what is on disk after put, load after a crash, cleanup."""

from __future__ import annotations

import asyncio
import json
import stat
import time

import pytest

from mailrelay import queue as queue_module
from mailrelay.queue import FAILED, SENT, Queue, QueueFullError, Recipient


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


async def test_remove_deletes_a_state_written_before_a_restart(tmp_path):
    queue = Queue(tmp_path)
    queue.load()
    item = await queue.put("a@x.test", ["b@y.test"], b"x\r\n")
    await queue.save_state(item)
    again = Queue(tmp_path)
    [loaded] = again.load()
    await again.remove(loaded)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


async def test_queue_size_cap(tmp_path):
    queue = Queue(tmp_path, max_items=2)
    queue.load()
    await queue.put("a@x.test", ["b@y.test"], b"1\r\n")
    await queue.put("a@x.test", ["b@y.test"], b"2\r\n")
    with pytest.raises(QueueFullError):
        await queue.put("a@x.test", ["b@y.test"], b"3\r\n")
    assert len(list(tmp_path.glob("*.msg"))) == 2


async def test_group_commit_shares_directory_fsyncs_and_covers_every_writer(
        tmp_path, monkeypatch):
    syncs: list[int] = []
    real = queue_module.fsync_dir

    def slow_dir_sync(path):
        # Every file of the batch is in place before its directory is synced.
        syncs.append(len(list(tmp_path.glob("q/*.msg"))))
        time.sleep(0.05)
        real(path)

    monkeypatch.setattr(queue_module, "fsync_dir", slow_dir_sync)
    queue = Queue(tmp_path / "q")
    queue.load()
    # 50 concurrent sessions share a handful of directory fsyncs.
    await asyncio.gather(*(queue.put("a@x.test", ["b@y.test"], b"m\r\n") for _ in range(50)))
    assert 1 <= len(syncs) <= 3 and syncs[-1] == 50
    before = len(syncs)
    await queue.put("a@x.test", ["b@y.test"], b"later\r\n")
    assert len(syncs) == before + 1, "a later writer gets a sync of its own"


async def test_group_commit_failure_reaches_every_writer_and_leaves_no_file(
        tmp_path, monkeypatch):
    def broken(path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(queue_module, "fsync_dir", broken)
    queue = Queue(tmp_path / "q")
    queue.load()
    results = await asyncio.gather(
        *(queue.put("a@x.test", ["b@y.test"], b"m\r\n") for _ in range(5)),
        return_exceptions=True)
    assert all(isinstance(r, OSError) for r in results)
    assert list((tmp_path / "q").iterdir()) == [] and queue.items == {}


async def test_one_failed_write_does_not_fail_the_rest_of_its_batch(tmp_path, monkeypatch):
    real = queue_module.atomic_write

    def picky(path, chunks, *args, **kwargs):
        if b"bad\r\n" in chunks:
            raise OSError(27, "File too large")
        real(path, chunks, *args, **kwargs)

    monkeypatch.setattr(queue_module, "atomic_write", picky)
    queue = Queue(tmp_path / "q")
    queue.load()
    results = await asyncio.gather(
        *(queue.put("a@x.test", ["b@y.test"], b"bad\r\n" if n == 2 else b"ok\r\n")
          for n in range(5)), return_exceptions=True)
    assert [isinstance(r, OSError) for r in results] == [False, False, True, False, False]
    assert len(list((tmp_path / "q").glob("*.msg"))) == 4 == len(queue.items)
