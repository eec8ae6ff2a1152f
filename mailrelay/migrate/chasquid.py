"""Importing a chasquid configuration directory (``mailrelay import-chasquid``).

:func:`plan_import` reads chasquid's directory (``chasquid.conf``, ``certs/``,
``domains/<domain>/{users,aliases,dkim:<selector>.pem}``, ``hooks/``) and works out
everything it would write, with one line per thing it converted and one per thing it
could not (saying what to do instead). :func:`apply` writes the plan. chasquid's
directory is only ever read.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..address import AddressError, normalize_domain
from ..cli.print_config import duration
from ..config import CONFIG_FILE, AliasSettings, TLSSettings, parse_hostport
from ..errors import ConfigError, MailrelayError
from ..fsutil import atomic_write, make_dirs
from ..message.dkim.keys import KEY_PREFIX, KEY_SUFFIX, check_selector, load_key
from ..policy import chasquid_users as ctext
from ..policy.aliases import ALIASES_FILE
from ..policy.aliases import parse_text as parse_aliases
from ..policy.users import RECEIVE_ONLY, USERS_FILE, chasquid_entry, check_localpart
from ..smtp.tls import find_certificates

CHASQUID_CONF = "chasquid.conf"
CONFIG_MODE = 0o640  # mailrelay.yaml, as init writes it: the server's group may read it
NEW_DATA_DIR = "/var/lib/mailrelay"

# chasquid.conf settings (chasquid 1.11 plus two later ones) and their types.
_STRING = ("hostname", "monitoring_address", "mail_delivery_agent_bin", "data_dir",
           "suffix_separators", "drop_characters", "mail_log_path", "dovecot_userdb_path",
           "dovecot_client_path", "give_up_send_after")
_INT = ("max_data_size_mb", "max_queue_items")
_BOOL = ("dovecot_auth", "haproxy_incoming")
_REPEATED = ("smtp_address", "submission_address", "submission_over_tls_address",
             "mail_delivery_agent_args")

# listen.<name>: (chasquid setting, port of chasquid's systemd socket unit).
_LISTENERS = {
    "smtp": ("smtp_address", 25),
    "submission": ("submission_address", 587),
    "submission_tls": ("submission_over_tls_address", 465),
}

# chasquid's defaults when mail_delivery_agent_bin/args are not set.
_DEFAULT_MDA = "maildrop"
_DEFAULT_MDA_ARGS = ["-f", "%from%", "-d", "%to_user%"]
_PLACEHOLDER = re.compile(r"(%(?:from|from_user|from_domain|to|to_user|to_domain)%)")
# In the /bin/sh form of the MDA command: the recipient comes as $1..$3, the sender
# from the SENDER variable mailrelay sets for pipes and MDAs.
_SH_VALUES = {
    "%to_user%": '"$1"', "%to_domain%": '"$2"', "%to%": '"$3"',
    "%from%": '"$SENDER"', "%from_user%": '"${SENDER%@*}"', "%from_domain%": '"${SENDER##*@}"',
}
_DIRECT_VALUES = {"%to_user%": "{user}", "%to_domain%": "{domain}", "%to%": "{address}"}

_HOSTNAME = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?")
_GO_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0,
             "m": 60.0, "h": 3600.0}

# The hooks mailrelay runs with chasquid's contract (mailrelay.message.filters.hooks),
# copied into hooks/ of the new configuration (filters.hooks_dir's default): what each does.
_RUN_HOOKS = {
    "post-data": "run after DATA and before queueing, as chasquid runs it (the message on "
                 "stdin, the same environment, exit 0 accepts with its output as header "
                 "fields, 20 refuses for good, anything else refuses for now), within "
                 "filters.hook_timeout (1m)",
    "alias-resolve": "run for an address of a local domain that the aliases files do not "
                     "have, as chasquid runs it (the address as argument, the targets on "
                     "stdout), within filters.alias_resolve_timeout (5s)",
}
_HOOKS = {
    "alias-exists": "mailrelay runs no alias-exists hook: list those addresses in "
                    "domains/<domain>/aliases",
}
# haproxy_incoming: chasquid took a PROXY header from any address; mailrelay only from
# the networks given per listener. haproxy usually runs on the same machine.
_LOOPBACK = ["127.0.0.1/32", "::1/128"]


@dataclass(frozen=True)
class PlannedFile:
    path: Path  # relative to the new configuration directory
    data: bytes
    mode: int


@dataclass
class Plan:
    """What an import writes and what it says about it."""

    chasquid_dir: Path
    target_dir: Path
    config_text: str = ""
    data_dir: Path = Path(NEW_DATA_DIR)  # what mailrelay.yaml's data_dir says
    dirs: list[Path] = field(default_factory=list)  # relative, created in order
    files: list[PlannedFile] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)
    not_converted: list[str] = field(default_factory=list)

    def add_dir(self, path: Path) -> None:
        for directory in [*reversed(path.parents[:-1]), path]:  # parents first
            if directory not in self.dirs:
                self.dirs.append(directory)

    def add_file(self, path: Path, data: bytes, mode: int) -> None:
        if path.parent != Path("."):
            self.add_dir(path.parent)
        self.files.append(PlannedFile(path, data, mode))

    def all_files(self) -> list[PlannedFile]:
        """Every file, mailrelay.yaml last (a half-finished import has none)."""
        return [*self.files, PlannedFile(Path(CONFIG_FILE), self.config_text.encode(),
                                         CONFIG_MODE)]


@dataclass
class _Conf:
    """chasquid.conf's settings as given (absent ones are not in ``values``)."""

    path: Path
    values: dict[str, str | int | bool | list[str]] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)

    def where(self, name: str) -> str:
        line = self.lines.get(name)
        return f"{CHASQUID_CONF}:{line}" if line else CHASQUID_CONF

    def text(self, name: str) -> str | None:
        value = self.values.get(name)
        return value if isinstance(value, str) else None

    def strings(self, name: str) -> list[str] | None:
        value = self.values.get(name)
        return list(value) if isinstance(value, list) else None


