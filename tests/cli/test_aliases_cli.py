"""``mailrelay aliases edit|resolve|check``, with a scripted stand-in for $EDITOR."""

from __future__ import annotations

import argparse
import io
import os
import shlex
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mailrelay.cli import aliases as aliases_cli
from mailrelay.cli.main import common_options
from mailrelay.errors import MailrelayError
from mailrelay.policy.users import UserDB

# Rewrites the file it is given with edit<N> (if present) on its N-th run and keeps a
# copy of what it was shown as seen<N>.
EDITOR_SCRIPT = """\
import pathlib, sys
here = pathlib.Path(__file__).parent
count = here / "count"
n = int(count.read_text()) if count.exists() else 0
count.write_text(str(n + 1))
target = pathlib.Path(sys.argv[1])
(here / f"seen{n}").write_bytes(target.read_bytes())
source = here / f"edit{n}"
if source.exists():
    target.write_bytes(source.read_bytes())
sys.exit(int((here / "status").read_text()) if (here / "status").exists() else 0)
"""

# Stands in for the server: SIGHUP writes the marker. "mailrelay" in the command line
# lets it pass the check that guards against stale pid files naming another process.
SERVER_SCRIPT = """\
# mailrelay stand-in
import pathlib, signal, sys, time
marker, ready = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
def hup(*_):
    marker.write_text("hup")
    sys.exit(0)
signal.signal(signal.SIGHUP, hup)
ready.write_text("ready")
time.sleep(60)
"""


@pytest.fixture
def confdir(tmp_path: Path) -> Path:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "mailrelay.yaml").write_text("hostname: mail.example.com\ndata_dir: var\n")
    for domain in ("example.com", "example.org"):
        (conf / "domains" / domain).mkdir(parents=True)
    db = UserDB.load(conf / "domains/example.com/users", "example.com")
    db.add_receive_only("me")
    db.save()
    return conf


class Editor:
    def __init__(self, directory: Path):
        self.dir = directory
        directory.mkdir()
        (directory / "editor.py").write_text(EDITOR_SCRIPT)
        self.command = f"{shlex.quote(sys.executable)} {shlex.quote(str(directory / 'editor.py'))}"

    def will_write(self, *contents: str) -> None:
        for n, text in enumerate(contents):
            (self.dir / f"edit{n}").write_text(text)

    def fail_with(self, status: int) -> None:
        (self.dir / "status").write_text(str(status))

    @property
    def runs(self) -> int:
        count = self.dir / "count"
        return int(count.read_text()) if count.exists() else 0

    def seen(self, n: int) -> str:
        return (self.dir / f"seen{n}").read_text()


@pytest.fixture
def editor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Editor:
    fake = Editor(tmp_path / "editor")
    monkeypatch.delenv("VISUAL", raising=False)
    monkeypatch.setenv("EDITOR", fake.command)
    # Our own temporary directory, to see that nothing is left behind.
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return fake


def run(confdir: Path, *argv: str, stdin: str = "",
        monkeypatch: pytest.MonkeyPatch | None = None) -> int:
    """Parse like ``mailrelay aliases ... -c DIR`` and report errors the way main() does."""
    parser = argparse.ArgumentParser(prog="mailrelay")
    subparsers = parser.add_subparsers(dest="command", required=True)
    aliases_cli.register(subparsers.add_parser("aliases", parents=[common_options()]),
                         common_options())
    args = parser.parse_args(["aliases", *argv, "-c", str(confdir)])
    if monkeypatch is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        return int(args.func(args) or 0)
    except MailrelayError as exc:
        print(f"mailrelay: {exc}", file=sys.stderr)
        return 1


def aliases_file(confdir: Path, domain: str = "example.com") -> Path:
    return confdir / "domains" / domain / "aliases"


def leftovers(confdir: Path, tmp_path: Path) -> list[str]:
    names = [p.name for p in (confdir / "domains/example.com").iterdir()]
    return sorted(n for n in names if n not in ("users", "aliases")) + \
        sorted(p.name for p in (tmp_path / "tmp").iterdir())


# edit

