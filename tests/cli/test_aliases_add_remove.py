"""``mailrelay aliases add DOMAIN LINE`` and ``aliases remove DOMAIN NAME``, run as the real
command: validated like ``aliases edit``, written atomically with the file's mode and the
directory's owner, and the running server (its own process) takes the change at once."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mailrelay.config import load_config
from mailrelay.policy.aliases import aliases_path
from tests.support.relay import RelayEnv
from tests.test_operations import rcpt_code_port_25, run  # noqa: F401  (run: a fixture)


@pytest.fixture
def confdir(tmp_path: Path) -> Path:
    conf = tmp_path / "conf"
    (conf / "domains" / "example.com").mkdir(parents=True)
    (conf / "domains" / "example.org").mkdir(parents=True)
    (conf / "mailrelay.yaml").write_text("hostname: mail.example.com\ndata_dir: var\n")
    (conf / "domains" / "example.com" / "users").write_text("me !\n")
    return conf


def mailrelay(confdir: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailrelay.cli.main", "-c", str(confdir),
                           "aliases", *argv], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def path_of(confdir: Path, domain: str = "example.com") -> Path:
    return aliases_path(load_config(confdir), domain)


def resolve(confdir: Path, address: str) -> list[str]:
    result = subprocess.run([sys.executable, "-m", "mailrelay.cli.main", "-c", str(confdir),
                             "aliases", "resolve", address], capture_output=True, text=True,
                            timeout=60)
    return result.stdout.splitlines() if result.returncode == 0 else []


def test_add_creates_the_file_then_appends(confdir):
    out = ok(mailrelay(confdir, "add", "example.com", "sales: me, friend@gmail.test"))
    path = path_of(confdir)
    assert out.startswith(f"added sales to {path}\n")
    assert "picks it up within seconds" in out  # no server running
    text = path.read_text()
    assert text.startswith("# Aliases for example.com")  # the header of a new file
    assert text.endswith("\nsales: me, friend@gmail.test\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert resolve(confdir, "sales@example.com") == ["mailbox  me@example.com",
                                                     "forward  friend@gmail.test"]
    # The words of the line as separate arguments are the same line.
    ok(mailrelay(confdir, "add", "EXAMPLE.COM", "*:", "me@gmail.test"))
    assert path.read_text().endswith("\nsales: me, friend@gmail.test\n*: me@gmail.test\n")
    assert resolve(confdir, "random@example.com") == ["forward  me@gmail.test"]


def test_add_refuses_an_existing_name_unless_replace(confdir):
    path = path_of(confdir)
    path.write_text("# mine\nSa.les: me\n# keep this comment\nabuse: me\n")
    path.chmod(0o640)
    line = one_line_error(mailrelay(confdir, "add", "example.com", "sales+x: friend@gmail.test"))
    assert line == (f"mailrelay: sales is already an alias of example.com ({path}:2: "
                    "Sa.les: me); give --replace to replace it")
    assert path.read_text() == "# mine\nSa.les: me\n# keep this comment\nabuse: me\n"
    out = ok(mailrelay(confdir, "add", "example.com", "--replace", "sales: friend@gmail.test"))
    assert out.startswith(f"replaced sales in {path}")
    assert path.read_text() == ("# mine\nsales: friend@gmail.test\n# keep this comment\n"
                                "abuse: me\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # the file's mode is kept


@pytest.mark.parametrize("line, message", [
    ("sales me", "expected 'name: target, ...'"),
    ("sales:", "no target"),
    ("sales: me, a<b>@example.org", ""),
    ("a@b: me", ""),
    ("# a comment", "expected 'name: target, ...'"),
])
def test_add_refuses_what_edit_refuses(confdir, line, message):
    path = path_of(confdir)
    path.write_text("abuse: me\n")
    error = one_line_error(mailrelay(confdir, "add", "example.com", line))
    assert error.startswith(f"mailrelay: not an alias line: {line!r}: ")
    assert message in error
    assert path.read_text() == "abuse: me\n"


def test_add_refuses_a_broken_file_and_unknown_domains(confdir):
    path = path_of(confdir)
    path.write_text("abuse: me\nthis line is broken\n")
    line = one_line_error(mailrelay(confdir, "add", "example.com", "sales: me"))
    assert line.startswith(f"mailrelay: {path}:2: ")
    assert line.endswith("(fix it first: mailrelay aliases edit example.com)")
    assert "example.net is not a local domain" in one_line_error(
        mailrelay(confdir, "add", "example.net", "sales: me"))
    assert not (confdir / "domains" / "example.net").exists()


def test_add_warns_about_an_alias_that_delivers_nowhere(confdir):
    result = mailrelay(confdir, "add", "example.com", "sales: nobody")
    assert result.returncode == 0
    assert "warning: sales@example.com delivers nowhere" in result.stderr


def test_remove(confdir):
    path = path_of(confdir)
    path.write_text("# aliases\npostmaster: me\nsales: me\nteam: sales\n*: me\nsales: me\n")
    result = mailrelay(confdir, "remove", "example.com", "Sales@Example.com")
    out = ok(result)
    assert out.startswith(f"removed sales from {path}")
    # Every line for it goes; "team: sales" still reaches the catch-all.
    assert path.read_text() == "# aliases\npostmaster: me\nteam: sales\n*: me\n"
    assert result.stderr == ""
    result = mailrelay(confdir, "remove", "example.com", "*")
    ok(result)
    assert path.read_text() == "# aliases\npostmaster: me\nteam: sales\n"
    # Now what pointed at sales delivers nowhere: said once.
    assert result.stderr.splitlines() == [
        "warning: team@example.com delivers nowhere (its targets are neither users nor "
        "aliases), so mail to it is refused"]
    result = mailrelay(confdir, "remove", "example.com", "postmaster")
    assert result.returncode == 0
    assert "postmaster@example.com is refused" in result.stderr
    assert "team@example.com" not in result.stderr  # said already
    line = one_line_error(mailrelay(confdir, "remove", "example.com", "sales"))
    assert line == f"mailrelay: no alias sales in {path}"
    line = one_line_error(mailrelay(confdir, "remove", "example.com", "sales@example.org"))
    assert line == "mailrelay: sales@example.org is not an address of example.com"
    line = one_line_error(mailrelay(confdir, "remove", "example.org", "sales"))
    assert "example.org has no aliases file" in line


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_a_new_file_belongs_to_the_service(confdir):
    service = (4242, 4242)
    for path in (confdir, confdir / "domains", confdir / "domains" / "example.com"):
        os.chown(path, *service)
    ok(mailrelay(confdir, "add", "example.com", "sales: me"))
    path = path_of(confdir)
    assert (path.stat().st_uid, path.stat().st_gid) == service
    ok(mailrelay(confdir, "remove", "example.com", "sales"))
    assert (path.stat().st_uid, path.stat().st_gid) == service
    assert not [p.name for p in path.parent.iterdir() if p.name.startswith(".")]


async def test_the_running_server_takes_it_at_once(env: RelayEnv, run) -> None:  # noqa: F811
    await run()
    assert await rcpt_code_port_25(env, "sales@example.com") == 550
    # The command returns once the server has loaded this very file (control socket).
    out = ok(mailrelay(env.config_dir, "add", "example.com", "sales: me"))
    assert out.splitlines()[-1] == "the running server took it"
    assert await rcpt_code_port_25(env, "sales@example.com") == 250
    out = ok(mailrelay(env.config_dir, "remove", "example.com", "sales"))
    assert out.splitlines()[-1] == "the running server took it"
    assert await rcpt_code_port_25(env, "sales@example.com") == 550
