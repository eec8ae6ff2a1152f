"""``mailrelay aliases``: edit (visudo-style), resolve and check the aliases files."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from ..address import AddressError, normalize_domain
from ..config import Config, load_config
from ..errors import ConfigError, MailrelayError
from ..fsutil import atomic_write
from ..policy.aliases import (
    CATCH_ALL,
    EMAIL,
    PIPE,
    Aliases,
    Target,
    aliases_path,
    default_text,
    parse_text,
)
from ..policy.users import Users
from .common import local_domain

PID_FILE = "mailrelay.pid"  # written by the server into data_dir (server.PID_FILE)
NEW_FILE_MODE = 0o644  # aliases hold no secrets; chasquid's files are world-readable too


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser("aliases", parents=[common], help="edit and test aliases")
    actions = parser.add_subparsers(dest="aliases_command", metavar="ACTION", required=True)

    edit = actions.add_parser("edit", parents=[common],
                              help="edit a domain's aliases in $VISUAL/$EDITOR, "
                                   "checked before it is installed")
    edit.add_argument("domain", metavar="DOMAIN", help="a local domain")
    edit.set_defaults(func=cmd_edit)

    resolve = actions.add_parser("resolve", parents=[common],
                                 help="show where mail for an address goes")
    resolve.add_argument("address", metavar="ADDR", help="local@domain")
    resolve.set_defaults(func=cmd_resolve)

    check = actions.add_parser("check", parents=[common], help="validate the aliases files")
    check.add_argument("domain", metavar="DOMAIN", nargs="?",
                       help="only this domain (default: all)")
    check.set_defaults(func=cmd_check)


def _editor() -> list[str]:
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    try:
        return shlex.split(editor)
    except ValueError as exc:
        raise MailrelayError(f"cannot parse the editor command {editor!r}: {exc}") from None


def _ask_edit_again() -> bool:
    """visudo's question; end of input means abort (safe for scripts)."""
    while True:
        print("(e)dit again, (a)bort? ", end="", flush=True)
        answer = sys.stdin.readline()
        if not answer:
            print()
            return False
        answer = answer.strip().lower()
        if answer in ("e", "edit"):
            return True
        if answer in ("a", "abort", "q", "quit"):
            return False


