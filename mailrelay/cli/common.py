"""Helpers shared by the CLI commands."""

from __future__ import annotations

import getpass
import os
import pwd
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from ..address import AddressError, normalize_domain
from ..config import Config
from ..errors import MailrelayError


def local_domain(config: Config, domain: str) -> str:
    """``domain`` normalised, if it is one of ours; else a one-line error naming ours."""
    try:
        domain = normalize_domain(domain)
    except AddressError as exc:
        raise MailrelayError(str(exc)) from None
    if domain not in config.domains:
        known = ", ".join(config.domains) if config.domains else "none"
        raise MailrelayError(f"{domain} is not a local domain (known: {known}; "
                             f"create {config.domain_dir(domain)}/ to add it)")
    return domain


def read_password(from_stdin: bool, prompt: str = "Password: ") -> str:
    """A password from the first line of standard input (``--password-stdin``), else asked
    on the terminal; a one-line error when there is neither.

    getpass asks on /dev/tty; without one it would read standard input after a warning and
    fail on its end with a traceback. And a password piped in without --password-stdin
    was meant for us, not to be ignored while a prompt waits on the terminal.
    """
    if from_stdin:
        line = sys.stdin.readline()
        if not line:
            raise MailrelayError("no password on standard input")
        # Only the line ending goes: spaces may be part of the password.
        return line.removesuffix("\n").removesuffix("\r")
    check_terminal()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", getpass.GetPassWarning)
            return getpass.getpass(prompt)
    except getpass.GetPassWarning:
        raise MailrelayError("no terminal to ask for the password on: use "
                             "--password-stdin") from None
    except EOFError:  # ctrl-D at the prompt
        print(file=sys.stderr)
        raise MailrelayError("no password given") from None


def check_terminal() -> None:
    """A one-line error unless a password can be asked on the terminal (see
    read_password); for commands that ask later, after other checks."""
    if sys.stdin.isatty():
        return
    try:
        open("/dev/tty", "rb").close()  # where getpass asks
    except OSError:
        raise MailrelayError("no terminal to ask for the password on: give it on "
                             "standard input with --password-stdin") from None
    raise MailrelayError("standard input is not a terminal: to give the password on "
                         "it, add --password-stdin")


def read_new_password(from_stdin: bool, min_length: int) -> str:
    """A new password: asked twice on a terminal, at least ``min_length`` characters."""
    password = read_password(from_stdin)
    if not password:
        raise MailrelayError("password must not be empty")
    if len(password) < min_length:
        raise MailrelayError(f"the password is too short: {len(password)} character"
                             f"{'s' if len(password) != 1 else ''}, at least {min_length} "
                             "(users.min_password_length in mailrelay.yaml)")
    if not from_stdin and read_password(False, "Repeat password: ") != password:
        raise MailrelayError("passwords do not match")
    return password


def unreadable_for_service(config_dir: Path, path: Path) -> str | None:
    """Run as root for a configuration directory another user owns (the server's user,
    as `mailrelay check` takes it): that user's name if it cannot read ``path``, else
    None (also when not root, or root owns the directory: nobody else to ask about).

    Asked in a forked child with the user's uid, gid and groups, so the kernel answers
    (ACLs and every directory on the way included)."""
    if os.geteuid() != 0:
        return None
    try:
        st = os.stat(config_dir)
    except OSError:
        return None
    if st.st_uid == 0:
        return None
    uid, gid, name = st.st_uid, st.st_gid, str(st.st_uid)
    groups = [gid]
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        pass  # a uid without a name: its directory's group
    else:
        name, gid = entry.pw_name, entry.pw_gid
        groups = os.getgrouplist(name, gid)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: only answers through its exit status
        code = 2
        try:
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            code = 0 if os.access(path, os.R_OK) else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return None if os.waitstatus_to_exitcode(status) == 0 else name


def server_took(config: Config, kind: str, domain: str, path: Path, digest: str,
                no_server: Callable[[], None] | None = None) -> bool | None:
    """Have the running server load ``domain``'s ``kind`` file ("users" or "aliases")
    just written, through data_dir/control.sock, and check that it took this version
    (``digest``: its sha256, hex). True: it did. False: it did not, with a warning (say,
    a file root wrote that the server's user cannot read: it keeps what it had). None:
    there was nothing to ask (no server: ``no_server`` is called) or no answer (warned;
    the server reloads changed files by itself within seconds)."""
    from ..ops.control import ServerNotRunning, request

    try:
        answer = request(config.data_dir, {"cmd": kind, "domain": domain})
    except ServerNotRunning:
        if no_server is not None:
            no_server()
        return None
    except MailrelayError as exc:
        print(f"warning: could not ask the running server whether it took the change "
              f"(it reloads changed files by itself within seconds): {exc}", file=sys.stderr)
        return None
    if answer.get("digest") == digest:
        return True
    reason = answer.get("error") or "it has another version of the file"
    print(f"warning: {path} is saved, but the running server did not take it: {reason}. "
          f"It keeps the {kind} of {domain} it had; fix the file (`mailrelay check`).",
          file=sys.stderr)
    return False


def my_user_name() -> str:
    """This process's user by name (its uid when it has none), for messages and for
    commands to paste."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())
