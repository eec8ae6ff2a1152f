"""``mailrelay queue`` against a real server process, with mail held by a sink answering 451;
and the control socket's handling of bad requests."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from mailrelay.errors import ConfigError
from mailrelay.ops.control import SOCKET_NAME, ControlServer
from mailrelay.queue import Queue, scan
from tests.support.process import start_server
from tests.support.relay import USER
from tests.support.sink import SinkBehaviour


def mailrelay_queue(env, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailrelay.cli.main", "queue", *argv, "-c", str(env.config_dir)],
        capture_output=True, text=True, timeout=60)


async def cli(env, *argv: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(mailrelay_queue, env, *argv)


async def cli_ok(env, *argv: str) -> str:
    result = await cli(env, *argv)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


async def cli_fails(env, *argv: str) -> str:
    """The one line a failing command prints; exit status 1."""
    result = await cli(env, *argv)
    assert result.returncode == 1, result.stdout
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def message(to: str, subject: str) -> bytes:
    return (f"From: {USER}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@example.com>\r\n\r\nhello\r\n").encode()


class Deferring:
    """Sink behaviour: 451 for every RCPT, numbered per address, so each attempt shows."""

    def __init__(self) -> None:
        self.attempts: Counter[str] = Counter()
        self.lock = threading.Lock()

    def __call__(self, address: str) -> str:
        with self.lock:  # called in the sink's thread
            self.attempts[address] += 1
            return f"451 4.7.1 try later #{self.attempts[address]}"


async def wait_for(check, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def spool(env) -> dict[str, dict[str, str]]:
    """{recipient address: {"id":…, "last_error":…}} straight from the queue files."""
    items, _ = scan(env.data_dir / "queue")
    return {r.address: {"id": item.id, "last_error": r.last_error, "status": r.status}
            for item in items for r in item.recipients}


@pytest.fixture
async def held(env):
    """A server process (retries 1 h, then 4 h apart) holding one message for a@remote.test
    and one for b@other.test: their MX, a sink, answers 451."""
    env.write_config(delivery={"retry_intervals": ["1h", "4h"]})
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    env.add_mx("other.test", (10, "mx1.other.test", "127.0.0.2"))
    env.sink = env.add_sink("127.0.0.2")
    env.deferring = Deferring()
    env.sink.behaviour = SinkBehaviour(rcpt=env.deferring)
    env.process = await start_server(env)
    try:
        await env.submit(["a@remote.test"], message("a@remote.test", "queue test A"))
        await env.submit(["b@other.test"], message("b@other.test", "queue test B"))
        await wait_for(lambda: all(spool(env).get(a, {}).get("last_error", "").endswith("#1")
                                   for a in ("a@remote.test", "b@other.test")),
                       what="the first attempts")
        env.ids = {address: entry["id"] for address, entry in spool(env).items()}
        yield env
    finally:
        if env.process.returncode is None:
            env.process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(env.process.wait(), 30)


async def stop_server(env) -> None:
    env.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(env.process.wait(), 30) == 0


async def test_list_and_show(held):
    env = held
    a, b = env.ids["a@remote.test"], env.ids["b@other.test"]
    out = await cli_ok(env, "list")
    lines = out.splitlines()
    assert lines[0].startswith(f"{a}  ") and f"<{USER}>" in lines[0]
    assert re.search(r"next attempt in (5\dm|1h0\dm)$", lines[0])  # 1h ± 10 %
    assert lines[1].split() == ["pending", "a@remote.test", "451", "4.7.1", "try", "later", "#1"]
    assert lines[2].startswith(f"{b}  ")
    assert lines[3].split()[:2] == ["pending", "b@other.test"]
    assert lines[-1] == "2 messages queued"

    data = json.loads(await cli_ok(env, "list", "--json"))
    assert data["server_running"] is True
    assert [m["id"] for m in data["messages"]] == [a, b]
    first = data["messages"][0]
    assert first["sender"] == USER and first["attempts"] == 1 and first["in_flight"] is False
    assert first["recipients"][0]["address"] == "a@remote.test"
    assert first["recipients"][0]["status"] == "pending"
    assert first["recipients"][0]["last_error"] == "451 4.7.1 try later #1"

    out = await cli_ok(env, "show", a)
    assert re.search(rf"^id: +{a}$", out, re.M)
    assert re.search(rf"^from: +<{USER}>$", out, re.M)
    assert re.search(rf"^submitted by: +{USER}$", out, re.M)
    assert re.search(r"^attempts: +1, last \d+s ago; next attempt in", out, re.M)
    recipients, headers = out.split("\nrecipients:\n")[1].split("\nheaders:\n")
    assert "pending  a@remote.test  451 4.7.1 try later #1  [1 attempt]" in recipients
    assert "    Subject: queue test A" in headers.splitlines()
    assert "    Received: from " in headers  # the server's own header is part of it
    assert "hello" not in headers  # headers only, not the body

    shown = json.loads(await cli_ok(env, "show", a, "--json"))["message"]
    assert shown["id"] == a and "Subject: queue test A\r\n" in shown["headers"]

    error = await cli_fails(env, "show", "0123456789abcdef")
    assert error == "mailrelay: no message 0123456789abcdef in the queue\n"


async def test_flush_retries_at_once(held):
    env = held
    a, b = env.ids["a@remote.test"], env.ids["b@other.test"]
    scheduled = json.loads(await cli_ok(env, "show", a, "--json"))["message"]["next_attempt"]
    # Only the domain's message is retried, and flush reports what came of it: it waits.
    lines = (await cli_ok(env, "flush", "--domain", "Remote.TEST")).splitlines()
    assert re.fullmatch(rf"{a}  still queued; next attempt in (5\dm|1h0\dm)", lines[0]), lines
    assert lines[1].split() == ["pending", "a@remote.test", "451", "4.7.1", "try", "later", "#2"]
    assert len(lines) == 2
    assert env.deferring.attempts == {"a@remote.test": 2, "b@other.test": 1}
    assert spool(env)["a@remote.test"]["last_error"].endswith("#2")
    # The failed flush did not move the schedule: the next retry stays where it was,
    # not 4 h (the second interval) from now.
    shown = json.loads(await cli_ok(env, "show", a, "--json"))["message"]
    assert shown["attempts"] == 2 and shown["next_attempt"] == scheduled

    out = await cli_ok(env, "flush", b)
    assert out.splitlines()[0].startswith(f"{b}  still queued; next attempt in ")
    assert "#2" in out.splitlines()[1]
    assert spool(env)["a@remote.test"]["last_error"].endswith("#2")

    assert await cli_ok(env, "flush", "--domain", "nowhere.test") == \
        "no queued message has a pending recipient at nowhere.test\n"
    assert "no message abc in the queue" in await cli_fails(env, "flush", "abc")
    assert await cli_ok(env, "flush", a, "--wait", "0") == "retrying 1 message now\n"
    await wait_for(lambda: env.deferring.attempts["a@remote.test"] == 3, what="the retry")

    # The remote takes mail again: a flush delivers everything now, not in an hour.
    env.sink.behaviour = SinkBehaviour()
    flushed = json.loads(await cli_ok(env, "flush", "--json"))
    assert flushed["flushed"] == 2
    assert sorted(m["id"] for m in flushed["messages"]) == [a, b]
    assert all(m["ended"] and not m["queued"] for m in flushed["messages"]), flushed
    assert {r["status"] for m in flushed["messages"] for r in m["recipients"]} == {"sent"}
    received = await env.sink.until(2)
    assert sorted(r.recipients[0] for r in received) == ["a@remote.test", "b@other.test"]
    await wait_for(lambda: not spool(env), what="an empty queue")
    assert await cli_ok(env, "list") == "the queue is empty\n"
    assert await cli_ok(env, "flush") == "the queue is empty\n"
    assert json.loads(await cli_ok(env, "flush", "--json")) == {"flushed": 0, "messages": []}


async def test_remove_and_bounce(held):
    env = held
    a, b = env.ids["a@remote.test"], env.ids["b@other.test"]
    assert await cli_ok(env, "remove", a) == f"removed {a}\n"
    assert [m["id"] for m in json.loads(await cli_ok(env, "list", "--json"))["messages"]] == [b]
    assert not (env.data_dir / "queue" / f"{a}.msg").exists()
    assert "no message" in await cli_fails(env, "remove", a)

    out = await cli_ok(env, "remove", b, "--bounce")
    lines = out.splitlines()
    assert lines[0] == f"removed {b}"
    assert lines[1].startswith("bounce ") and lines[1].endswith(f"queued to <{USER}> for "
                                                                "b@other.test")
    # The sender is a local user: the DSN lands in their mailbox.
    dsn = (await env.wait_mailbox(1))[0]
    assert b"Subject: Undelivered Mail Returned to Sender" in dsn
    assert b"Final-Recipient: rfc822; b@other.test" in dsn
    assert b"Status: 5.0.0" in dsn
    assert b"removed by the administrator" in dsn
    assert b"451 4.7.1 try later #1" in dsn  # what the last attempt heard
    assert b"Subject: queue test B" in dsn
    await wait_for(lambda: not spool(env), what="an empty queue")
    assert env.sink.messages == []  # neither was delivered


async def test_remove_bounce_json(held):
    env = held
    a = env.ids["a@remote.test"]
    data = json.loads(await cli_ok(env, "remove", a, "--bounce", "--json"))
    assert data["id"] == a and data["sender"] == USER
    assert data["bounced"] == ["a@remote.test"] and data["dsn"]
    await env.wait_mailbox(1)


async def test_without_a_server(held):
    env = held
    a = env.ids["a@remote.test"]
    sock = env.data_dir / SOCKET_NAME
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    await stop_server(env)
    assert not sock.exists()
    before = sorted(os.listdir(env.data_dir / "queue"))

    out = await cli_ok(env, "list")
    assert "pending  a@remote.test  451 4.7.1 try later #1" in out
    assert out.splitlines()[-1] == \
        "2 messages queued (read from the spool: the server is not running)"
    data = json.loads(await cli_ok(env, "list", "--json"))
    assert data["server_running"] is False and len(data["messages"]) == 2
    assert data["messages"][0]["in_flight"] is None
    out = await cli_ok(env, "show", a)
    assert "    Subject: queue test A" in out and "(read from the spool" in out
    assert "no message nope in the queue" in await cli_fails(env, "show", "nope")

    for argv in (("flush",), ("flush", a), ("remove", a), ("remove", a, "--bounce")):
        error = await cli_fails(env, *argv)
        assert error.startswith("mailrelay: the server is not running (no control socket at ")
        assert f"`queue {argv[0]}` needs the running server" in error
    assert sorted(os.listdir(env.data_dir / "queue")) == before  # read-only

    # A socket left by a crashed server is replaced at the next start.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()
    assert "the server is not running" in await cli_fails(env, "flush")
    env.process = await start_server(env)
    assert json.loads(await cli_ok(env, "list", "--json"))["server_running"] is True


def test_scan_reads_without_touching(tmp_path: Path):
    directory = tmp_path / "queue"
    queue = Queue(directory)
    queue.load()
    item = asyncio.run(queue.put("s@example.com", ["r@remote.test"], b"Subject: x\r\n\r\nx\r\n"))
    (directory / ".tmp-123").write_bytes(b"half written")
    (directory / "bad.msg").write_bytes(b"not a queue file\n")
    (directory / "orphan.state").write_bytes(b"{}")
    before = sorted(os.listdir(directory))
    items, problems = scan(directory)
    assert [i.id for i in items] == [item.id]
    assert items[0].recipients[0].address == "r@remote.test"
    assert problems == [f"{directory / 'bad.msg'}: not a mailrelay queue file"]
    assert sorted(os.listdir(directory)) == before
    assert scan(tmp_path / "missing") == ([], [])


# -- the control protocol -------------------------------------------------------------------

async def test_a_live_socket_is_not_taken_over(tmp_path: Path):
    path = tmp_path / SOCKET_NAME
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen()
    try:
        with pytest.raises(ConfigError, match="another mailrelay is running"):
            await ControlServer(path, None, None).start()  # type: ignore[arg-type]
        assert path.exists()
    finally:
        live.close()
    # Now it is stale: replaced, with mode 0600, and removed again on stop.
    control = ControlServer(path, None, None)  # type: ignore[arg-type]
    await control.start()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    await control.stop()
    assert not path.exists()


async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes) -> dict:
    writer.write(line + b"\n")
    await writer.drain()
    return json.loads(await asyncio.wait_for(reader.readline(), 10))


async def test_control_protocol_bad_input(relay):
    path = relay.data_dir / SOCKET_NAME
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        assert await ask(reader, writer, b"garbage") == \
            {"ok": False, "error": "bad request: not JSON"}
        assert await ask(reader, writer, b"[1, 2]") == \
            {"ok": False, "error": 'bad request: expected an object with "cmd"'}
        assert await ask(reader, writer, b'{"cmd": "explode"}') == \
            {"ok": False, "error": "unknown command 'explode' (list, show, flush, remove, "
                                   "users, auth_blocks, auth_unblock)"}
        assert await ask(reader, writer, b'{"cmd": "show"}') == \
            {"ok": False, "error": '"id" is required'}
        assert await ask(reader, writer, b'{"cmd": "remove", "id": "x"}') == \
            {"ok": False, "error": "no message x in the queue"}
        assert (await ask(reader, writer, b'{"cmd": "flush", "domain": 5}'))["ok"] is False
        assert (await ask(reader, writer, b'{"cmd": "flush", "domain": ""}'))["ok"] is False
        assert (await ask(reader, writer, b"\xff\xfe")) == \
            {"ok": False, "error": "bad request: not JSON"}
        # The same connection still serves.
        assert await ask(reader, writer, b'{"cmd": "list"}') == {"ok": True, "messages": []}
        assert await ask(reader, writer, b'{"cmd": "flush"}') == \
            {"ok": True, "flushed": 0, "messages": []}
        assert (await ask(reader, writer, b'{"cmd": "flush", "wait": "x"}'))["ok"] is False
        assert (await ask(reader, writer, b'{"cmd": "flush", "wait": -1}'))["ok"] is False
        assert (await ask(reader, writer, b'{"cmd": "users"}'))["ok"] is False
        # A line too long to be a request: an error, then the connection ends.
        response = await ask(reader, writer, b"x" * 100_000)
        assert response == {"ok": False, "error": "request too long"}
        assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        writer.close()
    # The server itself keeps running: a new connection works, and so does mail.
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        assert await ask(reader, writer, b'{"cmd": "list"}') == {"ok": True, "messages": []}
    finally:
        writer.close()
    await relay.submit(["friend@remote.test"], message("friend@remote.test", "still fine"))
    await relay.sink.until(1)
    await relay.stop()
    assert not path.exists()


def slow(reply: str | None, seconds: float = 1.0):
    """An RCPT rule that keeps the attempt in flight for a while, then answers."""
    def rule(address: str) -> str | None:
        time.sleep(seconds)  # the sink's own thread: only this session waits
        return reply
    return rule


async def test_remove_waits_for_the_attempt_in_flight(relay):
    relay.sink.behaviour = SinkBehaviour(rcpt=slow("451 4.7.1 slow"))
    server = relay.server
    await relay.submit(["friend@remote.test"], message("friend@remote.test", "in flight"))
    (item_id,) = list(server.queue.items)
    await wait_for(lambda: server.delivery.attempting(item_id), what="an attempt in flight")
    reader, writer = await asyncio.open_unix_connection(str(relay.data_dir / SOCKET_NAME))
    try:
        listed = await ask(reader, writer, b'{"cmd": "list"}')
        assert listed["messages"][0]["in_flight"] is True
        request = json.dumps({"cmd": "remove", "id": item_id, "bounce": True}).encode()
        response = await ask(reader, writer, request)
    finally:
        writer.close()
    # Answered only after the attempt: its 451 is in the bounce.
    assert response["ok"] is True and response["bounced"] == ["friend@remote.test"]
    assert not server.delivery.attempting(item_id) and item_id not in server.queue.items
    dsn = (await relay.wait_mailbox(1))[0]
    assert b"removed by the administrator (last attempt: 451 4.7.1 slow)" in dsn
    assert not (relay.data_dir / "queue" / f"{item_id}.msg").exists()


async def test_remove_of_a_message_its_attempt_delivers(relay):
    relay.sink.behaviour = SinkBehaviour(rcpt=slow(None))
    server = relay.server
    await relay.submit(["friend@remote.test"], message("friend@remote.test", "delivered"))
    (item_id,) = list(server.queue.items)
    await wait_for(lambda: server.delivery.attempting(item_id), what="an attempt in flight")
    reader, writer = await asyncio.open_unix_connection(str(relay.data_dir / SOCKET_NAME))
    try:
        request = json.dumps({"cmd": "remove", "id": item_id, "bounce": True}).encode()
        assert await ask(reader, writer, request) == {
            "ok": False, "error": f"no message {item_id} in the queue "
                                  "(delivered while waiting for its attempt)"}
    finally:
        writer.close()
    assert len(relay.sink.messages) == 1
    assert relay.mailbox() == []  # no bounce for what was delivered
