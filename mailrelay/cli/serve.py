"""``mailrelay serve``: run the server in the foreground (systemd runs it like this)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import sys

from ..config import load_config


def register(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run the server in the foreground, on the listeners of mailrelay.yaml (or the sockets "
        "systemd passes), logging to standard error. SIGHUP re-reads users, aliases, DKIM keys "
        "and certificates; SIGTERM stops it after the sessions in flight. Run it under systemd "
        "(systemd/mailrelay.service: the service user with CAP_NET_BIND_SERVICE for ports below "
        "1024), not as root.")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"],
                        help="the least important messages logged (default info; debug adds "
                             "detail on sessions, deliveries and filters)")
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


def configure_logging(level: str | int) -> None:
    """The server's log format on stderr."""
    # The journal stamps every line itself; elsewhere the time leads the line (a format
    # fail2ban's date detection knows: "2026-01-02 03:04:05,678").
    time_field = "" if _stderr_is_journal() else "%(asctime)s "
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(time_field + "%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper() if isinstance(level, str) else level,
                        handlers=[handler])


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    config = load_config(args.config)
    _raise_open_files_limit()
    from ..server import serve  # imported late: the CLI's other commands stay light

    wait_for_commands_by_pidfd()
    return asyncio.run(serve(config))


def wait_for_commands_by_pidfd() -> None:
    """The event loop learns that a command (MDA, hook) ended from a pidfd, as Python 3.12
    does by itself; 3.11's default starts a thread per command to wait for it, which cost
    6 % CPU per message where every message goes to an MDA (bench c, 3 alternations)."""
    if sys.version_info < (3, 12) and hasattr(os, "pidfd_open"):
        with contextlib.suppress(OSError):  # a kernel without pidfds (before 5.3)
            os.close(os.pidfd_open(os.getpid()))
            asyncio.set_child_watcher(asyncio.PidfdChildWatcher())
