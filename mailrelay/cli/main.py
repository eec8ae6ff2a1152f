"""Entry point of the ``mailrelay`` command: argument parsing and one-line error reporting."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ..config import DEFAULT_CONFIG_DIR
from ..errors import MailrelayError

# Each module defines register(subparsers, common) and sets func on its parsers;
# func(args) returns the exit code.
COMMAND_MODULES = ("serve", "check", "user", "dkim", "aliases", "import_chasquid", "send", "dns",
                   "queue", "init", "auth")


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
    return parent


def build_parser() -> argparse.ArgumentParser:
    common = common_options()
    parser = argparse.ArgumentParser(
        prog="mailrelay", description="SMTP submission and relay server for your own domains.",
        parents=[common_options(str(DEFAULT_CONFIG_DIR))],
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        module = importlib.import_module(f".{name}", __package__)
        module.register(subparsers, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
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


if __name__ == "__main__":
    sys.exit(main())
