"""The DNS records a domain served by mailrelay needs, and a check of what DNS publishes.

``plan_records`` says what to publish (MX, SPF, DKIM, DMARC, the hostname's A/AAAA, the
PTR of the server's addresses, and the optional HELO SPF, MTA-STS and TLS-RPT records);
``check_records`` asks the configured nameservers and compares, record by record.

Both know what delivery uses: the PTR (forward-confirmed reverse DNS) matters for each
address direct delivery sends from (``delivery.source_ipv4``/``source_ipv6`` or the
server's addresses, of the families in ``delivery.ip_families``), not for the others;
and with ``delivery.relay`` the SPF record must also name the relay's servers, by the
``include:`` of its provider (``--relay-spf``, or the table in ``RELAY_SPF_INCLUDES``).

All lookups go through ``authcheck.DNSLookup`` (the configured nameservers, a bounded
time per lookup), and SPF is evaluated by pyspf through the same resolver, exactly as
inbound mail is checked. DNS trouble becomes an ``error`` result for that record only,
naming the resolver; a resolver that does not answer at all (``probe_resolvers``) ends
the check at once instead of costing a timeout per record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial

import dns.exception
import dns.message
import dns.resolver
import dns.reversename

from ..config import Config, format_hostport
from ..dnsresolver import NO_ANSWER, NOT_DNS, REFUSED, probe_nameserver
from ..errors import MailrelayError
from ..message.dkim.keys import dns_record, format_txt
from ..message.dkim.signer import DKIMKey
from ..policy.authres import DNSLookup, DNSTempError, check_spf

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Statuses of a checked record; only "ok" is good.
OK, MISSING, WRONG, ERROR = "ok", "missing", "wrong", "error"

# An address no real server sends from (RFC 5737 TEST-NET-1): if SPF passes for it, the
# record authorises everybody (+all). It is only evaluated, never contacted.
_PROBE_IP = "192.0.2.1"
_MTA_STS_MAX_AGE = 604800  # one week, the RFC 8461 example; long enough to be useful
# Each lookup may take dns.timeout; a record check (SPF with includes) gets this many.
_LOOKUPS_PER_CHECK = 12
# Per lookup for `dns check` and `dns records` (at most dns.timeout): a person waits for
# the answer, and a resolver that is up answers well within it.
CHECK_TIMEOUT = 3.0

# The SPF include of common relay services, by the relay's host name (README, "When your
# provider blocks port 25"): (host suffix, the term the domain's SPF record needs).
RELAY_SPF_INCLUDES = (
    ("amazonaws.com", "include:amazonses.com"),  # email-smtp.<region>.amazonaws.com (SES)
    ("mailgun.org", "include:mailgun.org"),  # smtp.mailgun.org, smtp.eu.mailgun.org
    ("brevo.com", "include:spf.brevo.com"),  # smtp-relay.brevo.com
    ("sendinblue.com", "include:spf.brevo.com"),  # Brevo's former name
    ("gmail.com", "include:_spf.google.com"),  # smtp-relay.gmail.com, smtp.gmail.com
)
IPV6_PTR_ADVICE = ("Gmail refuses this: set the PTR or use `ip_families: [ipv4]` "
                   "(delivery.ip_families in mailrelay.yaml)")


@dataclass(frozen=True)
class Record:
    """One record to publish."""

    kind: str  # MX, A, AAAA, PTR, SPF, DKIM, DMARC, SPF-HELO, MTA-STS, TLS-RPT
    name: str  # owner name, without the trailing dot
    rtype: str  # MX, A, AAAA, PTR, TXT
    value: str  # presentation form; for TXT the text itself, unquoted
    why: str
    required: bool = True
    # The value is a stand-in (an address we could not learn); not to be pasted as is.
    placeholder: bool = False

    def zone(self) -> str:
        """The zone-file line."""
        if self.rtype == "TXT":
            return format_txt(self.name, self.value)
        return f"{self.name.rstrip('.')}. IN {self.rtype} {self.value}"


@dataclass
class RecordPlan:
    domain: str
    hostname: str
    ips: list[str]
    ip_source: str  # "--ip", "dns" or "none"
    records: list[Record]
    mta_sts_policy: str  # the file to serve at https://mta-sts.<domain>/.well-known/
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "domain": self.domain, "hostname": self.hostname, "ips": self.ips,
            "ip_source": self.ip_source, "notes": self.notes,
            "mta_sts_policy": self.mta_sts_policy,
            "records": [asdict(r) | {"zone": r.zone()} for r in self.records],
        }


@dataclass
class CheckResult:
    """What DNS publishes for one record, compared with what it should."""

    kind: str
    name: str
    status: str  # ok | missing | wrong | error
    detail: str  # what was found, or why it is not right
    fix: list[str] = field(default_factory=list)  # zone lines or steps that put it right
    required: bool = True

    @property
    def good(self) -> bool:
        return self.status == OK or not self.required


def parse_ips(values: Sequence[str]) -> list[IPAddress]:
    """``--ip`` values; a one-line error for anything that is not an address."""
    ips: list[IPAddress] = []
    for value in values:
        try:
            ip = ipaddress.ip_address(value.strip().strip("[]"))
        except ValueError:
            raise MailrelayError(f"--ip {value}: not an IPv4 or IPv6 address") from None
        if ip not in ips:
            ips.append(ip)
    return ips


def lookup_timeout(config: Config, given: float | None = None) -> float:
    """Seconds per lookup: ``given`` (--timeout), else dns.timeout but at most 3 s."""
    return given if given is not None else min(config.dns.timeout, CHECK_TIMEOUT)


def make_lookup(config: Config, timeout: float | None = None) -> DNSLookup:
    settings = dataclasses.replace(config.dns, timeout=lookup_timeout(config, timeout))
    return DNSLookup(settings, budget=_LOOKUPS_PER_CHECK * settings.timeout)


def resolver_addresses(config: Config) -> list[tuple[str, int]]:
    """The nameservers lookups go to: dns.nameservers, else the system's."""
    if config.dns.nameservers:
        return list(config.dns.nameservers)
    try:
        system = dns.resolver.Resolver(configure=True)
    except dns.resolver.NoResolverConfiguration:
        return [("127.0.0.1", 53)]  # what dnsresolver.make_resolver falls back to
    return [(str(server), system.port) for server in system.nameservers]


