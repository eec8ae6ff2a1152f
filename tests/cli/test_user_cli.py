"""``mailrelay user ...`` driven through a parser built from the module's register()."""

from __future__ import annotations

import argparse
import io
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mailrelay.cli import common
from mailrelay.cli import user as user_cli
from mailrelay.cli.main import common_options
from mailrelay.errors import MailrelayError
from mailrelay.policy import users as users_mod
from mailrelay.policy.users import UserDB, verify_password


@pytest.fixture(autouse=True)
def fast_scrypt(monkeypatch):
    monkeypatch.setattr(users_mod, "SCRYPT_LN", 4)


@pytest.fixture
def confdir(tmp_path: Path) -> Path:
    (tmp_path / "mailrelay.yaml").write_text("hostname: mail.example.com\ndata_dir: var\n")
    (tmp_path / "domains" / "example.com").mkdir(parents=True)
    (tmp_path / "domains" / "example.org").mkdir(parents=True)
    return tmp_path


def users_file(confdir: Path, domain: str = "example.com") -> Path:
    return confdir / "domains" / domain / "users"


def run(confdir: Path, *argv: str, stdin: str | None = None,
        monkeypatch: pytest.MonkeyPatch | None = None) -> int:
    """Parse like ``mailrelay -c DIR user ...`` and report errors the way main() does."""
    common = common_options()
    parser = argparse.ArgumentParser(prog="mailrelay")
    subparsers = parser.add_subparsers(dest="command", required=True)
    user_cli.register(subparsers.add_parser("user", parents=[common]), common)
    args = parser.parse_args(["user", *argv, "-c", str(confdir)])
    if stdin is not None:
        assert monkeypatch is not None
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        return int(args.func(args) or 0)
    except MailrelayError as exc:
        print(f"mailrelay: {exc}", file=sys.stderr)
        return 1


def prompts(monkeypatch, *answers: str) -> list[str]:
    """Answer getpass prompts in order; returns the prompts that were shown."""
    shown: list[str] = []
    replies = iter(answers)

    def fake(prompt: str = "Password: ") -> str:
        shown.append(prompt)
        return next(replies)

    monkeypatch.setattr(common.getpass, "getpass", fake)
    monkeypatch.setattr(sys, "stdin", Terminal())
    return shown


class Terminal(io.StringIO):
    """Standard input on a terminal (getpass, patched, answers instead)."""

    def isatty(self) -> bool:
        return True


def test_add_with_prompt_then_authenticate(confdir, monkeypatch, capsys):
    shown = prompts(monkeypatch, "s3cret pw", "s3cret pw")
    assert run(confdir, "add", "Alice@Example.com") == 0
    assert len(shown) == 2
    assert capsys.readouterr().out == "added alice@example.com\n"

    path = users_file(confdir)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    name, encoded = path.read_text().splitlines()[-1].split()
    assert name == "alice" and verify_password("s3cret pw", encoded)

    prompts(monkeypatch, "s3cret pw")
    assert run(confdir, "authenticate", "alice@example.com") == 0
    assert capsys.readouterr().out == "ok\n"
    prompts(monkeypatch, "wrong")
    assert run(confdir, "authenticate", "alice@example.com") == 1
    assert capsys.readouterr().out == "authentication failed\n"


def test_password_mismatch(confdir, monkeypatch, capsys):
    prompts(monkeypatch, "password one", "password two")
    assert run(confdir, "add", "alice@example.com") == 1
    assert capsys.readouterr().err == "mailrelay: passwords do not match\n"
    assert not users_file(confdir).exists()


def test_stdin_password_strips_only_the_newline(confdir, monkeypatch, capsys):
    assert run(confdir, "add", "bob@example.com", "--password-stdin",
               stdin=" pass word \nignored\n", monkeypatch=monkeypatch) == 0
    db = UserDB.load(users_file(confdir), "example.com")
    assert db.check_password("bob", " pass word ")
    assert run(confdir, "authenticate", "bob@example.com", "--password-stdin",
               stdin=" pass word \r\n", monkeypatch=monkeypatch) == 0
    assert capsys.readouterr().out.endswith("ok\n")


@pytest.mark.parametrize("stdin, message", [
    ("", "no password on standard input"),
    ("\n", "password must not be empty"),
])
def test_stdin_missing_or_empty_password(confdir, monkeypatch, capsys, stdin, message):
    assert run(confdir, "add", "bob@example.com", "--password-stdin",
               stdin=stdin, monkeypatch=monkeypatch) == 1
    assert capsys.readouterr().err == f"mailrelay: {message}\n"


def test_add_refuses_existing_user(confdir, monkeypatch, capsys):
    assert run(confdir, "add", "shop@example.com", "--receive-only") == 0
    before = users_file(confdir).read_text()
    assert run(confdir, "add", "SHOP@example.com", "--password-stdin",
               stdin="pw\n", monkeypatch=monkeypatch) == 1
    err = capsys.readouterr().err
    assert err.startswith("mailrelay: user shop@example.com already exists")
    assert err.count("\n") == 1
    assert users_file(confdir).read_text() == before


def test_unknown_domain_names_the_known_ones(confdir, capsys):
    assert run(confdir, "add", "a@example.net", "--receive-only") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "example.net is not a local domain" in err
    assert "known: example.com, example.org" in err


def test_bad_address(confdir, capsys):
    assert run(confdir, "remove", "no-at-sign") == 1
    assert capsys.readouterr().err == (
        "mailrelay: not an address: 'no-at-sign' (expected user@domain)\n")


