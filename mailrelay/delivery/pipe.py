"""Delivery to a command (alias targets ``| command``, the local MDA): the message on stdin.

The command runs in a session of its own, so a timeout or a server stop kills it and
everything it started. A message that is already in the spool is given to it as its stdin
file directly (no copy through this process); only the tail of its stderr is kept, for the
reply.

Each command is started and waited for in a thread of this module's pool, not on the event
loop: a fork/exec and asyncio's subprocess machinery (pipe transports, a child-watcher
thread per child) were a quarter of the event loop's time when every message went to an
MDA (bench/server_bench.py, py-spy).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shlex
import signal
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

EX_TEMPFAIL = 75  # sysexits.h: try again later
STDERR_KEPT = 4096  # bytes of the command's stderr kept for the reply (the tail counts)
# Once the command has exited, how long whatever it left running may hold its stderr.
LEFTOVER_WAIT = 0.2
# Delivery runs at most DeliveryManager.concurrency attempts at once; a command beyond
# this many waits for a thread (the default executor, which the queue's fsyncs use, is
# never taken by slow commands).
THREADS = 20
_pool: ThreadPoolExecutor | None = None


@dataclass(frozen=True)
class SpooledMessage:
    """A message stored in a file from ``offset`` to the end (a queue file's body)."""

    path: Path
    offset: int = 0


async def run_pipe(
    command: str, data: bytes | SpooledMessage, *, sender: str, recipient: str,
    timeout: float = 60.0,
) -> tuple[bool | None, str]:
    """(True, reply) delivered; (None, reply) retry later; (False, reply) failed for good."""
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        return False, f"554 5.3.5 bad pipe command: {exc}"
    if not argv:
        return False, "554 5.3.5 empty pipe command"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SENDER": sender,
           "RECIPIENT": recipient, "HOME": "/"}
    try:
        status, stderr = await _run(argv, env, data, timeout)
    except OSError as exc:
        return None, f"451 4.3.0 cannot run {argv[0]}: {exc.strerror or exc}"
    if status is None:
        return None, f"451 4.4.7 {argv[0]} did not finish in {timeout:.0f}s"
    detail = " ".join(stderr.decode("utf-8", "replace").split())[-200:]
    if status == 0:
        return True, "250 2.0.0 delivered to command"
    if status == EX_TEMPFAIL:
        return None, f"451 4.3.0 {argv[0]} asked to retry (exit 75) {detail}".rstrip()
    if status < 0:
        return None, f"451 4.3.0 {argv[0]} killed by signal {-status} {detail}".rstrip()
    return False, f"554 5.3.0 {argv[0]} failed (exit {status}) {detail}".rstrip()


async def _run(argv: list[str], env: dict[str, str], data: bytes | SpooledMessage,
               timeout: float) -> tuple[int | None, bytes]:
    """(exit status, negative for a signal, or None after ``timeout``; stderr's tail)."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(THREADS, thread_name_prefix="command")
    command = _Command()
    future = asyncio.get_running_loop().run_in_executor(
        _pool, command.run, argv, env, data, timeout)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:  # server stop: leave no command behind
        command.cancel()
        with contextlib.suppress(BaseException):
            await future  # the thread reaps it
        raise


class _Command:
    """One command run in a pool thread; ``cancel`` (from the loop) kills it whenever it
    comes: before the start (then the thread kills it as soon as it exists) or after."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True  # first, so that the thread sees it if we miss its process
        if self.process is not None:
            _kill(self.process)

    def run(self, argv: list[str], env: dict[str, str], data: bytes | SpooledMessage,
            timeout: float) -> tuple[int | None, bytes]:
        deadline = time.monotonic() + timeout
        with _stdin(data) as stdin:
            self.process = process = subprocess.Popen(
                argv, env=env, stdin=stdin, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, start_new_session=True)
        assert process.stderr is not None
        try:
            if self.cancelled:
                _kill(process)
            stderr = _tail(process, process.stderr.fileno(), deadline)
            if stderr is not None:
                # stderr closed: the command has exited or is about to.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    return process.wait(max(deadline - time.monotonic(), 0)), stderr
            return None, b""
        finally:
            process.stderr.close()
            if process.returncode is None:  # timed out, or an error here: none left behind
                _kill(process)
                process.wait()


def _stdin(data: bytes | SpooledMessage) -> contextlib.AbstractContextManager:
    """The command's stdin: the queue file at the body, or a temporary file with ``data``
    (the child gets its own copy of the descriptor; it need not read all of it)."""
    if isinstance(data, SpooledMessage):
        spool = open(data.path, "rb")  # noqa: SIM115 (the caller's with closes it)
        spool.seek(data.offset)
        return spool
    temporary = tempfile.TemporaryFile()  # noqa: SIM115 (as above)
    temporary.write(data)
    temporary.seek(0)
    return temporary


def _tail(process: subprocess.Popen[bytes], fd: int, deadline: float) -> bytes | None:
    """Read ``fd`` to EOF keeping its last STDERR_KEPT bytes; None at the deadline. Once
    the command has exited, whatever it left holding the pipe gets LEFTOVER_WAIT."""
    kept = bytearray()
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        now = time.monotonic()
        if process.poll() is not None:
            deadline = min(deadline, now + LEFTOVER_WAIT)
            if now >= deadline:
                return bytes(kept)
        elif now >= deadline:
            return None
        # Wake now and then to see whether the command exited with the pipe still held.
        if poller.poll(min(deadline - now, 0.1) * 1000):
            chunk = os.read(fd, 65536)
            if not chunk:
                return bytes(kept)
            kept += chunk
            del kept[:-STDERR_KEPT]


def _kill(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