def describe_resolver(config: Config) -> str:
    """The resolver in words, e.g. ``127.0.0.1:5353 (dns.nameservers in mailrelay.yaml)``."""
    servers = ", ".join(format_hostport(h, p) for h, p in resolver_addresses(config))
    where = ("dns.nameservers in mailrelay.yaml" if config.dns.nameservers
             else "the system's, from /etc/resolv.conf")
    return f"{servers} ({where})"


def probe_resolver(host: str, port: int, timeout: float) -> str | None:
    """None when the nameserver answers DNS at all; else why not, in words
    (dnsresolver.probe_nameserver)."""
    found = probe_nameserver(host, port, timeout)
    if found is None:
        return None
    what, detail = found
    where = format_hostport(host, port)
    if what == NO_ANSWER:
        return f"no answer from {where} within {timeout:g}s"
    if what == REFUSED:
        return f"{where} refused the connection (nothing listens there)"
    if what == NOT_DNS:
        return f"{where} answered something that is not DNS"
    return f"cannot reach {where}: {detail}"


def probe_resolvers(config: Config, timeout: float | None = None) -> str | None:
    """None when a nameserver of ``resolver_addresses`` answers; else why none does."""
    seconds = lookup_timeout(config, timeout)
    reasons = []
    for host, port in resolver_addresses(config):
        reason = probe_resolver(host, port, seconds)
        if reason is None:
            return None
        reasons.append(reason)
    return (f"the resolver {describe_resolver(config)} does not answer: "
            f"{'; '.join(reasons)}")


def hostname_addresses(lookup: DNSLookup, hostname: str) -> list[IPAddress]:
    """The A and AAAA addresses of ``hostname``; DNSTempError when DNS does not answer."""
    found: list[IPAddress] = []
    for rtype in ("A", "AAAA"):
        answer = lookup.resolve(hostname, rtype)
        found += [ipaddress.ip_address(r.address) for r in answer or ()]
    return found


def reverse_name(ip: IPAddress) -> str:
    return dns.reversename.from_address(str(ip)).to_text(omit_final_dot=True)


# -- what to publish ----------------------------------------------------------------