def test_edit_installs_a_valid_file(confdir, editor, tmp_path, capsys, monkeypatch):
    path = aliases_file(confdir)
    path.write_text("info: me\n")
    path.chmod(0o640)
    editor.will_write("info: me, friend@gmail.test\n*: me\n")
    assert run(confdir, "edit", "example.com", monkeypatch=monkeypatch) == 0
    assert editor.seen(0) == "info: me\n"
    assert path.read_text() == "info: me, friend@gmail.test\n*: me\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # the owner's choice is kept
    assert leftovers(confdir, tmp_path) == []
    out = capsys.readouterr().out
    assert f"installed {path}" in out
    assert "the running server picks it up within seconds" in out


def test_edit_creates_a_new_file_from_the_header(confdir, editor, tmp_path, monkeypatch):
    path = aliases_file(confdir, "example.org")
    editor.will_write("*: me@example.com\n")
    assert run(confdir, "edit", "Example.ORG", monkeypatch=monkeypatch) == 0
    assert "Aliases for example.org" in editor.seen(0)
    assert path.read_text() == "*: me@example.com\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_edit_invalid_then_abort_keeps_the_old_file(confdir, editor, tmp_path, capsys,
                                                    monkeypatch):
    path = aliases_file(confdir)
    path.write_text("info: me\n")
    editor.will_write("info: me\nbroken line\n")
    assert run(confdir, "edit", "example.com", stdin="a\n", monkeypatch=monkeypatch) == 1
    assert path.read_text() == "info: me\n"
    captured = capsys.readouterr()
    assert "line 2: expected 'name: target" in captured.err
    assert "(e)dit again, (a)bort?" in captured.out
    assert editor.runs == 1
    assert leftovers(confdir, tmp_path) == []


def test_edit_invalid_then_end_of_input_aborts(confdir, editor, monkeypatch):
    editor.will_write("me = you\n")
    assert run(confdir, "edit", "example.com", stdin="", monkeypatch=monkeypatch) == 1
    assert not aliases_file(confdir).exists()


def test_edit_invalid_then_edit_again(confdir, editor, tmp_path, capsys, monkeypatch):
    path = aliases_file(confdir)
    path.write_text("info: me\n")
    editor.will_write("info: me\nsales: a b\n", "info: me\nsales: me\n")
    assert run(confdir, "edit", "example.com", stdin="what?\ne\n",
               monkeypatch=monkeypatch) == 0
    assert editor.runs == 2
    assert editor.seen(1) == "info: me\nsales: a b\n"  # the second run continues the first
    assert "line 2: whitespace" in capsys.readouterr().err
    assert path.read_text() == "info: me\nsales: me\n"
    assert leftovers(confdir, tmp_path) == []


def test_edit_without_changes(confdir, editor, tmp_path, capsys, monkeypatch):
    assert run(confdir, "edit", "example.com", monkeypatch=monkeypatch) == 0
    assert capsys.readouterr().out == "no changes\n"
    assert not aliases_file(confdir).exists()  # the header alone is not saved
    assert leftovers(confdir, tmp_path) == []


def test_edit_when_the_editor_fails(confdir, editor, capsys, monkeypatch):
    editor.will_write("info: me\n")
    editor.fail_with(2)
    assert run(confdir, "edit", "example.com", monkeypatch=monkeypatch) == 1
    assert "status 2" in capsys.readouterr().err
    assert not aliases_file(confdir).exists()


def test_edit_prefers_visual(confdir, editor, monkeypatch):
    monkeypatch.setenv("VISUAL", editor.command)
    monkeypatch.setenv("EDITOR", "/nonexistent/editor")
    editor.will_write("info: me\n")
    assert run(confdir, "edit", "example.com", monkeypatch=monkeypatch) == 0


def test_edit_unknown_domain(confdir, editor, capsys, monkeypatch):
    assert run(confdir, "edit", "example.net", monkeypatch=monkeypatch) == 1
    assert "example.net is not a local domain" in capsys.readouterr().err
    assert editor.runs == 0


def test_edit_sends_sighup_to_the_server(confdir, editor, tmp_path, capsys, monkeypatch):
    marker, ready = tmp_path / "hup", tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT, str(marker), str(ready)])
    try:
        deadline = time.monotonic() + 20
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        (confdir / "var").mkdir()
        (confdir / "var/mailrelay.pid").write_text(f"{child.pid}\n")
        editor.will_write("info: me\n")
        assert run(confdir, "edit", "example.com", monkeypatch=monkeypatch) == 0
        assert child.wait(timeout=20) == 0
        assert marker.read_text() == "hup"
        assert f"told the running server (pid {child.pid}) to reload" in capsys.readouterr().out
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_edit_ignores_a_stale_pid_file(confdir, editor, capsys, monkeypatch):
    (confdir / "var").mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (confdir / "var/mailrelay.pid").write_text(f"{dead.pid}\n")
    editor.will_write("info: me\n")
    assert run(confdir, "edit", "example.com", monkeypatch=monkeypatch) == 0
    assert "picks it up within seconds" in capsys.readouterr().out


