"""``mailrelay check`` (and one-line errors of the command) run as a real subprocess."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from mailrelay import users as users_mod
from mailrelay.users import UserDB
from tests.delivery.test_relay import RELAY_PASSWORD, configure_relay, start_relay
from tests.support.relay import free_port


@pytest.fixture(autouse=True)
def fast_scrypt(monkeypatch):
    # Hashes written by this process; the server reads any valid ln.
    monkeypatch.setattr(users_mod, "SCRYPT_LN", 4)


def mailrelay(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailrelay.cli.main", *argv],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )


def check(confdir: Path) -> subprocess.CompletedProcess[str]:
    return mailrelay("check", "-c", str(confdir))


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """Exit 1 with exactly one line on stderr and no traceback; returns that line."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert "Traceback" not in result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mailrelay: ")
    return lines[0]


@pytest.fixture
def confdir(tmp_path: Path) -> Path:
    directory = tmp_path / "conf"
    (directory / "domains" / "example.com").mkdir(parents=True)
    (directory / "domains" / "example.org").mkdir(parents=True)
    (directory / "mailrelay.yaml").write_text(
        "hostname: mail.example.com\n"
        "data_dir: var\n"
        "tls: {self_signed: true}\n"
    )
    db = UserDB.load(directory / "domains" / "example.com" / "users", "example.com")
    db.set_password("me", "pw")
    db.save()
    return directory


def test_check_good_config(confdir):
    result = check(confdir)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    domain_lines = [line for line in lines if line.startswith("domain ")]
    assert len(domain_lines) == 2
    assert domain_lines[0].startswith("domain example.com: 1 user(s)")
    assert domain_lines[1].startswith("domain example.org: 0 user(s)")
    assert any("mail.example.com" in line for line in lines)
    assert any("self-signed" in line for line in lines)
    # check changes nothing on disk: no data_dir, no certificate.
    assert not (confdir / "var").exists()


def test_check_counts_users_and_receive_only(confdir):
    db = UserDB.load(confdir / "domains" / "example.org" / "users", "example.org")
    db.set_password("a", "pw")
    db.add_receive_only("b")
    db.save()
    result = check(confdir)
    assert result.returncode == 0, result.stderr
    assert "domain example.org: 2 user(s)" in result.stdout


def test_check_with_config_option_before_command(confdir):
    result = mailrelay("-c", str(confdir), "check")
    assert result.returncode == 0, result.stderr
    assert "domain example.com: 1 user(s)" in result.stdout


def test_check_broken_yaml(confdir):
    (confdir / "mailrelay.yaml").write_text(
        "hostname: mail.example.com\n"
        "limits:\n"
        "  max_errors: 3\n"
        "  max_message_size: lots\n"
    )
    line = one_line_error(check(confdir))
    assert f"{confdir.resolve() / 'mailrelay.yaml'}:4:" in line
    assert "mailrelay.yaml:4:" in line


def test_check_yaml_syntax_error(confdir):
    (confdir / "mailrelay.yaml").write_text("hostname: mail.example.com\nlisten: smtp: 1\n")
    line = one_line_error(check(confdir))
    assert "mailrelay.yaml:2:" in line


def test_check_unknown_setting(confdir):
    (confdir / "mailrelay.yaml").write_text(
        "hostname: mail.example.com\n\n\nlistn:\n  smtp: ['127.0.0.1:25']\n")
    line = one_line_error(check(confdir))
    assert "mailrelay.yaml:4:" in line
    assert "listn" in line


def test_check_broken_users_file(confdir):
    users = confdir / "domains" / "example.org" / "users"
    users.write_text("# users\nalice !\nbob not-a-hash\n")
    line = one_line_error(check(confdir))
    assert f"{users.resolve()}:3:" in line
    assert "bob" in line


def test_check_users_file_with_wrong_field_count(confdir):
    users = confdir / "domains" / "example.com" / "users"
    users.write_text(users.read_text() + "carol\n")
    line_number = len(users.read_text().splitlines())
    line = one_line_error(check(confdir))
    assert f"users:{line_number}:" in line


def test_check_bad_domain_directory(confdir):
    (confdir / "domains" / "Example.NET").mkdir()
    line = one_line_error(check(confdir))
    assert "Example.NET" in line


@pytest.mark.parametrize(
    "argv",
    [
        ("check", "-c", "{missing}"),
        ("-c", "{missing}", "check"),
        ("serve", "-c", "{missing}"),
        ("user", "list", "-c", "{missing}"),
    ],
)
def test_nonexistent_config_dir(tmp_path, argv):
    missing = tmp_path / "does-not-exist"
    result = mailrelay(*(arg.format(missing=missing) for arg in argv))
    line = one_line_error(result)
    assert str(missing) in line
    assert result.stdout == ""


def test_check_reports_broken_aliases_and_dkim_keys(confdir):
    domain_dir = confdir / "domains" / "example.com"
    (domain_dir / "aliases").write_text("# ok\nsales: me\nbroken line\n")
    (domain_dir / "dkim:bad.pem").write_text("not a key\n")
    result = check(confdir)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = result.stderr.splitlines()
    assert any(f"{domain_dir / 'aliases'}:3:" in line for line in errors), errors
    assert any("dkim:bad.pem" in line for line in errors), errors
    assert "domain example.com: 1 user(s)" in result.stdout


def test_check_counts_aliases_and_catch_all(confdir):
    (confdir / "domains" / "example.com" / "aliases").write_text("sales: me\n*: me\n")
    result = check(confdir)
    assert result.returncode == 0, result.stderr
    assert "domain example.com: 1 user(s), 1 alias(es) + catch-all, no DKIM keys" in result.stdout


# -- delivery.relay: probed, a warning when it cannot be reached ------------------------------

async def test_check_logs_in_to_the_relay(env):
    relay = start_relay(env)
    configure_relay(env, port=relay.relay_port)
    result = await asyncio.to_thread(check, env.config_dir)
    assert result.returncode == 0, result.stderr
    [line] = [x for x in result.stdout.splitlines() if "relay smtp.relay.test" in x]
    assert line.startswith(f"relay smtp.relay.test:{relay.relay_port} (starttls) for all "
                           "remote mail: ok")
    assert "TLS verified" in line and "logged in as AKIAEXAMPLERELAYUSER" in line
    assert relay.logins == [("AKIAEXAMPLERELAYUSER", True, True)]
    assert RELAY_PASSWORD not in result.stdout + result.stderr


async def test_check_warns_about_a_relay_it_cannot_use(env):
    configure_relay(env, port=free_port())  # nothing listens
    result = await asyncio.to_thread(check, env.config_dir)
    assert result.returncode == 0, result.stderr  # a network condition: only a warning
    assert "warning: relay smtp.relay.test" in result.stdout
    assert "451 4.4.1 connection to relay" in result.stdout

    relay = start_relay(env)
    configure_relay(env, port=relay.relay_port, password="not-the-password")
    result = await asyncio.to_thread(check, env.config_dir)
    assert result.returncode == 0
    assert "warning: relay" in result.stdout and "535 5.7.8" in result.stdout
    assert "not-the-password" not in result.stdout and RELAY_PASSWORD not in result.stdout


async def test_check_refuses_a_password_file_others_can_read(env):
    configure_relay(env, port=587)
    (env.config_dir / "relay.password").chmod(0o644)
    line = one_line_error(await asyncio.to_thread(check, env.config_dir))
    assert "relay.password is open to group or others (mode 0644)" in line
    (env.config_dir / "relay.password").unlink()
    line = one_line_error(await asyncio.to_thread(check, env.config_dir))
    assert "relay.password does not exist" in line
