"""``mailrelay user``: add, change, remove, list and test users of the local domains."""

from __future__ import annotations

import argparse
import sys

from ..address import AddressError, normalize_local, split
from ..config import Config, load_config
from ..errors import MailrelayError
from ..policy.users import USERS_FILE, UserDB
from .common import local_domain, read_new_password, read_password, server_took


def register(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:

    # The actions take -c too: ``common``'s -c has no default (see main.common_options),
    # so one given earlier is kept.
    actions = parser.add_subparsers(dest="user_command", metavar="ACTION", required=True)

    add = actions.add_parser("add", parents=[common], help="add a user")
    add.add_argument("address", metavar="ADDR", help="local@domain")
    how = add.add_mutually_exclusive_group()
    how.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of standard input")
    how.add_argument("--receive-only", action="store_true",
                     help="the user receives mail but cannot log in")
    add.set_defaults(func=cmd_add)

    passwd = actions.add_parser("passwd", parents=[common], help="change a user's password")
    passwd.add_argument("address", metavar="ADDR", help="local@domain")
    passwd.add_argument("--password-stdin", action="store_true",
                        help="read the password from the first line of standard input")
    passwd.set_defaults(func=cmd_passwd)

    remove = actions.add_parser("remove", parents=[common], help="remove a user")
    remove.add_argument("address", metavar="ADDR", help="local@domain")
    remove.set_defaults(func=cmd_remove)

    listing = actions.add_parser("list", parents=[common], help="list users")
    listing.add_argument("domain", metavar="DOMAIN", nargs="?",
                         help="only this domain (default: all)")
    listing.set_defaults(func=cmd_list)

    auth = actions.add_parser("authenticate", parents=[common],
                              help="check a password (exit 0 if right, 1 if not)")
    auth.add_argument("address", metavar="ADDR", help="local@domain")
    auth.add_argument("--password-stdin", action="store_true",
                      help="read the password from the first line of standard input")
    auth.set_defaults(func=cmd_authenticate)


def _domain_db(config: Config, domain: str) -> UserDB:
    domain = local_domain(config, domain)
    return UserDB.load(config.domain_dir(domain) / USERS_FILE, domain)


def _user_db(config: Config, address: str) -> tuple[str, UserDB]:
    """The normalised local part of ``address`` and its domain's database."""
    try:
        local, domain = split(address)
    except AddressError:
        raise MailrelayError(f"not an address: {address!r} (expected user@domain)") from None
    return normalize_local(local), _domain_db(config, domain)


def cmd_add(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    local, db = _user_db(config, args.address)
    if local in db:
        raise MailrelayError(f"user {local}@{db.domain} already exists "
                             "(use `mailrelay user passwd` to change the password)")
    if args.receive_only:
        db.add_receive_only(local)
    else:
        db.set_password(local, read_new_password(args.password_stdin,
                                                 config.users.min_password_length))
    db.save()
    note = " (receive-only)" if args.receive_only else ""
    print(f"added {local}@{db.domain}{note}")
    return _tell_server(config, db)


def cmd_passwd(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    local, db = _user_db(config, args.address)
    if local not in db:
        raise MailrelayError(f"no such user: {local}@{db.domain}")
    db.set_password(local, read_new_password(args.password_stdin,
                                             config.users.min_password_length))
    db.save()
    print(f"password changed for {local}@{db.domain}")
    return _tell_server(config, db)


def cmd_remove(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    local, db = _user_db(config, args.address)
    if local not in db:
        raise MailrelayError(f"no such user: {local}@{db.domain}")
    address = f"{local}@{db.domain}"
    reaching = _aliases_reaching(config, address)
    db.remove(local)
    db.save()
    print(f"removed {address}")
    _warn_about_aliases(config, address, reaching)
    return _tell_server(config, db)


def _aliases_reaching(config: Config, address: str) -> list[str]:
    """The aliases (``name@domain``, ``*@domain`` for a catch-all) whose mail reaches the
    user ``address`` now, directly or through other aliases."""
    from ..policy.aliases import MAILBOX, Aliases
    from ..policy.users import Users

    try:
        users = Users.load(config)
    except MailrelayError:
        return []  # a broken users file elsewhere: `mailrelay check` says more
    aliases = Aliases.load(config)[0]
    found = []
    for domain, table in aliases.tables.items():
        for name in table:
            alias = f"{name}@{domain}"
            targets = aliases.resolve(alias, users.exists, config.is_local_domain,
                                      warn=lambda message: None)
            if any(t.kind == MAILBOX and t.value == address for t in targets):
                found.append(alias)
    return found


def _warn_about_aliases(config: Config, address: str, reaching: list[str]) -> None:
    """After ``address`` was removed: where the mail of each alias that reached it goes
    now (the catch-all, other targets, or nowhere: refused)."""
    from ..policy.aliases import CATCH_ALL, PIPE, Aliases
    from ..policy.users import Users

    if not reaching:
        return
    try:
        users = Users.load(config)
    except MailrelayError:
        return
    aliases = Aliases.load(config)[0]
    for alias in reaching:
        targets = aliases.resolve(alias, users.exists, config.is_local_domain,
                                  warn=lambda message: None)
        domain = alias.rpartition("@")[2]
        shown = f"the catch-all of {domain}" if alias.startswith(f"{CATCH_ALL}@") else alias
        now = (", ".join(f"| {t.value}" if t.kind == PIPE else t.value for t in targets)
               if targets else "nowhere: it is refused (550 5.1.1)")
        print(f"warning: {shown} led to {address}; its mail now goes to {now} "
              f"(`mailrelay aliases edit {domain}`)", file=sys.stderr)


def _tell_server(config: Config, db: UserDB) -> int:
    """Have the running server load the file just written (``server_took``): 1 when it
    did not take it (it keeps the users it had, so a removed user could still log in).
    Without a running server there is nothing to do: it reads the file when it starts."""
    return 1 if server_took(config, "users", db.domain, db.path, db.digest) is False else 0


def cmd_list(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    domains = [args.domain] if args.domain else list(config.domains)
    for domain in domains:
        db = _domain_db(config, domain)
        for name in db.names():
            note = "" if db.can_login(name) else " (receive-only)"
            print(f"{name}@{db.domain}{note}")
    return 0


def cmd_authenticate(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    local, db = _user_db(config, args.address)
    password = read_password(args.password_stdin)
    if db.check_password(local, password):
        print("ok")
        return 0
    print("authentication failed")
    return 1