def _q(value: object) -> str:
    """A YAML scalar or flow list (JSON is valid YAML and quotes everything safely)."""
    return json.dumps(value)


def _read_conf(path: Path, plan: Plan) -> _Conf:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", path) from None
    conf = _Conf(path)
    root = ctext.parse_text(data, path)
    for item in root.fields:
        name = item.name
        if name in _REPEATED:
            previous = conf.values.setdefault(name, [])
            assert isinstance(previous, list)
            previous.append(ctext.as_text(item, path))
            conf.lines.setdefault(name, item.line)
            continue
        if name in conf.values:
            raise ConfigError(f"{name} given twice (first on line {conf.lines[name]})",
                              path, item.line)
        if name in _STRING:
            conf.values[name] = ctext.as_text(item, path)
        elif name in _INT:
            conf.values[name] = ctext.as_int(item, path)
        elif name in _BOOL:
            conf.values[name] = ctext.as_bool(item, path)
        else:
            plan.not_converted.append(f"{CHASQUID_CONF}:{item.line}: unknown setting {name}: "
                                      "not imported (check whether mailrelay.yaml needs "
                                      "an equivalent)")
            continue
        conf.lines[name] = item.line
    return conf


def plan_import(chasquid_dir: Path | str, target_dir: Path | str, *, copy_certs: bool = False,
                which: Callable[[str], str | None] = shutil.which,
                data_dir: Path | str | None = None) -> Plan:
    """Everything an import of ``chasquid_dir`` into ``target_dir`` would do; reads only.

    MailrelayError (one line) when the import cannot be done at all: no chasquid.conf,
    a broken chasquid.conf, or a target that already has a mailrelay.yaml.
    """
    source = Path(os.path.abspath(chasquid_dir))
    target = Path(os.path.abspath(target_dir))
    if not source.is_dir():
        raise MailrelayError(f"{source} is not a directory")
    if not (source / CHASQUID_CONF).exists():
        raise MailrelayError(f"{source / CHASQUID_CONF} not found: is {source} chasquid's "
                             "configuration directory?")
    if (target / CONFIG_FILE).exists():
        raise MailrelayError(f"{target / CONFIG_FILE} already exists: import into a new "
                             "directory (nothing was written)")
    real_source = source.resolve()
    real_target = target.resolve()
    if real_target == real_source or real_source in real_target.parents:
        raise MailrelayError(f"the new configuration directory must be outside {source} "
                             "(chasquid's directory is never modified)")
    plan = Plan(source, target)
    conf = _read_conf(source / CHASQUID_CONF, plan)
    yaml_lines = [
        f"# Imported from chasquid's configuration in {source} by `mailrelay import-chasquid`.",
        "# Every setting and its default: see README.md (Configuration).",
        "",
    ]
    yaml_lines += _hostname(conf, plan)
    yaml_lines += _listen(conf, plan)
    yaml_lines += _data_dir(conf, plan, data_dir)
    yaml_lines += _tls(source, plan, copy_certs)
    yaml_lines += _limits(conf, plan)
    alias_lines, alias_settings = _alias_settings(conf, plan)
    yaml_lines += alias_lines
    yaml_lines += _delivery(conf, plan, which)
    yaml_lines += _metrics(conf, plan)
    yaml_lines += _dovecot(conf, plan)
    yaml_lines += _proxy_protocol(conf, plan)
    _unsupported(conf, plan)
    _domains(source, plan, alias_settings)
    _hooks(source, plan)
    plan.config_text = "\n".join(yaml_lines) + "\n"
    return plan