@pytest.mark.skipif(not os.path.exists("/proc/self/cmdline"), reason="needs /proc")
def test_edit_does_not_signal_an_unrelated_process(confdir, editor, capsys, monkeypatch):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (confdir / "var").mkdir()
        (confdir / "var/mailrelay.pid").write_text(f"{other.pid}\n")
        editor.will_write("info: me\n")
        assert run(confdir, "edit", "example.com", monkeypatch=monkeypatch) == 0
        assert "picks it up within seconds" in capsys.readouterr().out
        assert other.poll() is None  # SIGHUP would have killed it
    finally:
        other.kill()
        other.wait()


# resolve

def test_resolve(confdir, capsys):
    aliases_file(confdir).write_text(
        "info: me, friend@gmail.test\nticket: | /usr/bin/ticket --queue support\n")
    aliases_file(confdir, "example.org").write_text("*: info@example.com\n")
    assert run(confdir, "resolve", "In.Fo+x@example.com") == 0
    assert capsys.readouterr().out == "mailbox  me@example.com\nforward  friend@gmail.test\n"
    assert run(confdir, "resolve", "anyone@example.org") == 0
    assert capsys.readouterr().out == "mailbox  me@example.com\nforward  friend@gmail.test\n"
    assert run(confdir, "resolve", "ticket@example.com") == 0
    assert capsys.readouterr().out == "pipe  /usr/bin/ticket --queue support\n"
    assert run(confdir, "resolve", "me+tag@example.com") == 0
    assert capsys.readouterr().out == "mailbox  me@example.com\n"
    assert run(confdir, "resolve", "someone@remote.test") == 0
    assert capsys.readouterr().out == "email  someone@remote.test\n"


def test_resolve_unknown(confdir, capsys):
    aliases_file(confdir).write_text("dead: nobody\n")
    assert run(confdir, "resolve", "nobody@example.com") == 1
    assert "no such user or alias" in capsys.readouterr().err
    assert run(confdir, "resolve", "dead@example.com") == 1
    assert run(confdir, "resolve", "not-an-address") == 1
    assert "not an address" in capsys.readouterr().err


def test_resolve_asks_the_alias_resolve_hook_as_the_server_does(confdir, capsys):
    """The chasquid peer's note: `aliases resolve` ignored hooks/alias-resolve, so it
    called refused what the server delivers."""
    hook = confdir / "hooks" / "alias-resolve"
    hook.parent.mkdir()
    hook.write_text('#!/bin/sh\n'
                    'case "$1" in\n'
                    '  sales@example.com) echo "me@example.com, boss@remote.test" ;;\n'
                    '  broken@example.com) exit 1 ;;\n'
                    'esac\n')
    hook.chmod(0o755)
    assert run(confdir, "resolve", "Sales+tag@example.com") == 0  # asked as written, then cleaned
    captured = capsys.readouterr()
    assert captured.out == "mailbox  me@example.com\nforward  boss@remote.test\n"
    assert "from hooks/alias-resolve (asked about sales@example.com)" in captured.err
    assert run(confdir, "resolve", "nobody@example.com") == 1
    assert "no such user or alias" in capsys.readouterr().err
    assert run(confdir, "resolve", "broken@example.com") == 1
    assert "alias-resolve hook failed" in capsys.readouterr().err


# check

def test_check(confdir, capsys):
    aliases_file(confdir).write_text("postmaster: me\ninfo: me\nsales: info\n")
    aliases_file(confdir, "example.org").write_text("*: | cmd x\n")
    assert run(confdir, "check") == 0
    captured = capsys.readouterr()
    assert captured.out == ("example.com: 3 aliases, no catch-all\n"
                            "example.org: 0 aliases, catch-all → | cmd x\n")
    assert captured.err == ""
    assert run(confdir, "check", "example.org") == 0
    assert capsys.readouterr().out.startswith("example.org: 0 aliases")


