"""Users and aliases files on the real server (issue 16, rows 7 and 10): each domain's
users load on their own, a broken file refuses the start (file:line) and keeps the last
good table on reload, and `mailrelay user` says when the running server did not take its
change."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bench.ports import free_port
from mailrelay.config import load_config
from mailrelay.errors import ConfigError
from mailrelay.policy import users as users_mod
from mailrelay.server import Server
from tests.support.client import RawSMTP
from tests.support.relay import HOSTNAME, PASSWORD, USER, RelayEnv

BOB = "bob@other.test"
BOB_PASSWORD = "bob's own password"


@pytest.fixture(autouse=True)
def fast_scrypt(monkeypatch):
    monkeypatch.setattr(users_mod, "SCRYPT_LN", 4)  # hashes this process writes


def mailrelay(env, *argv: str, stdin: str = "", prefix: tuple[str, ...] = ()
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, "-m", "mailrelay.cli.main", *argv,
                           "-c", str(env.config_dir)],
                          input=stdin, capture_output=True, text=True, timeout=60, cwd="/")


async def login(env, user: str, password: str) -> int:
    client = await RawSMTP.connect("127.0.0.1", env.ports["submission"])
    await client.cmd("EHLO client.test")
    await client.starttls(env.client_tls(), HOSTNAME)
    await client.cmd("EHLO client.test")
    code, _ = await client.auth_plain(user, password)
    await client.close()
    return code


async def test_a_broken_users_file_holds_back_only_its_own_domain(env, caplog):
    """other.test's users file gets a garbage line: `user remove` in example.com takes
    effect in the running server all the same (it used to keep everyone's old entries,
    so the removed user could still log in); other.test keeps its last good users."""
    env.add_user(BOB, BOB_PASSWORD)
    env.add_user("ann@example.com", "ann's password")
    await env.start()
    other = env.config_dir / "domains" / "other.test" / "users"
    other.write_text(other.read_text() + "garbage-line-without-a-hash\n")
    garbage_line = len(other.read_text().splitlines())

    result = await asyncio.to_thread(mailrelay, env, "user", "remove", "ann@example.com")
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("removed ann@example.com\n", "")
    assert await login(env, "ann@example.com", "ann's password") == 535
    assert await login(env, USER, PASSWORD) == 235
    assert await login(env, BOB, BOB_PASSWORD) == 235, "other.test keeps its last good users"

    assert env.server.reload() is False
    assert any(f"{other}:{garbage_line}: " in r.getMessage() and "keeping the last good users" in
               r.getMessage() for r in caplog.records)
    assert await login(env, "ann@example.com", "ann's password") == 535


async def test_a_broken_users_file_refuses_the_start(env):
    """At start there is no last good table: the server refuses, naming file and line, as
    `check` does (starting without the domain's users would refuse their mail: 550)."""
    users = env.config_dir / "domains" / "example.com" / "users"
    users.write_text(users.read_text() + "\nnot a users line\n")
    with pytest.raises(ConfigError) as caught:
        Server(load_config(env.config_dir))
    assert str(caught.value).startswith(f"{users}:")


@pytest.mark.parametrize("broken", ["unreadable", "bad line"])
async def test_a_broken_aliases_file_refuses_the_start(env, broken):
    """It used to start anyway and answer 550 5.1.1 for every alias."""
    aliases = env.config_dir / "domains" / "example.com" / "aliases"
    if broken == "unreadable":
        aliases.mkdir()  # reading it fails (EISDIR), for root too
        expected = f"{aliases}: cannot read: Is a directory"
    else:
        aliases.write_text("postmaster: me\nsales me\n")
        expected = f"{aliases}:2: "
    with pytest.raises(ConfigError) as caught:
        Server(load_config(env.config_dir))
    assert str(caught.value).startswith(expected), caught.value
    result = await asyncio.to_thread(mailrelay, env, "serve")
    assert result.returncode == 1 and expected in result.stderr


async def test_an_unreadable_aliases_file_on_reload_keeps_the_last_good_table(env):
    aliases = env.config_dir / "domains" / "example.com" / "aliases"
    aliases.write_text("sales: me\n")
    await env.start()
    aliases.unlink()
    aliases.mkdir()
    assert env.server.reload() is False
    client = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
    await client.cmd("EHLO mx.sender.test")
    await client.cmd("MAIL FROM:<alice@sender.test>")
    assert (await client.cmd("RCPT TO:<sales@example.com>"))[0] == 250
    await client.close()


# -- the CLI checks that the running server took its change ---------------------------------

NOBODY = (65534, 65534)
AS_NOBODY = ("setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups")


@pytest.fixture
async def served_by_nobody(dns_server, ca):
    """A server process running as nobody (the service user), on a configuration it owns,
    under a directory other users can traverse."""
    if os.geteuid() != 0:
        pytest.skip("needs root (a server as another user, files root owns)")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    root = Path(tempfile.mkdtemp(prefix="mailrelay-users-"))
    root.chmod(0o755)
    env = RelayEnv(root=root, dns=dns_server, ca=ca, sink_port=free_port())
    env.write_config()
    env.add_user()
    env.add_user("ann@example.com", "ann's password")
    for path in [env.config_dir, *env.config_dir.rglob("*")]:
        os.chown(path, *NOBODY, follow_symlinks=False)
    process = await asyncio.create_subprocess_exec(
        *AS_NOBODY, sys.executable, "-m", "mailrelay.cli.main", "serve",
        "-c", str(env.config_dir), cwd="/", stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"})
    log = b""
    drain = None
    try:
        while b"mailrelay ready" not in log:
            line = await asyncio.wait_for(process.stderr.readline(), 30)
            assert line, f"server exited: {log.decode()}"
            log += line
        drain = asyncio.ensure_future(process.stderr.read())  # the pipe must not fill up
        yield env
    finally:
        if process.returncode is None:
            process.terminate()
            await asyncio.wait_for(process.wait(), 30)
        if drain is not None:
            await drain
        env.close()
        shutil.rmtree(root, ignore_errors=True)


async def test_the_cli_warns_when_the_running_server_did_not_take_its_change(
        served_by_nobody):
    """root edited the users file by hand (now root's, mode 0600): the server, as nobody,
    cannot read it, so `user remove` changes the file but not what the server does. The
    CLI says so (exit 1) instead of reporting success."""
    env = served_by_nobody
    users = env.config_dir / "domains" / "example.com" / "users"
    os.chown(users, 0, 0)
    result = await asyncio.to_thread(mailrelay, env, "user", "remove", "ann@example.com")
    assert result.returncode == 1
    assert result.stdout == "removed ann@example.com\n"
    [warning] = result.stderr.splitlines()
    assert warning.startswith(f"warning: {users} is saved, but the running server did not "
                              "take it: ")
    assert "cannot read: Permission denied" in warning
    assert await login(env, "ann@example.com", "ann's password") == 235, \
        "the server still has the old users: the warning was due"

    os.chown(users, *NOBODY)  # fixed: the next change takes effect, and nothing is said
    result = await asyncio.to_thread(mailrelay, env, "user", "passwd", USER,
                                     "--password-stdin", stdin="a new password\n")
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert await login(env, USER, "a new password") == 235
    assert await login(env, "ann@example.com", "ann's password") == 535


async def test_aliases_commands_say_when_the_running_server_did_not_take_the_change(
        served_by_nobody, tmp_path):
    """root wrote the aliases file (root's, mode 0600): `aliases add`, `remove` and `edit`
    said "told the running server to reload" and exited 0 while the server logged that
    it cannot read the file. Now they ask it, as `user add` does, and warn (exit 1)."""
    env = served_by_nobody
    aliases = env.config_dir / "domains" / "example.com" / "aliases"
    aliases.write_text("postmaster: me\n")
    os.chown(aliases, 0, 0)
    aliases.chmod(0o600)

    async def rcpt(address: str) -> int:
        client = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
        await client.cmd("EHLO mx.sender.test")
        await client.cmd("MAIL FROM:<alice@sender.test>")
        code = (await client.cmd(f"RCPT TO:<{address}>"))[0]
        await client.close()
        return code

    editor = tmp_path / "editor.py"
    editor.write_text("import sys\nopen(sys.argv[1], 'a').write('team: me\\n')\n")
    commands = [("aliases", "add", "example.com", "sales: me"),
                ("aliases", "remove", "example.com", "postmaster"),
                ("aliases", "edit", "example.com")]
    for argv in commands:
        result = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "mailrelay.cli.main", *argv,
                             "-c", str(env.config_dir)],
            capture_output=True, text=True, timeout=60, cwd="/", stdin=subprocess.DEVNULL,
            env={**os.environ, "EDITOR": f"{sys.executable} {editor}"})
        assert result.returncode == 1, (argv, result.stdout, result.stderr)
        assert "told the running server" not in result.stdout
        [warning] = [line for line in result.stderr.splitlines()
                     if line.startswith("warning: ") and "did not take" in line]
        assert warning.startswith(f"warning: {aliases} is saved, but the running server did "
                                  "not take it: "), warning
        assert "cannot read: Permission denied" in warning
    assert await rcpt("sales@example.com") == 550, "the server still has the old aliases"

    os.chown(aliases, *NOBODY)  # fixed: the next change is taken, and said so
    result = await asyncio.to_thread(mailrelay, env, "aliases", "add", "example.com",
                                     "info: me")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "the running server took it"
    assert await rcpt("sales@example.com") == 250 and await rcpt("info@example.com") == 250