# --- mailrelay.yaml -------------------------------------------------------------------------


def _hostname(conf: _Conf, plan: Plan) -> list[str]:
    given = conf.text("hostname")
    if given:
        hostname, origin = given.strip().rstrip(".").lower(), conf.where("hostname")
    else:
        # chasquid's default is the system's host name.
        hostname, origin = socket.gethostname().lower(), "not set: this machine's name"
    if not _HOSTNAME.fullmatch(hostname):
        plan.not_converted.append(f"hostname {hostname!r} ({origin}) is not a host name: "
                                  "mail.example.com written instead; set hostname in "
                                  "mailrelay.yaml to the name of this server's PTR record")
        hostname = "mail.example.com"
    elif not given:
        plan.not_converted.append(f"hostname not set in {CHASQUID_CONF}: this machine's name "
                                  f"{hostname!r} written; make it the name of this server's "
                                  "PTR record")
    else:
        plan.converted.append(f"hostname: {hostname} ({origin})")
    return ["# The name this server greets with; it must match the PTR record of its IP.",
            f"hostname: {_q(hostname)}", ""]


def _listen(conf: _Conf, plan: Plan) -> list[str]:
    lines = ["listen:"]
    for name, (setting, port) in _LISTENERS.items():
        given = conf.strings(setting)
        values = given if given else ["systemd"]
        converted: list[str] = []
        for value in values:
            origin = f"{setting} {value!r}" + ("" if given else " (chasquid's default)")
            if value == "systemd":
                new = f"0.0.0.0:{port}"
                why = (f"socket activation by chasquid's systemd unit on port {port}; "
                       f"add \"[::]:{port}\" to listen on IPv6 too")
            elif re.fullmatch(r":\d+", value):
                new = f"0.0.0.0{value}"
                why = f"every address; add \"[::]{value}\" to listen on IPv6 too"
            else:
                try:
                    parse_hostport(value)
                except ValueError as exc:
                    plan.not_converted.append(f"{origin} ({conf.where(setting)}): {exc}: set "
                                              f"listen.{name} in mailrelay.yaml by hand")
                    continue
                new, why = value, ""
            if new not in converted:
                converted.append(new)
            note = f"; {why}" if why else ""
            plan.converted.append(f"listen.{name}: {new} (from {origin}{note})")
        if not converted:
            converted = [f"0.0.0.0:{port}"]
            plan.not_converted.append(f"listen.{name}: nothing usable in {setting}, "
                                      f"0.0.0.0:{port} written instead: check it")
        lines.append(f"  {name}: {_q(converted)}")
    return [*lines, ""]


def _data_dir(conf: _Conf, plan: Plan, given: Path | str | None) -> list[str]:
    old = conf.text("data_dir") or "/var/lib/chasquid"
    if given is not None:
        new = os.path.abspath(given)
        if new == os.path.abspath(old):
            raise MailrelayError(f"--data-dir {given} is chasquid's data_dir: give mailrelay "
                                 "a directory of its own (nothing was written)")
    else:
        new = NEW_DATA_DIR if os.path.normpath(old) != NEW_DATA_DIR else "/var/lib/mailrelay2"
    plan.data_dir = Path(new)
    plan.converted.append(f"data_dir: {new}, a new directory (chasquid's {old} is not "
                          "reused: mailrelay keeps its queue in its own format)")
    plan.not_converted.append(f"chasquid's queue in {old}/queue is not imported: let "
                              "chasquid deliver what it has queued before you stop it")
    return [f"# New: mailrelay does not read chasquid's data_dir ({old}).",
            f"data_dir: {_q(new)}", ""]


