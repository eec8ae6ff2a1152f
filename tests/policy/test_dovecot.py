"""mailrelay.policy.dovecot against a real dovecot, and against broken or hostile sockets."""

from __future__ import annotations

import asyncio
import base64
import grp
import hashlib
import logging
import os
import pwd
import shutil
import signal
import subprocess
import textwrap
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from mailrelay.config import load_config
from mailrelay.errors import ConfigError
from mailrelay.policy.dovecot import MAX_LINE, MAX_LINES, DovecotAuth

DOVECOT = shutil.which("dovecot") or ("/usr/sbin/dovecot" if Path("/usr/sbin/dovecot").exists()
                                      else None)
needs_dovecot = pytest.mark.skipif(
    DOVECOT is None, reason="dovecot not installed (scripts/setup installs Debian's dovecot-core)")

USER = "imaponly@example.com"  # known to dovecot only
PASSWORD = "dovecot-only secret"
HASHED_USER = "hashed@example.com"
HASHED_PASSWORD = "another secret"
BROKEN_USER = "someone@broken.test"  # its passwd file is unreadable: dovecot fails inside


# --- a real dovecot, private to the test session ---------------------------------------


class Dovecot:
    def __init__(self, root: Path, process: subprocess.Popen):
        self.root = root
        self.process = process
        self.userdb = root / "run" / "auth-userdb"
        self.client = root / "run" / "auth-client"

    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture(scope="session")
