"""``mailrelay serve`` as the real command: it says at start when it runs as root, and
the way README ("Running without systemd") and init give to run it as the service user
instead, with only the capability for ports below 1024, works."""

from __future__ import annotations

import os
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.support.process import python_for_other_users
from tests.support.relay import free_port

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (another uid, port < 1024)")


def low_port() -> int:
    """A free port below 1024 on 127.0.0.1 (only root and CAP_NET_BIND_SERVICE bind it)."""
    for port in random.sample(range(600, 1024), 100):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port below 1024")


def serve_until_ready(command: list[str]) -> tuple[int | None, str]:
    """Start ``command`` (a serve), wait for "mailrelay ready" or its exit, stop it; the
    exit status when it stopped by itself (None: it was ready) and its log so far."""
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                               stdin=subprocess.DEVNULL, text=True, cwd="/", env=env)
    log = []
    deadline = time.monotonic() + 30
    try:
        assert process.stderr is not None
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                return process.wait(timeout=30), "".join(log)
            log.append(line)
            if "mailrelay ready" in line:
                return None, "".join(log)
        raise AssertionError(f"not ready after 30 s: {''.join(log)}")
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)


def small_config(directory: Path, smtp_port: int) -> Path:
    (directory / "domains" / "example.com").mkdir(parents=True)
    (directory / "domains" / "example.com" / "aliases").write_text("postmaster: me@gmail.test\n")
    (directory / "mailrelay.yaml").write_text(yaml.safe_dump({
        "hostname": "mail.example.com", "data_dir": "var", "tls": {"self_signed": True},
        "listen": {"smtp": [f"127.0.0.1:{smtp_port}"],
                   "submission": [f"127.0.0.1:{free_port()}"],
                   "submission_tls": [f"127.0.0.1:{free_port()}"]},
    }))
    return directory


@needs_root
def test_serve_as_root_warns(open_dir):
    """It ran entirely as root without a word: pipe targets and hooks as root too."""
    conf = small_config(open_dir / "conf", free_port())
    status, log = serve_until_ready([sys.executable, "-m", "mailrelay.cli.main", "serve",
                                     "-c", str(conf)])
    assert status is None, log
    [warning] = [line for line in log.splitlines() if " WARNING mailrelay: running as root" in line]
    assert "systemd" in warning and "setpriv" in warning


@needs_root
def test_init_without_systemd_prints_a_start_that_binds_low_ports_as_the_service_user(
        open_dir):
    """init --no-systemd said "Then `mailrelay serve -c …`": as root that runs all as
    root, and as the service user it cannot bind port 25. It now prints the setpriv
    command of README's "Running without systemd"; run as printed (with this test's
    Python and ports), the server starts as the service user, binds a port below 1024,
    and does not warn."""
    etc, var = open_dir / "etc", open_dir / "var"
    result = subprocess.run(
        [sys.executable, "-m", "mailrelay.cli.main", "init", "example.com", "--hostname",
         "mail.example.com", "--forward-to", "me@gmail.test", "--user", "me@example.com",
         "--password-stdin", "-c", str(etc), "--data-dir", str(var), "--service-user",
         "nobody", "--no-systemd", "--ip", "192.0.2.1"],
        input="a good password\n", capture_output=True, text=True, timeout=120, cwd="/")
    assert result.returncode == 0, result.stderr
    [command] = [line.strip() for line in result.stdout.splitlines()
                 if line.strip().startswith("setpriv ")]
    argv = shlex.split(command)
    assert argv[:8] == ["setpriv", "--reuid=nobody", f"--regid={group_of('nobody')}",
                        "--init-groups", "--inh-caps=+net_bind_service",
                        "--ambient-caps=+net_bind_service",
                        "--bounding-set=-all,+net_bind_service", "--no-new-privs"]
    assert argv[-3:] == ["serve", "-c", str(etc)]
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert re.sub(r"\s*\\\n\s*", " ", readme).count(" ".join(argv[3:8])) >= 1

    port = low_port()
    settings = yaml.safe_load((etc / "mailrelay.yaml").read_text())
    settings["listen"] = {"smtp": [f"127.0.0.1:{port}"],
                          "submission": [f"127.0.0.1:{free_port()}"],
                          "submission_tls": [f"127.0.0.1:{free_port()}"]}
    settings["tls"]["self_signed"] = True  # no acme.sh here
    (etc / "mailrelay.yaml").write_text(yaml.safe_dump(settings))
    binary = argv.index("serve") - 1
    argv[binary:binary + 1] = [python_for_other_users(), "-m", "mailrelay.cli.main"]
    status, log = serve_until_ready(argv)
    assert status is None, log
    assert f"listening on 127.0.0.1:{port}" in log
    assert "running as root" not in log


def group_of(user: str) -> str:
    import grp
    import pwd

    return grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name


def test_serve_and_check_name_the_same_first_error_of_a_users_file(tmp_path):
    """Two bad lines in a users file: serve refuses to start naming the first, the one
    check reports first (the operator saw line 7 in the log and line 6 in check; not
    reproduced: both read the file through UserDB.load_all, and this holds them to it)."""
    conf = small_config(tmp_path / "conf", free_port())
    users = conf / "domains" / "example.com" / "users"
    users.write_text("# users\n\nme !\nyou !\nthem !\nbad line here\nworse\n")
    status, log = serve_until_ready([sys.executable, "-m", "mailrelay.cli.main", "serve",
                                     "-c", str(conf)])
    assert status == 1
    [line] = [x for x in log.splitlines() if x.startswith("mailrelay: ")]
    assert line.startswith(f"mailrelay: {users}:6: ")
    checked = subprocess.run([sys.executable, "-m", "mailrelay.cli.main", "check", "-c",
                              str(conf)], capture_output=True, text=True, timeout=60)
    errors = [x for x in checked.stderr.splitlines() if x.startswith("error: ")]
    assert errors[0] == f"error: {line.removeprefix('mailrelay: ')}"
    assert errors[1].startswith(f"error: {users}:7: ")


def test_serve_waits_for_commands_without_a_thread_each():
    """An MDA or hook ends: the loop hears it from a pidfd, not from a thread per command
    (Python 3.11's default; 3.12 uses pidfds itself)."""
    code = (
        "import asyncio, threading\n"
        "from mailrelay.cli.serve import wait_for_commands_by_pidfd\n"
        "wait_for_commands_by_pidfd()\n"
        "async def main():\n"
        "    process = await asyncio.create_subprocess_exec('sleep', '0.3')\n"
        "    threads = threading.active_count()\n"
        "    return threads, await process.wait()\n"
        "print(*asyncio.run(main()))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, check=True)
    assert done.stdout.split() == ["1", "0"]
