"""How ``mailrelay user add/passwd`` get a password, run as the real command: from standard
input only with --password-stdin, else from the terminal (a real pseudo-terminal here);
never a getpass warning or a traceback; at least ``users.min_password_length`` characters."""

from __future__ import annotations

import fcntl
import os
import select
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from mailrelay.config import load_config
from mailrelay.errors import ConfigError
from mailrelay.policy.users import UserDB


@pytest.fixture
def confdir(tmp_path: Path) -> Path:
    (tmp_path / "mailrelay.yaml").write_text("hostname: mail.example.com\ndata_dir: var\n")
    (tmp_path / "domains" / "example.com").mkdir(parents=True)
    return tmp_path


def mailrelay(confdir: Path, *argv: str, stdin: str | None = None
              ) -> subprocess.CompletedProcess[str]:
    """The real command, in a session of its own: no terminal at all."""
    return subprocess.run([sys.executable, "-m", "mailrelay.cli.main", "-c", str(confdir),
                           *argv], capture_output=True, text=True, timeout=60, input=stdin,
                          stdin=None if stdin is not None else subprocess.DEVNULL,
                          start_new_session=True)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def users(confdir: Path) -> UserDB:
    return UserDB.load(confdir / "domains" / "example.com" / "users", "example.com")


def on_terminal(confdir: Path, argv: list[str], answers: list[str],
                stdin_text: str | None = None) -> tuple[int, str]:
    """Run with a pseudo-terminal as the controlling terminal (getpass asks on /dev/tty),
    answering each prompt; standard input is the terminal too, unless ``stdin_text`` is
    given (then it is a pipe). Returns the exit status and everything shown."""
    master, slave = os.openpty()

    def controlling_terminal() -> None:
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

    process = subprocess.Popen(
        [sys.executable, "-m", "mailrelay.cli.main", "-c", str(confdir), *argv],
        stdin=subprocess.PIPE if stdin_text is not None else slave, stdout=slave,
        stderr=slave, preexec_fn=controlling_terminal, close_fds=True)
    os.close(slave)
    if stdin_text is not None:
        assert process.stdin is not None
        process.stdin.write(stdin_text.encode())
        process.stdin.close()
    shown = b""
    pending = list(answers)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the other side closed: the process is gone
                break
            if not chunk:
                break
            shown += chunk
            # A prompt ("Password: ", "Password for x: ") not answered yet: answer it.
            if pending and shown.rstrip().endswith(b":") and shown.count(b"assword") > (
                    len(answers) - len(pending)):
                os.write(master, pending.pop(0).encode() + b"\n")
        elif process.poll() is not None:
            break
    os.close(master)
    return process.wait(timeout=30), shown.decode("utf-8", "replace")


def test_piped_password_without_the_option_and_no_terminal(confdir):
    for action in ("add", "passwd"):
        line = one_line_error(mailrelay(confdir, "user", action, "me@example.com",
                                        stdin="a good password\n"))
        if action == "passwd":
            assert "no such user" in line
            continue
        assert line == ("mailrelay: no terminal to ask for the password on: give it on "
                        "standard input with --password-stdin")
    assert not (confdir / "domains" / "example.com" / "users").exists()


def test_password_stdin_for_add_and_passwd(confdir):
    result = mailrelay(confdir, "user", "add", "me@example.com", "--password-stdin",
                       stdin="a good password\n")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert users(confdir).check_password("me", "a good password")
    result = mailrelay(confdir, "user", "passwd", "me@example.com", "--password-stdin",
                       stdin="another password\n")
    assert result.returncode == 0, result.stderr
    assert users(confdir).check_password("me", "another password")
    # No line at all on standard input.
    line = one_line_error(mailrelay(confdir, "user", "passwd", "me@example.com",
                                    "--password-stdin", stdin=""))
    assert line == "mailrelay: no password on standard input"


def test_minimum_length_default_and_configured(confdir):
    for short in ("a", "1234567"):
        for action in ("add", "passwd"):
            address = "new@example.com" if action == "add" else "me@example.com"
            if action == "passwd":
                mailrelay(confdir, "user", "add", address, "--password-stdin",
                          stdin="the first password\n")
            line = one_line_error(mailrelay(confdir, "user", action, address,
                                            "--password-stdin", stdin=short + "\n"))
            assert line == (f"mailrelay: the password is too short: {len(short)} "
                            f"character{'s' if len(short) > 1 else ''}, at least 8 "
                            "(users.min_password_length in mailrelay.yaml)")
    assert users(confdir).check_password("me", "the first password")
    assert "new" not in users(confdir)
    assert mailrelay(confdir, "user", "add", "eight@example.com", "--password-stdin",
                     stdin="12345678\n").returncode == 0

    config = confdir / "mailrelay.yaml"
    config.write_text(config.read_text() + "users:\n  min_password_length: 12\n")
    assert load_config(confdir).users.min_password_length == 12
    line = one_line_error(mailrelay(confdir, "user", "passwd", "eight@example.com",
                                    "--password-stdin", stdin="eleven char\n"))
    assert "11 characters, at least 12" in line
    # Checking a password is not setting one: a short old password still authenticates.
    assert mailrelay(confdir, "user", "authenticate", "eight@example.com",
                     "--password-stdin", stdin="12345678\n").returncode == 0


@pytest.mark.parametrize("value", ["0", "-3", "eight", "[8]"])
def test_min_password_length_must_be_a_positive_number(confdir, value):
    config = confdir / "mailrelay.yaml"
    config.write_text(config.read_text() + f"users:\n  min_password_length: {value}\n")
    with pytest.raises(ConfigError, match=r"mailrelay.yaml:4: "):
        load_config(confdir)


def test_on_a_terminal_it_asks_twice(confdir):
    code, shown = on_terminal(confdir, ["user", "add", "me@example.com"],
                              ["typed on a terminal", "typed on a terminal"])
    assert code == 0, shown
    assert "Password:" in shown and "Repeat password:" in shown
    assert "typed on a terminal" not in shown  # not echoed
    assert "Warning" not in shown and "Traceback" not in shown
    assert users(confdir).check_password("me", "typed on a terminal")

    code, shown = on_terminal(confdir, ["user", "passwd", "me@example.com"],
                              ["short", "short"])
    assert code == 1 and "the password is too short: 5 characters" in shown, shown
    code, shown = on_terminal(confdir, ["user", "passwd", "me@example.com"],
                              ["one good password", "another one"])
    assert code == 1 and "passwords do not match" in shown, shown
    assert users(confdir).check_password("me", "typed on a terminal")


def test_on_a_terminal_a_piped_password_needs_the_option(confdir):
    """``echo pw | mailrelay user add …`` typed in a terminal: the pipe is not ignored
    while a prompt waits on the terminal; it says to add --password-stdin."""
    code, shown = on_terminal(confdir, ["user", "add", "me@example.com"], [],
                              stdin_text="a good password\n")
    assert code == 1, shown
    assert shown.strip() == ("mailrelay: standard input is not a terminal: to give the "
                             "password on it, add --password-stdin")
    code, shown = on_terminal(confdir, ["user", "add", "me@example.com", "--password-stdin"],
                              [], stdin_text="a good password\n")
    assert code == 0, shown
    assert users(confdir).check_password("me", "a good password")
