"""``mailrelay init``: from an empty server to a complete configuration in one command.

Everything is planned and validated first (names, addresses, an existing configuration,
permissions, the password, the DKIM keys generated in memory), then written; a failure
while writing removes what this run created. Run again, it keeps every file that exists
and adds what is missing, so it never overwrites anything.

Ownership: as root, the configuration and data directories belong to the service user
(created with ``useradd --system`` when missing), and every file and directory below them
gets that owner through the one rule of :func:`mailrelay.fsutil.owner_for`. Not as root,
everything belongs to the caller, and no user or systemd unit is made.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import ipaddress
import os
import pwd
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from ..address import AddressError, normalize_domain, split
from ..config import CONFIG_FILE, UserSettings, load_config
from ..errors import ConfigError, MailrelayError
from ..fsutil import atomic_write, make_dirs
from ..message.dkim.keys import PrivateKey, generate_key, load_domain_keys, write_key
from ..message.dkim.signer import ED25519_SHA256
from ..ops.dnsrecords import parse_ips
from ..policy.aliases import CATCH_ALL, EMAIL, Target, default_text, parse_text
from ..policy.users import USERS_FILE, UserDB, check_localpart
from .aliases import NEW_FILE_MODE as ALIASES_MODE
from .common import my_user_name, read_new_password
from .dns import print_records

DEFAULT_DATA_DIR = Path("/var/lib/mailrelay")
DEFAULT_SERVICE_USER = "mailrelay"
UNIT_NAME = "mailrelay.service"
SYSTEMD_DIR = Path("/etc/systemd/system")
# The unit shipped beside the package (a clone of the repository, README's install).
PACKAGED_UNIT = Path(__file__).resolve().parents[2] / "systemd" / UNIT_NAME
README = Path(__file__).resolve().parents[2] / "README.md"

DIR_MODE = 0o750
DATA_DIR_MODE = 0o700
CONFIG_MODE = 0o640
USERS_MODE = 0o600  # UserDB.save's mode

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_FQDN = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})+")
_USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,30}")


def register(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.description = (
        "Creates the service user, the configuration directory (-c) with mailrelay.yaml for ports "
        "25, 587 and 465, DOMAIN with its first user, the aliases (catch-all to --forward-to, "
        "postmaster, abuse), RSA and Ed25519 DKIM keys and the data directory, installs and "
        "enables the systemd unit, then prints the acme.sh commands for the certificate and the "
        "DNS records to publish. Run again, it keeps what exists and adds what is missing. Without"
        " root it needs --no-systemd, and everything belongs to the caller.")
    parser.add_argument("domain", metavar="DOMAIN", help="your mail domain, e.g. example.com")
    parser.add_argument("--hostname", required=True, metavar="HOST",
                        help="this server's name (its MX, PTR and certificate name), "
                             "e.g. mail.example.com")
    parser.add_argument("--forward-to", required=True, metavar="ADDR",
                        help="where mail to the domain goes (catch-all), e.g. me@gmail.com")
    parser.add_argument("--user", required=True, metavar="ADDR",
                        help="the first login, an address of DOMAIN, e.g. me@example.com")
    parser.add_argument("--password-stdin", action="store_true",
                        help="read the user's password from the first line of standard input "
                             "(default: ask twice on the terminal)")
    parser.add_argument("--data-dir", metavar="DIR",
                        help=f"queue and state (default {DEFAULT_DATA_DIR})")
    parser.add_argument("--service-user", metavar="NAME",
                        help=f"the user the server runs as, created when missing (default "
                             f"{DEFAULT_SERVICE_USER}; root only)")
    parser.add_argument("--no-systemd", action="store_true",
                        help="do not install and enable the systemd unit")
    parser.add_argument("--ip", action="append", default=[], metavar="ADDRESS",
                        help="a public address of this server, for the DNS records (repeat "
                             "for IPv4 and IPv6; default: the A/AAAA records of --hostname)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would be done; write nothing")
    parser.set_defaults(func=run)


# -- the plan ------------------------------------------------------------------------------


@dataclasses.dataclass
class Step:
    """One thing init does (or keeps): printed, then applied in order."""

    verb: str  # create | keep | add | chown | run
    target: str  # a path, a user name or a command line
    detail: str = ""
    # Does it; returns the paths it created (removed again if a later step fails).
    action: Callable[[], list[Path]] | None = None

    def line(self, dry_run: bool) -> str:
        done = {"create": "created", "keep": "kept", "add": "added", "chown": "changed owner",
                "run": "ran"}[self.verb]
        verb = f"would {'change owner' if self.verb == 'chown' else self.verb}" if dry_run \
            else done
        return f"{verb:<14} {self.target}" + (f" ({self.detail})" if self.detail else "")


@dataclasses.dataclass
class Plan:
    """Everything one run of init does, validated by plan_init before any step runs."""

    config_dir: Path
    data_dir: Path
    domain: str
    hostname: str
    forward_to: str
    local: str  # the first user's local part
    as_root: bool
    service_user: str  # as root: the user files belong to; else the caller's name
    systemd: bool
    ips: list[str]
    steps: list[Step] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def add(self, verb: str, target: Path | str, detail: str = "",
            action: Callable[[], list[Path]] | None = None) -> None:
        self.steps.append(Step(verb, str(target), detail, action))


def _fail(message: str) -> MailrelayError:
    return MailrelayError(f"{message} (nothing was written)")


def _hostname(value: str) -> str:
    name = value.strip().rstrip(".").lower()
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(name)
        raise _fail(f"--hostname {value}: an IP address, not a host name "
                    "(e.g. mail.example.com)")
    if not _FQDN.fullmatch(name) or name.rsplit(".", 1)[1].isdigit():
        raise _fail(f"--hostname {value!r} is not a fully qualified host name "
                    "(e.g. mail.example.com)")
    return name


def _domain(value: str) -> str:
    try:
        domain = normalize_domain(value)
    except AddressError as exc:
        raise _fail(f"{value!r}: {exc}") from None
    if not _FQDN.fullmatch(domain) or domain.rsplit(".", 1)[1].isdigit():
        raise _fail(f"{value!r} is not a domain name (e.g. example.com)")
    return domain


def _address(option: str, value: str) -> tuple[str, str]:
    try:
        local, domain = split(value.strip())
        return local, normalize_domain(domain)
    except AddressError:
        raise _fail(f"{option} {value!r} is not an address (user@domain)") from None


def _owner_of(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_uid, st.st_gid


def _service_ids(plan: Plan) -> tuple[int, int]:
    """The service user's uid and gid (it exists by the time steps run)."""
    if not plan.as_root:
        return os.geteuid(), os.getegid()
    entry = pwd.getpwnam(plan.service_user)
    return entry.pw_uid, entry.pw_gid