def spf_value(strict: bool = False, relay_include: str | None = None) -> str:
    # "mx": mail leaves from the host mail arrives at, so the record follows the MX; and
    # through the relay's servers when one is configured.
    relay = f"{relay_include} " if relay_include else ""
    return f"v=spf1 mx {relay}{'-all' if strict else '~all'}"


def relay_spf_term(config: Config, given: str | None = None) -> str | None:
    """The SPF term that authorises ``delivery.relay``'s servers: ``given`` (the
    --relay-spf option: "include:x" or a bare domain), else the table's entry for the
    relay's host; None without a relay, or for a relay the table does not know."""
    relay = config.delivery.relay
    if given:
        term = given.strip()
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9:._/-]*", term):
            raise MailrelayError(f"--relay-spf {given}: not an SPF term "
                                 "(e.g. include:amazonses.com)")
        return term if ":" in term else f"include:{term}"
    if relay is None:
        return None
    for suffix, term in RELAY_SPF_INCLUDES:
        if relay.host == suffix or relay.host.endswith("." + suffix):
            return term
    return None


def relays_everything(config: Config) -> bool:
    """All remote mail goes through delivery.relay: no direct delivery from this host."""
    relay = config.delivery.relay
    return relay is not None and not relay.domains


def dmarc_value(domain: str) -> str:
    return f"v=DMARC1; p=quarantine; rua=mailto:postmaster@{domain}"


def mta_sts_policy(hostname: str) -> str:
    return (f"version: STSv1\nmode: testing\nmx: {hostname}\n"
            f"max_age: {_MTA_STS_MAX_AGE}\n")


def plan_records(config: Config, domain: str, keys: Sequence[DKIMKey],
                 ips: Sequence[IPAddress], ip_source: str, *,
                 strict_spf: bool = False, relay_spf: str | None = None) -> RecordPlan:
    """Every record ``domain`` needs, with why; PTRs and A/AAAA for the ``ips`` given
    (and for delivery's source addresses); ``relay_spf`` as for relay_spf_term."""
    host = config.hostname
    relay = config.delivery.relay
    relay_term = relay_spf_term(config, relay_spf)
    records: list[Record] = [
        Record("MX", domain, "MX", f"10 {host}.",
               f"mail for {domain} is delivered to this server ({host})"),
    ]
    records += address_records(host, ips)
    records += ptr_records(host, [*ips, *(ip for ip in source_addresses(config)
                                          if ip not in ips)])
    relay_why = (f"and the servers of the relay {relay.host} (delivery.relay), by "
                 f"{relay_term}; " if relay is not None and relay_term else "")
    spf_why = ("authorises the MX host (this server) to send as @" + domain + "; "
               + relay_why
               + ("-all: everybody else fails outright"
                  if strict_spf else
                  "~all, not -all: DMARC below already tells receivers to quarantine "
                  "mail that fails, and some receivers reject an SPF -all failure before "
                  "looking at DKIM, which loses mail forwarded by your recipients "
                  "(use --strict-spf for -all)"))
    records.append(Record("SPF", domain, "TXT", spf_value(strict_spf, relay_term), spf_why))
    for key in keys:
        name, value = dns_record(key)
        records.append(Record("DKIM", name, "TXT", value,
                              f"the public half of {key.path or 'the key'} "
                              f"({key.algorithm}); receivers check signatures with it"))
    records.append(Record(
        "DMARC", f"_dmarc.{domain}", "TXT", dmarc_value(domain),
        "tells receivers what to do with mail that claims to be from " + domain
        + " but passes neither aligned SPF nor DKIM: p=quarantine (spam folder) protects "
        "the domain without losing mail outright while you set things up (p=none protects "
        "nothing; move to p=reject once the reports are clean); aggregate reports go to "
        f"postmaster@{domain}, so make that a user or alias"))
    if host != domain:  # else the domain's SPF record is the HELO name's, too
        records.append(Record(
            "SPF-HELO", host, "TXT", "v=spf1 a -all",
            f"recommended: bounces are sent with an empty sender, so receivers check SPF "
            f"of the HELO name {host}; only this host uses that name, hence -all",
            required=False))
    records += [mta_sts_record(domain, host), tls_rpt_record(domain, host)]
    notes: list[str] = []
    if not keys:
        notes.append(f"{domain} has no DKIM key: create one with "
                     f"`mailrelay dkim keygen {domain}`, then run this again")
    if not ips:
        notes.append(f"the addresses of {host} are unknown (it does not resolve): "
                     "run this again with --ip ADDRESS for each public address of the server")
    if relay is not None and not relay_term:
        notes.append(f"the SPF record must also authorise the servers of the relay "
                     f"{relay.host}: ask the provider for its SPF include and run this again "
                     "with --relay-spf include:THEIR-DOMAIN")
    if relays_everything(config):
        notes.append(f"all remote mail leaves through the relay {relay.host}, so receivers "
                     "see its addresses, not this server's: the PTR records above only matter "
                     "if you deliver directly again")
    return RecordPlan(domain, host, [str(ip) for ip in ips], ip_source, records,
                      mta_sts_policy(host), notes)


