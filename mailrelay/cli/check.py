"""``mailrelay check``: load the configuration with the server's own code, as the server's
user sees the files, and report every problem at once.

What ``serve`` loads, ``check`` loads through the same functions: ``load_config``, the
users files (``UserDB.load_all``, which ``Users.load`` uses), ``Aliases.load``,
``KeyRing.load``, the certificates (``tls.inspect_certificates``: the pairs
``CertificateStore.load`` reads), ``verifying_tls_context`` for ``delivery.ca_file``,
``load_or_create_secrets`` for an existing ``srs.secret``, and the router's RCPT decision
for ``postmaster@``. On top of that it says what the server only finds out later or
never: a certificate that does not cover ``hostname`` or is about to expire, a
``data_dir`` it cannot write, unsafe file modes, aliases that deliver nowhere,
``delivery.local_mda`` programs, a domain without a DKIM key.

Whose permissions: the files are looked at as the server's user, by default the owner of
the configuration directory (``--user`` names another). Run as root, the checks run in a
forked child that has switched to that user's uid, gid and groups, so every "can it read
this?" is answered by the kernel itself for the real loading code (ACLs and all) rather
than computed from mode bits. Run as anyone else, they run with the caller's own
permissions, and a warning says so when that is not the server's user.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import grp
import json
import os
import pwd
import shlex
import shutil
import stat
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import CONFIG_FILE, Config, load_config, setting_line
from ..delivery.manager import mda_command
from ..delivery.relay import RelayFailure, relay_from_config
from ..delivery.results import verifying_tls_context
from ..dnsresolver import make_resolver
from ..errors import ConfigError, MailrelayError
from ..fsutil import write_all
from ..message.dkim.keys import KeyRing
from ..policy.aliases import Aliases, aliases_path, parse_text
from ..policy.srs import SECRET_FILE, load_or_create_secrets
from ..policy.users import USERS_FILE, UserDB, Users
from ..smtp.tls import inspect_certificates
from .aliases import domain_problems
from .common import my_user_name

EXPIRY_WARNING = dt.timedelta(days=14)
# Directories of data_dir the server writes into, beside data_dir itself.
DATA_SUBDIRS = ("queue", "mail", "mta-sts", "selfsigned")


def register(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.description = (
        "Loads the configuration with the server's own code, as the server's user sees the files, "
        "and prints every error and warning with its file and line. Exit status 1 if there is an "
        "error, 0 with only warnings.")
    parser.add_argument("--user", metavar="NAME",
                        help="the server's user, whose permissions count (name or uid; "
                             "default: the owner of the configuration directory)")
    parser.set_defaults(func=run)


@dataclass
class Finding:
    message: str
    path: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        return str(ConfigError(self.message, self.path, self.line))


@dataclass
class Report:
    """What one check found; serialisable, so a child running as another user can hand
    it back."""

    info: list[str] = field(default_factory=list)
    errors: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    fatal: str | None = None  # the configuration did not load: nothing else was checked

    def error(self, message: str, path: Path | str | None = None,
              line: int | None = None) -> None:
        self.errors.append(Finding(message, str(path) if path else None, line))

    def warning(self, message: str, path: Path | str | None = None,
                line: int | None = None) -> None:
        self.warnings.append(Finding(message, str(path) if path else None, line))

    def add(self, exc: ConfigError) -> None:
        self.error(exc.message, exc.path, exc.line)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Report:
        data = json.loads(text)
        return cls(info=data["info"], errors=[Finding(**f) for f in data["errors"]],
                   warnings=[Finding(**f) for f in data["warnings"]], fatal=data["fatal"])


@dataclass(frozen=True)
class Identity:
    """The user whose view of the files counts."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    why: str  # "the owner of /etc/mailrelay", "--user"

    def __str__(self) -> str:
        return self.name if self.name == str(self.uid) else f"{self.name} (uid {self.uid})"


def _identity(uid: int, gid: int, why: str) -> Identity:
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:  # a uid without a name (a container's, a test's): its group as given
        return Identity(str(uid), uid, gid, (gid,), why)
    return Identity(entry.pw_name, uid, entry.pw_gid,
                    tuple(os.getgrouplist(entry.pw_name, entry.pw_gid)), why)


def service_identity(config_dir: Path, user: str | None) -> Identity:
    """``--user`` (a name or a uid), else the owner of ``config_dir``, else ourselves."""
    if user:
        if user.isdigit():
            return _identity(int(user), int(user), "--user")
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise MailrelayError(f"--user {user}: no such user") from None
        return _identity(entry.pw_uid, entry.pw_gid, "--user")
    try:
        st = config_dir.stat()
    except OSError:
        return _identity(os.geteuid(), os.getegid(), "the caller")
    return _identity(st.st_uid, st.st_gid, f"the owner of {config_dir}")


