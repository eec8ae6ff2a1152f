"""Pipe targets: the message on stdin, exit status decides delivered / retry / failed."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import pytest

from mailrelay.delivery import pipe
from mailrelay.delivery.pipe import SpooledMessage, run_pipe

PY = sys.executable


async def test_message_on_stdin_and_envelope_in_environment(tmp_path):
    out = tmp_path / "out"
    script = tmp_path / "save.py"
    script.write_text(
        "import os, sys\n"
        f"open({str(out)!r}, 'wb').write(sys.stdin.buffer.read() + "
        "(os.environ['SENDER'] + ' ' + os.environ['RECIPIENT']).encode())\n")
    delivered, reply = await run_pipe(f"{PY} {script}", b"Subject: x\r\n\r\nbody\r\n",
                                      sender="a@x.test", recipient="list@example.com")
    assert delivered is True and reply.startswith("250")
    assert out.read_bytes() == b"Subject: x\r\n\r\nbody\r\na@x.test list@example.com"


async def test_exit_75_means_retry():
    delivered, reply = await run_pipe(f"{PY} -c 'import sys; sys.exit(75)'", b"x",
                                      sender="", recipient="a@example.com")
    assert delivered is None and reply.startswith("451 4.")


async def test_other_failures_are_permanent_and_say_why():
    delivered, reply = await run_pipe(
        f"{PY} -c 'import sys; sys.stderr.write(\"no such list\"); sys.exit(3)'", b"x",
        sender="", recipient="a@example.com")
    assert delivered is False and reply.startswith("554 5.")
    assert "no such list" in reply


async def test_timeout_kills_the_command_and_retries():
    delivered, reply = await run_pipe(f"{PY} -c 'import time; time.sleep(30)'", b"x",
                                      sender="", recipient="a@example.com", timeout=0.5)
    assert delivered is None and "did not finish" in reply


async def test_missing_command_is_retried_and_bad_syntax_fails():
    delivered, _ = await run_pipe("/nonexistent/command", b"x", sender="", recipient="a@x")
    assert delivered is None
    delivered, _ = await run_pipe("'unterminated", b"x", sender="", recipient="a@x")
    assert delivered is False


async def test_a_spooled_message_is_the_commands_stdin_from_its_offset(tmp_path):
    spool = tmp_path / "item.msg"
    spool.write_bytes(b"ENVELOPE LINE\n" + b"Subject: y\r\n\r\n" + b"z" * 200_000)
    out = tmp_path / "out"
    delivered, _ = await run_pipe(f"sh -c 'cat > {out}'",
                                  SpooledMessage(spool, len(b"ENVELOPE LINE\n")),
                                  sender="", recipient="a@example.com")
    assert delivered is True
    assert out.read_bytes() == b"Subject: y\r\n\r\n" + b"z" * 200_000


async def test_a_large_message_is_fed_through_a_full_pipe(tmp_path):
    data = bytes(range(256)) * 8192  # 2 MiB: many times the pipe's buffer
    out = tmp_path / "out"
    delivered, _ = await run_pipe(f"sh -c 'cat > {out}'", data, sender="", recipient="a@x")
    assert delivered is True and out.read_bytes() == data


async def test_a_command_that_ignores_stdin_is_judged_by_its_exit_status():
    delivered, reply = await run_pipe("true", b"x" * 1_000_000, sender="", recipient="a@x")
    assert delivered is True, reply
    delivered, reply = await run_pipe("false", b"x" * 1_000_000, sender="", recipient="a@x")
    assert delivered is False and "exit 1" in reply


async def test_a_flood_on_stderr_does_not_block_and_its_tail_is_the_reason():
    script = "import sys; sys.stderr.write('x' * 300000 + ' the real reason'); sys.exit(2)"
    delivered, reply = await run_pipe(f'{PY} -c "{script}"', b"", sender="", recipient="a@x")
    assert delivered is False and reply.endswith("the real reason")


async def test_killed_by_a_signal_is_retried():
    delivered, reply = await run_pipe("sh -c 'kill -9 $$'", b"x", sender="", recipient="a@x")
    assert delivered is None and "signal 9" in reply


async def test_cancelling_kills_the_command_and_leaves_no_zombie(tmp_path):
    pid_file = tmp_path / "pid"
    task = asyncio.create_task(run_pipe(f"sh -c 'echo $$ > {pid_file}; exec sleep 30'", b"",
                                        sender="", recipient="a@x"))
    for _ in range(200):
        await asyncio.sleep(0.01)
        if pid_file.exists() and pid_file.read_text().strip():
            break
    pid = int(pid_file.read_text())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(200):  # killed and reaped: the pid is gone, not a zombie
        if not os.path.exists(f"/proc/{pid}"):
            break
        await asyncio.sleep(0.01)
    assert not os.path.exists(f"/proc/{pid}")


async def test_many_commands_at_once_each_get_their_own_status():
    results = await asyncio.gather(*(
        run_pipe(f"sh -c 'cat >/dev/null; exit {n % 3 and 75}'", b"m" * 10_000, sender="",
                 recipient="a@x") for n in range(30)))
    assert [delivered for delivered, _ in results] == [
        None if n % 3 else True for n in range(30)]


@pytest.mark.parametrize("end, expected", [
    ("exit 0", (True, "250 2.0.0 delivered to command")),
    ("kill -9 $$", (None, "451 4.3.0 sh killed by signal 9 note")),
])
async def test_a_child_left_holding_stderr_does_not_hold_the_verdict(tmp_path, end, expected):
    """The command is judged when it exits, not when everything it started has closed
    its stderr: else a delivered message looks hung and is delivered again at each retry."""
    child = tmp_path / "child"
    await run_pipe("true", b"", sender="", recipient="a@x")  # what a first command sets up
    fds = len(os.listdir("/proc/self/fd"))
    started = time.monotonic()
    result = await run_pipe(f"sh -c 'sleep 30 & echo $! > {child}; echo note >&2; {end}'",
                            b"x", sender="", recipient="a@x", timeout=5)
    try:
        assert result == expected
        assert time.monotonic() - started < 2  # not the 5 s timeout
        await asyncio.sleep(0.01)  # a transport closes its file on the loop's next turn
        assert len(os.listdir("/proc/self/fd")) == fds  # the child's pipe is not kept
    finally:
        os.kill(int(child.read_text()), signal.SIGKILL)


async def test_a_command_that_exits_in_time_keeps_its_verdict(tmp_path, monkeypatch):
    """The wait for a leftover child's stderr comes after the verdict: a command that
    exited in time is not turned into a timeout (and run again) by it."""
    monkeypatch.setattr(pipe, "LEFTOVER_WAIT", 1.5)  # longer than the command's timeout
    child = tmp_path / "child"
    try:
        result = await run_pipe(f"sh -c 'sleep 30 & echo $! > {child}; exit 0'", b"x",
                                sender="", recipient="a@x", timeout=1)
        assert result == (True, "250 2.0.0 delivered to command")
    finally:
        os.kill(int(child.read_text()), signal.SIGKILL)