def mta_sts_record(domain: str, host: str) -> Record:
    policy_id = hashlib.sha256(mta_sts_policy(host).encode()).hexdigest()[:20]
    return Record(
        "MTA-STS", f"_mta-sts.{domain}", "TXT", f"v=STSv1; id={policy_id}",
        f"optional: senders that support MTA-STS (RFC 8461) then insist on TLS to {host}; "
        f"only useful once https://mta-sts.{domain}/.well-known/mta-sts.txt serves the "
        "policy (with a valid certificate; mailrelay does not serve HTTPS); the id is the "
        "policy's hash, so it changes when the policy does",
        required=False)


def tls_rpt_record(domain: str, host: str) -> Record:
    return Record(
        "TLS-RPT", f"_smtp._tls.{domain}", "TXT", f"v=TLSRPTv1; rua=mailto:postmaster@{domain}",
        f"optional: senders report trouble with TLS to {host} (RFC 8460)", required=False)


def source_addresses(config: Config) -> list[IPAddress]:
    """delivery.source_ipv4 and source_ipv6, where set."""
    found = [config.delivery.source_ipv4, config.delivery.source_ipv6]
    return [ipaddress.ip_address(ip) for ip in found if ip]


def delivery_role(config: Config, ip: IPAddress) -> tuple[bool, str]:
    """(whether direct delivery sends from ``ip``, in words what it is to delivery)."""
    family = f"ipv{ip.version}"
    relay = config.delivery.relay
    if relays_everything(config):
        assert relay is not None
        return False, f"not used for sending: all remote mail goes through the relay {relay.host}"
    if family not in config.delivery.ip_families:
        return False, (f"not used for sending: delivery.ip_families is "
                       f"[{', '.join(config.delivery.ip_families)}]")
    source = getattr(config.delivery, f"source_{family}")
    if source and ipaddress.ip_address(source) != ip:
        return False, f"not used for sending: delivery.source_{family} is {source}"
    what = "delivery's IPv%d source address" if source else "delivery sends from it (IPv%d)"
    return True, what % ip.version


def address_records(host: str, ips: Sequence[IPAddress]) -> list[Record]:
    why = f"{host} is the MX host and the HELO name; it must resolve to the server"
    if not ips:
        return [Record("A", host, "A", "<IPv4 address of this server>", why,
                       placeholder=True)]
    return [Record("A" if ip.version == 4 else "AAAA", host, "A" if ip.version == 4 else "AAAA",
                   str(ip), why) for ip in ips]


def ptr_records(host: str, ips: Sequence[IPAddress]) -> list[Record]:
    why = ("reverse DNS: receivers refuse or distrust mail from an address whose PTR does "
           "not name a host that resolves back to it; set it at your VPS provider (the "
           "reverse zone is theirs), not in the zone of your domain")
    if not ips:
        return [Record("PTR", "<reverse name of the server's address>", "PTR", f"{host}.",
                       why, placeholder=True)]
    return [Record("PTR", reverse_name(ip), "PTR", f"{host}.", why) for ip in ips]


# -- what DNS publishes -------------------------------------------------------------

