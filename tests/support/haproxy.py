"""A real haproxy (Debian's) on loopback in front of the server under test."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import textwrap
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from bench.ports import free_port

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists()
                                      else None)
needs_haproxy = pytest.mark.skipif(
    HAPROXY is None, reason="haproxy not installed (scripts/setup installs Debian's haproxy)")


def listening(port: int) -> bool:
    """Whether a TCP socket listens on ``port``, without connecting to it (a connection
    would reach the backend as a proxied client)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()  # sl local_address rem_address st ...
            if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":  # 0A: LISTEN
                return True
    return False


@asynccontextmanager
async def haproxy(directory: Path, backends: dict[str, tuple[int, str]]):
    """haproxy in ``mode tcp``: for each name, a frontend on a free loopback port to
    ``127.0.0.1:<port>`` with ``option`` (``send-proxy``, ``send-proxy-v2``). Yields the
    frontend ports by name."""
    ports = {name: free_port() for name in backends}
    sections = "".join(textwrap.dedent(f"""\
        listen {name}
            bind 127.0.0.1:{ports[name]}
            server mailrelay 127.0.0.1:{port} {option}
        """) for name, (port, option) in backends.items())
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "haproxy.cfg"
    config.write_text(textwrap.dedent("""\
        global
            maxconn 200
        defaults
            mode tcp
            timeout connect 5s
            timeout client 30s
            timeout server 30s
        """) + sections)
    log_path = directory / "haproxy.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not all(listening(port) for port in ports.values()):
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "haproxy did not start"
            await asyncio.sleep(0.05)
        yield ports
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
