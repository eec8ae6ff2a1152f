"""Running ``mailrelay serve`` as its own process, for tests that signal or kill it."""

from __future__ import annotations

import asyncio
import sys
from typing import Any


async def start_server(env, **kwargs: Any) -> asyncio.subprocess.Process:
    """Start it on ``env``'s config and wait until it is ready (kwargs go to the exec)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mailrelay.cli.main", "serve", "-c", str(env.config_dir),
        stderr=asyncio.subprocess.PIPE, **kwargs)
    log = b""
    while b"mailrelay ready" not in log:
        line = await asyncio.wait_for(process.stderr.readline(), 30)
        assert line, f"server exited: {log.decode()}"
        log += line
    # Keep draining its log so the pipe never fills up and blocks the server.
    process.log_drain = asyncio.ensure_future(process.stderr.read())
    return process
