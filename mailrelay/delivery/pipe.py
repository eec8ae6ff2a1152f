"""Delivery to a command (alias targets ``| command``): the message on stdin."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex

EX_TEMPFAIL = 75  # sysexits.h: try again later


async def run_pipe(
    command: str, data: bytes, *, sender: str, recipient: str, timeout: float = 60.0
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
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True)
    except OSError as exc:
        return None, f"451 4.3.0 cannot run {argv[0]}: {exc.strerror}"
    try:
        _, stderr = await asyncio.wait_for(process.communicate(data), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 9)
        await process.wait()
        return None, f"451 4.4.7 {argv[0]} did not finish in {timeout:.0f}s"
    detail = " ".join(stderr.decode("utf-8", "replace").split())[-200:]
    if process.returncode == 0:
        return True, "250 2.0.0 delivered to command"
    if process.returncode == EX_TEMPFAIL:
        return None, f"451 4.3.0 {argv[0]} asked to retry (exit 75) {detail}".rstrip()
    return False, f"554 5.3.0 {argv[0]} failed (exit {process.returncode}) {detail}".rstrip()
