"""Typed settings: loading and validating ``mailrelay.yaml`` plus the domains layout.

Every error names the file and line (YAML node positions are kept while converting),
so ``mailrelay check`` can point the owner at the exact place to fix.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import stat
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from .address import AddressError, normalize_domain
from .errors import ConfigError

CONFIG_FILE = "mailrelay.yaml"

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
}
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(value: Any) -> int:
    """Parse ``"50MiB"``, ``"10kB"`` or a plain integer into a byte count."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, float):
        raise ValueError(f"a size is a whole number of bytes or has a unit, not {value!r}")
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {value!r} (use e.g. 50MiB, 512KiB, 1000000)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def parse_duration(value: Any) -> float:
    """Parse ``"5d"``, ``"1h30m"``, ``"90s"`` or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    text = str(value).strip().replace(" ", "")
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 5m, 2h, 5d)")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def format_hostport(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets (what parse_hostport reads back)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_hostport(value: Any, default_port: int | None = None) -> tuple[str, int]:
    """Parse ``"127.0.0.1:2525"``, ``"[::1]:25"`` or a bare host with a default port."""
    text = str(value).strip()
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?", text)
    if match:
        host, port = match.group(1), match.group(2)
    elif text.count(":") == 1:
        host, port = text.split(":")
    elif text.count(":") > 1:  # a bare IPv6 address
        host, port = text, None
    else:
        host, port = text, None
    if port is None:
        if default_port is None:
            raise ValueError(f"{value!r} needs a port (host:port)")
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in {value!r}")
    return host, int(port)


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(text: str) -> IPNetwork:
    """``192.0.2.0/24``, ``2001:db8::/32``, or one address (``127.0.0.1``, ``::1``).

    ValueError for anything else, including host bits set (``10.0.0.1/8``). An
    IPv4-mapped IPv6 network is turned into its IPv4 network.
    """
    network = ipaddress.ip_network(str(text).strip(), strict=True)
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network



@dataclass(frozen=True)
class ListenSettings:
    smtp: list[tuple[str, int]] = field(default_factory=lambda: [("0.0.0.0", 25)])
    submission: list[tuple[str, int]] = field(default_factory=lambda: [("0.0.0.0", 587)])
    submission_tls: list[tuple[str, int]] = field(default_factory=lambda: [("0.0.0.0", 465)])


@dataclass(frozen=True)
class TLSSettings:
    certs_dir: Path | None = None
    acme_sh_home: Path | None = None
    self_signed: bool = False


@dataclass(frozen=True)
class DNSSettings:
    nameservers: list[tuple[str, int]] = field(default_factory=list)
    timeout: float = 5.0


IP_FAMILIES = ("ipv4", "ipv6")


@dataclass(frozen=True)
class RelaySettings:
    """A smarthost (``delivery.relay``): remote mail goes to it instead of to MX hosts.

    TLS is always required and verified; the password is never held here, only the path
    of the file it is read from (mailrelay.delivery.relay reads it when it logs in).
    """

    host: str
    port: int = 587
    tls: str = "starttls"  # starttls | implicit
    username: str | None = None
    password_file: Path | None = None
    # Recipient domains (A-labels) that go through the relay; empty: all remote mail.
    domains: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeliverySettings:
    smtp_port: int = 25
    retry_intervals: list[float] = field(
        default_factory=lambda: [60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0]
    )
    give_up_after: float = 5 * 86400.0
    max_mx_hosts: int = 5
    concurrency: int = 20
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    # Deliver local mail through this command instead of the built-in Maildir, e.g.
    # "/usr/lib/dovecot/dovecot-lda -d {address}" (MDA_PLACEHOLDERS filled in).
    local_mda: str | None = None
    pipe_timeout: float = 60.0
    # Tell the sender once that a message is still queued after this long (0: never).
    delay_warning_after: float = 4 * 3600.0
    # Outbound SMTP connections in all, and to one destination domain at a time.
    max_connections: int = 100
    max_connections_per_domain: int = 10
    # An idle connection to an MX stays open this long for the next message to reuse it.
    connection_idle_time: float = 5.0
    # Opportunistic TLS: after a failed STARTTLS handshake, retry the host without TLS
    # (never for a domain whose MTA-STS policy is "enforce").
    tls_fallback_plain: bool = True
    # Trust anchors (PEM) for verifying MX certificates and MTA-STS policy hosts;
    # None: the system's store.
    ca_file: Path | None = None
    mta_sts: bool = True
    mta_sts_port: int = 443  # HTTPS port of mta-sts.<domain> (other values are for tests)
    relay: RelaySettings | None = None
    # Direct delivery binds to these before connecting (None: the kernel chooses), and
    # tries only MX addresses of these families (e.g. ipv4 alone while the IPv6 PTR is unset).
    source_ipv4: str | None = None
    source_ipv6: str | None = None
    ip_families: tuple[str, ...] = IP_FAMILIES


@dataclass(frozen=True)
class MetricsSettings:
    # Prometheus /metrics over HTTP on this address (keep it on loopback); None: off.
    listen: tuple[str, int] | None = None


LISTENER_KINDS = ("smtp", "submission", "submission_tls")  # smtp.session.Port values


@dataclass(frozen=True)
class KindLimitSettings:
    """``limits.<kind>``: connection limits of one listener kind; None: the general one."""

    max_connections: int | None = None
    max_connections_per_ip: int | None = None


@dataclass(frozen=True)
class LimitSettings:
    """``limits:``: what one client, and all together, may make the server do."""

    max_message_size: int = 50 * 1024 * 1024
    max_recipients: int = 100
    command_timeout: float = 300.0
    max_errors: int = 10
    # Each listener kind counts its own connections (port 25 cannot starve 587/465),
    # per client: an IPv4 address or an IPv6 /64. limits.<kind> overrides these.
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    smtp: KindLimitSettings = field(default_factory=KindLimitSettings)
    submission: KindLimitSettings = field(default_factory=KindLimitSettings)
    submission_tls: KindLimitSettings = field(default_factory=KindLimitSettings)
    auth_failures_per_ip: int = 5
    auth_block_time: float = 600.0
    auth_failure_delay: float = 1.0
    # Back-pressure: answer 452 4.3.1 rather than accept what cannot be stored.
    max_queue_items: int = 100_000
    min_free_space: int = 100 * 1024 * 1024
    # A message's header section: bigger, or with more fields, gets 552 5.6.0 at DATA.
    max_header_size: int = 1024 * 1024
    max_header_fields: int = 1000
    # Received: fields, ours included, at which a message is refused as a loop (554 5.4.6).
    max_hops: int = 50
    # The TLS handshake on 465 and after STARTTLS must end within this.
    tls_handshake_timeout: float = 30.0
    # The whole DATA payload must arrive within this (each read: command_timeout).
    data_timeout: float = 20 * 60.0
    # Message bytes all sessions together may hold in memory; None: 2 x max_message_size.
    max_data_in_flight: int | None = None

    def connection_limits(self, kind: str) -> tuple[int, int]:
        """(connections in all, per client) for listener ``kind``."""
        own: KindLimitSettings = getattr(self, kind)
        return (own.max_connections or self.max_connections,
                own.max_connections_per_ip or self.max_connections_per_ip)

    @property
    def data_in_flight(self) -> int:
        return (self.max_data_in_flight if self.max_data_in_flight is not None
                else 2 * self.max_message_size)


@dataclass(frozen=True)
class AliasSettings:
    # chasquid's defaults: "me.name+tag@" is "mename@" when looking up users and aliases.
    drop_characters: str = "."
    suffix_separators: str = "+"
    max_depth: int = 10
    srs_max_age: float = 21 * 86400.0  # how long bounces to our SRS addresses are accepted


@dataclass(frozen=True)
class InboundSettings:
    """Checks on mail from outside (port 25, no AUTH)."""

    reject_spf_fail: bool = True  # 550 5.7.23 (unless DMARC passes through DKIM)
    reject_dmarc: bool = True  # 550 5.7.1 when the sender's DMARC policy is p=reject
    on_dns_error: str = "accept"  # accept | tempfail: what to do when the checks hit DNS trouble


@dataclass(frozen=True)
class AuthSettings:
    """Logins of users not in our users files (chasquid's dovecot_auth)."""

    # Ask dovecot's auth service about users not in domains/<domain>/users.
    dovecot: bool = False
    # Its auth-userdb and auth-client unix sockets; None: the first that answers of
    # /var/run/dovecot/auth-chasquid-{userdb,client} and /var/run/dovecot/auth-{userdb,client}.
    dovecot_userdb_path: Path | None = None
    dovecot_client_path: Path | None = None
    dovecot_timeout: float = 5.0


@dataclass(frozen=True)
class ProxyProtocolSettings:
    """haproxy's PROXY protocol (v1 and v2) per listener kind (chasquid's haproxy_incoming).

    A kind with networks takes connections only from them, each starting with a PROXY
    header; an empty tuple is off.
    """

    smtp: tuple[IPNetwork, ...] = ()
    submission: tuple[IPNetwork, ...] = ()
    submission_tls: tuple[IPNetwork, ...] = ()
    timeout: float = 5.0  # for the whole header to arrive

    def trusted(self, kind: str) -> tuple[IPNetwork, ...]:
        """The proxies' networks for listener ``kind`` (``smtp``, ``submission``, …)."""
        return getattr(self, kind, ()) if kind in ("smtp", "submission", "submission_tls") else ()


@dataclass(frozen=True)
class UserSettings:
    """What ``mailrelay user add/passwd`` and ``init`` accept as a new password."""

    # NIST SP 800-63B's minimum for a password the user chose; logins are not affected.
    min_password_length: int = 8


@dataclass(frozen=True)
class SenderSettings:
    # Authenticated users may send (MAIL FROM and From:) only as their own addresses...
    restrict: bool = True
    # ...plus these shell-style patterns, keyed by user address or by domain (all its users).
    allow: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class RspamdSettings:
    """rspamd checks the message after DATA (see mailrelay.message.filters.rspamd)."""

    url: str | None = None  # e.g. http://127.0.0.1:11333 (its normal worker); None: off
    timeout: float = 10.0
    on_error: str = "accept"  # accept | tempfail: when rspamd is down, slow or answers garbage
    submission: bool = False  # also check mail from authenticated users (587/465)


@dataclass(frozen=True)
class FilterSettings:
    """chasquid's hooks (hooks/post-data, hooks/alias-resolve) and rspamd."""

    hooks_dir: Path | None = None  # None: <config dir>/hooks, as chasquid
    hook_timeout: float = 60.0  # post-data; chasquid's fixed 1 minute
    alias_resolve_timeout: float = 5.0  # chasquid's fixed 5 seconds
    rspamd: RspamdSettings = field(default_factory=RspamdSettings)


@dataclass(frozen=True)
class Config:
    config_dir: Path
    hostname: str
    listen: ListenSettings
    data_dir: Path
    tls: TLSSettings
    dns: DNSSettings
    delivery: DeliverySettings
    limits: LimitSettings
    domains: tuple[str, ...]
    senders: SenderSettings = field(default_factory=SenderSettings)
    aliases: AliasSettings = field(default_factory=AliasSettings)
    inbound: InboundSettings = field(default_factory=InboundSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    filters: FilterSettings = field(default_factory=FilterSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    proxy_protocol: ProxyProtocolSettings = field(default_factory=ProxyProtocolSettings)
    users: UserSettings = field(default_factory=UserSettings)
    # What is loaded but deserves the owner's attention (``check`` prints it, ``serve``
    # logs it): e.g. a setting that no longer has an effect.
    warnings: tuple[str, ...] = ()

    @property
    def domains_dir(self) -> Path:
        return self.config_dir / "domains"

    def domain_dir(self, domain: str) -> Path:
        return self.domains_dir / domain

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower() in self.domains

    @property
    def primary_domain(self) -> str | None:
        """The first domain: the home of postmaster@ without a domain, and of DSNs."""
        return self.domains[0] if self.domains else None


class _Reader:
    """Walks a composed YAML node tree, converting values and remembering positions."""

    def __init__(self, path: Path):
        self.path = path

    def error(self, message: str, node: yaml.Node | None) -> ConfigError:
        line = node.start_mark.line + 1 if node is not None else None
        return ConfigError(message, self.path, line)

    def mapping(self, node: yaml.Node | None, where: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if node is None or (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")):
            return {}
        if not isinstance(node, yaml.MappingNode):
            raise self.error(f"{where} must be a mapping", node)
        result: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise self.error(f"{where}: keys must be plain names", key_node)
            if key_node.value in result:
                # YAML would silently keep the last one, hiding the first from the owner.
                first = result[key_node.value][0].start_mark.line + 1
                raise self.error(f"{where}: {key_node.value} given twice (first on line {first})",
                                 key_node)
            result[key_node.value] = (key_node, value_node)
        return result

    def scalar(self, node: yaml.Node) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.error("expected a single value", node)
        return yaml.safe_load(yaml.serialize(node))

    def sequence(self, node: yaml.Node) -> list[yaml.Node]:
        if isinstance(node, yaml.ScalarNode):
            if node.tag.endswith(":null"):
                return []
            return [node]  # a single value where a list is allowed
        if not isinstance(node, yaml.SequenceNode):
            raise self.error("expected a list", node)
        return list(node.value)


def _convert(reader: _Reader, node: yaml.Node, converter: Any, name: str) -> Any:
    try:
        return converter(reader.scalar(node))
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise reader.error(f"{name}: {exc}", node) from None


def _as_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, not {value!r}")
    return value


def _as_positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"expected a positive whole number, not {value!r}")
    return value


def _as_port(value: Any) -> int:
    port = _as_positive_int(value)
    if port > 65535:
        raise ValueError(f"not a port number: {value}")
    return port


def _one_of(*choices: str):
    def convert(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, not {value!r}")
        return str(value)
    return convert


def _as_str(value: Any) -> str:
    if value is None or isinstance(value, bool | dict | list):
        raise ValueError(f"expected text, not {value!r}")
    return str(value)


def _section(
    reader: _Reader, node: yaml.Node | None, name: str, spec: dict[str, Any]
) -> dict[str, Any]:
    """Convert a mapping section using ``spec`` (key -> converter); unknown keys are errors."""
    values: dict[str, Any] = {}
    for key, (key_node, value_node) in reader.mapping(node, name).items():
        if key not in spec:
            known = ", ".join(sorted(spec))
            raise reader.error(f"unknown setting {name}.{key} (known: {known})", key_node)
        values[key] = spec[key](reader, value_node, f"{name}.{key}")
    return values


# delivery.local_mda's placeholders (delivery.manager.mda_command fills them in): the
# local part; the domain and the address in Unicode, as chasquid's %to_domain% and %to%;
# both again in ASCII (IDNA A-labels).
MDA_PLACEHOLDERS = ("user", "domain", "address", "domain_ascii", "address_ascii")


def _as_mda_template(value: Any) -> str | None:
    """A local_mda command template whose placeholders are all known: refused here, at
    load, rather than failing every local delivery later."""
    if value is None:
        return None
    template = _as_str(value)
    known = ", ".join(f"{{{name}}}" for name in MDA_PLACEHOLDERS)
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion
                  in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:  # a lone brace
        raise ValueError(f"{exc} (the placeholders are {known}; "
                         "{{ and }} for a literal brace)") from None
    for name, spec, conversion in fields:
        if name == "" or name.isdigit():
            raise ValueError(f"positional placeholders are not allowed (the placeholders "
                             f"are {known}; {{{{ and }}}} for a literal brace)")
        if name not in MDA_PLACEHOLDERS:
            raise ValueError(f"unknown placeholder {{{name}}} (known: {known}; "
                             "{{ and }} for a literal brace)")
        if spec or conversion:
            raise ValueError(f"{{{name}}} takes no format or conversion")
    return template


def _scalar_of(converter: Any):
    return lambda reader, node, name: _convert(reader, node, converter, name)


def _list_of(converter: Any):
    def convert(reader: _Reader, node: yaml.Node, name: str) -> list[Any]:
        return [_convert(reader, item, converter, name) for item in reader.sequence(node)]
    return convert


def _tuple_of(converter: Any):
    def convert(reader: _Reader, node: yaml.Node, name: str) -> tuple[Any, ...]:
        return tuple(_list_of(converter)(reader, node, name))
    return convert


def _optional_path(base: Path):
    def convert(value: Any) -> Path | None:
        if value is None:
            return None
        return (base / _as_str(value)).resolve()
    return convert


def load_config(config_dir: Path | str) -> Config:
    """Load ``mailrelay.yaml`` from ``config_dir`` and discover the domains beside it."""
    config_dir = Path(config_dir).resolve()
    path = config_dir / CONFIG_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("configuration file not found", path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {exc}", path) from None
    reader = _Reader(path)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise ConfigError(f"YAML syntax error: {exc.problem}", path, line) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"YAML error: {exc}", path) from None

    hostport = _list_of(parse_hostport)
    top_spec: dict[str, Any] = {
        "hostname": _scalar_of(_as_str),
        "listen": None, "data_dir": _scalar_of(_as_str), "tls": None, "dns": None,
        "delivery": None, "limits": None, "senders": None, "aliases": None, "inbound": None,
        "metrics": None, "workers": None, "auth": None, "proxy_protocol": None,
        "filters": None, "users": None,
    }
    top = reader.mapping(root, "top level")
    for key, (key_node, _) in top.items():
        if key not in top_spec:
            raise reader.error(f"unknown setting {key} (known: {', '.join(sorted(top_spec))})",
                               key_node)

    def sub(name: str) -> yaml.Node | None:
        return top[name][1] if name in top else None

    if "hostname" not in top:
        raise ConfigError("hostname is required (the name this server greets with)", path)
    hostname = _convert(reader, top["hostname"][1], _as_str, "hostname").strip().lower()
    if not re.fullmatch(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?", hostname):
        raise reader.error(f"hostname: {hostname!r} is not a host name", top["hostname"][1])

    listen = ListenSettings(**_section(reader, sub("listen"), "listen", {
        "smtp": hostport, "submission": hostport, "submission_tls": hostport,
    }))

    data_dir_value = (
        _convert(reader, top["data_dir"][1], _as_str, "data_dir") if "data_dir" in top
        else "/var/lib/mailrelay"
    )
    data_dir = (config_dir / data_dir_value).resolve()

    base_path = _scalar_of(_optional_path(config_dir))
    tls_values = _section(reader, sub("tls"), "tls", {
        "certs_dir": base_path, "acme_sh_home": base_path, "self_signed": _scalar_of(_as_bool),
    })
    tls_values.setdefault("certs_dir", config_dir / "certs")
    tls = TLSSettings(**tls_values)

    dns = DNSSettings(**_section(reader, sub("dns"), "dns", {
        "nameservers": _list_of(lambda v: parse_hostport(v, 53)),
        "timeout": _scalar_of(parse_duration),
    }))

    delivery = DeliverySettings(**_section(reader, sub("delivery"), "delivery", {
        "smtp_port": _scalar_of(_as_port),
        "retry_intervals": _list_of(parse_duration),
        "give_up_after": _scalar_of(parse_duration),
        "max_mx_hosts": _scalar_of(_as_positive_int),
        "concurrency": _scalar_of(_as_positive_int),
        "connect_timeout": _scalar_of(parse_duration),
        "command_timeout": _scalar_of(parse_duration),
        "local_mda": _scalar_of(_as_mda_template),
        "pipe_timeout": _scalar_of(parse_duration),
        "delay_warning_after": _scalar_of(parse_duration),
        "max_connections": _scalar_of(_as_positive_int),
        "max_connections_per_domain": _scalar_of(_as_positive_int),
        "connection_idle_time": _scalar_of(parse_duration),
        "tls_fallback_plain": _scalar_of(_as_bool),
        "ca_file": base_path,
        "mta_sts": _scalar_of(_as_bool),
        "mta_sts_port": _scalar_of(_as_port),
        # Converted below, with its own keys; null is no relay, as leaving it out.
        "relay": lambda r, node, name: None if node.tag.endswith(":null") else node,
        "source_ipv4": _scalar_of(_ip_of(4)),
        "source_ipv6": _scalar_of(_ip_of(6)),
        "ip_families": _families,
    }))
    if not delivery.retry_intervals:
        raise reader.error("delivery.retry_intervals must not be empty", sub("delivery"))
    if delivery.relay is not None:
        delivery = dataclasses.replace(
            delivery, relay=_relay_settings(reader, delivery.relay, config_dir))

    limits = LimitSettings(**_section(reader, sub("limits"), "limits", {
        "max_message_size": _scalar_of(parse_size),
        "max_recipients": _scalar_of(_as_positive_int),
        "command_timeout": _scalar_of(parse_duration),
        "max_errors": _scalar_of(_as_positive_int),
        "max_connections": _scalar_of(_as_positive_int),
        "max_connections_per_ip": _scalar_of(_as_positive_int),
        "auth_failures_per_ip": _scalar_of(_as_positive_int),
        "auth_block_time": _scalar_of(parse_duration),
        "auth_failure_delay": _scalar_of(parse_duration),
        "max_queue_items": _scalar_of(_as_positive_int),
        "min_free_space": _scalar_of(parse_size),
        "max_header_size": _scalar_of(parse_size),
        "max_header_fields": _scalar_of(_as_positive_int),
        "max_hops": _scalar_of(_as_positive_int),
        "tls_handshake_timeout": _scalar_of(_as_timeout),
        "data_timeout": _scalar_of(_as_timeout),
        "max_data_in_flight": _scalar_of(lambda v: None if v is None else parse_size(v)),
        **{kind: _kind_limits for kind in LISTENER_KINDS},
    }))
    if limits.data_in_flight < limits.max_message_size:
        raise reader.error(
            f"limits.max_data_in_flight ({limits.data_in_flight} bytes) must be at least "
            f"limits.max_message_size ({limits.max_message_size} bytes)", sub("limits"))

    senders = SenderSettings(**_section(reader, sub("senders"), "senders", {
        "restrict": _scalar_of(_as_bool),
        "allow": _allow_patterns,
    }))

    aliases = AliasSettings(**_section(reader, sub("aliases"), "aliases", {
        "drop_characters": _scalar_of(lambda v: "" if v is None else _as_str(v)),
        "suffix_separators": _scalar_of(lambda v: "" if v is None else _as_str(v)),
        "max_depth": _scalar_of(_as_positive_int),
        "srs_max_age": _scalar_of(parse_duration),
    }))

    inbound = InboundSettings(**_section(reader, sub("inbound"), "inbound", {
        "reject_spf_fail": _scalar_of(_as_bool),
        "reject_dmarc": _scalar_of(_as_bool),
        "on_dns_error": _scalar_of(_one_of("accept", "tempfail")),
    }))

    metrics = MetricsSettings(**_section(reader, sub("metrics"), "metrics", {
        "listen": _scalar_of(_as_metrics_listen),
    }))

    auth = AuthSettings(**_section(reader, sub("auth"), "auth", {
        "dovecot": _scalar_of(_as_bool),
        "dovecot_userdb_path": base_path,
        "dovecot_client_path": base_path,
        "dovecot_timeout": _scalar_of(parse_duration),
    }))

    networks = _tuple_of(parse_network)
    proxy_protocol = ProxyProtocolSettings(**_section(
        reader, sub("proxy_protocol"), "proxy_protocol", {
            "smtp": networks, "submission": networks, "submission_tls": networks,
            "timeout": _scalar_of(parse_duration),
        }))

    users = UserSettings(**_section(reader, sub("users"), "users", {
        "min_password_length": _scalar_of(_as_positive_int),
    }))

    warnings = []
    if "workers" in top:
        # Removed: SMTP worker processes doubled the memory and split the per-IP limits
        # for no gain on the small machines mailrelay is for. A config that still has the
        # key keeps working.
        line = top["workers"][0].start_mark.line + 1
        warnings.append(f"{path}:{line}: workers: no longer used, mailrelay runs as one "
                        "process; delete this line")
    if not (listen.smtp or listen.submission or listen.submission_tls):
        line = top["listen"][0].start_mark.line + 1 if "listen" in top else None
        where = f"{path}:{line}" if line else str(path)
        warnings.append(f"{where}: listen: no address at all: the server takes no mail "
                        "(unless systemd passes it sockets), it only delivers its queue")

    domains = discover_domains(config_dir)
    if delivery.relay is not None:
        ours = sorted(set(delivery.relay.domains) & set(domains))
        if ours:
            raise reader.error(f"delivery.relay.domains: {', '.join(ours)} is a local domain "
                               "(its mail is delivered here, never to the relay)",
                               sub("delivery"))
    filter_values = _section(reader, sub("filters"), "filters", {
        "hooks_dir": base_path,
        "hook_timeout": _scalar_of(_as_timeout),
        "alias_resolve_timeout": _scalar_of(_as_timeout),
        "rspamd": lambda reader, node, name: RspamdSettings(**_section(reader, node, name, {
            "url": _scalar_of(_as_rspamd_url),
            "timeout": _scalar_of(_as_timeout),
            "on_error": _scalar_of(_one_of("accept", "tempfail")),
            "submission": _scalar_of(_as_bool),
        })),
    })
    if filter_values.get("hooks_dir") is None:
        filter_values["hooks_dir"] = config_dir / "hooks"
    filters = FilterSettings(**filter_values)

    return Config(
        config_dir=config_dir, hostname=hostname, listen=listen, data_dir=data_dir, tls=tls,
        dns=dns, delivery=delivery, limits=limits, domains=domains,
        senders=senders, aliases=aliases, inbound=inbound, metrics=metrics,
        auth=auth, proxy_protocol=proxy_protocol, warnings=tuple(warnings),
        filters=filters, users=users,
    )


def setting_line(config_dir: Path | str, dotted: str) -> int | None:
    """The line of ``dotted`` (``delivery.local_mda``) in ``mailrelay.yaml``, for messages
    about a setting that loaded but is wrong in another way (``mailrelay check``); None
    when it is not written there (a default) or the file does not parse."""
    try:
        node = yaml.compose((Path(config_dir) / CONFIG_FILE).read_text(encoding="utf-8"),
                            Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    line = None
    for key in dotted.split("."):
        if not isinstance(node, yaml.MappingNode):
            return None
        found = next(((name, value) for name, value in node.value
                      if isinstance(name, yaml.ScalarNode) and name.value == key), None)
        if found is None:
            return None
        line, node = found[0].start_mark.line + 1, found[1]
    return line


def _ip_of(version: int):
    def convert(value: Any) -> str | None:
        if value is None:
            return None
        try:
            ip = ipaddress.ip_address(_as_str(value).strip().strip("[]"))
        except ValueError:
            raise ValueError(f"{value!r} is not an IPv{version} address") from None
        if ip.version != version:
            raise ValueError(f"{value} is not an IPv{version} address")
        return str(ip)
    return convert


def _families(reader: _Reader, node: yaml.Node, name: str) -> tuple[str, ...]:
    families = _list_of(_one_of(*IP_FAMILIES))(reader, node, name)
    if not families:
        raise reader.error(f"{name} must name ipv4, ipv6 or both", node)
    if len(set(families)) != len(families):
        raise reader.error(f"{name}: a family is listed twice", node)
    return tuple(families)


_RELAY_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|\[?[0-9A-Fa-f:.]+\]?")


def _relay_settings(reader: _Reader, node: yaml.Node, config_dir: Path) -> RelaySettings:
    """``delivery.relay``: the smarthost, its TLS mode, login and the domains it serves."""
    name = "delivery.relay"
    values = _section(reader, node, name, {
        "host": _scalar_of(_as_str),
        "port": _scalar_of(_as_port),
        "tls": _scalar_of(_one_of("starttls", "implicit")),
        "username": _scalar_of(_as_str),
        "password_file": _scalar_of(_optional_path(config_dir)),
        "domains": _list_of(_as_relay_domain),
    })
    host = str(values.get("host", "")).strip().lower()
    if not host:
        raise reader.error(f"{name}.host is required (the relay's host name)", node)
    if not _RELAY_HOST.fullmatch(host):
        raise reader.error(f"{name}.host: {host!r} is not a host name", node)
    values["host"] = host.strip("[]")
    values.setdefault("port", 465 if values.get("tls") == "implicit" else 587)
    if ("username" in values) != (values.get("password_file") is not None):
        raise reader.error(f"{name}: username and password_file go together (both, for "
                           "AUTH, or neither, for a relay that knows this server's address)",
                           node)
    if values.get("password_file") is not None:
        check_secret_file(values["password_file"], f"{name}.password_file", reader.path)
    values["domains"] = tuple(dict.fromkeys(values.get("domains", ())))
    return RelaySettings(**values)


def _as_relay_domain(value: Any) -> str:
    try:
        return normalize_domain(_as_str(value))
    except AddressError as exc:
        raise ValueError(str(exc)) from None


def check_secret_file(path: Path, setting: str, config_path: Path | None = None) -> None:
    """A file that holds a secret: it must exist and be readable by its owner only.

    Only its metadata is looked at (its content is read where it is used), so a command
    run by another user than the service's still loads the configuration."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{setting}: {path} does not exist", config_path) from None
    except OSError as exc:
        raise ConfigError(f"{setting}: {path}: {exc.strerror or exc}", config_path) from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{setting}: {path} is not a regular file", config_path)
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise ConfigError(f"{setting}: {path} is open to group or others (mode {mode:04o}); "
                          f"chmod 600 {path}", config_path)


def _as_metrics_listen(value: Any) -> tuple[str, int] | None:
    """``host:port``; a port alone (``9125``, ``:9125``) is on loopback, where an HTTP
    endpoint without authentication belongs."""
    if value is None:
        return None
    text = _as_str(value).strip()
    if re.fullmatch(r":?\d+", text):
        return "127.0.0.1", _as_port(int(text.lstrip(":")))
    try:
        return parse_hostport(text)
    except ValueError as exc:
        if "needs a port" not in str(exc):
            raise
        raise ValueError(f"{text!r} has no port: give host:port, e.g. "
                         "127.0.0.1:9125") from None

def _kind_limits(reader: _Reader, node: yaml.Node, name: str) -> KindLimitSettings:
    """``limits.smtp: {max_connections: 500, max_connections_per_ip: 20}``."""
    optional = _scalar_of(lambda v: None if v is None else _as_positive_int(v))
    return KindLimitSettings(**_section(reader, node, name, {
        "max_connections": optional,  # null: the general limits.max_connections
        "max_connections_per_ip": optional,
    }))


def _as_timeout(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("a timeout must be longer than 0s")
    return seconds


def _as_rspamd_url(value: Any) -> str | None:
    """``http://host:port[/prefix]``: rspamd's HTTP protocol, plain (it serves no TLS)."""
    if value is None:
        return None
    text = _as_str(value).strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a URL ({exc})") from None
    if parts.scheme != "http":
        raise ValueError(f"{text!r}: expected http://host:port (rspamd serves plain HTTP)")
    if not parts.hostname or parts.username is not None or parts.query or parts.fragment:
        raise ValueError(f"{text!r}: expected http://host:port with nothing else but a path")
    if not port:
        raise ValueError(f"{text!r} needs a port (rspamd's normal worker listens on 11333)")
    return text


def _allow_patterns(reader: _Reader, node: yaml.Node, name: str) -> dict[str, tuple[str, ...]]:
    """``{user@domain | domain: [pattern, ...]}`` with lower-cased keys and patterns."""
    result: dict[str, tuple[str, ...]] = {}
    for key, (key_node, value_node) in reader.mapping(node, name).items():
        if not re.fullmatch(r"[^@\s]+@[^@\s]+|[^@\s]+\.[^@\s]+", key):
            raise reader.error(f"{name}: {key!r} is neither an address nor a domain", key_node)
        patterns = _list_of(_as_str)(reader, value_node, f"{name}.{key}")
        result[key.lower()] = tuple(p.lower() for p in patterns)
    return result


def discover_domains(config_dir: Path) -> tuple[str, ...]:
    """The local domains: one directory each under ``domains/`` (chasquid's layout)."""
    domains_dir = config_dir / "domains"
    if not domains_dir.is_dir():
        return ()
    found = []
    for entry in sorted(domains_dir.iterdir()):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        try:
            name = normalize_domain(entry.name)
        except AddressError:
            raise ConfigError("directory name is not a domain", entry) from None
        if name != entry.name:
            raise ConfigError(f"domain directory must be named {name!r} (lower-case, ASCII)",
                              entry)
        found.append(name)
    return tuple(found)