class _Checker:
    """Runs each record's check with a fresh time budget; DNS trouble is that record's
    result, not a traceback. Once the resolver is known not to answer, the remaining
    records are not checked (each would only wait out its timeout)."""

    def __init__(self, config: Config, timeout: float | None, down: str | None):
        self.config = config
        self.timeout = lookup_timeout(config, timeout)
        self.down = down

    def __call__(self, kind: str, name: str, required: bool,
                 check: Callable[[DNSLookup], CheckResult]) -> CheckResult:
        if self.down is not None:
            return CheckResult(kind, name, ERROR, "not checked: the resolver does not answer",
                               required=required)
        try:
            return check(make_lookup(self.config, self.timeout))
        except (DNSTempError, dns.exception.DNSException) as exc:
            timed_out = _timed_out(str(exc))
            if timed_out:
                self.down = probe_resolvers(self.config, self.timeout)
            if timed_out and self.down is not None:
                detail = self.down
            else:
                detail = _trouble(exc, describe_resolver(self.config), self.timeout)
            return CheckResult(kind, name, ERROR, f"DNS lookup failed: {detail}",
                               required=required)


def _timed_out(text: str) -> bool:
    return "timed out" in text or "lifetime expired" in text or "Timeout" in text


def _trouble(exc: Exception, resolver: str, timeout: float) -> str:
    """dnspython's long messages (every server, every attempt) in a few words."""
    text = str(exc)
    query, _, reason = text.partition(": ") if isinstance(exc, DNSTempError) else ("", "", text)
    if _timed_out(reason):
        reason = f"no answer within {timeout:g}s from {resolver}"
    elif "SERVFAIL" in reason:
        reason = f"SERVFAIL from {resolver}"
    elif "REFUSED" in reason:
        reason = f"{resolver} refused the query"
    elif len(reason) > 100:
        reason = reason[:97] + "..."
    return f"{query}: {reason}" if query else reason


def check_records(config: Config, domain: str, keys: Sequence[DKIMKey],
                  ips: Sequence[IPAddress], *, strict_spf: bool = False,
                  relay_spf: str | None = None, timeout: float | None = None,
                  resolver_down: str | None = None) -> list[CheckResult]:
    """Each record of ``plan_records`` looked up through the configured resolver."""
    return list(iter_check_records(config, domain, keys, ips, strict_spf=strict_spf,
                                   relay_spf=relay_spf, timeout=timeout,
                                   resolver_down=resolver_down))


def iter_check_records(config: Config, domain: str, keys: Sequence[DKIMKey],
                       ips: Sequence[IPAddress], *, strict_spf: bool = False,
                       relay_spf: str | None = None, timeout: float | None = None,
                       resolver_down: str | None = None) -> Iterator[CheckResult]:
    """The results of ``check_records`` one by one, each as soon as it is known.

    Without ``ips`` the server's addresses are the hostname's A/AAAA records. ``timeout``
    is per lookup (``lookup_timeout``); ``resolver_down`` (``probe_resolvers``) says the
    resolver does not answer: nothing is looked up then."""
    host = config.hostname
    relay_term = relay_spf_term(config, relay_spf)
    guarded = _Checker(config, timeout, resolver_down)
    yield guarded("MX", domain, True, partial(_check_mx, domain=domain, host=host))

    published: list[IPAddress] = []

    def addresses(lookup: DNSLookup) -> CheckResult:
        published.extend(hostname_addresses(lookup, host))
        return _check_addresses(host, ips, published)

    yield guarded("A", host, True, addresses)
    # The server's addresses: the ones given, else the ones published (when we got them).
    server_ips = list(ips) or published
    yield from _check_delivery_ptrs(config, server_ips, guarded)
    yield guarded("SPF", domain, True,
                  partial(_check_spf, domain=domain, host=host, ips=server_ips,
                          strict=strict_spf, relay=config.delivery.relay,
                          relay_term=relay_term, direct=not relays_everything(config)))
    if not keys:
        yield CheckResult(
            "DKIM", f"*._domainkey.{domain}", MISSING, f"{domain} has no DKIM key on disk",
            [f"mailrelay dkim keygen {domain}   (then publish the record it prints)"])
    for key in keys:
        yield guarded("DKIM", dns_record(key)[0], True, partial(_check_dkim, key=key))
    yield guarded("DMARC", f"_dmarc.{domain}", True, partial(_check_dmarc, domain=domain))
    if host != domain:  # one name has one SPF record: the domain's, checked above
        yield guarded("SPF-HELO", host, False,
                      partial(_check_helo_spf, host=host, ips=server_ips))
    for record, version, needed in ((mta_sts_record(domain, host), "v=STSv1", "id"),
                                    (tls_rpt_record(domain, host), "v=TLSRPTv1", "rua")):
        yield guarded(record.kind, record.name, False,
                      partial(_check_tagged, record=record, version=version,
                              needed=(needed,)))


