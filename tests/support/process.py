"""Running ``mailrelay serve`` as its own process, for tests that signal or kill it."""

from __future__ import annotations

import asyncio
import atexit
import functools
import os
import shutil
import site
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


async def start_server(env, log_file: Path | None = None,
                       **kwargs: Any) -> asyncio.subprocess.Process:
    """Start it on ``env``'s config and wait until it is ready (kwargs go to the exec).

    With ``log_file`` its stderr (the log) goes to that file, as a log file fail2ban reads.
    """
    command = [sys.executable, "-m", "mailrelay.cli.main", "serve", "-c", str(env.config_dir)]
    # A test that wants notifications passes its own NOTIFY_SOCKET; none leaks from a
    # service manager that runs the tests.
    kwargs.setdefault("env", {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"})
    if log_file is not None:
        with open(log_file, "wb") as handle:
            process = await asyncio.create_subprocess_exec(*command, stderr=handle, **kwargs)
        for _ in range(600):
            if b"mailrelay ready" in log_file.read_bytes():
                return process
            assert process.returncode is None, f"server exited: {log_file.read_text()}"
            await asyncio.sleep(0.05)
        raise AssertionError(f"server not ready after 30 s: {log_file.read_text()}")
    process = await asyncio.create_subprocess_exec(
        *command, stderr=asyncio.subprocess.PIPE, **kwargs)
    await wait_ready(process)
    return process


async def wait_ready(process: asyncio.subprocess.Process) -> str:
    """Read a server's stderr (a pipe) until "mailrelay ready"; then keep draining it, so
    the pipe never fills up and blocks the server. Returns the log up to there."""
    assert process.stderr is not None
    log = b""
    while b"mailrelay ready" not in log:
        line = await asyncio.wait_for(process.stderr.readline(), 30)
        assert line, f"server exited: {log.decode()}"
        log += line
    process.log_drain = asyncio.ensure_future(process.stderr.read())
    return log.decode()


def make_python(directory: Path) -> str:
    """A Python in ``directory`` that runs this test environment's code (mailrelay and
    its dependencies through this interpreter's site-packages), for running commands
    whose sys.executable another user must be able to execute: this interpreter may sit
    where only root can reach it (pyenv under /root), as `mailrelay check` then says."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--copies", str(directory)],
                   check=True, capture_output=True, timeout=60)
    [site_dir] = (directory / "lib").glob("python*/site-packages")
    lines = "".join(f"import site; site.addsitedir({path!r})\n"
                    for path in site.getsitepackages())
    (site_dir / "mailrelay-tests.pth").write_text(lines)
    return str(directory / "bin" / "python")


@functools.cache
def python_for_other_users() -> str:
    """make_python in a directory every user can traverse, once per test session."""
    root = Path(tempfile.mkdtemp(prefix="mailrelay-python-"))
    root.chmod(0o755)
    atexit.register(shutil.rmtree, root, True)
    return make_python(root / "venv")