def run(args: argparse.Namespace) -> int:
    config_dir = Path(args.config).absolute()
    who = service_identity(config_dir, args.user)
    if os.geteuid() == 0 and who.uid != 0:
        report = _collect_as(who, config_dir)
    else:
        report = collect(config_dir)
        me = _identity(os.geteuid(), os.getegid(), "the caller")
        if who.uid != me.uid:
            report.warning(f"checked with the permissions of {me}, not of the server's user "
                           f"{who} ({who.why}): run it as root or as {who.name} to see the "
                           "files as the server does")
        elif who.uid == 0 and os.geteuid() == 0:
            report.warning(f"checked as root ({who.why}), who can read everything; if the "
                           "server runs as another user (User= of its unit), check with "
                           "--user NAME")
    if report.fatal is not None:
        raise MailrelayError(report.fatal)
    print(f"checked as {who}, {who.why}")
    for line in report.info:
        print(line)
    for finding in report.warnings:
        print(f"warning: {finding}", file=sys.stderr)
    for finding in report.errors:
        print(f"error: {finding}", file=sys.stderr)
    counts = (f"{len(report.errors)} error(s), {len(report.warnings)} warning(s)")
    print(f"check: {'FAILED, ' if report.errors else 'ok, '}{counts}")
    return 1 if report.errors else 0


def _collect_as(who: Identity, config_dir: Path) -> Report:
    """``collect`` in a forked child with ``who``'s uid, gid and groups."""
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the CLI
        code = 1
        try:
            os.close(read_end)
            os.setgroups(list(who.groups))
            os.setgid(who.gid)
            os.setuid(who.uid)
            report = collect(config_dir)
            # Forked, not exec'd: that this process runs says nothing about whether the
            # user could start this mailrelay (a venv under /root).
            problem = program_problem()
            if problem:
                report.error(problem)
            payload = report.to_json()
            code = 0
        except BaseException as exc:
            # A MailrelayError's text is the one line (a ConfigError's with file:line).
            text = str(exc) if isinstance(exc, MailrelayError) else f"{type(exc).__name__}: {exc}"
            payload = json.dumps({"crash": text})
        finally:
            try:
                write_all(write_end, payload.encode())
            finally:
                os._exit(code)
    os.close(write_end)
    chunks = []
    with os.fdopen(read_end, "rb") as pipe:
        while chunk := pipe.read(65536):
            chunks.append(chunk)
    os.waitpid(pid, 0)
    data = b"".join(chunks).decode()
    try:
        crash = json.loads(data).get("crash")
    except ValueError:
        crash = "no report"
    if crash:
        raise MailrelayError(f"the check as {who} failed: {crash}")
    return Report.from_json(data)


def program_problem() -> str | None:
    """None if this process's user can execute this mailrelay's Python (sys.executable,
    through its symlinks), else why not, naming the first directory on the way that it
    cannot search or the file it cannot execute."""
    executable = os.path.abspath(sys.executable)
    if os.access(executable, os.X_OK):
        return None
    real = os.path.realpath(executable)
    shown = executable if real == executable else f"{executable} ({real})"
    why = f"its Python {shown} is not executable for it"
    for path in dict.fromkeys([executable, real]):
        closed = next((d for d in reversed(Path(path).parents)
                       if not os.access(d, os.X_OK)), None)
        if closed is not None:
            why = f"it cannot search {closed}, on the way to its Python {shown}"
            break
    return (f"the server's user cannot run this mailrelay: {why}, so the server cannot "
            "start as this user; install mailrelay where it can (README: /opt/mailrelay, "
            "\"Install on your server\")")