def _check_delivery_ptrs(config: Config, server_ips: Sequence[IPAddress],
                         guarded: _Checker) -> Iterator[CheckResult]:
    """Forward-confirmed reverse DNS of each address direct delivery sends from (required)
    and of the server's other addresses (optional), each saying what delivery does with
    it; IPv6 without a matching PTR gets the warning Gmail's refusals call for."""
    host = config.hostname
    for ip in [*server_ips, *(ip for ip in source_addresses(config) if ip not in server_ips)]:
        used, role = delivery_role(config, ip)
        result = guarded("PTR", reverse_name(ip), used, partial(_check_ptr, ip=ip, host=host))
        result.required = used
        if result.status != ERROR:
            result.detail = f"{result.detail} ({role})"
        if used and ip.version == 6 and result.status != OK:
            result.fix = [*result.fix, IPV6_PTR_ADVICE]
        yield result


def _norm(name: str) -> str:
    return name.rstrip(".").lower()


def _check_mx(lookup: DNSLookup, domain: str, host: str) -> CheckResult:
    want = [f"{domain}. IN MX 10 {host}."]
    answer = lookup.resolve(domain, "MX")
    if answer is None:
        return CheckResult("MX", domain, MISSING, "no MX record", want)
    mx = sorted((r.preference, _norm(r.exchange.to_text())) for r in answer)
    shown = ", ".join(f"{pref} {target or '.'}" for pref, target in mx)
    ours = [pref for pref, target in mx if target == host]
    if not ours:
        return CheckResult("MX", domain, WRONG, f"MX is {shown}, not {host}",
                           [*want, f"and remove: {shown}"])
    preferred = [f"{pref} {target}" for pref, target in mx if pref < min(ours) and target != host]
    if preferred:
        # Senders try those first, so mail for the domain goes elsewhere.
        return CheckResult("MX", domain, WRONG,
                           f"MX is {shown}: {', '.join(preferred)} is preferred over {host}",
                           [*want, f"and remove: {', '.join(preferred)}"])
    return CheckResult("MX", domain, OK, f"MX is {shown}")


def _check_addresses(host: str, ips: Sequence[IPAddress],
                     published: list[IPAddress]) -> CheckResult:
    if not published:
        fix = [r.zone() for r in address_records(host, ips)]
        if not ips:
            fix.append("(or run this with --ip ADDRESS to name the server's addresses)")
        return CheckResult("A", host, MISSING, "no A or AAAA record", fix)
    shown = ", ".join(map(str, published))
    absent = [ip for ip in ips if ip not in published]
    if absent:
        return CheckResult("A", host, WRONG,
                           f"resolves to {shown}, not to {', '.join(map(str, absent))}",
                           [r.zone() for r in address_records(host, ips)])
    detail = f"resolves to {shown}"
    if not ips:
        detail += " (taken as the server's addresses; --ip names them)"
    return CheckResult("A", host, OK, detail)


def _check_ptr(lookup: DNSLookup, ip: IPAddress, host: str) -> CheckResult:
    """Forward-confirmed reverse DNS: IP -> PTR -> host, and host -> A/AAAA -> IP."""
    name = reverse_name(ip)
    fix = [f"{name}. IN PTR {host}.",
           f"(set the reverse DNS of {ip} to {host} in your VPS provider's control panel)"]
    answer = lookup.resolve(name, "PTR")
    if answer is None:
        return CheckResult("PTR", name, MISSING, f"{ip} has no PTR record", fix)
    targets = sorted({_norm(r.target.to_text()) for r in answer})
    if host not in targets:
        return CheckResult("PTR", name, WRONG,
                           f"PTR of {ip} is {', '.join(targets)}, not {host}", fix)
    forward = hostname_addresses(lookup, host)
    if ip not in forward:
        return CheckResult(
            "PTR", name, WRONG,
            f"PTR of {ip} is {host}, but {host} does not resolve to {ip} (not forward-confirmed)",
            [r.zone() for r in address_records(host, [ip])])
    return CheckResult("PTR", name, OK, f"{ip} -> {host} -> {ip}")


