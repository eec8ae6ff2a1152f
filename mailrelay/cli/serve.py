"""``mailrelay serve``: run the server in the foreground (systemd runs it like this)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import sys
import time

from ..config import load_config


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser("serve", parents=[common], help="run the server")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.set_defaults(func=run)


def _raise_open_files_limit() -> None:
    """Every connection and queue file is a descriptor: the usual soft limit of 1024 is
    below the default max_connections, so take what the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM to the device:inode of the journal's stream."""
    with contextlib.suppress(OSError, ValueError):
        device, inode = os.environ.get("JOURNAL_STREAM", "").split(":")
        st = os.fstat(sys.stderr.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    return False


class SecondCachingFormatter(logging.Formatter):
    """The standard format ("2026-01-02 03:04:05,678"), with the date and time of day
    formatted once per second: time.strftime for every line showed in the profile of
    one-connection-per-message load, where the mail log writes three lines a message."""

    _second = -1
    _text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._text = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return self.default_msec_format % (self._text, record.msecs)


def configure_logging(level: str | int) -> None:
    """The server's log format on stderr (also used by its SMTP worker processes)."""
    # The journal stamps every line itself; elsewhere the time leads the line (a format
    # fail2ban's date detection knows: "2026-01-02 03:04:05,678").
    time_field = "" if _stderr_is_journal() else "%(asctime)s "
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SecondCachingFormatter(time_field + "%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper() if isinstance(level, str) else level,
                        handlers=[handler])
    # The format uses no caller, thread or process fields: skip collecting them for every
    # line (the logging HOWTO's "Optimization" section). The mail log writes several lines
    # per message.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    config = load_config(args.config)
    _raise_open_files_limit()
    from ..server import serve  # imported late: the CLI's other commands stay light

    return asyncio.run(serve(config))