def collect(config_dir: Path) -> Report:
    """Every check, with this process's permissions."""
    report = Report()
    try:
        config = load_config(config_dir)
    except ConfigError as exc:
        report.fatal = str(exc)
        return report
    report.info.append(f"config {config.config_dir}: ok (hostname {config.hostname})")
    for warning in config.warnings:
        report.warning(warning)
    _check_modes(config, report)
    _check_certificates(config, report)
    _check_data_dir(config, report)
    trust_ok = _check_delivery(config, report)
    if config.delivery.relay is not None:
        _check_relay(config, report, trust_ok)
    users = _check_users(config, report)
    aliases = _check_aliases(config, report, users)
    keyring, key_errors = KeyRing.load(config)
    for error in key_errors:
        report.add(error)
    if not config.domains:
        report.warning(f"no domains: create {config.domains_dir}/<domain>/")
    for domain in config.domains:
        keys = keyring.keys_for(domain)
        files = list(config.domain_dir(domain).glob("dkim:*.pem"))
        if not files:
            report.warning(f"no DKIM key: mail from {domain} leaves unsigned and fails DMARC "
                           f"at Gmail (`mailrelay dkim keygen {domain}`)",
                           config.domain_dir(domain))
        # Key files that do not load are errors above: keygen would not be the fix.
        db = users.domain(domain)
        catch_all = " + catch-all" if aliases.catch_all(domain) else ""
        dkim_note = (f"{len(keys)} DKIM key(s) ({', '.join(k.selector for k in keys)})"
                     if keys else "no DKIM keys")
        if len(files) > len(keys):
            dkim_note += f" ({len(files) - len(keys)} key file(s) that do not load)"
        report.info.append(f"domain {domain}: {len(db) if db else 0} user(s), "
                           f"{aliases.count(domain)} alias(es){catch_all}, {dkim_note}")
    return report


# -- file modes ----------------------------------------------------------------------------


def _mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None  # missing, or not ours to see: the loading code reports that


def _writable_by_others(path: Path, report: Report, why: str) -> None:
    mode = _mode(path)
    if mode is not None and mode & 0o022:
        who = " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002)) if mode & bit)
        report.error(f"writable by {who} (mode {mode:04o}): {why}; chmod go-w", path)


def _readable_by_others(path: Path, report: Report, why: str, *, error: bool) -> None:
    mode = _mode(path)
    if mode is not None and mode & 0o004:
        message = f"readable by others (mode {mode:04o}): {why}"
        (report.error if error else report.warning)(message, path)


def _check_modes(config: Config, report: Report) -> None:
    changes = "whoever can write it changes what the server does"
    for directory in (config.config_dir, config.domains_dir,
                      *(config.domain_dir(d) for d in config.domains)):
        _writable_by_others(directory, report, changes)
    _writable_by_others(config.config_dir / CONFIG_FILE, report, changes)
    for domain in config.domains:
        users = config.domain_dir(domain) / USERS_FILE
        _writable_by_others(users, report, "whoever can write it can add a login")
        _readable_by_others(users, report, "the password hashes can be attacked offline; "
                            "chmod 600 (or 640 with the server's group)", error=False)
        _writable_by_others(aliases_path(config, domain), report,
                            "pipe targets in it run commands as the server")
        for key in sorted(config.domain_dir(domain).glob("dkim:*.pem")):
            _writable_by_others(key, report, "whoever can write it signs as " + domain)
            _readable_by_others(key, report, f"anyone on this machine can sign mail as "
                                f"{domain}; chmod 600", error=True)


# -- certificates --------------------------------------------------------------------------


def _check_certificates(config: Config, report: Report) -> None:
    tls, hostname = config.tls, config.hostname
    found, problems = inspect_certificates(tls)
    for problem in problems:
        report.add(problem)
    now = dt.datetime.now(dt.UTC)
    for cert in found:
        report.info.append(f"certificate {cert.name}: {', '.join(cert.names)} "
                           f"(valid until {cert.not_after:%Y-%m-%d})")
        if cert.expired:
            report.error(f"expired on {cert.not_after:%Y-%m-%d}: clients that verify "
                         "certificates refuse it; renew it", cert.cert_path)
        elif cert.not_after - now < EXPIRY_WARNING:
            days = (cert.not_after - now).days
            report.warning(f"expires on {cert.not_after:%Y-%m-%d}, in {days} day(s): is its "
                           "renewal (acme.sh's cron job) running?", cert.cert_path)
        _readable_by_others(cert.key_path, report, "anyone on this machine can read the "
                            "certificate's private key; chmod 600", error=True)
    yaml_path = config.config_dir / CONFIG_FILE
    if not found:
        if tls.self_signed:
            report.info.append("certificates: none found; a self-signed one for "
                               f"{hostname} is generated at start")
            return
        where = ", ".join(str(p) for p in (tls.certs_dir, tls.acme_sh_home) if p)
        report.error(f"no TLS certificate found (looked in {where}), so the server refuses "
                     f"to start: install one for {hostname} (README, \"Running under "
                     "systemd\"), or set tls.self_signed: true for a test",
                     yaml_path, setting_line(config.config_dir, "tls"))
    elif not any(cert.covers(hostname) for cert in found):
        names = ", ".join(sorted({n for cert in found for n in cert.names}))
        if tls.self_signed:
            report.warning(f"no certificate covers the hostname {hostname} (found: {names}); "
                           "a self-signed one is generated for it", yaml_path,
                           setting_line(config.config_dir, "hostname"))
        else:
            report.error(f"no certificate covers the hostname {hostname} (found: {names}): "
                         "clients that verify the name (Gmail, Thunderbird) refuse the "
                         "connection", yaml_path, setting_line(config.config_dir, "hostname"))