def _writable(directory: Path, plan: Plan) -> None:
    """Fail now, not half-way, when the caller cannot create things in ``directory``."""
    while not directory.exists():
        directory = directory.parent
    if not directory.is_dir():
        raise _fail(f"{directory} is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise _fail(f"cannot create files in {directory}: permission denied")


def _directory(plan: Plan, path: Path, mode: int, *, own: bool = False) -> None:
    """Create ``path`` (mode ``mode``) or keep it; ``own``: it must belong to the service
    user even when its parent does not (the configuration and data directories)."""

    def create() -> list[Path]:
        # The configuration and data directories: what is made on the way to them stays
        # traversable (0755), or the service user could not reach them.
        created = make_dirs(path.parent, 0o755) if own else []
        created += make_dirs(path, mode)
        if own and plan.as_root:
            os.chown(path, *_service_ids(plan))
        return created

    def chown() -> list[Path]:
        os.chown(path, *_service_ids(plan))
        return []

    if path.exists():
        if not path.is_dir():
            raise _fail(f"{path} exists and is not a directory")
        plan.add("keep", f"{path}/")
        owner = _owner_of(path)
        wanted = None
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(plan.service_user)
            wanted = (entry.pw_uid, entry.pw_gid)
        if plan.as_root and owner != wanted:
            plan.add("chown", f"{path}/", f"to {plan.service_user}, so the server can use "
                     "it; what is in it keeps its owner", chown)
        return
    _writable(path, plan)
    plan.add("create", f"{path}/", f"mode {mode:04o}", create)


def _file(plan: Plan, path: Path, data: bytes, mode: int, what: str) -> None:
    if path.exists():
        # Only "not replaced": what init would have written (`what`) need not be what
        # the kept file says (the owner may have changed the ports since).
        plan.add("keep", path, "not replaced")
        return

    def write() -> list[Path]:
        atomic_write(path, data, mode=mode)
        return [path]

    plan.add("create", path, f"{what}, mode {mode:04o}", write)


def _ipv6_available() -> bool:
    """Whether this machine can listen on IPv6: a [::] listener fails start-up if not."""
    import socket

    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def config_text(hostname: str, data_dir: Path, ipv6: bool, systemd: bool = True) -> str:
    def addresses(port: int) -> str:
        found = [f'"0.0.0.0:{port}"'] + ([f'"[::]:{port}"'] if ipv6 else [])
        return "[" + ", ".join(found) + "]"

    restart = ("`systemctl restart mailrelay`" if systemd else
               "stop `mailrelay serve` (SIGTERM) and start it again")
    return f"""\
# mailrelay configuration, written by `mailrelay init` on {dt.date.today():%Y-%m-%d}.
# Every setting and its default: README.md, "Configuration". After a change:
# `mailrelay check`, then {restart}.

# The name this server greets with: the MX of your domains, the PTR of its address
# and the name on its certificate.
hostname: {hostname}

listen:
  {("smtp: " + addresses(25)).ljust(48)}# MX: mail for your domains, STARTTLS offered
  {("submission: " + addresses(587)).ljust(48)}# STARTTLS, then AUTH (mail clients, Gmail)
  {("submission_tls: " + addresses(465)).ljust(48)}# implicit TLS, then AUTH

# Queue, SRS secret and state.
data_dir: {data_dir}

tls:
  # certs/<name>/fullchain.pem + privkey.pem, where `acme.sh --install-cert` puts them.
  certs_dir: certs
  self_signed: false
"""


def aliases_text(domain: str, local: str, forward_to: str) -> str:
    return default_text(domain) + f"""
# Written by `mailrelay init`. {local} is a login (the users file); this alias sends
# its mail on too, since an alias wins over a user of the same name.
{local}: {forward_to}
# RFC 5321 wants postmaster@ to reach a person; abuse@ is where spam reports go.
postmaster: {local}
abuse: {local}
# Every other address of {domain}.
*: {forward_to}
"""


def plan_init(args: argparse.Namespace) -> Plan:
    """Everything init would do, validated; raises a one-line error otherwise."""
    domain = _domain(args.domain)
    hostname = _hostname(args.hostname)
    user_local, user_domain = _address("--user", args.user)
    if user_domain != domain:
        raise _fail(f"--user {args.user}: not an address of {domain}")
    try:
        local = check_localpart(user_local)
    except ValueError as exc:
        raise _fail(f"--user {args.user}: {exc}") from None
    forward_local, forward_domain = _address("--forward-to", args.forward_to)
    forward_to = f"{forward_local}@{forward_domain}"
    try:
        ips = [str(ip) for ip in parse_ips(args.ip)]
    except MailrelayError as exc:
        raise _fail(str(exc)) from None

    as_root = os.geteuid() == 0
    me = my_user_name()
    if not as_root:
        if not args.no_systemd:
            raise _fail("installing the systemd unit needs root: run it as root, or pass "
                        "--no-systemd")
        if args.service_user:
            raise _fail("--service-user needs root (without root everything belongs to you)")
    service_user = (args.service_user or DEFAULT_SERVICE_USER) if as_root else me
    if as_root and not _USER_NAME.fullmatch(service_user):
        raise _fail(f"--service-user {service_user!r} is not a valid user name")

    config_dir = Path(args.config).absolute()
    data_dir = Path(args.data_dir).absolute() if args.data_dir else DEFAULT_DATA_DIR
    if config_dir.exists() and not config_dir.is_dir():
        raise _fail(f"{config_dir} exists and is not a directory")

    config_path = config_dir / CONFIG_FILE
    existing_domains: tuple[str, ...] = ()
    if config_path.exists():
        try:
            existing = load_config(config_dir)
        except ConfigError as exc:
            raise _fail(f"{exc}; init does not touch a configuration that does not load") \
                from None
        if existing.hostname != hostname:
            raise _fail(f"{config_path} exists with hostname {existing.hostname}, not "
                        f"{hostname}: init never changes an existing configuration (edit it, "
                        "or use another -c)")
        if args.data_dir and existing.data_dir != data_dir.resolve():
            raise _fail(f"{config_path} exists with data_dir {existing.data_dir}, not "
                        f"{data_dir}: init never changes an existing configuration")
        data_dir = existing.data_dir
        existing_domains = existing.domains
    if forward_domain in {domain, hostname, *existing_domains}:
        raise _fail(f"--forward-to {forward_to} is an address this server receives mail "
                    "for, so forwarding to it would loop: give an address at another "
                    "provider (e.g. you@gmail.com)")

    systemd = as_root and not args.no_systemd
    plan = Plan(config_dir, data_dir, domain, hostname, forward_to, local, as_root,
                service_user, systemd, ips)
    if not as_root:
        plan.notes.append(f"not root: no service user is created and everything belongs to "
                          f"{me}; run the server as {me}")
    unit = _plan_systemd_checks(plan)
    _plan_service_user(plan)
    _plan_files(plan, args)
    if unit is not None:
        _plan_unit(plan, unit)
    return plan


def _plan_systemd_checks(plan: Plan) -> str | None:
    """The unit to install, or None; fails now when systemd cannot take it."""
    if not plan.systemd:
        return None
    if not Path("/run/systemd/system").is_dir() or shutil.which("systemctl") is None:
        raise _fail("systemd is not running on this machine (no /run/systemd/system): pass "
                    "--no-systemd and start `mailrelay serve` another way")
    if not PACKAGED_UNIT.is_file():
        raise _fail(f"the packaged unit {PACKAGED_UNIT} is missing: pass --no-systemd and "
                    "install a unit yourself")
    for path in (plan.config_dir, plan.data_dir):
        if re.search(r"\s", str(path)):
            raise _fail(f"{path}: a path with spaces cannot go into the unit")
    return PACKAGED_UNIT.read_text()


def _plan_service_user(plan: Plan) -> None:
    if not plan.as_root:
        return
    try:
        entry = pwd.getpwnam(plan.service_user)
    except KeyError:
        pass
    else:
        plan.add("keep", f"user {plan.service_user}", f"uid {entry.pw_uid}")
        return
    if shutil.which("useradd") is None:
        raise _fail(f"user {plan.service_user} does not exist and useradd is not installed")
    command = useradd_command(plan.service_user, plan.data_dir)

    def create() -> list[Path]:
        _run(command)
        return []

    plan.add("create", f"user {plan.service_user}", " ".join(command), create)


def useradd_command(user: str, home: Path) -> list[str]:
    """How init (and import-chasquid) create the service user: a system user with its own
    group, no login shell, its home the data directory (not created by useradd)."""
    return ["useradd", "--system", "--user-group", "--home-dir", str(home),
            "--no-create-home", "--shell", "/usr/sbin/nologin", user]


def service_user_name(given: str | None) -> str:
    """--service-user as root (default mailrelay); a one-line error when not a user name."""
    name = given or DEFAULT_SERVICE_USER
    if not _USER_NAME.fullmatch(name):
        raise _fail(f"--service-user {name!r} is not a valid user name")
    return name


def _plan_files(plan: Plan, args: argparse.Namespace) -> None:
    config_dir, domain = plan.config_dir, plan.domain
    domain_dir = config_dir / "domains" / domain
    _directory(plan, config_dir, DIR_MODE, own=True)
    _directory(plan, config_dir / "domains", DIR_MODE)
    _directory(plan, domain_dir, DIR_MODE)
    _plan_user(plan, domain_dir / USERS_FILE, args)

    text = aliases_text(domain, plan.local, plan.forward_to)
    table, errors = parse_text(text, domain)
    if errors or table[CATCH_ALL] != [Target(EMAIL, plan.forward_to)]:
        # The address must stand in an aliases file as itself (no ",", no spaces...).
        reason = errors[0].message if errors else "not a single address"
        raise _fail(f"--forward-to {args.forward_to}: {reason}")
    aliases = domain_dir / "aliases"
    if aliases.exists():
        _keep_aliases(plan, aliases)
    else:
        _file(plan, aliases, text.encode(), ALIASES_MODE,
              f"{plan.local}, postmaster, abuse and * to {plan.forward_to}")

    _plan_keys(plan, domain_dir, args.dry_run)
    certs = config_dir / "certs"
    _directory(plan, certs, DIR_MODE)
    _directory(plan, certs / plan.hostname, DIR_MODE)
    _directory(plan, plan.data_dir, DATA_DIR_MODE, own=True)
    # Last of the configuration: a run that fails before it leaves no mailrelay.yaml.
    _file(plan, config_dir / CONFIG_FILE,
          config_text(plan.hostname, plan.data_dir, _ipv6_available(), plan.systemd).encode(),
          CONFIG_MODE, "ports 25, 587 and 465")


def _min_password_length(plan: Plan) -> int:
    """users.min_password_length of the configuration init adds to, else the default."""
    if (plan.config_dir / CONFIG_FILE).exists():
        with contextlib.suppress(ConfigError):
            return load_config(plan.config_dir).users.min_password_length
    return UserSettings().min_password_length


def _plan_user(plan: Plan, path: Path, args: argparse.Namespace) -> None:
    address = f"{plan.local}@{plan.domain}"
    try:
        db = UserDB.load(path, plan.domain)
    except ConfigError as exc:
        raise _fail(f"{exc}; fix it first") from None
    if plan.local in db:
        plan.add("keep", path, f"{address} exists; password unchanged")
        return
    existed = path.exists()
    if not args.dry_run:
        try:
            db.set_password(plan.local, read_new_password(args.password_stdin,
                                                          _min_password_length(plan)))
        except MailrelayError as exc:
            raise _fail(str(exc)) from None
    previous = path.read_bytes() if existed else None

    def save() -> list[Path]:
        if previous is not None and path.read_bytes() != previous:
            raise MailrelayError(f"{path} changed while init ran")
        db.save()
        return [] if existed else [path]

    if existed:
        plan.add("add", path, f"{address} (the other users are kept)", save)
    else:
        plan.add("create", path, f"{address}, mode {USERS_MODE:04o}", save)


def _keep_aliases(plan: Plan, path: Path) -> None:
    """Keep an existing aliases file, saying what it lacks of what init would write."""
    try:
        table, _ = parse_text(path.read_bytes(), plan.domain, path)
    except OSError as exc:
        raise _fail(f"{path}: {exc.strerror}") from None
    missing = [name for name in ("postmaster", "abuse", CATCH_ALL) if name not in table]
    detail = "not replaced"
    if missing:
        detail += f"; it has no {', '.join(missing)} (`mailrelay aliases edit {plan.domain}`)"
    plan.add("keep", path, detail)


def _plan_keys(plan: Plan, domain_dir: Path, dry_run: bool) -> None:
    keys, errors = load_domain_keys(domain_dir, plan.domain)
    if errors:
        raise _fail(f"{errors[0]}; fix or remove it first")
    have = {"ed25519" if k.algorithm == ED25519_SHA256 else "rsa": k for k in keys}
    today = f"{dt.date.today():%Y%m%d}"
    for kind, algo in (("rsa", "rsa2048"), ("ed25519", "ed25519")):
        if kind in have:
            plan.add("keep", have[kind].path, f"DKIM {kind} key, selector {have[kind].selector}")
            continue
        selector = f"{today}-{kind}"
        key: PrivateKey | None = None if dry_run else generate_key(algo)

        def write(selector: str = selector, key: PrivateKey | None = key) -> list[Path]:
            assert key is not None
            return [write_key(domain_dir, selector, key)]

        path = domain_dir / f"dkim:{selector}.pem"
        plan.add("create", path, f"DKIM {algo} key, mode 0600", write)


def render_unit(template: str, *, binary: str, config_dir: Path, data_dir: Path, user: str,
                group: str, readme: Path | None = None) -> str:
    """The packaged unit for this installation: ExecStart, User/Group and the writable
    data_dir are set; the sandbox settings stay as shipped."""
    lines = []
    state_dir = data_dir.parent == Path("/var/lib")
    for line in template.splitlines():
        key = line.partition("=")[0] if "=" in line and not line.startswith("#") else None
        if key == "ExecStart":
            line = f"ExecStart={binary} serve -c {config_dir}"
        elif key == "User":
            line = f"User={user}"
        elif key == "Group":
            line = f"Group={group}"
        elif key == "StateDirectory":
            if not state_dir:
                continue  # systemd only manages directories under /var/lib
            line = f"StateDirectory={data_dir.name}"
        elif key == "StateDirectoryMode" and not state_dir:
            continue
        elif key == "ReadWritePaths":
            line = f"ReadWritePaths={data_dir}"
        elif key == "Documentation" and readme is not None:
            line = f"Documentation=file://{readme}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def mailrelay_binary() -> str:
    """How systemd starts this installation's mailrelay."""
    script = Path(os.path.abspath(sys.executable)).parent / "mailrelay"
    if script.is_file() and os.access(script, os.X_OK):
        return str(script)
    return f"{os.path.abspath(sys.executable)} -m mailrelay.cli.main"


def _plan_unit(plan: Plan, template: str) -> None:
    group = _group_of(plan.service_user)  # useradd --user-group; an existing user's own
    text = render_unit(template, binary=mailrelay_binary(), config_dir=plan.config_dir,
                       data_dir=plan.data_dir, user=plan.service_user, group=group,
                       readme=README if README.is_file() else None)
    path = SYSTEMD_DIR / UNIT_NAME
    if path.exists():
        same = path.read_text(errors="replace") == text
        plan.add("keep", path, "as init would write it" if same else
                 "differs from what init would write; not replaced")
    else:
        def write() -> list[Path]:
            atomic_write(path, text.encode(), mode=0o644)
            return [path]

        plan.add("create", path, f"runs {plan.service_user}'s mailrelay serve -c "
                 f"{plan.config_dir}", write)
    for command in (["systemctl", "daemon-reload"], ["systemctl", "enable", "mailrelay"]):
        plan.add("run", " ".join(command), "", lambda command=command: _run(command))


def run_command(command: list[str]) -> list[Path]:
    """Run ``command`` (useradd, systemctl); a one-line MailrelayError when it fails."""
    return _run(command)


def _run(command: list[str]) -> list[Path]:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        raise MailrelayError(f"{' '.join(command)}: {exc}") from None
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])
        raise MailrelayError(f"{' '.join(command)}: {reason[-1]}")
    return []


