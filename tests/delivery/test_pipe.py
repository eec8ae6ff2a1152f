"""Pipe targets: the message on stdin, exit status decides delivered / retry / failed."""

from __future__ import annotations

import sys

from mailrelay.delivery.pipe import run_pipe

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