# -- data_dir ------------------------------------------------------------------------------


def _probe_file(directory: Path) -> str | None:
    """None if this process can create, write, fsync and remove a file in ``directory``
    (what the queue does), else why not. Nothing is left behind."""
    probe = directory / f".mailrelay-check.{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        return exc.strerror or str(exc)
    try:
        os.write(fd, b"x")
        os.fsync(fd)
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        os.close(fd)
        try:
            os.unlink(probe)
        except OSError as exc:  # created but not removable: say so, it is left there
            return f"cannot remove {probe}: {exc.strerror}"
    return None


def _my_group() -> str:
    try:
        return grp.getgrgid(os.getegid()).gr_name
    except KeyError:
        return str(os.getegid())


def _probe_mkdir(directory: Path) -> str | None:
    probe = directory / f".mailrelay-check.{os.getpid()}"
    try:
        os.mkdir(probe, 0o700)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.rmdir(probe)
    return None


def _check_data_dir(config: Config, report: Report) -> None:
    data_dir = config.data_dir
    line = setting_line(config.config_dir, "data_dir")
    where = (config.config_dir / CONFIG_FILE, line) if line else (data_dir, None)
    if not data_dir.exists():
        ancestor = data_dir.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        reason = _probe_mkdir(ancestor) if ancestor.is_dir() else "not a directory"
        if reason:
            fix = f"install -d -m 0700 -o {my_user_name()} -g {_my_group()} {data_dir}"
            if data_dir.parent == Path("/var/lib"):
                # The packaged unit (and init's) has StateDirectory= for it.
                report.warning(f"data_dir {data_dir} does not exist, and it cannot be created "
                               f"in {ancestor} ({reason}): under systemd the unit creates it "
                               "at the first start (StateDirectory=); without systemd, create "
                               f"it first: {fix}", *where)
            else:
                report.error(f"data_dir {data_dir} does not exist, and it cannot be created in "
                             f"{ancestor} ({reason}): create it for the server's user: {fix}",
                             *where)
        else:
            report.info.append(f"data_dir {data_dir}: created at the first start")
        return
    if not data_dir.is_dir():
        report.error(f"data_dir {data_dir} is not a directory", *where)
        return
    reason = _probe_file(data_dir)
    if reason:
        report.error(f"data_dir {data_dir}: cannot create files in it ({reason}); the queue "
                     "and srs.secret live there", *where)
        return
    for name in DATA_SUBDIRS:
        sub = data_dir / name
        if sub.exists() and not sub.is_dir():
            report.error("is not a directory, so the server refuses to start: move it "
                         "aside", sub)
        elif sub.is_dir() and (reason := _probe_file(sub)):
            report.error(f"cannot create files in it ({reason}); chown -R the data_dir to "
                         "the server's user", sub)
    queue = data_dir / "queue"
    unreadable = []
    if queue.is_dir() and os.access(queue, os.R_OK | os.X_OK):
        unreadable = [p for p in sorted(queue.iterdir())
                      if p.is_file() and not os.access(p, os.R_OK | os.W_OK)]
    if unreadable:
        report.error(f"{len(unreadable)} queued file(s) the server cannot read and write "
                     f"(e.g. {unreadable[0].name}): chown -R the data_dir to the server's "
                     "user", queue)
    secret = data_dir / SECRET_FILE
    if secret.exists():
        try:
            load_or_create_secrets(data_dir)  # reads only: the file exists
        except (OSError, ValueError, MailrelayError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            report.error(f"cannot be loaded: {reason}", secret)
        _readable_by_others(secret, report, "whoever reads it can forge SRS addresses "
                            "that make the server relay their mail; chmod 600", error=True)


# -- delivery ------------------------------------------------------------------------------


def _check_delivery(config: Config, report: Report) -> bool:
    """delivery.ca_file and delivery.local_mda; whether the trust anchors load."""
    yaml_path = config.config_dir / CONFIG_FILE
    trust_ok = True
    try:
        verifying_tls_context(config.delivery.ca_file)
    except ConfigError as exc:
        trust_ok = False
        report.error(exc.message, yaml_path,
                     setting_line(config.config_dir, "delivery.ca_file"))
    template = config.delivery.local_mda
    if template is None:
        return trust_ok
    line = setting_line(config.config_dir, "delivery.local_mda")
    sample = f"postmaster@{config.domains[0] if config.domains else 'example.com'}"
    # Its placeholders were checked by load_config, as for serve; filled in as delivery
    # does, on a sample address.
    command = mda_command(template, sample)
    try:
        program = shlex.split(command)[0]
    except (ValueError, IndexError):
        report.error("delivery.local_mda: not a command line", yaml_path, line)
        return
    if shutil.which(program) is None:
        report.error(f"delivery.local_mda: {program} is not an executable program for this "
                     "user, so every local delivery fails", yaml_path, line)
    return trust_ok


def _check_relay(config: Config, report: Report, trust_ok: bool) -> None:
    """delivery.relay: its password file must be readable by the server's user (an
    error: every relay login fails without it, and mail waits until give_up_after), then
    a login (a warning only when it fails: the network or the relay may be down)."""
    settings = config.delivery.relay
    assert settings is not None
    readable = True
    if settings.password_file is not None:
        try:
            with open(settings.password_file, "rb"):
                pass
        except OSError as exc:
            readable = False
            report.error(f"the relay password file cannot be read ({exc.strerror or exc}): "
                         "every login to the relay fails and remote mail waits in the queue;"
                         " the server's user must read it (chown it to that user, mode 0600)",
                         settings.password_file)
    if not (trust_ok and readable):
        report.info.append(f"relay {settings.host}:{settings.port}: login not tried "
                           "(see the errors)")
        return
    status = relay_status(config)
    if status.startswith("warning: "):
        report.warning(status.removeprefix("warning: "))
    else:
        report.info.append(status)


# -- users and aliases ---------------------------------------------------------------------


def _check_users(config: Config, report: Report) -> Users:
    dbs: dict[str, UserDB] = {}
    for domain in config.domains:
        db, errors = UserDB.load_all(config.domain_dir(domain) / USERS_FILE, domain)
        for error in errors:
            report.add(error)
        dbs[domain] = db
    return Users(dbs)


def _check_aliases(config: Config, report: Report, users: Users) -> Aliases:
    aliases, errors = Aliases.load(config)
    for error in errors:
        report.add(error)
    broken = {str(e.path) for e in errors}
    for domain in config.domains:
        path = aliases_path(config, domain)
        if str(path) in broken:
            continue  # its lines are reported above; the rest would be guesses
        lines: dict[str, int] = {}
        try:
            table, _ = parse_text(path.read_bytes(), domain, path, config.aliases, lines)
        except FileNotFoundError:
            table = {}
        # The same rule as `aliases check` (one place: cli/aliases.py).
        for name, problem in domain_problems(aliases, domain, table, users, config):
            report.error(problem, path, lines.get(name) if name else None)
    return aliases


# -- the relay -----------------------------------------------------------------------------

# `check` should answer soon even when the relay does not.
_PROBE_TIMEOUT = 10.0


def relay_status(config: Config) -> str:
    """One line on delivery.relay: reachable, TLS verified and login accepted, or a
    warning saying which of those failed. A warning only: the network or the relay may
    be down for a while, which the queue rides out; the password is never shown."""
    settings = config.delivery.relay
    assert settings is not None
    where = f"relay {settings.host}:{settings.port} ({settings.tls})"
    scope = ", ".join(settings.domains) if settings.domains else "all remote mail"
    try:
        detail = asyncio.run(_probe(config))
    except RelayFailure as failure:
        return f"warning: {where} for {scope}: {failure.reply}"
    return f"{where} for {scope}: ok ({detail})"


async def _probe(config: Config) -> str:
    relay = relay_from_config(config, verifying_tls_context(config.delivery.ca_file))
    assert relay is not None
    relay.connect_timeout = min(relay.connect_timeout, _PROBE_TIMEOUT)
    relay.command_timeout = min(relay.command_timeout, _PROBE_TIMEOUT)
    last = RelayFailure(f"451 4.4.1 relay {relay.host}: no address")
    for address in await relay.addresses(make_resolver(config.dns)):
        try:
            smtp = await relay.open(address)
        except RelayFailure as failure:
            last = failure
            continue
        ssl_object = smtp.get_transport_info("ssl_object")
        version = ssl_object.version() if ssl_object is not None else "?"
        try:
            await smtp.quit(timeout=_PROBE_TIMEOUT)
        except Exception:  # the answer is in; how the relay says goodbye does not matter
            smtp.close()
        login = (f", logged in as {relay.settings.username}"
                 if relay.settings.username is not None else "")
        return f"[{address}], TLS verified ({version}){login}"
    raise last