def cmd_edit(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    domain = local_domain(config, args.domain)
    path = aliases_path(config, domain)
    try:
        original: bytes | None = path.read_bytes()
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        original, mode = None, NEW_FILE_MODE
    start = original if original is not None else default_text(domain).encode()
    editor = _editor()

    # A private directory, so the editor sees a plain "aliases-<domain>" name and its
    # own backup/swap files are cleaned up with it.
    workdir = Path(tempfile.mkdtemp(prefix="mailrelay-aliases."))
    try:
        tmp = workdir / f"aliases-{domain}"
        tmp.write_bytes(start)
        while True:
            try:
                result = subprocess.run([*editor, str(tmp)])
            except OSError as exc:
                raise MailrelayError(f"cannot run the editor {editor[0]!r}: "
                                     f"{exc.strerror or exc}") from None
            if result.returncode != 0:
                raise MailrelayError(f"the editor exited with status {result.returncode}; "
                                     f"{path} left unchanged")
            edited = tmp.read_bytes()
            if edited == start:
                print("no changes")
                return 0
            _, errors = parse_text(edited, domain, None, config.aliases)
            if not errors:
                break
            for error in errors:
                print(f"line {error.line}: {error.message}", file=sys.stderr)
            if not _ask_edit_again():
                print(f"aborted; {path} left unchanged", file=sys.stderr)
                return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    atomic_write(path, edited, mode=mode)
    print(f"installed {path}")
    _notify_server(config)
    return 0


def _server_pid(config: Config) -> int | None:
    """The pid in data_dir/mailrelay.pid if that process is alive and is mailrelay."""
    try:
        pid = int((config.data_dir / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, but another user's: reported when signalling
    # A stale file after a crash may name a reused pid: SIGHUP would kill that process.
    with contextlib.suppress(OSError):
        if b"mailrelay" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return None
    return pid


def _notify_server(config: Config) -> None:
    pid = _server_pid(config)
    later = "the running server picks it up within seconds"
    if pid is None:
        print(later)
        return
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        print(f"could not signal the server (pid {pid}: {exc.strerror}); {later}")
        return
    print(f"told the running server (pid {pid}) to reload")


def _load(config: Config) -> Aliases:
    aliases, errors = Aliases.load(config)
    for error in errors:
        print(f"warning: {error} (that domain is resolved without its aliases)",
              file=sys.stderr)
    return aliases


def cmd_resolve(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    users = Users.load(config)
    aliases = _load(config)
    warnings: list[str] = []
    try:
        targets = aliases.resolve(args.address, users.exists, config.is_local_domain,
                                  warn=warnings.append)
        local_input = config.is_local_domain(normalize_domain(args.address.rpartition("@")[2]))
    except AddressError:
        raise MailrelayError(f"not an address: {args.address!r} "
                             "(expected user@domain)") from None
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not targets:
        raise MailrelayError(f"{args.address}: no such user or alias "
                             "(mail to it is refused)")
    for target in targets:
        kind = "forward" if target.kind == EMAIL and local_input else target.kind
        print(f"{kind}  {target.value}")
    return 0


def _describe(targets: list[Target]) -> str:
    return ", ".join(f"| {t.value}" if t.kind == PIPE else t.value for t in targets)


def cmd_check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    domains = [local_domain(config, args.domain)] if args.domain else list(config.domains)
    users = Users.load(config)
    aliases = Aliases.load(config)[0]  # broken files are reported one by one below
    failed = False
    for domain in domains:
        path = aliases_path(config, domain)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            print(f"{domain}: no aliases file")
            continue
        except OSError as exc:
            print(ConfigError(f"cannot read: {exc.strerror or exc}", path), file=sys.stderr)
            failed = True
            continue
        table, errors = parse_text(raw, domain, path, config.aliases)
        if errors:
            for error in errors:
                print(error, file=sys.stderr)
            failed = True
            continue
        count = sum(1 for name in table if name != CATCH_ALL)
        catch_all = (f"catch-all → {_describe(table[CATCH_ALL])}" if CATCH_ALL in table
                     else "no catch-all")
        print(f"{domain}: {count} alias{'es' if count != 1 else ''}, {catch_all}")
        for warning in _dead_ends(aliases, domain, table, users, config):
            print(f"warning: {warning}", file=sys.stderr)
    return 1 if failed else 0


def _dead_ends(aliases: Aliases, domain: str, table: dict[str, list[Target]],
               users: Users, config: Config) -> list[str]:
    """Aliases that deliver nowhere (so RCPT refuses them), loops and too-deep chains."""
    return list(dict.fromkeys(problem for _, problem in
                              alias_problems(aliases, domain, table, users, config)))


def alias_problems(aliases: Aliases, domain: str, table: dict[str, list[Target]],
                   users: Users, config: Config) -> list[tuple[str, str]]:
    """(name, problem) for each alias of ``domain`` that delivers nowhere, runs into a
    loop or is nested too deep; the catch-all (``*``) included. Shared by ``aliases
    check`` and ``mailrelay check``."""
    problems: list[tuple[str, str]] = []
    for name in table:
        # "*@domain" resolves through the catch-all: no alias or user has that name.
        address = f"{name}@{domain}"
        found: list[str] = []
        if not aliases.resolve(address, users.exists, config.is_local_domain,
                               warn=found.append):
            what = f"the catch-all of {domain}" if name == CATCH_ALL else address
            found.append(f"{what} delivers nowhere (its targets are neither "
                         "users nor aliases), so mail to it is refused")
        problems += [(name, problem) for problem in dict.fromkeys(found)]
    return problems
