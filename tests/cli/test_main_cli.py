"""The ``mailrelay`` command itself: ``--version``, and a command group alone prints what
it can do (on stdout, exit 0, as ``--help``), run as the real command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import mailrelay
from mailrelay.cli.main import COMMANDS

REPO = Path(__file__).resolve().parents[2]


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


def test_a_reader_that_goes_away_ends_it_quietly():
    """`mailrelay print-config | head -1` printed "mailrelay: Broken pipe": the pipe is
    closed before mailrelay writes, as head closes it after its first line."""
    process = subprocess.Popen([sys.executable, "-m", "mailrelay.cli.main", "print-config",
                                "-c", "config"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, cwd=REPO)
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == 141  # as a program that SIGPIPE stops
    assert stderr == b""


def test_every_command_says_what_it_does_and_every_option_has_help():
    """`serve --help` had no description and --log-level no help."""
    import argparse

    from mailrelay.cli.main import build_parser

    missing = []

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    if not sub.description:
                        missing.append(f"{name} {sub_name}: no description")
                    walk(sub, f"{name} {sub_name}")
            elif not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "mailrelay")
    assert missing == []
    result = mailrelay_cmd("serve", "--help")
    assert result.returncode == 0
    description = result.stdout.split("\n\n")[1]
    assert "foreground" in description and "root" in description
    assert "--log-level {debug,info,warning,error}\n" in result.stdout
    assert "default info" in result.stdout.split("--log-level {debug,info,warning,error}\n")[1]
