"""Delivery to a command (alias targets ``| command``, the local MDA): the message on stdin.

The command runs through ``asyncio.create_subprocess_exec`` in a session of its own, so a
timeout or a server stop kills it and everything it started. A message that is already in
the spool is given to it as its stdin file directly (no copy through this process); only
the tail of its stderr is kept, for the reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

EX_TEMPFAIL = 75  # sysexits.h: try again later
STDERR_KEPT = 4096  # bytes of the command's stderr kept for the reply (the tail counts)
LEFTOVER_WAIT = 0.2  # once it exited, how long what the command left may hold its stderr


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
    """(exit status, negative for a signal, or None after ``timeout``; stderr's tail).

    stderr is a pipe of our own, read apart from the process: asyncio's ``wait()`` returns
    only once every pipe it made is closed, so a background child that kept the command's
    stderr (``sleep 30 &``) would make a command that exited 0 look hung, and its message
    would be delivered again at every retry.
    """
    loop = asyncio.get_running_loop()
    spool = None
    if isinstance(data, SpooledMessage):
        spool = open(data.path, "rb")  # noqa: SIM115 (closed below, after the start)
        spool.seek(data.offset)
    err_r, err_w = os.pipe()
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, env=env, stdin=spool if spool is not None else subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=err_w, start_new_session=True)
    except BaseException:
        os.close(err_r)
        raise
    finally:
        os.close(err_w)  # the child has its own copies
        if spool is not None:
            spool.close()
    stderr = bytearray()
    stderr_stream = asyncio.StreamReader(limit=STDERR_KEPT)
    stderr_pipe: asyncio.ReadTransport | None = None
    reader = asyncio.ensure_future(_tail(stderr_stream, stderr))
    try:
        # The transport owns the read end and closes it.
        stderr_pipe, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(stderr_stream),
            open(err_r, "rb", buffering=0))  # noqa: SIM115
        async with asyncio.timeout(timeout):
            if not isinstance(data, SpooledMessage):
                await _feed(process, data)
            status = await process.wait()
        # Exited in time: that is the verdict. Whatever the command left running may hold
        # its stderr open: take what has come, without waiting for that.
        await asyncio.wait([reader], timeout=LEFTOVER_WAIT)
        return status, bytes(stderr)
    except TimeoutError:
        _kill(process)
        await process.wait()
        return None, b""
    except BaseException:  # cancelled (server stop): leave no command behind
        _kill(process)
        with contextlib.suppress(BaseException):
            await asyncio.shield(process.wait())
        raise
    finally:
        reader.cancel()
        if stderr_pipe is not None:
            stderr_pipe.close()


async def _feed(process: asyncio.subprocess.Process, data: bytes) -> None:
    assert process.stdin is not None
    # A command that stops reading (EPIPE) is judged by its exit status.
    with contextlib.suppress(ConnectionError):
        process.stdin.write(data)
        await process.stdin.drain()
    with contextlib.suppress(ConnectionError):
        process.stdin.close()


async def _tail(stream: asyncio.StreamReader, kept: bytearray) -> None:
    """Read to EOF into ``kept``, keeping only its last STDERR_KEPT bytes."""
    while chunk := await stream.read(65536):
        kept += chunk
        del kept[:-STDERR_KEPT]


def _kill(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