def _spf_records(lookup: DNSLookup, name: str) -> list[str]:
    texts = [t.decode("utf-8", "replace") for t in lookup.txt(name)]
    return [t for t in texts if t.lower() == "v=spf1" or t.lower().startswith("v=spf1 ")]


def _spf_fix(existing: str, failing: Sequence[IPAddress]) -> str:
    """The record with the server added: "mx" when it lacks it, else the addresses."""
    terms = existing.split()
    add = ["mx"] if "mx" not in (t.lower() for t in terms) else [
        f"ip{ip.version}:{ip}" for ip in failing]
    return " ".join(terms[:1] + add + terms[1:])


def _check_spf(lookup: DNSLookup, domain: str, host: str, ips: Sequence[IPAddress],
               strict: bool, relay=None, relay_term: str | None = None,
               direct: bool = True) -> CheckResult:
    """SPF passes for the server's addresses (when it delivers directly) and names the
    relay's include (when there is a relay)."""
    records = _spf_records(lookup, domain)
    want = format_txt(domain, spf_value(strict, relay_term))
    if not records:
        return CheckResult("SPF", domain, MISSING, "no SPF record (TXT v=spf1 ...)", [want])
    if len(records) > 1:
        return CheckResult("SPF", domain, WRONG,
                           f"{len(records)} SPF records (receivers treat that as an error)",
                           [f"keep only one: {want}"])
    record = records[0]
    if relay is not None:
        terms = [t.lower() for t in record.split()]
        if relay_term is None:
            return CheckResult("SPF", domain, WRONG,
                               f'"{record}": cannot tell whether it authorises the relay '
                               f"{relay.host} (not in mailrelay's table of relay services)",
                               ["ask the relay's provider for its SPF include and run this "
                                "with --relay-spf include:THEIR-DOMAIN"])
        if relay_term.lower() not in terms:
            fixed = " ".join([*record.split()[:1], relay_term, *record.split()[1:]])
            return CheckResult("SPF", domain, WRONG,
                               f'"{record}" does not name the relay {relay.host} '
                               f"({relay_term})", [format_txt(domain, fixed)])
        if not direct:
            # All remote mail leaves through the relay: this server's addresses need not pass.
            return CheckResult("SPF", domain, OK, f'"{record}" names the relay {relay.host} '
                               f"({relay_term})")
    if not ips:
        return CheckResult("SPF", domain, ERROR,
                           f'"{record}" found, but the server\'s addresses are unknown',
                           ["run this with --ip ADDRESS"])
    sender = f"postmaster@{domain}"
    failing: list[tuple[IPAddress, str]] = []
    for ip in ips:
        result, _ = check_spf(lookup, str(ip), host, sender)
        if result == "temperror":
            raise DNSTempError(f"SPF of {domain} for {ip}: temperror")
        if result != "pass":
            failing.append((ip, result))
    if failing:
        why = ", ".join(f"{ip} ({result})" for ip, result in failing)
        fixed = _spf_fix(record, [ip for ip, _ in failing])
        return CheckResult("SPF", domain, WRONG, f'"{record}" does not authorise {why}',
                           [format_txt(domain, fixed)])
    if _PROBE_IP not in map(str, ips) and check_spf(lookup, _PROBE_IP, host, sender)[0] == "pass":
        return CheckResult("SPF", domain, WRONG,
                           f'"{record}" authorises every address (it passes {_PROBE_IP})',
                           [want])
    return CheckResult("SPF", domain, OK,
                       f'"{record}" authorises {", ".join(map(str, ips))}')


def _check_helo_spf(lookup: DNSLookup, host: str, ips: Sequence[IPAddress]) -> CheckResult:
    want = [format_txt(host, "v=spf1 a -all")]
    records = _spf_records(lookup, host)
    if not records:
        return CheckResult("SPF-HELO", host, MISSING, f"no SPF record for {host}", want,
                           required=False)
    failing = [str(ip) for ip in ips if check_spf(lookup, str(ip), host, "<>")[0] != "pass"]
    if failing or len(records) > 1:
        return CheckResult("SPF-HELO", host, WRONG,
                           f'"{records[0]}" does not authorise {", ".join(failing)}'
                           if failing else f"{len(records)} SPF records", want, required=False)
    return CheckResult("SPF-HELO", host, OK, f'"{records[0]}"', required=False)


