"""``mailrelay aliases``: edit (visudo-style), resolve and check the aliases files."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
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
    normalize_name,
    parse_text,
)
from ..policy.users import Users
from .common import local_domain, server_took

PID_FILE = "mailrelay.pid"  # written by the server into data_dir (server.PID_FILE)
NEW_FILE_MODE = 0o644  # aliases hold no secrets; chasquid's files are world-readable too


def register(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:

    actions = parser.add_subparsers(dest="aliases_command", metavar="ACTION", required=True)

    edit = actions.add_parser("edit", parents=[common],
                              help="edit a domain's aliases in $VISUAL/$EDITOR, "
                                   "checked before it is installed")
    edit.add_argument("domain", metavar="DOMAIN", help="a local domain")
    edit.set_defaults(func=cmd_edit)

    add = actions.add_parser("add", parents=[common],
                             help="add one alias line to a domain's aliases (for scripts)")
    add.add_argument("domain", metavar="DOMAIN", help="a local domain")
    add.add_argument("line", metavar="LINE", nargs="+",
                     help="the line, as in the file: 'NAME: TARGET, TARGET…' (quote it, "
                          "or give its words as separate arguments)")
    add.add_argument("--replace", action="store_true",
                     help="replace the alias when NAME has one (default: refuse)")
    add.set_defaults(func=cmd_add)

    remove = actions.add_parser("remove", parents=[common],
                                help="remove an alias (its line) from a domain's aliases")
    remove.add_argument("domain", metavar="DOMAIN", help="a local domain")
    remove.add_argument("name", metavar="NAME",
                        help="the alias: NAME, NAME@DOMAIN, or * for the catch-all")
    remove.set_defaults(func=cmd_remove)

    resolve = actions.add_parser("resolve", parents=[common],
                                 help="show where mail for an address goes")
    resolve.add_argument("address", metavar="ADDR", help="local@domain")
    resolve.set_defaults(func=cmd_resolve)

    check = actions.add_parser("check", parents=[common], help="validate the aliases files")
    check.add_argument("domain", metavar="DOMAIN", nargs="?",
                       help="only this domain (default: all)")
    check.set_defaults(func=cmd_check)


def _editor() -> list[str]:
    """$VISUAL or $EDITOR, as given (a script may name one); else, only when someone sits
    at a terminal, the system's editor (Debian's ``editor`` alternative, or vi). Without
    a terminal and without either variable, a full-screen editor would only hang or fail
    half-way, so that is a one-line error instead."""
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR")
    if not editor:
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            raise MailrelayError("no editor to run: standard input or output is not a "
                                 "terminal and neither VISUAL nor EDITOR is set (set one, or "
                                 "change one alias with `mailrelay aliases add` or `remove`)")
        editor = "editor" if shutil.which("editor") else "vi"
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
    return _tell_server(config, domain, path, edited)


def _read_current(config: Config, domain: str) -> tuple[Path, bytes | None, int]:
    """The aliases file of ``domain``: path, content (None: no file yet) and mode; a
    broken file is refused (one line each), as the server would not load it either."""
    path = aliases_path(config, domain)
    try:
        original: bytes | None = path.read_bytes()
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return path, None, NEW_FILE_MODE
    _, errors = parse_text(original, domain, path, config.aliases)
    if errors:
        for error in errors[1:]:
            print(f"mailrelay: {error}", file=sys.stderr)
        raise MailrelayError(f"{errors[0]} (fix it first: mailrelay aliases edit {domain})")
    return path, original, mode


def _defined_by(raw_line: str, domain: str, config: Config) -> str | None:
    """The normalised name a line of the file defines (None: a comment, blank or bad)."""
    table, errors = parse_text(raw_line, domain, None, config.aliases)
    return None if errors or not table else next(iter(table))


def _install(config: Config, domain: str, path: Path, original: bytes | None, new: bytes,
             mode: int, what: str) -> int:
    """Validate and write ``new`` as ``aliases edit`` does, then make the server reload."""
    table, errors = parse_text(new, domain, path, config.aliases)
    if errors:  # cannot happen for a line that parsed on its own; never install it anyway
        raise MailrelayError(f"{errors[0]}; {path} left unchanged")
    before = _problems(config, domain, original)
    try:
        current = path.read_bytes()
    except FileNotFoundError:
        current = None
    if current != original:
        raise MailrelayError(f"{path} changed while this ran; {path} left unchanged, try again")
    atomic_write(path, new, mode=mode)
    print(f"{what} {path}")
    for problem in _problems(config, domain, new, table):
        if problem not in before:
            print(f"warning: {problem}", file=sys.stderr)
    return _tell_server(config, domain, path, new)


def _problems(config: Config, domain: str, text: bytes | None,
              table: dict[str, list[Target]] | None = None) -> list[str]:
    """What ``aliases check`` would warn about in ``domain`` with ``text`` as its file."""
    if table is None:
        table = parse_text(text, domain, None, config.aliases)[0] if text else {}
    aliases = Aliases.load(config)[0]
    aliases.tables[domain] = table
    users = Users.load(config)
    return list(dict.fromkeys(problem for _, problem in
                              domain_problems(aliases, domain, table, users, config)))


def cmd_add(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    domain = local_domain(config, args.domain)
    line = " ".join(args.line).strip()
    if "\n" in line or "\r" in line:
        raise MailrelayError("one line only (to add several, run this once for each)")
    table, errors = parse_text(line, domain, None, config.aliases)
    if errors or not table:
        why = errors[0].message if errors else "expected 'name: target, ...'"
        raise MailrelayError(f"not an alias line: {line!r}: {why}")
    (name,) = table
    path, original, mode = _read_current(config, domain)
    lines = (original if original is not None else default_text(domain).encode()
             ).decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    defined = [i for i, raw in enumerate(lines) if _defined_by(raw, domain, config) == name]
    shown = "the catch-all" if name == CATCH_ALL else name
    if defined and not args.replace:
        number = defined[-1]
        raise MailrelayError(f"{shown} is already an alias of {domain} ({path}:{number + 1}: "
                             f"{lines[number].strip()}); give --replace to replace it")
    if defined:
        lines[defined[0]] = line  # where it was; any later line for it goes
        lines = [raw for i, raw in enumerate(lines) if i not in defined[1:]]
        what = f"replaced {shown} in"
    else:
        lines.append(line)
        what = f"added {shown} to"
    return _install(config, domain, path, original,
                    ("\n".join(lines) + "\n").encode("utf-8"), mode, what)


def cmd_remove(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    domain = local_domain(config, args.domain)
    given = args.name.strip()
    if "@" in given and given != CATCH_ALL:
        local, _, other = given.rpartition("@")
        if local_domain(config, other) != domain:
            raise MailrelayError(f"{given} is not an address of {domain}")
        given = local
    probe, errors = parse_text(f"{given}: postmaster", domain, None, config.aliases)
    if errors or not probe:
        raise MailrelayError(f"not an alias name: {args.name!r}")
    (name,) = probe
    path, original, mode = _read_current(config, domain)
    shown = "the catch-all" if name == CATCH_ALL else name
    if original is None:
        raise MailrelayError(f"{domain} has no aliases file ({path}), so no alias {shown}")
    lines = original.decode("utf-8").split("\n")
    kept = [raw for raw in lines if _defined_by(raw, domain, config) != name]
    if len(kept) == len(lines):
        raise MailrelayError(f"no alias {shown} in {path}")
    return _install(config, domain, path, original, "\n".join(kept).encode("utf-8"), mode,
                    f"removed {shown} from")


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


def _tell_server(config: Config, domain: str, path: Path, written: bytes) -> int:
    """Have the running server load the aliases just written (``server_took``, as
    `mailrelay user` does): 1 when it did not take them. A server that has no control
    socket gets SIGHUP (an older one)."""
    took = server_took(config, "aliases", domain, path, hashlib.sha256(written).hexdigest(),
                       no_server=lambda: _notify_server(config))
    if took:
        print("the running server took it")
    return 1 if took is False else 0


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
    if not targets and local_input:
        targets = _ask_the_hook(config, args.address, users, aliases, warnings)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not targets:
        raise MailrelayError(f"{args.address}: no such user or alias "
                             "(mail to it is refused)")
    for target in targets:
        kind = "forward" if target.kind == EMAIL and local_input else target.kind
        print(f"{kind}  {target.value}")
    return 0


def _ask_the_hook(config: Config, address: str, users: Users, aliases: Aliases,
                  warnings: list[str]) -> list[Target]:
    """What the server does for an address no user or alias takes: ask hooks/alias-resolve
    (as written, then without suffix and drop characters), and route what it names
    through users and aliases (policy.router.hook_targets, which the server uses)."""
    import asyncio

    from ..message.filters.hooks import Hooks
    from ..policy.router import hook_targets

    hooks = Hooks.from_config(config)
    if hooks.alias_resolve is None:
        return []
    local, _, domain = address.rpartition("@")
    domain = normalize_domain(domain)
    names = dict.fromkeys((f"{local}@{domain}",
                           f"{normalize_name(local, config.aliases)}@{domain}"))
    for name in names:
        found = asyncio.run(hooks.resolve(name))
        if found is None:
            raise MailrelayError(f"{address}: the alias-resolve hook failed (the server "
                                 "answers 451; its log says why)")
        if found:
            warnings.append(f"{address}: from hooks/alias-resolve (asked about {name})")
            return hook_targets(found, aliases, users.exists, config.is_local_domain,
                                warn=warnings.append)
    return []


def _describe(targets: list[Target]) -> str:
    return ", ".join(f"| {t.value}" if t.kind == PIPE else t.value for t in targets)


def cmd_check(args: argparse.Namespace) -> int:
    """The aliases part of ``mailrelay check``, with the same rule (domain_problems) and
    the same verdict: each problem is an error, and any error makes the exit status 1."""
    config = load_config(args.config)
    domains = [local_domain(config, args.domain)] if args.domain else list(config.domains)
    users = Users.load(config)
    aliases = Aliases.load(config)[0]  # broken files are reported one by one below
    failed = False
    for domain in domains:
        path = aliases_path(config, domain)
        lines: dict[str, int] = {}
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            print(f"{domain}: no aliases file")
            table: dict[str, list[Target]] = {}
        except OSError as exc:
            print(f"error: {ConfigError(f'cannot read: {exc.strerror or exc}', path)}",
                  file=sys.stderr)
            failed = True
            continue
        else:
            table, errors = parse_text(raw, domain, path, config.aliases, lines)
            if errors:
                for error in errors:
                    print(f"error: {error}", file=sys.stderr)
                failed = True
                continue
            count = sum(1 for name in table if name != CATCH_ALL)
            catch_all = (f"catch-all → {_describe(table[CATCH_ALL])}" if CATCH_ALL in table
                         else "no catch-all")
            print(f"{domain}: {count} alias{'es' if count != 1 else ''}, {catch_all}")
        for name, problem in domain_problems(aliases, domain, table, users, config):
            where = ConfigError(problem, path, lines.get(name) if name else None)
            print(f"error: {where}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


def domain_problems(aliases: Aliases, domain: str, table: dict[str, list[Target]],
                    users: Users, config: Config) -> list[tuple[str | None, str]]:
    """The one rule of what is wrong with a domain's (loadable) aliases, for ``mailrelay
    check`` and ``aliases check`` alike, where each is an error (``aliases add`` and
    ``remove`` warn about those a change brings): (alias name, or None for the domain;
    the problem). An alias or catch-all that delivers nowhere (RCPT refuses it), a
    loop, a chain deeper than aliases.max_depth, and postmaster@ refused (RFC 5321
    4.5.1 requires it to reach a person)."""
    problems: list[tuple[str | None, str]] = list(
        alias_problems(aliases, domain, table, users, config))
    postmaster = f"postmaster@{domain}"
    if not aliases.exists(postmaster, users.exists, config.is_local_domain):
        problems.append((None, f"{postmaster} is refused (550 5.1.1), but RFC 5321 4.5.1 "
                               "requires it to reach a person: add `postmaster: <user>` "
                               f"(`mailrelay aliases edit {domain}`)"))
    return problems


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
