"""``mailrelay auth``: the clients the login throttle blocks, and lifting a block.

Both ask the running server (over ``data_dir/control.sock``): blocks live in its memory
(limits.auth_failures_per_ip, auth_block_time) and end with a restart anyway.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..config import load_config
from ..errors import MailrelayError
from ..ops.control import ServerNotRunning, request


def register(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="auth_command", metavar="ACTION", required=True)
    json_option = argparse.ArgumentParser(add_help=False)
    json_option.add_argument("--json", action="store_true", help="print JSON, for scripts")
    parents = [common, json_option]

    blocks = actions.add_parser("blocks", parents=parents,
                                help="clients blocked after too many failed logins, with "
                                     "the time left")
    blocks.set_defaults(func=cmd_blocks)

    unblock = actions.add_parser("unblock", parents=parents,
                                 help="lift the block of a client (IPv6: of its /64)")
    unblock.add_argument("ip", metavar="IP", help="an address, e.g. 203.0.113.9 or "
                                                  "2001:db8::7 (or its /64)")
    unblock.set_defaults(func=cmd_unblock)


def cmd_blocks(args: argparse.Namespace) -> int:
    blocks = _ask(args, {"cmd": "auth_blocks"})["blocks"]
    if args.json:
        print(json.dumps({"blocks": blocks}, indent=2))
        return 0
    for block in blocks:
        print(f"{block['client']:<43} {_left(block['remaining']):>8} left  "
              f"{block['failures']} failed login{'s' if block['failures'] != 1 else ''}")
    count = len(blocks)
    print("no client is blocked" if not count else
          f"{count} client{'s' if count != 1 else ''} blocked")
    return 0


def cmd_unblock(args: argparse.Namespace) -> int:
    response = _ask(args, {"cmd": "auth_unblock", "ip": args.ip})
    if args.json:
        print(json.dumps(response, indent=2))
        return 0
    if response["unblocked"] is None:
        print(f"{args.ip} is not blocked")
    else:
        print(f"{response['unblocked']}: block lifted")
    return 0


def _ask(args: argparse.Namespace, payload: dict[str, Any]) -> dict[str, Any]:
    config = load_config(args.config)
    try:
        return request(config.data_dir, payload)
    except ServerNotRunning as exc:
        raise MailrelayError(f"{exc}; login blocks live in the running server (none "
                             "survive a restart)") from None


def _left(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
