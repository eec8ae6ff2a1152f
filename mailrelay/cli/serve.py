"""``mailrelay serve``: run the server in the foreground (systemd runs it like this)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from ..config import load_config


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser("serve", parents=[common], help="run the server")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    config = load_config(args.config)
    from ..server import serve  # imported late: the CLI's other commands stay light

    return asyncio.run(serve(config))