def _tags(text: str) -> dict[str, str]:
    """``k=v; k=v`` (DKIM, DMARC, MTA-STS, TLS-RPT syntax), names lower-cased."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, equals, value = part.partition("=")
        if equals:
            tags.setdefault(name.strip().lower(), value.strip())
    return tags


def _check_dkim(lookup: DNSLookup, key: DKIMKey) -> CheckResult:
    name, value = dns_record(key)
    want = [format_txt(name, value)]
    texts = [t.decode("utf-8", "replace") for t in lookup.txt(name)]
    # A key record may omit v=DKIM1 (RFC 6376 3.6.1); any record with p= counts.
    found = [t for t in texts if "p" in _tags(t)]
    if not found:
        what = "no TXT record" if not texts else "no DKIM key record (TXT with p=)"
        return CheckResult("DKIM", name, MISSING, what, want)
    if len(found) > 1:
        return CheckResult("DKIM", name, WRONG, f"{len(found)} key records",
                           [f"keep only one: {want[0]}"])
    tags = _tags(found[0])
    published = re.sub(r"\s", "", tags["p"])
    expected = _tags(value)["p"]
    if not published:
        return CheckResult("DKIM", name, WRONG, "the key is revoked (empty p=)", want)
    if published != expected:
        return CheckResult("DKIM", name, WRONG,
                           f"p= is not the public half of {key.path or 'the key on disk'}",
                           want)
    kind = tags.get("k", "rsa").lower()
    if kind != _tags(value)["k"]:
        return CheckResult("DKIM", name, WRONG, f"k={kind}, the key is {_tags(value)['k']}",
                           want)
    return CheckResult("DKIM", name, OK, f"matches {key.path or 'the key on disk'}")


def _check_dmarc(lookup: DNSLookup, domain: str) -> CheckResult:
    name = f"_dmarc.{domain}"
    want = [format_txt(name, dmarc_value(domain))]
    texts = [t.decode("utf-8", "replace") for t in lookup.txt(name)]
    found = [t for t in texts if re.match(r"v\s*=\s*DMARC1\s*(;|$)", t)]
    if not found:
        return CheckResult("DMARC", name, MISSING, "no DMARC record (TXT v=DMARC1; ...)", want)
    if len(found) > 1:
        # RFC 7489 6.6.3: several records mean no policy at all.
        return CheckResult("DMARC", name, WRONG,
                           f"{len(found)} DMARC records (receivers then apply none)",
                           [f"keep only one: {want[0]}"])
    policy = _tags(found[0]).get("p", "").lower()
    if policy not in ("none", "quarantine", "reject"):
        return CheckResult("DMARC", name, WRONG,
                           f'"{found[0]}" has no valid policy (p=none|quarantine|reject)', want)
    detail = f'"{found[0]}"'
    if policy == "none":
        detail += " (p=none only monitors; quarantine or reject protects the domain)"
    return CheckResult("DMARC", name, OK, detail)


def _check_tagged(lookup: DNSLookup, record: Record, version: str,
                  needed: Sequence[str]) -> CheckResult:
    """An optional record: a TXT starting with ``version`` that has the ``needed`` tags."""
    kind, name, want = record.kind, record.name, [record.zone()]
    texts = [t.decode("utf-8", "replace") for t in lookup.txt(name)]
    found = [t for t in texts if t.replace(" ", "").lower().startswith(version.lower())]
    if not found:
        return CheckResult(kind, name, MISSING, f"no {kind} record", want,
                           required=False)
    tags = _tags(found[0])
    absent = [tag for tag in needed if not tags.get(tag)]
    if len(found) > 1 or absent:
        what = (f"{len(found)} records" if len(found) > 1
                else f'"{found[0]}" lacks {", ".join(absent)}=')
        return CheckResult(kind, name, WRONG, what, want, required=False)
    return CheckResult(kind, name, OK, f'"{found[0]}"', required=False)
