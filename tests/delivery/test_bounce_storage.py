"""A DSN that must be sent is stored before the state it replaces is dropped (issue 16,
row 5): the queue refuses new mail at the moment a remote host answers 550, and the
sender still hears of it, exactly once.

On the real server: a sink that holds its RCPT reply until the queue is refusing, a full
``max_queue_items``, and a queue directory on a small tmpfs filled to the last byte (a
disk that is really full)."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import errno
import logging
import os
import subprocess
import threading
from pathlib import Path

import pytest

from tests.delivery.test_delivery_flow import MESSAGE, parse_dsn
from tests.support.client import RawSMTP
from tests.support.sink import SinkBehaviour


class HeldReplies:
    """RCPT replies given only once ``release`` is set: 550 for bad@, else ``other``."""

    def __init__(self, other: str | None = None) -> None:
        self.release = threading.Event()
        self.other = other
        self.asked: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, address: str) -> str | None:
        with self.lock:
            self.asked.append(address)
        self.release.wait(20)  # runs in the sink's thread: the remote host is "slow"
        return "550 5.1.1 no such mailbox" if address.startswith("bad@") else self.other

    def count(self, address: str) -> int:
        with self.lock:
            return self.asked.count(address)


async def wait_for(check, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def dsn_kinds(env) -> list[tuple[str, str]]:
    """(Action, Final-Recipient) of each report in the sender's mailbox."""
    found = []
    for data in env.mailbox():
        message = data.split(b"\r\n", 2)[2]  # after Return-Path and Delivered-To
        _, blocks = parse_dsn(message)
        found += [(block["Action"], block["Final-Recipient"].split(";")[-1].strip())
                  for block in blocks[1:]]
    return found


async def test_a_full_queue_still_stores_the_dsn_of_a_550(env):
    """max_queue_items reached while the remote host answers 550: the DSN goes past the
    cap (it is one of a bounded few), the sender is told once, and mail from clients is
    still refused with 452 meanwhile."""
    env.write_config(limits={"max_queue_items": 3},
                     delivery={"retry_intervals": ["1h"], "give_up_after": "5h"})
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    env.add_mx("held.test", (10, "mx.held.test", "127.0.0.9"))  # nothing listens: held
    sink = env.add_sink("127.0.0.2")
    replies = HeldReplies()
    sink.behaviour = SinkBehaviour(rcpt=replies)
    await env.start()
    await env.submit(["bad@remote.test"], MESSAGE)
    await wait_for(lambda: replies.count("bad@remote.test") == 1, what="the RCPT")
    await env.submit(["one@held.test"], MESSAGE)
    await env.submit(["two@held.test"], MESSAGE)
    assert len(env.server.queue.items) == 3
    client = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
    await client.cmd("EHLO client.test")
    code, lines = await client.cmd("MAIL FROM:<someone@elsewhere.test>")
    assert (code, lines[0].split()[0]) == (452, "4.3.1"), "the queue refuses new mail"
    await client.close()

    replies.release.set()  # now the 550 comes
    [dsn] = await env.wait_mailbox(1)
    assert dsn_kinds(env) == [("failed", "bad@remote.test")]
    _, blocks = parse_dsn(dsn.split(b"\r\n", 2)[2])
    assert blocks[1]["Status"] == "5.1.1"
    await wait_for(lambda: len(env.server.queue.items) == 2, what="the bounced message gone")
    await asyncio.sleep(0.5)
    assert len(env.mailbox()) == 1, "exactly one DSN"


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "4m"):
    """``path`` on a tmpfs of its own, so it can really run out of space (root only)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs (a disk that is really full)")
    path.mkdir(parents=True, mode=0o700)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700",
                             "tmpfs", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """A file that takes every free byte of ``directory``'s file system."""
    ballast = directory / "ballast"
    with open(ballast, "wb", buffering=0) as handle:
        for size in (1 << 20, 4096, 1):  # smaller and smaller, to the last byte
            try:
                while True:
                    handle.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return ballast


async def test_a_full_disk_keeps_the_failure_until_its_dsn_is_stored(env, caplog):
    """The queue's file system is full when the 550 (and, for another message, the time
    of the delay warning) comes: nothing can be stored, so the recipient stays queued and
    the failure is tried again on the schedule. Once there is room again, the sender gets
    exactly one DSN, and the other sender exactly one delay warning."""
    caplog.set_level(logging.INFO)
    env.write_config(limits={"min_free_space": "1KiB"},
                     delivery={"retry_intervals": ["300ms"], "give_up_after": "1h",
                               "delay_warning_after": "700ms"})
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    sink = env.add_sink("127.0.0.2")
    replies = HeldReplies(other="451 4.2.1 mailbox busy")
    sink.behaviour = SinkBehaviour(rcpt=replies)
    with small_tmpfs(env.data_dir / "queue") as queue_dir:
        try:
            await env.start()
            await env.submit(["bad@remote.test"], MESSAGE)
            await env.submit(["slow@remote.test"], MESSAGE)
            await wait_for(lambda: replies.count("bad@remote.test") == 1, what="the RCPT")
            ballast = fill(queue_dir)
            replies.release.set()
            # Retried while the disk is full: each time 550 again, and the DSN refused.
            await wait_for(lambda: replies.count("bad@remote.test") >= 3, what="retries")
            await wait_for(lambda: replies.count("slow@remote.test") >= 4, what="retries")
            assert env.mailbox() == []
            assert [i.pending[0].address for i in env.server.queue.items.values()] == \
                ["bad@remote.test", "slow@remote.test"], "the failure is kept, not dropped"
            def refused(what: str) -> bool:
                return any(what in r.getMessage() and "could not be stored" in r.getMessage()
                           for r in caplog.records)

            await wait_for(lambda: refused("the DSN for <bad@remote.test>"), what="a log line")
            await wait_for(lambda: refused("the delay warning for <slow@remote.test>"),
                           what="a log line")
            assert not refused("the delay warning for <bad@remote.test>"), \
                "a failure waiting for its DSN is not a delay"
            assert not [r for r in caplog.records
                        if r.exc_info and r.name.startswith("mailrelay")], "no tracebacks"

            ballast.unlink()
            await wait_for(lambda: len(env.mailbox()) == 2, what="the DSN and the warning")
            await wait_for(lambda: [i.pending[0].address
                                    for i in env.server.queue.items.values()]
                           == ["slow@remote.test"], what="the bounced message gone")
            seen = replies.count("slow@remote.test")
            await wait_for(lambda: replies.count("slow@remote.test") >= seen + 3,
                           what="more retries")
            assert sorted(dsn_kinds(env)) == [("delayed", "slow@remote.test"),
                                              ("failed", "bad@remote.test")]
            subjects = sorted(email.message_from_bytes(m.split(b"\r\n", 2)[2],
                                                       policy=email.policy.default)["Subject"]
                              for m in env.mailbox())
            assert subjects == ["Delayed Mail (still being retried)",
                                "Undelivered Mail Returned to Sender"]
        finally:
            await env.stop()