def test_check_and_aliases_check_give_the_same_verdict(confdir):
    """An alias that delivers nowhere and a refused postmaster@ were warnings (exit 0) in
    `aliases check` and errors (exit 1) in `check`: one rule now, errors in both."""
    aliases_file(confdir).write_text("info: me\ndead: nobody\n")
    aliases_file(confdir, "example.org").write_text("postmaster: me@example.com\n")
    (confdir / "mailrelay.yaml").write_text("hostname: mail.example.com\ndata_dir: var\n"
                                            "tls: {self_signed: true}\n")
    alone = mailrelay("aliases", "check", "-c", str(confdir))
    whole = mailrelay("check", "-c", str(confdir))
    assert (alone.returncode, whole.returncode) == (1, 1)
    path = str(aliases_file(confdir))

    def about_aliases(stderr: str) -> list[str]:
        return sorted(line for line in stderr.splitlines() if path in line)

    expected = [f"error: {path}:2: dead@example.com delivers nowhere (its targets are "
                "neither users nor aliases), so mail to it is refused",
                f"error: {path}: postmaster@example.com is refused (550 5.1.1), but RFC 5321 "
                "4.5.1 requires it to reach a person: add `postmaster: <user>` "
                "(`mailrelay aliases edit example.com`)"]
    assert about_aliases(alone.stderr) == about_aliases(whole.stderr) == sorted(expected)
    assert alone.stderr.splitlines() == expected  # nothing else, in file order

    aliases_file(confdir).write_text("info: me\npostmaster: me\n")
    assert mailrelay("aliases", "check", "-c", str(confdir)).returncode == 0


def test_check_reports_errors_with_file_and_line(confdir, capsys):
    aliases_file(confdir).write_text("info: me\n\nsales: me\nbroken\n")
    assert run(confdir, "check") == 1
    captured = capsys.readouterr()
    assert f"{aliases_file(confdir)}:4: expected 'name: target" in captured.err
    assert "example.org: no aliases file" in captured.out


# the real command line



def mailrelay(*argv: str, env: dict[str, str] | None = None,
              stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailrelay.cli.main", *argv],
                          capture_output=True, text=True, timeout=60, input=stdin,
                          env={**os.environ, **(env or {})})


def test_command_line_resolve_and_check(confdir):
    aliases_file(confdir).write_text("info: me, friend@gmail.test\npostmaster: me\n")
    aliases_file(confdir, "example.org").write_text("postmaster: me@example.com\n")
    result = mailrelay("-c", str(confdir), "aliases", "resolve", "info@example.com")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "mailbox  me@example.com\nforward  friend@gmail.test\n"
    result = mailrelay("aliases", "resolve", "nobody@example.com", "-c", str(confdir))
    assert result.returncode == 1
    assert result.stderr.startswith("mailrelay: nobody@example.com: no such user or alias")
    result = mailrelay("aliases", "check", "-c", str(confdir))
    assert result.returncode == 0, result.stderr
    assert "example.com: 2 aliases, no catch-all" in result.stdout


def test_command_line_edit(confdir, editor):
    editor.will_write("info: me,\n", "info me\n")
    result = mailrelay("aliases", "edit", "example.com", "-c", str(confdir),
                       env={"EDITOR": editor.command}, stdin="a\n")
    assert result.returncode == 0, result.stderr
    assert aliases_file(confdir).read_text() == "info: me,\n"
    result = mailrelay("aliases", "edit", "example.com", "-c", str(confdir),
                       env={"EDITOR": editor.command}, stdin="a\n")
    assert result.returncode == 1
    assert "line 1: expected 'name: target" in result.stderr
    assert aliases_file(confdir).read_text() == "info: me,\n"


def test_edit_without_an_editor_or_a_terminal_is_one_line(confdir, tmp_path):
    """No VISUAL, no EDITOR and no terminal (a script, cron, ssh without -t): it ran vi,
    which cannot work there. Now it refuses in one line and runs nothing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ran = tmp_path / "ran"
    for name in ("vi", "vim", "editor", "sensible-editor", "nano"):
        (bin_dir / name).write_text(f"#!/bin/sh\necho {name} >> {ran}\n")
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("VISUAL", "EDITOR")}
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}"
    result = subprocess.run([sys.executable, "-m", "mailrelay.cli.main", "aliases", "edit",
                             "example.com", "-c", str(confdir)], capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL, env=env)
    assert result.returncode == 1 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("mailrelay: no editor to run") and "EDITOR" in line
    assert not ran.exists()
    assert not aliases_file(confdir).exists()