def _tls(source: Path, plan: Plan, copy_certs: bool) -> list[str]:
    certs_dir = source / "certs"
    found = []
    try:
        found = find_certificates(TLSSettings(certs_dir=certs_dir))
    except ConfigError as exc:
        plan.not_converted.append(f"certificates: {exc}: fix it, then check again with "
                                  "`mailrelay check`")
    if certs_dir.is_dir():
        for entry in sorted(certs_dir.iterdir()):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            if not ((entry / "fullchain.pem").is_file() and (entry / "privkey.pem").is_file()):
                plan.not_converted.append(f"certs/{entry.name}: lacks fullchain.pem or "
                                          "privkey.pem, skipped (mailrelay skips it too)")
    if not found:
        where = "chasquid's certs/" if certs_dir.is_dir() and not copy_certs else "certs/"
        plan.not_converted.append(f"no usable certificate: put <name>/fullchain.pem and "
                                  f"privkey.pem in {where} (TLS, AUTH and port 465 need one)")
        if copy_certs or not certs_dir.is_dir():
            return ["tls:", f"  certs_dir: {_q('certs')}", "  self_signed: false", ""]
    for cert in found:  # none when a pair is broken: mailrelay would refuse it too
        names = ", ".join(cert.names)
        until = f"{cert.not_after:%Y-%m-%d}"
        if cert.expired:
            plan.not_converted.append(f"certificate {cert.name} expired on {until}: renew it")
        if copy_certs:
            # Read through symlinks (certbot's live/ links): the copy holds the files.
            for part, mode in (("fullchain.pem", 0o644), ("privkey.pem", 0o600)):
                data = (certs_dir / cert.name / part).read_bytes()
                plan.add_file(Path("certs") / cert.name / part, data, mode)
            plan.converted.append(f"certificate {cert.name} ({names}, valid until {until}): "
                                  "copied to certs/ (renewals no longer reach the copy: "
                                  "point your ACME client at it)")
        else:
            plan.converted.append(f"certificate {cert.name} ({names}, valid until {until}): "
                                  f"used in place from {certs_dir}, so renewals keep working "
                                  "(the user mailrelay runs as must be able to read it)")
    if copy_certs:
        return ["tls:", f"  certs_dir: {_q('certs')}", "  self_signed: false", ""]
    return ["tls:", "  # chasquid's certificates, used where they are (renewals keep working).",
            f"  certs_dir: {_q(str(certs_dir))}", "  self_signed: false", ""]


def _limits(conf: _Conf, plan: Plan) -> list[str]:
    lines = []
    size = conf.values.get("max_data_size_mb")
    if isinstance(size, int) and size > 0:
        lines.append(f"  max_message_size: {size}MiB")
        plan.converted.append(f"limits.max_message_size: {size}MiB "
                              f"(from max_data_size_mb {size})")
    else:
        lines.append("  max_message_size: 50MiB")
        plan.converted.append("limits.max_message_size: 50MiB (chasquid's default)")
    items = conf.values.get("max_queue_items")
    if isinstance(items, int) and items > 0:
        lines.append(f"  max_queue_items: {items}")
        plan.converted.append(f"limits.max_queue_items: {items} (from max_queue_items)")
    return ["limits:", *lines, ""]


def _alias_settings(conf: _Conf, plan: Plan) -> tuple[list[str], AliasSettings]:
    lines = ["aliases:"]
    values = {}
    for name, default in (("drop_characters", "."), ("suffix_separators", "+")):
        value = conf.text(name)
        origin = conf.where(name) if value is not None else "chasquid's default"
        # An empty value means none (as in current chasquid; 1.11 took it as the default).
        values[name] = default if value is None else value
        lines.append(f"  {name}: {_q(values[name])}")
        plan.converted.append(f"aliases.{name}: {values[name]!r} ({origin})")
    return [*lines, ""], AliasSettings(**values)


def _go_duration(text: str) -> float:
    parts = _GO_DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * _GO_UNITS[u] for n, u in parts)


