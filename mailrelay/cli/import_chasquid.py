"""``mailrelay import-chasquid``: turn a chasquid configuration directory into ours.

Ownership as init does it: as root, the new configuration directory and the data
directory are handed to the service user (``--service-user``, default ``mailrelay``,
created with useradd when missing), and every file written below them takes their owner
(fsutil.owner_for), so the server can read what root imported. Not as root, everything
belongs to the caller.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
from pathlib import Path

from ..config import CONFIG_FILE
from ..errors import MailrelayError
from ..fsutil import make_dirs
from ..migrate.chasquid import Plan, apply, plan_import
from .init import (
    DATA_DIR_MODE,
    DIR_MODE,
    run_command,
    service_user_name,
    setpriv_command,
    useradd_command,
)


def register(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.description = (
        "Read chasquid's configuration directory (never changing it) and write an equivalent "
        "mailrelay configuration into the -c directory, which must not have a mailrelay.yaml yet. "
        "Prints one line per thing converted and one per thing that was not, with what to do "
        "instead. As root, the new directory and the data directory are handed to the service "
        "user (created when missing), as init does.")
    parser.add_argument("chasquid_dir", metavar="CHASQUID_DIR",
                        help="chasquid's configuration directory, e.g. /etc/chasquid")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan and the new mailrelay.yaml; write nothing")
    parser.add_argument("--copy-certs", action="store_true",
                        help="copy the certificates instead of using chasquid's certs/ "
                             "in place")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="mailrelay's queue and state, created mode 0700 (default "
                             "/var/lib/mailrelay; never chasquid's)")
    parser.add_argument("--service-user", metavar="NAME",
                        help="the user the server runs as, created when missing; it gets the "
                             "new directory and the data directory (default mailrelay; root "
                             "only)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    as_root = os.geteuid() == 0
    if args.service_user and not as_root:
        raise MailrelayError("--service-user needs root (without root everything belongs to "
                             "you; nothing was written)")
    user = service_user_name(args.service_user) if as_root else None
    plan = plan_import(args.chasquid_dir, args.config, copy_certs=args.copy_certs,
                       data_dir=args.data_dir)
    _check_data_dir(plan.data_dir)
    _report(plan)
    if args.dry_run:
        if user is not None:
            print(f"would hand {plan.target_dir}/ and {plan.data_dir}/ to {user}" +
                  ("" if _user_exists(user) else
                   f" (created: {' '.join(useradd_command(user, plan.data_dir))})"))
        for planned in plan.all_files():
            print(f"would write {plan.target_dir / planned.path} (mode {planned.mode:04o})")
        print(f"--- {plan.target_dir / CONFIG_FILE} would be:")
        print(plan.config_text, end="")
        print("--- dry run: nothing written")
        return 0
    ids = _service_user(user, plan.data_dir) if user is not None else None
    # Directories made on the way to it stay traversable (0755), so the server reaches it.
    made = make_dirs(plan.target_dir.parent, 0o755)
    made += make_dirs(plan.target_dir, DIR_MODE)
    try:
        _hand_over(plan.target_dir, ids, user)
        written = apply(plan)
    except BaseException:
        for directory in reversed(made):
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
    print(f"wrote {len(written)} file(s) under {plan.target_dir}; chasquid's directory "
          "was not changed")
    existed = plan.data_dir.is_dir()
    # Directories made on the way stay traversable (0755): the data directory alone is
    # private, so the service user can reach it.
    make_dirs(plan.data_dir.parent, 0o755)
    make_dirs(plan.data_dir, DATA_DIR_MODE)
    _hand_over(plan.data_dir, ids, user)
    print(f"{'kept' if existed else 'created'} data_dir {plan.data_dir}/"
          + (f" ({user}'s)" if user else ""))
    print(f"next: mailrelay check -c {plan.target_dir}")
    if user is not None:
        print("then stop chasquid and start mailrelay: under systemd, install the unit "
              "(README, \"Running under systemd\"); without it, as " + user + ":")
        print(f"  {setpriv_command(user, _group_name(ids), plan.target_dir)}")
    return 0


def _user_exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


def _group_name(ids: tuple[int, int] | None) -> str:
    import grp

    assert ids is not None
    try:
        return grp.getgrgid(ids[1]).gr_name
    except KeyError:
        return str(ids[1])


def _check_data_dir(data_dir: Path) -> None:
    """Fail before anything is written when the data directory cannot be made."""
    if data_dir.exists():
        if not data_dir.is_dir():
            raise MailrelayError(f"data_dir {data_dir} exists and is not a directory "
                                 "(nothing was written)")
        return
    parent = data_dir.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MailrelayError(f"data_dir {data_dir} cannot be created: {parent} is not "
                             "writable for you; give --data-dir, or run as root (nothing was "
                             "written)")


def _service_user(user: str, data_dir: Path) -> tuple[int, int]:
    """The service user's uid and gid, created (as init does) when missing."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        command = useradd_command(user, data_dir)
        run_command(command)
        entry = pwd.getpwnam(user)
        print(f"created user {user} ({' '.join(command)})")
    else:
        print(f"kept user {user} (uid {entry.pw_uid})")
    return entry.pw_uid, entry.pw_gid


def _hand_over(directory: Path, ids: tuple[int, int] | None, user: str | None) -> None:
    """The directory itself to the service user (what is in it keeps its owner; what is
    written into it takes this one)."""
    if ids is None:
        return
    st = directory.stat()
    if (st.st_uid, st.st_gid) != ids:
        os.chown(directory, *ids)
        print(f"changed owner of {directory}/ to {user}")


def _report(plan: Plan) -> None:
    for line in plan.converted:
        print(f"converted: {line}")
    for line in plan.not_converted:
        print(f"not converted: {line}")