def dovecot(tmp_path_factory) -> Dovecot:
    if DOVECOT is None:
        pytest.skip("dovecot not installed (scripts/setup installs Debian's dovecot-core)")
    root = tmp_path_factory.mktemp("dovecot")
    (root / "run").mkdir()
    (root / "lib").mkdir()
    (root / "passwd").mkdir()
    me = pwd.getpwuid(os.geteuid()).pw_name
    if os.geteuid() == 0:
        # dovecot runs its login helpers as these (Debian's package creates them), but
        # auth as root: pytest's temporary directories are private to root.
        internal, login, auth_user = "dovecot", "dovenull", "root"
    else:
        internal = login = auth_user = me
    sha256 = base64.b64encode(hashlib.sha256(HASHED_PASSWORD.encode()).digest()).decode()
    (root / "passwd" / "example.com").write_text(
        f"{USER}:{{PLAIN}}{PASSWORD}:65534:65534::/nonexistent::\n"
        f"{HASHED_USER}:{{SHA256}}{sha256}:65534:65534::/nonexistent::\n")
    # A passwd file dovecot cannot open (a symlink loop): an internal failure.
    (root / "passwd" / "broken.test").symlink_to("broken.test")
    (root / "dovecot.conf").write_text(textwrap.dedent(f"""\
        base_dir = {root}/run
        state_dir = {root}/lib
        log_path = {root}/dovecot.log
        ssl = no
        protocols =
        default_internal_user = {internal}
        default_internal_group = {grp.getgrgid(pwd.getpwnam(internal).pw_gid).gr_name}
        default_login_user = {login}
        auth_mechanisms = plain
        auth_failure_delay = 0
        passdb {{
          driver = passwd-file
          args = {root}/passwd/%d
        }}
        userdb {{
          driver = passwd-file
          args = {root}/passwd/%d
        }}
        service auth {{
          user = {auth_user}
          unix_listener auth-userdb {{
            mode = 0600
            user = {me}
          }}
          unix_listener auth-client {{
            mode = 0600
            user = {me}
          }}
        }}
        service auth-worker {{
          user = {auth_user}
        }}
        service anvil {{
          chroot =
        }}
        """))
    process = subprocess.Popen([DOVECOT, "-F", "-c", str(root / "dovecot.conf")],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    server = Dovecot(root, process)
    try:
        deadline = time.monotonic() + 15
        while not (server.userdb.exists() and server.client.exists()):
            if process.poll() is not None:
                pytest.fail(f"dovecot exited: {process.stderr.read().decode()} {server.log()}")
            if time.monotonic() > deadline:
                pytest.fail(f"dovecot did not create its sockets: {server.log()}")
            time.sleep(0.05)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stderr.close()


@pytest.fixture
def auth(dovecot) -> DovecotAuth:
    return DovecotAuth(dovecot.userdb, dovecot.client, timeout=5)


def dovecot_logs(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "mailrelay.dovecot"]


def assert_one_clean_line(caplog, *secrets: str) -> str:
    records = dovecot_logs(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].exc_info is None
    text = caplog.text
    assert "Traceback" not in text
    for secret in secrets:
        assert secret not in text
    return records[0].getMessage()


@needs_dovecot
async def test_dovecot_only_user_authenticates(auth, caplog):
    assert await auth.authenticate(USER, PASSWORD) is True
    assert await auth.authenticate(HASHED_USER, HASHED_PASSWORD, remote_ip="192.0.2.7") is True
    assert dovecot_logs(caplog) == []


@needs_dovecot
async def test_wrong_password_fails(auth, caplog):
    # dovecot answers failures on a 0.5 s tick: ask at once.
    assert await asyncio.gather(auth.authenticate(USER, "wrong password"),
                                auth.authenticate(HASHED_USER, PASSWORD),
                                auth.authenticate(USER, PASSWORD + "x")) == [False] * 3
    assert dovecot_logs(caplog) == []


@needs_dovecot
async def test_unknown_user(auth, caplog):
    assert await auth.exists("nobody@example.com") is False
    assert await auth.exists("nobody@nodomain.test") is False
    assert await auth.authenticate("nobody@example.com", PASSWORD) is False
    assert dovecot_logs(caplog) == []


@needs_dovecot
async def test_known_users_exist(auth):
    assert await auth.exists(USER) is True
    assert await auth.exists(HASHED_USER) is True


@needs_dovecot
async def test_dovecot_internal_failure_is_temporary(auth, caplog):
    """dovecot itself cannot read the passwd file: not "wrong", but "try again later"."""
    assert await auth.authenticate(BROKEN_USER, "x") is None
    assert "could not check the password" in assert_one_clean_line(caplog, "\tx")
    caplog.clear()
    assert await auth.exists(BROKEN_USER) is None
    assert "lookup failed" in assert_one_clean_line(caplog)


@needs_dovecot
async def test_injection_attempts_never_reach_dovecot(auth, caplog):
    """A TAB or LF would add fields or commands: such names and passwords are refused,
    and a real dovecot confirms nothing slipped through."""
    assert await auth.authenticate(f"{USER}\tresp=eA==", PASSWORD) is False
    assert await auth.authenticate(f"{USER}\nAUTH\t2\tPLAIN", PASSWORD) is False
    assert await auth.authenticate(f"{USER}\x00", PASSWORD) is False
    assert await auth.authenticate(USER, f"{PASSWORD}\x00{PASSWORD}") is False
    assert await auth.authenticate(USER, f"{PASSWORD}\n") is False
    assert await auth.exists(f"{USER}\tservice=imap") is False
    assert await auth.exists(f"x\nUSER\t2\t{USER}") is False
    assert all(PASSWORD not in r.getMessage() for r in dovecot_logs(caplog))
    # The same user, asked properly, still works.
    assert await auth.authenticate(USER, PASSWORD) is True


@needs_dovecot
async def test_many_logins_at_once_do_not_block(auth):
    results = await asyncio.gather(*(auth.authenticate(USER, PASSWORD if i % 2 else "no")
                                     for i in range(20)))
    assert results == [i % 2 == 1 for i in range(20)]


@needs_dovecot
async def test_autodetection_picks_the_first_socket_that_answers(dovecot, tmp_path):
    dead = tmp_path / "dead"
    dead.touch()  # exists, but nobody listens
    auth = DovecotAuth(None, None, userdb_candidates=[str(tmp_path / "none"), str(dead),
                                                      str(dovecot.userdb)],
                       client_candidates=[str(dovecot.client)])
    assert await auth.check() is None
    assert auth.userdb_path == str(dovecot.userdb)
    assert auth.client_path == str(dovecot.client)
    assert await auth.authenticate(USER, PASSWORD) is True


async def test_autodetection_finds_nothing(tmp_path, caplog):
    auth = DovecotAuth(None, None, timeout=5,
                       userdb_candidates=[str(tmp_path / "u")],
                       client_candidates=[str(tmp_path / "c")])
    assert "no userdb socket found" in await auth.check()
    assert await auth.exists(USER) is None
    assert "dovecot_userdb_path" in assert_one_clean_line(caplog)
    caplog.clear()
    assert await auth.authenticate(USER, PASSWORD) is None
    assert "no auth-client socket found" in assert_one_clean_line(caplog, PASSWORD)


async def test_missing_socket_is_none_at_once_with_one_log_line(tmp_path, caplog):
    auth = DovecotAuth(tmp_path / "auth-userdb", tmp_path / "auth-client", timeout=5)
    started = time.monotonic()
    assert await auth.authenticate(USER, PASSWORD) is None
    assert time.monotonic() - started < 0.5
    assert "No such file" in assert_one_clean_line(caplog, PASSWORD)
    caplog.clear()
    assert await auth.exists(USER) is None
    assert time.monotonic() - started < 1
    assert_one_clean_line(caplog)
    assert await auth.check() == f"{tmp_path / 'auth-userdb'}: No such file or directory"


# --- hostile or broken sockets ----------------------------------------------------------------


class FakeServer:
    """A unix socket that runs ``script(reader, writer)`` per connection and records what
    the client sent and how many bytes it was sent."""

    def __init__(self, path: Path, script):
        self.path = path
        self.script = script
        self.received: list[bytes] = []
        self.sent = 0
        self.connections = 0

    async def handle(self, reader, writer):
        self.connections += 1

        async def drain_client():
            self.received.append(await reader.read(MAX_LINE))
            while data := await reader.read(MAX_LINE):
                self.received[-1] += data

        reading = asyncio.ensure_future(drain_client())
        try:
            await self.script(self, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            await asyncio.sleep(0)
            reading.cancel()

    def write(self, writer, data: bytes) -> None:
        self.sent += len(data)
        writer.write(data)


@asynccontextmanager
async def fake(tmp_path: Path, script):
    fake_server = FakeServer(tmp_path / "s", script)
    server = await asyncio.start_unix_server(fake_server.handle, str(fake_server.path))
    try:
        yield fake_server
    finally:
        server.close()


HANDSHAKE = (b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\nSPID\t12345\n"
             b"CUID\t7\nCOOKIE\t0123456789abcdef\nDONE\n")


def replies(*chunks: bytes, wait: float = 0.0):
    async def script(server, writer):
        for chunk in chunks:
            server.write(writer, chunk)
            await writer.drain()
            await asyncio.sleep(0.02)
        await asyncio.sleep(wait)
    return script


def both(path: Path, timeout: float = 2) -> DovecotAuth:
    return DovecotAuth(path, path, timeout=timeout)


async def test_what_we_send_is_chasquids_request(tmp_path):
    async with fake(tmp_path, replies(HANDSHAKE, b"OK\t1\tuser=me@example.com\n")) as server:
        assert await both(server.path).authenticate("me@example.com", "pw",
                                                    remote_ip="::ffff:192.0.2.7") is True
    lines = server.received[0].decode().split("\n")
    assert lines[0] == "VERSION\t1\t1"
    assert lines[1] == f"CPID\t{os.getpid()}"
    plain = base64.b64encode(b"me@example.com\0me@example.com\0pw").decode()
    assert lines[2] == ("AUTH\t1\tPLAIN\tservice=smtp\tsecured\tno-penalty\tnologin\t"
                        f"rip=192.0.2.7\tresp={plain}")
    (tmp_path / "userdb").mkdir()
    async with fake(tmp_path / "userdb", replies(b"VERSION\t1\t1\nSPID\t1\n",
                                                 b"USER\t1\tme@example.com\tuid=1\n")) as server:
        assert await both(server.path).exists("me@example.com") is True
    assert server.received[0] == b"VERSION\t1\t1\nUSER\t1\tme@example.com\tservice=smtp\n"


@pytest.mark.parametrize("answer, result", [
    (b"OK\t1\tuser=x\n", True),
    (b"FAIL\t1\tuser=x\n", False),
    (b"FAIL\t1\n", False),
    (b"FAIL\t1\tuser=x\ttemp\n", None),
    (b"FAIL\t1\tcode=temp_fail\treason=database down\n", None),
    (b"CONT\t1\t\n", None),
    (b"OK\t2\tuser=x\n", None),  # not our request
    (b"OK\n", None),
    (b"MAYBE\t1\n", None),
    (b"\n", None),
])
async def test_authentication_answers(tmp_path, caplog, answer, result):
    async with fake(tmp_path, replies(HANDSHAKE, answer)) as server:
        assert await both(server.path).authenticate("me@example.com", "pw") is result
    if result is None:
        assert_one_clean_line(caplog, base64.b64encode(b"me@example.com\0me@example.com\0pw")
                              .decode())
    else:
        assert dovecot_logs(caplog) == []


@pytest.mark.parametrize("answer, result", [
    (b"USER\t1\tme@example.com\n", True),
    (b"NOTFOUND\t1\n", False),
    (b"FAIL\t1\treason=ldap down\n", None),
    (b"USER\t2\tme@example.com\n", None),
    (b"PASS\t1\n", None),
])
async def test_userdb_answers(tmp_path, caplog, answer, result):
    async with fake(tmp_path, replies(b"VERSION\t1\t1\nSPID\t9\n", answer)) as server:
        assert await both(server.path).exists("me@example.com") is result
    if result is None:
        assert_one_clean_line(caplog)


@pytest.mark.parametrize("greeting", [
    b"VERSION\t2\t0\n",  # a major version we do not speak
    b"HELLO\n",
    b"\x00\xff\xfe garbage \x01\x02\n",
    b"SPID\t1\nVERSION\t1\t1\n",
])
async def test_garbage_greetings(tmp_path, caplog, greeting):
    async with fake(tmp_path, replies(greeting + HANDSHAKE + b"OK\t1\n")) as server:
        started = time.monotonic()
        assert await both(server.path).authenticate("me@example.com", "pw") is None
        assert await both(server.path).exists("me@example.com") is None
        assert time.monotonic() - started < 1
    assert len(dovecot_logs(caplog)) == 2
    assert "unexpected greeting" in caplog.text


async def test_closed_mid_handshake(tmp_path, caplog):
    async with fake(tmp_path, replies(b"VERSION\t1\t2\nMECH\tPL")) as server:
        assert await both(server.path).authenticate("me@example.com", "pw") is None
    assert "closed mid-line" in assert_one_clean_line(caplog)


async def test_endless_line_is_cut_at_the_line_limit(tmp_path, caplog):
    async def endless(server, writer):
        server.write(writer, b"VERSION\t1\t")
        while server.sent < 100_000_000:
            server.write(writer, b"x" * 65536)
            await writer.drain()

    async with fake(tmp_path, endless) as server:
        started = time.monotonic()
        assert await both(server.path, timeout=5).authenticate("me@example.com", "pw") is None
        assert time.monotonic() - started < 1
    assert f"longer than {MAX_LINE}" in assert_one_clean_line(caplog)
    assert server.sent < 10_000_000  # the client stopped reading: the writer was held back


async def test_a_million_lines_are_not_read(tmp_path, caplog):
    async with fake(tmp_path, replies(b"VERSION\t1\t2\n" + b"MECH\tPLAIN\n" * 1_000_000)
                    ) as server:
        started = time.monotonic()
        assert await both(server.path).authenticate("me@example.com", "pw") is None
        assert time.monotonic() - started < 1
    assert f"more than {MAX_LINES} lines" in assert_one_clean_line(caplog)


async def test_silent_socket_times_out(tmp_path, caplog):
    async with fake(tmp_path, replies(wait=10)) as server:
        started = time.monotonic()
        assert await both(server.path, timeout=0.3).authenticate("me@example.com", "pw") is None
        assert await both(server.path, timeout=0.3).exists("me@example.com") is None
        elapsed = time.monotonic() - started
    assert 0.5 < elapsed < 1.5
    assert len(dovecot_logs(caplog)) == 2
    assert "no answer within 0.3s" in caplog.text


async def test_answer_that_never_comes_times_out(tmp_path, caplog):
    async with fake(tmp_path, replies(HANDSHAKE, wait=10)) as server:
        started = time.monotonic()
        assert await both(server.path, timeout=0.3).authenticate("me@example.com", "pw") is None
        assert time.monotonic() - started < 1
    assert "no answer within 0.3s" in assert_one_clean_line(caplog)


@pytest.mark.parametrize("user", ["a b@example.com", " me", "me\t", "me\n", "me\r", "me\x00",
                                  "me\x01", "me\u2028", "me\u00a0x", "", "x" * 600])
async def test_unsafe_user_names_are_not_sent(tmp_path, caplog, user):
    async with fake(tmp_path, replies(HANDSHAKE, b"OK\t1\n")) as server:
        assert await both(server.path).authenticate(user, "pw") is False
        assert await both(server.path).exists(user) is False
    assert server.connections == 0


@pytest.mark.parametrize("password", ["pw\t", "pw\n", "\rpw", "p\x00w", "", "x" * 2000])
async def test_unsafe_passwords_are_not_sent(tmp_path, caplog, password):
    async with fake(tmp_path, replies(HANDSHAKE, b"OK\t1\n")) as server:
        assert await both(server.path).authenticate("me@example.com", password) is False
    assert server.connections == 0
    assert_one_clean_line(caplog)


async def test_non_ascii_credentials_travel_as_utf8(tmp_path):
    async with fake(tmp_path, replies(HANDSHAKE, b"OK\t1\n")) as server:
        assert await both(server.path).authenticate("josé@example.com", "contraseña") is True
    auth_line = server.received[0].split(b"\n")[2]
    assert base64.b64decode(auth_line.split(b"resp=")[1]) == \
        "josé@example.com\0josé@example.com\0contraseña".encode()


# --- configuration ----------------------------------------------------------------------------


def write_config(directory: Path, extra: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "mailrelay.yaml").write_text(
        "hostname: mail.example.com\n" + textwrap.dedent(extra).lstrip("\n"))
    return directory


def test_config_auth_section(tmp_path):
    config = load_config(write_config(tmp_path, """
        auth:
          dovecot: true
          dovecot_userdb_path: /var/run/dovecot/auth-chasquid-userdb
          dovecot_client_path: run/auth-client
          dovecot_timeout: 2s
        """))
    assert config.auth.dovecot is True
    # Like every path in mailrelay.yaml, resolved (/var/run is /run on Debian).
    assert config.auth.dovecot_userdb_path == \
        Path("/var/run/dovecot/auth-chasquid-userdb").resolve()
    assert config.auth.dovecot_client_path == tmp_path / "run" / "auth-client"
    assert config.auth.dovecot_timeout == 2.0
    default = load_config(write_config(tmp_path / "d", "")).auth
    assert (default.dovecot, default.dovecot_userdb_path, default.dovecot_client_path,
            default.dovecot_timeout) == (False, None, None, 5.0)


@pytest.mark.parametrize("text, words", [
    ("auth:\n  dovecot: yes please\n", "auth.dovecot"),
    ("auth:\n  dovecot_auth: true\n", "unknown setting auth.dovecot_auth"),
    ("auth:\n  dovecot_timeout: -1\n", "auth.dovecot_timeout"),
])
def test_config_auth_errors(tmp_path, text, words):
    write_config(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.line == 3
    assert words in str(info.value)