def _delivery(conf: _Conf, plan: Plan, which: Callable[[str], str | None]) -> list[str]:
    lines = []
    give_up = conf.text("give_up_send_after")
    if give_up is not None:
        try:
            seconds = _go_duration(give_up)
        except ValueError as exc:
            plan.not_converted.append(f"give_up_send_after ({conf.where('give_up_send_after')}):"
                                      f" {exc}: set delivery.give_up_after by hand")
        else:
            # In the largest unit that holds it: 72h is written 3d, not 259200s.
            value = duration(float(max(1, round(seconds))))
            lines.append(f"  give_up_after: {value}")
            plan.converted.append(f"delivery.give_up_after: {value} "
                                  f"(from give_up_send_after {give_up!r})")
    binary = conf.text("mail_delivery_agent_bin")
    args = conf.strings("mail_delivery_agent_args")
    if binary is None and args is None and which(_DEFAULT_MDA) is None:
        plan.not_converted.append(
            "mail_delivery_agent_bin not set: chasquid's default, maildrop, is not installed "
            "here, so local mail goes to mailrelay's Maildirs (data_dir/mail/<domain>/<user>/);"
            " set delivery.local_mda to deliver through an MDA")
    else:
        binary = binary or _DEFAULT_MDA
        args = _DEFAULT_MDA_ARGS if args is None else args
        command = mda_template(binary, args)
        origin = " ".join([binary, *args])
        notes = []
        if any(_uses_sender(arg) for arg in args):
            notes.append("through /bin/sh, which takes the sender from $SENDER")
        if which(binary) is None:
            notes.append(f"{binary} is not installed here")
        if conf.text("mail_delivery_agent_bin") is None:
            notes.append("chasquid's default MDA")
        note = f" ({'; '.join(notes)})" if notes else ""
        lines.append(f"  local_mda: {_q(command)}")
        plan.converted.append(f"delivery.local_mda: {command} (from {origin!r}){note}")
    return ["delivery:", *lines, ""] if lines else []


def mda_template(binary: str, args: list[str]) -> str:
    """chasquid's MDA binary and arguments as a ``delivery.local_mda`` command line.

    ``%to%``, ``%to_user%`` and ``%to_domain%`` become ``{address}``, ``{user}`` and
    ``{domain}``, which give the domain in U-labels as chasquid does. mailrelay has no
    placeholder for the sender, so a command that uses ``%from%`` (chasquid's default
    does) runs through ``/bin/sh``, which reads the sender from ``$SENDER`` and the
    recipient from ``$1``..``$3``.
    """
    if not any(_uses_sender(arg) for arg in args):
        words = [_escape_braces(shlex.quote(binary))]
        for arg in args:
            pieces = [_DIRECT_VALUES.get(piece) or _escape_braces(shlex.quote(piece))
                      for piece in _PLACEHOLDER.split(arg) if piece]
            words.append("".join(pieces) or "''")
        return " ".join(words)
    script_words = ["exec", shlex.quote(binary)]
    for arg in args:
        pieces = [_SH_VALUES.get(piece) or shlex.quote(piece)
                  for piece in _PLACEHOLDER.split(arg) if piece]
        script_words.append("".join(pieces) or "''")
    script = " ".join(script_words)
    return f"/bin/sh -c {_escape_braces(shlex.quote(script))} mda {{user}} {{domain}} {{address}}"


def _uses_sender(arg: str) -> bool:
    return any(p in arg for p in ("%from%", "%from_user%", "%from_domain%"))


def _escape_braces(text: str) -> str:
    # The command is a str.format template: literal braces are doubled.
    return text.replace("{", "{{").replace("}", "}}")


def _metrics(conf: _Conf, plan: Plan) -> list[str]:
    """monitoring_address: chasquid's monitoring server, whose /metrics mailrelay has."""
    given = conf.text("monitoring_address")
    if not given:
        return []
    origin = f"from monitoring_address {given!r} ({conf.where('monitoring_address')})"
    value = given.strip()
    notes = []
    if re.fullmatch(r":\d+", value):
        # Go's ":1099" is every address; /metrics has no authentication: loopback.
        value = f"127.0.0.1{value}"
        notes.append("chasquid listened on every address there; mailrelay's /metrics is "
                     "plain HTTP without authentication, so it is on loopback: give "
                     "another address if Prometheus scrapes from elsewhere")
    try:
        host, _ = parse_hostport(value)
    except ValueError as exc:
        plan.not_converted.append(f"monitoring_address {given!r} "
                                  f"({conf.where('monitoring_address')}): {exc}: set "
                                  "metrics.listen (host:port) by hand")
        return []
    if host in ("", "0.0.0.0", "::", "[::]"):
        notes.append("every address: plain HTTP without authentication, keep it behind a "
                     "firewall")
    notes.append("Prometheus /metrics only, with mailrelay's own metric names (README, "
                 "Metrics): update dashboards and alerts; chasquid's other monitoring "
                 "pages have no equivalent")
    plan.converted.append(f"metrics.listen: {value} ({origin}; {'; '.join(notes)})")
    return ["metrics:", "  # Prometheus /metrics (plain HTTP: keep it on loopback).",
            f"  listen: {_q(value)}", ""]


