"""systemd socket activation wired into ``mailrelay serve`` (issue 20, item 6): a real
``python -m mailrelay.cli.main serve`` child started the way systemd starts it, with
listening sockets at fds 3.. and LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES set."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import textwrap
from pathlib import Path

from tests.support.client import RawSMTP
from tests.support.process import wait_ready
from tests.support.relay import HOSTNAME, PASSWORD, USER

REPO = Path(__file__).resolve().parent.parent.parent

# What systemd does between fork and exec: the sockets to 3, 4, …, the variables, and
# LISTEN_PID set by the shell to the pid the service keeps ($$: exec keeps it).
WRAPPER = textwrap.dedent(r"""
    import fcntl, os, sys
    fds = [int(fd) for fd in sys.argv[1].split(",")]
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
    for fd in fds:
        os.close(fd)
    for index, fd in enumerate(high):
        os.dup2(fd, 3 + index)
        os.close(fd)
    os.environ["LISTEN_FDS"] = str(len(fds))
    os.environ["LISTEN_FDNAMES"] = sys.argv[2]
    os.execvp("sh", ["sh", "-c",
                     'LISTEN_PID=$$ exec "$0" -m mailrelay.cli.main serve -c "$1"',
                     sys.executable, sys.argv[3]])
""")


def listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


async def serve_activated(env, sockets: list[socket.socket], names: str):
    fds = [s.fileno() for s in sockets]
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith("LISTEN_") and k != "NOTIFY_SOCKET"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRAPPER, ",".join(map(str, fds)), names, str(env.config_dir),
        pass_fds=fds, stderr=asyncio.subprocess.PIPE, env=environment, cwd=REPO)
    return process, await wait_ready(process)


async def test_serve_takes_the_sockets_systemd_passes_and_binds_the_rest(env):
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    env.sink = env.add_sink("127.0.0.2")
    smtp, tls = listener(), listener()
    process = None
    try:
        process, log = await serve_activated(env, [smtp, tls], "smtp:submission_tls")
        assert "systemd passed sockets for smtp, submission_tls" in log
        # The listen.smtp and listen.submission_tls addresses are not bound...
        assert f"listening on 127.0.0.1:{env.ports['smtp']}" not in log
        assert f"listening on 127.0.0.1:{env.ports['submission_tls']}" not in log
        assert f"listening on 127.0.0.1:{smtp.getsockname()[1]}" in log
        for kind in ("smtp", "submission_tls"):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", env.ports[kind])
            except ConnectionRefusedError:
                continue
            writer.close()
            raise AssertionError(f"listen.{kind} is bound although systemd passed it")
        # ...listen.submission is, as usual.
        client = await RawSMTP.connect("127.0.0.1", env.ports["submission"])
        await client.close()

        # Mail for a local user through the activated port 25.
        client = await RawSMTP.connect("127.0.0.1", smtp.getsockname()[1])
        assert (await client.cmd("EHLO client.test"))[0] == 250
        assert await client.send_message("a@elsewhere.test", [USER],
                                         b"Subject: through systemd's socket\r\n\r\nhi\r\n") \
            == 250
        await client.close()
        [stored] = await env.wait_mailbox(1)
        assert b"Subject: through systemd's socket" in stored

        # A submission through the activated 465 (implicit TLS).
        client = await RawSMTP.connect("127.0.0.1", tls.getsockname()[1],
                                       tls=env.client_tls(), server_hostname=HOSTNAME)
        assert (await client.cmd("EHLO client.test"))[0] == 250
        assert (await client.auth_plain(USER, PASSWORD))[0] == 235
        assert await client.send_message(USER, ["friend@remote.test"],
                                         b"Subject: submitted\r\n\r\nhi\r\n") == 250
        await client.close()
        await env.sink.until(1)
    finally:
        smtp.close()
        tls.close()
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 30) == 0


async def test_a_socket_with_a_wrong_name_stops_the_start(env):
    sock = listener()
    try:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", WRAPPER, str(sock.fileno()), "imaps", str(env.config_dir),
            pass_fds=[sock.fileno()], stderr=asyncio.subprocess.PIPE, env=environment,
            cwd=REPO)
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    finally:
        sock.close()
    assert process.returncode == 1
    # One line says why (the tests run as root: the warning about that comes first).
    [line] = [line for line in stderr.decode().strip().splitlines()
              if "running as root" not in line]
    assert "descriptor 3 is named 'imaps'" in line and "FileDescriptorName=" in line
