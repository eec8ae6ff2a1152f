"""Entry point of the ``mailrelay`` command: argument parsing and one-line error reporting."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from functools import partial

from .. import DEFAULT_CONFIG_DIR, __version__
from ..errors import MailrelayError

# command: (module, one line of help). A module's register(parser, common) fills in its
# command's parser and sets func on it (func(args) returns the exit code). Only the module
# of the command being run is imported: `mailrelay --help` and the light commands start
# without loading the server.
COMMANDS = {
    "serve": ("serve", "run the server"),
    "check": ("check", "load the configuration as the server does and report every problem"),
    "init": ("init", "create a complete configuration: user, domain, aliases, DKIM keys, unit"),
    "user": ("user", "manage users"),
    "aliases": ("aliases", "edit and test aliases"),
    "dkim": ("dkim", "DKIM keys and DNS records"),
    "dns": ("dns", "the DNS records of a domain: what to publish, and a check"),
    "queue": ("queue", "inspect and manage the queue"),
    "send": ("send", "send a test message and show the SMTP dialogue"),
    "auth": ("auth", "login blocks: list them, lift one"),
    "print-config": ("print_config",
                     "print the effective configuration (defaults filled in, as YAML)"),
    "import-chasquid": ("import_chasquid",
                        "import a chasquid configuration (users keep their passwords)"),
}


def common_options(default: object = argparse.SUPPRESS) -> argparse.ArgumentParser:
    """Options every command takes, so ``-c`` works before and after the command name.

    Only the top-level parser has the real default: a subcommand's default would
    overwrite a ``-c`` given before the command name.
    """
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "-c", "--config", default=default, metavar="DIR",
        help=f"configuration directory (default {DEFAULT_CONFIG_DIR})",
    )
    parent.add_argument("--version", action="version", version=version_text(),
                        help="print mailrelay's version and exit")
    return parent


def version_text() -> str:
    return f"mailrelay {__version__} (Python {sys.version.split()[0]})"


def _help_when_alone(parser: argparse.ArgumentParser) -> None:
    """A command group without its command (``mailrelay``, ``mailrelay queue``) prints its
    help, the list of what it can do, on stdout and exits 0, as ``--help`` does: asking
    what there is is not a mistake (git prints the same list, but exits 1)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            action.required = False
            parser.set_defaults(func=partial(_print_help, parser))
            for sub in dict.fromkeys(action.choices.values()):
                _help_when_alone(sub)


def _describe_actions(parser: argparse.ArgumentParser) -> None:
    """A command or action without a description of its own is described, in its
    ``--help``, by the line the list of its group gives it (``mailrelay user add --help``
    said nothing about what it does)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                if sub.description is None and helps.get(name):
                    sub.description = helps[name][:1].upper() + helps[name][1:] + "."
                _describe_actions(sub)


def _print_help(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    parser.print_help()
    return 0


def _command_in(argv: Sequence[str]) -> str | None:
    """The command named in ``argv`` (after the options that take a value), if any."""
    words = iter(argv)
    for word in words:
        if word in ("-c", "--config"):
            next(words, None)
        elif not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; with ``argv``, the parser for running it: only the named
    command's module is loaded, the others are listed by name and help."""
    common = common_options()
    parser = argparse.ArgumentParser(
        prog="mailrelay", description="SMTP submission and relay server for your own domains.",
        parents=[common_options(str(DEFAULT_CONFIG_DIR))],
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = _command_in(argv) if argv is not None else None
    for name, (module_name, help_text) in COMMANDS.items():
        command = subparsers.add_parser(name, parents=[common], help=help_text)
        if argv is None or name == wanted:
            module = importlib.import_module(f".{module_name}", __package__)
            module.register(command, common)
    _help_when_alone(parser)
    _describe_actions(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, where a reader that went away is handled
        return code
    except BrokenPipeError:
        return _reader_gone()
    except MailrelayError as exc:
        print(f"mailrelay: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mailrelay: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        # Files and sockets: say which and why in one line, not a traceback.
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"mailrelay: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1


def _reader_gone() -> int:
    """``mailrelay queue list | head``: the reader has what it wanted and closed the pipe.
    Stop quietly, as a program that SIGPIPE ends (exit status 128 + 13), and point stdout
    at /dev/null so that the interpreter's last flush does not complain either."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return 141


if __name__ == "__main__":
    sys.exit(main())