def _dovecot(conf: _Conf, plan: Plan) -> list[str]:
    """dovecot_auth and its socket paths: the auth: section (policy/dovecot.py)."""
    paths = {name: conf.text(name) for name in ("dovecot_userdb_path", "dovecot_client_path")}
    if conf.values.get("dovecot_auth") is not True:
        for name, value in paths.items():
            if value:
                plan.not_converted.append(f"{name} {value!r} ({conf.where(name)}): "
                                          "dovecot_auth is off, so chasquid did not use it "
                                          "either: not imported")
        return []
    lines = ["auth:", "  # Logins of users not in domains/<domain>/users are checked by dovecot.",
             "  dovecot: true"]
    found = []
    for name, value in paths.items():
        if value:
            lines.append(f"  {name}: {_q(value)}")
            found.append(f"{name}: {value}")
    where = ("; ".join(found) if found else "the sockets found as chasquid finds them, "
             "auth-chasquid-userdb/-client or auth-userdb/-client in /var/run/dovecot")
    plan.converted.append(f"auth.dovecot: true (from dovecot_auth, "
                          f"{conf.where('dovecot_auth')}; {where}): users not in mailrelay's "
                          "users files log in with their dovecot password; dovecot's "
                          "auth listeners (10-master.conf) must let mailrelay's user "
                          "connect, as they let chasquid's")
    return [*lines, ""]


def _proxy_protocol(conf: _Conf, plan: Plan) -> list[str]:
    """haproxy_incoming: chasquid read a PROXY header on every listener, from anyone."""
    if conf.values.get("haproxy_incoming") is not True:
        return []
    plan.converted.append(
        f"proxy_protocol: {', '.join(_LOOPBACK)} on smtp, submission and submission_tls "
        f"(from haproxy_incoming, {conf.where('haproxy_incoming')}, which chasquid applied "
        "to every listener): chasquid took a PROXY header from any address; mailrelay only "
        "from trusted networks, so loopback is written (haproxy on this machine): add "
        "haproxy's address if it runs elsewhere, and leave out a listener haproxy does not "
        "forward to. mailrelay reads PROXY v1 and v2 (send-proxy, send-proxy-v2), on 465 "
        "before the TLS handshake (haproxy in mode tcp)")
    networks = _q(_LOOPBACK)
    return ["proxy_protocol:",
            "  # Connections come through haproxy on this machine (chasquid's haproxy_incoming).",
            f"  smtp: {networks}", f"  submission: {networks}", f"  submission_tls: {networks}",
            ""]


def _unsupported(conf: _Conf, plan: Plan) -> None:
    """Settings with no mailrelay equivalent: one line each, saying what to do instead."""
    advice = {
        "mail_log_path": "mailrelay logs each event as one line to stderr, which is the "
                         "journal under systemd (journalctl -u mailrelay); no separate file",
    }
    for name, text in advice.items():
        value = conf.values.get(name)
        if value:
            plan.not_converted.append(f"{name} {value!r} ({conf.where(name)}): {text}")


# --- domains --------------------------------------------------------------------------------


def _domains(source: Path, plan: Plan, settings: AliasSettings) -> None:
    domains_dir = source / "domains"
    if not domains_dir.is_dir():
        plan.not_converted.append("no domains/ directory in chasquid's configuration: create "
                                  "domains/<domain>/ for each of your domains")
        return
    seen: dict[str, str] = {}
    entries = [e for e in domains_dir.iterdir() if not e.name.startswith(".") and e.is_dir()]
    # A directory already named in lower case wins over "Example.com" for the same domain
    # (chasquid-util keeps the case it was given).
    for entry in sorted(entries, key=lambda e: (e.name.lower(), e.name != e.name.lower())):
        try:
            domain = normalize_domain(entry.name)
        except AddressError as exc:
            plan.not_converted.append(f"domains/{entry.name}: {exc}: not imported")
            continue
        if domain in seen:
            plan.not_converted.append(f"domains/{entry.name}: the same domain as "
                                      f"domains/{seen[domain]}: not imported; merge it by hand")
            continue
        seen[domain] = entry.name
        renamed = f" (renamed from {entry.name})" if domain != entry.name else ""
        plan.converted.append(f"domain {domain}{renamed}")
        target = Path("domains") / domain
        plan.add_dir(target)
        _users(entry, domain, target, plan)
        _aliases(entry, domain, target, plan, settings)
        _dkim(source, entry, domain, target, plan)
        known = {USERS_FILE, ALIASES_FILE, "dkim_selector"}
        for item in sorted(entry.iterdir()):
            if item.name.startswith(".") or item.name in known:
                continue
            if item.name.startswith(KEY_PREFIX) and item.name.endswith(KEY_SUFFIX):
                continue
            plan.not_converted.append(f"domains/{entry.name}/{item.name}: not a file "
                                      "chasquid or mailrelay uses: not imported")
    if not seen:
        plan.not_converted.append("no domains in chasquid's domains/: create "
                                  "domains/<domain>/ for each of your domains")


