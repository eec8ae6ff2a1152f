"""The ``mailrelay`` command itself: ``--version``, and a command group alone prints what
it can do (on stdout, exit 0, as ``--help``), run as the real command."""

from __future__ import annotations

import subprocess
import sys

import pytest

import mailrelay
from mailrelay.cli.main import COMMANDS


def mailrelay_cmd(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailrelay.cli.main", *argv],
                          capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("argv", [["--version"], ["queue", "--version"],
                                  ["-c", "/nonexistent", "user", "add", "--version"]])
def test_version(argv):
    result = mailrelay_cmd(*argv)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"mailrelay {mailrelay.__version__} (Python 3.")
    assert result.stderr == ""


def test_mailrelay_alone_lists_the_commands():
    result = mailrelay_cmd()
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout == mailrelay_cmd("--help").stdout
    for name in COMMANDS:
        assert f"    {name} " in result.stdout


@pytest.mark.parametrize("group, actions", [
    ("queue", ("list", "show", "flush", "remove")),
    ("user", ("add", "passwd", "remove", "list", "authenticate")),
    ("aliases", ("edit", "add", "remove", "resolve", "check")),
    ("dns", ("records", "check")),
])
def test_a_group_alone_lists_its_actions(group, actions):
    result = mailrelay_cmd(group)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith(f"usage: mailrelay {group} ")
    assert result.stdout == mailrelay_cmd(group, "--help").stdout
    for action in actions:
        assert f"    {action} " in result.stdout


def test_a_wrong_command_is_still_a_usage_error():
    result = mailrelay_cmd("qeue")
    assert result.returncode == 2
    assert "invalid choice: 'qeue'" in result.stderr and result.stdout == ""