# -- running it ----------------------------------------------------------------------------


def apply(plan: Plan) -> None:
    """Run the steps in order; if one fails, remove what the earlier ones created."""
    created: list[Path] = []
    for step in plan.steps:
        if step.action is None:
            print(step.line(dry_run=False))
            continue
        try:
            created += step.action()
        except BaseException as exc:
            removed = _undo(created)
            if isinstance(exc, OSError):
                where = f"{exc.filename}: " if exc.filename else ""
                exc = MailrelayError(f"{where}{exc.strerror or exc}")
            if isinstance(exc, MailrelayError):
                undone = f"; removed again the {removed} file(s) and directories it had " \
                         "created" if removed else ""
                raise MailrelayError(f"{step.target}: {exc}{undone}") from None
            raise
        print(step.line(dry_run=False))


def _undo(created: list[Path]) -> int:
    removed = 0
    for path in reversed(created):
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink()
            removed += 1
    return removed


def acme_commands(plan: Plan) -> list[str]:
    """acme.sh's commands for the certificate, installed where certs_dir looks."""
    directory = plan.config_dir / "certs" / plan.hostname
    reload = []
    if plan.as_root:
        reload.append(f"chown -R {plan.service_user}: {plan.config_dir / 'certs'}")
    # try-reload-or-restart: nothing when the server is not running yet (the first
    # --install-cert comes before the first start).
    reload.append("systemctl try-reload-or-restart mailrelay" if plan.systemd else
                  f'kill -HUP "$(cat {plan.data_dir / "mailrelay.pid"})" 2>/dev/null; true')
    return [
        f"acme.sh --issue -d {plan.hostname} --standalone"
        "    # port 80 free; or --webroot DIR, or --dns dns_<provider>",
        f"acme.sh --install-cert -d {plan.hostname} \\",
        f"    --fullchain-file {directory / 'fullchain.pem'} \\",
        f"    --key-file {directory / 'privkey.pem'} \\",
        f"    --reloadcmd '{' && '.join(reload) if plan.systemd else '; '.join(reload)}'",
    ]