def _users(entry: Path, domain: str, target: Path, plan: Plan) -> None:
    path = entry / USERS_FILE
    if not path.exists():
        return
    try:
        users = ctext.parse_users(path.read_bytes(), path)
    except (ConfigError, OSError) as exc:
        plan.not_converted.append(f"users of {domain}: {exc}: none imported; add them with "
                                  "`mailrelay user add`")
        return
    entries: dict[str, str] = {}
    for user in users:
        address = f"{user.name}@{domain}"
        try:
            local = check_localpart(user.name)
        except ValueError as exc:
            plan.not_converted.append(f"user {address}: {exc}: not imported; add it under "
                                      "another name with `mailrelay user add`")
            continue
        address = f"{local}@{domain}"
        if local in entries:
            plan.not_converted.append(f"user {address} appears twice in {path}: the later "
                                      "entry wins, as in chasquid")
        try:
            entries[local], problem = chasquid_entry(user)
        except ValueError as exc:
            entries[local] = RECEIVE_ONLY
            plan.not_converted.append(
                f"user {address}: its chasquid password hash is unusable ({exc}): "
                f"imported as receive-only; set a password with "
                f"`mailrelay user passwd {address}`")
            continue
        if problem:
            plan.not_converted.append(
                f"user {address} has {problem}: imported as receive-only; set a "
                f"password with `mailrelay user passwd {address}`")
        elif entries[local] == RECEIVE_ONLY:
            plan.converted.append(f"user {address}: receive-only (denied in chasquid)")
        else:
            plan.converted.append(f"user {address}: same password (scrypt hash copied)")
    header = (f"# mailrelay users of {domain}, imported from chasquid's {path}.\n"
              "# <local part> <password hash>, or <local part> ! for a receive-only user.\n"
              "# Edit with `mailrelay user`.\n")
    body = "".join(f"{name} {entries[name]}\n" for name in sorted(entries))
    plan.add_file(target / USERS_FILE, (header + body).encode("utf-8"), 0o600)


def _aliases(entry: Path, domain: str, target: Path, plan: Plan,
             settings: AliasSettings) -> None:
    path = entry / ALIASES_FILE
    if not path.exists():
        return
    try:
        data = path.read_bytes()
    except OSError as exc:
        plan.not_converted.append(f"aliases of {domain}: cannot read {path}: "
                                  f"{exc.strerror or exc}")
        return
    table, errors = parse_aliases(data, domain, path, settings)
    if errors:
        # chasquid skips lines it cannot read; mailrelay refuses the whole file, so the
        # lines it cannot read are commented out (and named) rather than copied as they are.
        lines = data.split(b"\n")
        for error in errors:
            assert error.line is not None
            plan.not_converted.append(
                f"aliases of {domain}, line {error.line}: {error.message}: commented out; "
                "fix it with `mailrelay aliases edit`")
            lines[error.line - 1] = (b"# import-chasquid: not understood: "
                                     + lines[error.line - 1])
        data = b"\n".join(lines)
    catch_all = " and a catch-all" if "*" in table else ""
    count = len([name for name in table if name != "*"])
    plan.add_file(target / ALIASES_FILE, data, 0o644)
    plan.converted.append(f"aliases of {domain}: {count} alias(es){catch_all}, copied as "
                          "they are")