def test_passwd_changes_password_and_needs_existing_user(confdir, monkeypatch, capsys):
    assert run(confdir, "passwd", "alice@example.com", "--password-stdin",
               stdin="x\n", monkeypatch=monkeypatch) == 1
    assert "no such user: alice@example.com" in capsys.readouterr().err

    assert run(confdir, "add", "alice@example.com", "--receive-only") == 0
    prompts(monkeypatch, "new password", "new password")
    assert run(confdir, "passwd", "alice@example.com") == 0
    assert capsys.readouterr().out.endswith("password changed for alice@example.com\n")
    db = UserDB.load(users_file(confdir), "example.com")
    assert db.can_login("alice") and db.check_password("alice", "new password")


def test_remove(confdir, capsys):
    assert run(confdir, "add", "a@example.com", "--receive-only") == 0
    assert run(confdir, "remove", "A@example.com") == 0
    assert capsys.readouterr().out.endswith("removed a@example.com\n")
    assert UserDB.load(users_file(confdir), "example.com").names() == []
    assert run(confdir, "remove", "a@example.com") == 1
    assert capsys.readouterr().err == "mailrelay: no such user: a@example.com\n"


def test_list(confdir, monkeypatch, capsys):
    run(confdir, "add", "zed@example.com", "--receive-only")
    run(confdir, "add", "amy@example.com", "--password-stdin", stdin="a password\n",
        monkeypatch=monkeypatch)
    run(confdir, "add", "info@example.org", "--receive-only")
    capsys.readouterr()

    assert run(confdir, "list") == 0
    assert capsys.readouterr().out == (
        "amy@example.com\nzed@example.com (receive-only)\ninfo@example.org (receive-only)\n")
    assert run(confdir, "list", "EXAMPLE.ORG") == 0
    assert capsys.readouterr().out == "info@example.org (receive-only)\n"
    assert run(confdir, "list", "example.net") == 1
    assert "example.net is not a local domain" in capsys.readouterr().err


def test_receive_only_cannot_authenticate(confdir, monkeypatch, capsys):
    run(confdir, "add", "shop@example.com", "--receive-only")
    assert run(confdir, "authenticate", "shop@example.com", "--password-stdin",
               stdin="!\n", monkeypatch=monkeypatch) == 1
    assert capsys.readouterr().out.endswith("authentication failed\n")


def test_broken_users_file_is_a_one_line_error(confdir, capsys):
    users_file(confdir).write_text("alice\n")
    assert run(confdir, "list") == 1
    assert capsys.readouterr().err == (
        f"mailrelay: {users_file(confdir)}:1: expected '<user> <password hash>' "
        "(or '<user> !')\n")


def test_missing_config_is_a_one_line_error(tmp_path, capsys):
    assert run(tmp_path, "list") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "configuration file not found" in err


def test_receive_only_and_password_stdin_are_exclusive(confdir):
    with pytest.raises(SystemExit):
        run(confdir, "add", "a@example.com", "--receive-only", "--password-stdin")


def test_config_option_before_the_action(confdir, capsys):
    common = common_options()
    parser = argparse.ArgumentParser(prog="mailrelay")
    subparsers = parser.add_subparsers(dest="command", required=True)
    user_cli.register(subparsers.add_parser("user", parents=[common]), common)
    args = parser.parse_args(["user", "-c", str(confdir), "list"])
    assert args.config == str(confdir)


def test_config_option_before_the_command(tmp_path):
    """``mailrelay -c DIR user list`` must use DIR, not the default /etc/mailrelay."""
    import subprocess
    import sys

    (tmp_path / "mailrelay.yaml").write_text("hostname: mail.example.com\ndata_dir: var\n")
    (tmp_path / "domains" / "example.com").mkdir(parents=True)
    for args in (["-c", str(tmp_path), "user", "list"], ["user", "list", "-c", str(tmp_path)]):
        result = subprocess.run([sys.executable, "-m", "mailrelay.cli.main", *args],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr


def test_remove_warns_about_aliases_that_led_to_the_user(confdir):
    """`user remove` of a user aliases point to said nothing, and their mail silently went
    to the catch-all. Now each such alias is named, with where its mail goes now."""
    (confdir / "domains/example.com/aliases").write_text(
        "postmaster: ann\nsales: team\nteam: ann, bob\n*: me@gmail.test\n")
    (confdir / "domains/example.org/aliases").write_text("*: ann@example.com\n")
    for name in ("ann", "bob"):
        assert run(confdir, "add", f"{name}@example.com", "--receive-only") == 0

    def remove(address: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mailrelay.cli.main", "user", "remove",
                               address, "-c", str(confdir)], capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL)

    result = remove("ann@example.com")
    assert result.returncode == 0 and result.stdout == "removed ann@example.com\n"
    assert sorted(result.stderr.splitlines()) == [
        "warning: postmaster@example.com led to ann@example.com; its mail now goes to "
        "me@gmail.test (`mailrelay aliases edit example.com`)",
        "warning: sales@example.com led to ann@example.com; its mail now goes to "
        "me@gmail.test, bob@example.com (`mailrelay aliases edit example.com`)",
        "warning: team@example.com led to ann@example.com; its mail now goes to "
        "me@gmail.test, bob@example.com (`mailrelay aliases edit example.com`)",
        "warning: the catch-all of example.org led to ann@example.com; its mail now goes "
        "to me@gmail.test (`mailrelay aliases edit example.org`)",
    ]
    (confdir / "domains/example.com/aliases").write_text("sales: bob\n")
    result = remove("bob@example.com")
    assert result.returncode == 0
    assert result.stderr == ("warning: sales@example.com led to bob@example.com; its mail "
                             "now goes to nowhere: it is refused (550 5.1.1) "
                             "(`mailrelay aliases edit example.com`)\n")
    (confdir / "domains/example.com/aliases").unlink()
    assert run(confdir, "add", "cy@example.com", "--receive-only") == 0
    assert remove("cy@example.com").stderr == ""  # nothing led to it: nothing to say