def _group_of(user: str) -> str:
    """The primary group of ``user`` (useradd --user-group: its own name)."""
    with contextlib.suppress(KeyError):
        import grp

        return grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name
    return user


def setpriv_command(user: str, group: str, config_dir: Path) -> str:
    """``mailrelay serve`` as ``user`` with only CAP_NET_BIND_SERVICE, as the unit runs it
    (README, "Running without systemd")."""
    return (f"setpriv --reuid={user} --regid={group} --init-groups "
            "--inh-caps=+net_bind_service --ambient-caps=+net_bind_service "
            "--bounding-set=-all,+net_bind_service --no-new-privs "
            f"{mailrelay_binary()} serve -c {config_dir}")


def start_hint(plan: Plan) -> list[str]:
    """How to start the server after init: systemctl, setpriv as the service user (root
    without systemd: ports below 1024 need the capability, and root should not run it),
    or serve as the caller, who cannot bind those ports."""
    check = f"`mailrelay check -c {plan.config_dir}`"
    if plan.systemd:
        return [f"Then {check} and `systemctl start mailrelay`."]
    if plan.as_root:
        user = plan.service_user
        return [f"Then {check}, and start it as {user} with the one capability ports 25, 587 "
                "and 465 need (README, \"Running without systemd\"):",
                f"  {setpriv_command(user, _group_of(user), plan.config_dir)}"]
    return [f"Then {check} and `mailrelay serve -c {plan.config_dir}`. Ports 25, 587 and 465 "
            f"need root or CAP_NET_BIND_SERVICE, which {plan.service_user} has not: have root "
            f"start it as {plan.service_user} (README, \"Running without systemd\"), or move "
            "the listen: addresses in mailrelay.yaml to ports from 1024 up."]


def run(args: argparse.Namespace) -> int:
    plan = plan_init(args)
    for note in plan.notes:
        print(f"note: {note}")
    if args.dry_run:
        for step in plan.steps:
            print(step.line(dry_run=True))
        print("dry run: nothing written (the DNS records are printed once the keys exist)")
        return 0
    apply(plan)
    print()
    print(f"Next, the certificate for {plan.hostname} (https://github.com/acmesh-official/"
          "acme.sh), installed where mailrelay reads it:")
    for line in acme_commands(plan):
        print(f"  {line}")
    print()
    for line in start_hint(plan):
        print(line)
    print()
    return print_records(load_config(plan.config_dir), plan.domain, plan.ips)