def _dkim(source: Path, entry: Path, domain: str, target: Path, plan: Plan) -> None:
    keys: list[tuple[str, Path, str]] = []
    for path in sorted(entry.glob(f"{KEY_PREFIX}*{KEY_SUFFIX}")):
        keys.append((path.name[len(KEY_PREFIX):-len(KEY_SUFFIX)], path, ""))
    selector_file = entry / "dkim_selector"
    if selector_file.is_file():
        # The layout of chasquid's example post-data hook (dkimsign), before chasquid
        # signed by itself: domains/<d>/dkim_selector + certs/<d>/dkim_privkey.pem.
        selector = selector_file.read_text(encoding="utf-8", errors="replace").strip()
        key_file = source / "certs" / entry.name / "dkim_privkey.pem"
        if not key_file.is_file():
            plan.not_converted.append(f"DKIM selector {selector!r} of {domain} "
                                      f"(dkim_selector) has no key in {key_file}: add one with "
                                      "`mailrelay dkim keygen`")
        elif any(s == selector for s, _, _ in keys):
            plan.not_converted.append(f"{key_file}: selector {selector!r} of {domain} already "
                                      f"has a {KEY_PREFIX}{selector}{KEY_SUFFIX}: not imported")
        else:
            keys.append((selector, key_file, " from the post-data hook's dkim_selector and "
                                             f"certs/{entry.name}/dkim_privkey.pem"))
    for selector, path, origin in keys:
        try:
            check_selector(selector)
            key = load_key(path, domain, selector)
            data = path.read_bytes()
        except MailrelayError as exc:
            plan.not_converted.append(f"DKIM key {path.name} of {domain}: {exc}: not "
                                      "imported; make a new one with `mailrelay dkim keygen`")
            continue
        except OSError as exc:
            plan.not_converted.append(f"DKIM key {path} of {domain}: cannot read: "
                                      f"{exc.strerror or exc}")
            continue
        plan.add_file(target / f"{KEY_PREFIX}{selector}{KEY_SUFFIX}", data, 0o600)
        plan.converted.append(f"DKIM key of {domain}, selector {selector}{origin}: copied "
                              f"({_key_kind(key.private_key)})")


def _key_kind(private_key: object) -> str:
    size = getattr(private_key, "key_size", None)
    return f"RSA-{size}" if size else "Ed25519"


def _hooks(source: Path, plan: Plan) -> None:
    """post-data and alias-resolve are copied as they are (mailrelay runs them with
    chasquid's contract), executable as they were; other files are reported."""
    hooks = source / "hooks"
    if not hooks.is_dir():
        return
    for hook in sorted(hooks.iterdir()):
        if hook.name.startswith(".") or not hook.is_file():
            continue
        if hook.name not in _RUN_HOOKS:
            advice = _HOOKS.get(hook.name, "mailrelay runs only post-data and alias-resolve")
            plan.not_converted.append(f"hooks/{hook.name}: {advice}")
            continue
        try:
            data = hook.read_bytes()
            executable = os.access(hook, os.X_OK)
        except OSError as exc:
            plan.not_converted.append(f"hooks/{hook.name}: cannot read: "
                                      f"{exc.strerror or exc}: copy it by hand")
            continue
        plan.add_file(Path("hooks") / hook.name, data, 0o755 if executable else 0o644)
        if executable:
            plan.converted.append(f"hooks/{hook.name}: copied to hooks/{hook.name}, "
                                  f"{_RUN_HOOKS[hook.name]}")
        else:
            plan.not_converted.append(f"hooks/{hook.name} is not executable, so chasquid "
                                      "answered 451 to every message because of it (or did "
                                      "not run it): copied without the executable bit, which "
                                      f"mailrelay skips; chmod +x hooks/{hook.name} to use it")


# --- writing --------------------------------------------------------------------------------


def apply(plan: Plan) -> list[Path]:
    """Write the plan; refuses to replace any file, removes what it wrote on failure."""
    target = plan.target_dir
    files = plan.all_files()
    for planned in files:
        if (target / planned.path).exists():
            raise MailrelayError(f"{target / planned.path} already exists: import into a new "
                                 "directory (nothing was written)")
    written: list[Path] = []
    made: list[Path] = []
    try:
        for directory in [Path("."), *plan.dirs]:
            # Owned like the directory they are made in (fsutil.owner_for), mode 0750.
            made += make_dirs(target / directory)
        for planned in files:
            path = target / planned.path
            atomic_write(path, planned.data, mode=planned.mode)
            written.append(path)
    except BaseException:
        for path in reversed(written):
            with contextlib.suppress(OSError):
                path.unlink()
        for path in reversed(made):
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
    return written
