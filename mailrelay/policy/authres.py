"""SPF, DKIM and DMARC checks of unauthenticated mail (port 25), recorded in an
Authentication-Results header field (RFC 8601) and turned into a reject decision.

The evaluators are libraries: pyspf for SPF, dkimpy for DKIM signatures. DMARC (RFC 7489)
is the small policy step on top of them, done here because authheaders' version reads
the public suffix list from disk on every call (~60 ms each, three per message), looks
at the first DKIM signature only and lets DNS errors escape. The organisational domain
comes from publicsuffix2 with a list loaded once from disk, never downloaded.

Every lookup goes to the configured nameservers (``DNSSettings``) through one blocking
dnspython resolver (the server's, sharing its cache), and all the lookups of one message
share one time budget. The checks block: run them in a thread.
"""

from __future__ import annotations

import contextvars
import ipaddress
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import dkim
import dns.exception
import dns.name
import dns.resolver
import spf
from dkim.util import InvalidTagValueList, parse_tag_value
from publicsuffix2 import PublicSuffixList

from ..config import DNSSettings
from ..dnsresolver import blocking_twin, make_resolver
from ..message.headers import addresses, get_all, parse_headers

log = logging.getLogger("mailrelay.authcheck")

MAX_DKIM_SIGNATURES = 10  # more is abuse: each costs a lookup and a hash of the body
_DEBIAN_PSL = Path("/usr/share/publicsuffix/public_suffix_list.dat")


@dataclass(frozen=True)
class AuthResults:
    spf: str  # pass | fail | softfail | neutral | none | temperror | permerror
    spf_domain: str  # MAIL FROM domain, or the HELO name when MAIL FROM is <>
    dkim: list[tuple[str, str, str]]  # (result, d=, s=) per signature; [] when unsigned
    dmarc: str  # pass | fail | none | temperror | permerror
    dmarc_policy: str | None  # none | quarantine | reject: the one that applies
    from_domain: str | None
    header: bytes  # a complete, folded Authentication-Results field ending in CRLF


# -- DNS -------------------------------------------------------------------------

class DNSTempError(Exception):
    """No answer from DNS (timeout, SERVFAIL, unreachable, time budget spent)."""


class DNSLookup:
    """Blocking lookups at the configured nameservers, all within one deadline."""

    def __init__(self, settings: DNSSettings, budget: float | None = None,
                 resolver: dns.resolver.Resolver | None = None):
        self.resolver = (resolver if resolver is not None
                         else blocking_twin(make_resolver(settings)))
        self.per_lookup = settings.timeout
        self.deadline = time.monotonic() + (2 * settings.timeout if budget is None else budget)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def resolve(self, name: str, rdtype: str, timeout: float | None = None
                ) -> dns.resolver.Answer | None:
        """The answer, or None when the name or the data does not exist."""
        left = self.remaining()
        if left <= 0:
            raise DNSTempError(f"{name}/{rdtype}: DNS time budget spent")
        lifetime = min(left, self.per_lookup, timeout or self.per_lookup)
        try:
            return self.resolver.resolve(name, rdtype, lifetime=lifetime, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            raise DNSTempError(f"{name}/{rdtype}: {exc}") from None
        except dns.exception.DNSException:
            return None  # a name that cannot exist (empty or too long label, ...)

    def txt(self, name: str) -> list[bytes]:
        """Each TXT record's character-strings joined (RFC 7208 3.3, RFC 6376 3.6.2.2)."""
        answer = self.resolve(name, "TXT")
        return [b"".join(rdata.strings) for rdata in answer] if answer is not None else []

    def dkim_dnsfunc(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        """dkimpy's ``dnsfunc``: the first TXT record, or None."""
        qname = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        records = self.txt(qname)
        return records[0] if records else None


# -- SPF (pyspf) -----------------------------------------------------------------

# pyspf looks up DNS through its module-level ``DNSLookup`` (its own tests replace it the
# same way); ours sends each query of the check in progress to that check's resolver.
_spf_lookup: contextvars.ContextVar[DNSLookup | None] = contextvars.ContextVar(
    "mailrelay_spf_lookup", default=None)
_PYSPF_LOOKUP = spf.DNSLookup_dnspython  # its default, named so a re-import cannot loop


def _pyspf_dns(name: str, qtype: str, strict: object = True, timeout: float = 20
               ) -> list[tuple[tuple[str, str], object]]:
    lookup = _spf_lookup.get()
    if lookup is None:  # somebody else's pyspf call: leave it alone
        return _PYSPF_LOOKUP(name, qtype, strict, timeout)
    try:
        answer = lookup.resolve(name, qtype, timeout)
    except DNSTempError as exc:
        raise spf.TempError(f"DNS {exc}") from None
    if answer is None:
        return []
    # The shapes pyspf's own dnspython driver returns.
    key = (name, qtype)
    if qtype in ("A", "AAAA"):
        return [(key, rdata.address) for rdata in answer]
    if qtype == "MX":
        return [(key, (rdata.preference, rdata.exchange.to_text(True))) for rdata in answer]
    if qtype == "PTR":
        return [(key, rdata.target.to_text(True)) for rdata in answer]
    if qtype in ("TXT", "SPF"):
        return [(key, rdata.strings) for rdata in answer]
    return []


spf.DNSLookup = _pyspf_dns


def _a_label(domain: str) -> str:
    domain = domain.rstrip(".").lower()
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def check_spf(lookup: DNSLookup, client_ip: str, helo: str, mail_from: str) -> tuple[str, str]:
    """(result, domain checked): MAIL FROM's domain, or HELO's for a null sender."""
    sender = mail_from.strip().strip("<>")
    # The identity pyspf checks: without an "@" (only <> in practice) that is HELO's.
    domain = _a_label(sender.rpartition("@")[2] if "@" in sender else helo.strip())
    if not domain:
        return "none", ""
    try:
        ip = ipaddress.ip_address(client_ip.split("%")[0])
    except ValueError:
        return "permerror", domain
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped  # a dual-stack socket's view of an IPv4 client
    token = _spf_lookup.set(lookup)
    try:
        budget = max(lookup.remaining(), 0.001)
        result, _explanation = spf.check2(i=str(ip), s=sender, h=helo.strip(),
                                          timeout=lookup.per_lookup, querytime=budget)
    except Exception:  # a pyspf bug must not turn into a rejection
        log.exception("spf: check of %s from %s failed", domain, ip)
        result = "temperror"
    finally:
        _spf_lookup.reset(token)
    return str(result), domain


# -- DKIM (dkimpy) ---------------------------------------------------------------

class QuietLogger(logging.LoggerAdapter):
    """For dkimpy, which logs every bad signature at ERROR: here that is an ordinary
    result, so it goes to DEBUG."""

    def log(self, level: int, msg: object, *args: object, **kwargs: object) -> None:
        super().log(logging.DEBUG, msg, *args, **kwargs)  # type: ignore[arg-type]


_DKIMPY_LOG = QuietLogger(logging.getLogger("mailrelay.authcheck.dkimpy"), {})


def check_dkim(lookup: DNSLookup, message: bytes) -> list[tuple[str, str, str]]:
    """(result, d=, s=) for each DKIM-Signature, top down (RFC 8601 2.7.1 results)."""
    end = message.find(b"\r\n\r\n")
    head = message[:end] if end >= 0 else message
    if b"dkim-signature" not in head.lower():
        return []  # unsigned: spare dkimpy's parse of the whole message
    try:
        verifier = dkim.DKIM(message, logger=_DKIMPY_LOG, minkey=1024,
                             timeout=lookup.per_lookup)
    except dkim.DKIMException:  # a header section dkimpy cannot parse (common in spam)
        signed = get_all(parse_headers(message), "DKIM-Signature")
        return [("neutral", "", "")] if signed else []
    signatures = [value for name, value in verifier.headers if name.lower() == b"dkim-signature"]
    return [_check_signature(lookup, verifier, index, value)
            for index, value in enumerate(signatures[:MAX_DKIM_SIGNATURES])]


def _check_signature(lookup: DNSLookup, verifier: dkim.DKIM, index: int, value: bytes
                     ) -> tuple[str, str, str]:
    try:
        tags = parse_tag_value(value)
    except InvalidTagValueList:
        return "neutral", "", ""
    domain = tags.get(b"d", b"").decode("ascii", "replace").lower()
    selector = tags.get(b"s", b"").decode("ascii", "replace")
    try:
        # Syntax, algorithm, expiry: "could not be processed" is neutral.
        dkim.validate_signature_fields(tags)
    except dkim.DKIMException:
        return "neutral", domain, selector
    key_name = f"{selector}._domainkey.{domain}"
    try:
        key = lookup.dkim_dnsfunc(key_name)
    except DNSTempError:
        return "temperror", domain, selector
    if key is None:
        return "permerror", domain, selector  # no key published
    try:
        dkim.evaluate_pk(key_name, key)
    except Exception:  # revoked (empty p=), unparsable, unknown k= or s=
        return "permerror", domain, selector
    try:
        valid = verifier.verify(idx=index, dnsfunc=lambda _name, timeout=5: key)
    except dkim.KeyFormatError:  # e.g. an RSA key below 1024 bits (RFC 8301)
        return "permerror", domain, selector
    except dkim.ValidationError:  # body hash mismatch
        return "fail", domain, selector
    except Exception:
        return "neutral", domain, selector
    return ("pass" if valid else "fail"), domain, selector


# -- DMARC (RFC 7489) ------------------------------------------------------------

_psl_lock = threading.Lock()
_psl_list: PublicSuffixList | None = None


def _psl() -> PublicSuffixList:
    """The list, built once (about a second): checks in several threads wait for it."""
    global _psl_list
    if _psl_list is None:
        with _psl_lock:
            if _psl_list is None:
                _psl_list = _load_psl()
    return _psl_list


def _load_psl() -> PublicSuffixList:
    # Debian's list (package "publicsuffix") is kept current by apt; otherwise the one
    # publicsuffix2 ships. Never fetched from the network.
    if _DEBIAN_PSL.is_file():
        try:
            return PublicSuffixList(str(_DEBIAN_PSL))
        except (OSError, ValueError) as exc:
            log.warning("dmarc: cannot read %s (%s); using the bundled list", _DEBIAN_PSL, exc)
    return PublicSuffixList()


def org_domain(domain: str) -> str:
    """The organisational domain (RFC 7489 3.2): one label below the public suffix."""
    domain = domain.lower().rstrip(".")
    labels = domain.split(".")
    # publicsuffix2 lacks the implicit "*" rule for TLDs not on the list (.test, .lan):
    # their public suffix is the last label, as the PSL algorithm says.
    suffix = _psl().get_tld(domain, strict=True) or labels[-1]
    size = suffix.count(".") + 2
    return ".".join(labels[-size:]) if len(labels) >= size else domain


class _BadRecord(Exception):
    pass


def _dmarc_record(lookup: DNSLookup, domain: str) -> dict[str, str] | None:
    """The tags of the one DMARC record at ``_dmarc.<domain>``, or None (RFC 7489 6.6.3:
    none or several records mean no policy)."""
    found = []
    for text in lookup.txt(f"_dmarc.{domain}"):
        tags = _parse_dmarc(text.decode("ascii", "replace"))
        if tags is not None:
            found.append(tags)
    return found[0] if len(found) == 1 else None


def _parse_dmarc(text: str) -> dict[str, str] | None:
    """Tags of a record that starts with v=DMARC1; None for other TXT records."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, equals, value = part.partition("=")
        name = name.strip().lower()
        if not equals:
            if part.strip() and not tags:
                return None
            continue  # unknown or broken tags are ignored (RFC 7489 6.3)
        if not tags and (name != "v" or value.strip() != "DMARC1"):
            return None
        tags.setdefault(name, value.strip())
    if not tags:
        return None
    policy = tags.get("p", "").lower()
    if policy not in ("none", "quarantine", "reject"):
        if "rua" not in tags:
            raise _BadRecord(text)
        tags["p"] = "none"  # RFC 7489 6.6.3 step 6: a record with reports only
    return tags


_RANK = {"fail": 0, "temperror": 1, "permerror": 2, "pass": 3, "none": 4}
_STRENGTH = {"reject": 0, "quarantine": 1, "none": 2, None: 3}


def check_dmarc(lookup: DNSLookup, from_domains: list[str], spf_result: str, spf_domain: str,
                dkim_results: list[tuple[str, str, str]]) -> tuple[str, str | None, str | None]:
    """(result, policy, From domain). Several From domains (RFC 7489 6.6.1): the worst."""
    if not from_domains:
        return "permerror", None, None
    outcomes = [(*_dmarc_one(lookup, domain, spf_result, spf_domain, dkim_results), domain)
                for domain in dict.fromkeys(from_domains)]
    return min(outcomes, key=lambda o: (_RANK[o[0]], _STRENGTH[o[1]]))


def _dmarc_one(lookup: DNSLookup, domain: str, spf_result: str, spf_domain: str,
               dkim_results: list[tuple[str, str, str]]) -> tuple[str, str | None]:
    organisation = org_domain(domain)
    try:
        record = _dmarc_record(lookup, domain)
        inherited = record is None and organisation != domain
        if inherited:
            record = _dmarc_record(lookup, organisation)
    except DNSTempError:
        return "temperror", None
    except _BadRecord:
        return "permerror", None
    if record is None:
        return "none", None
    policy = record["p"].lower()
    if inherited and record.get("sp", "").lower() in ("none", "quarantine", "reject"):
        policy = record["sp"].lower()
    pct = record.get("pct", "100")
    if pct.isdigit() and int(pct) < 100:
        # Sampled policy: a message "not selected" gets the next weaker one (6.6.4); we
        # never select, so partial rollouts never lose mail here.
        policy = {"reject": "quarantine", "quarantine": "none"}.get(policy, policy)

    def aligned(other: str, mode: str) -> bool:
        other = other.lower().rstrip(".")
        if mode.lower() == "s":
            return other == domain
        return org_domain(other) == organisation

    if spf_result == "pass" and aligned(spf_domain, record.get("aspf", "r")):
        return "pass", policy
    if any(result == "pass" and aligned(d, record.get("adkim", "r"))
           for result, d, _ in dkim_results):
        return "pass", policy
    if spf_result == "temperror" or any(result == "temperror" for result, _, _ in dkim_results):
        return "temperror", policy  # it might have passed: never reject on DNS trouble
    return "fail", policy


def from_domains(message: bytes) -> list[str]:
    """The domains of the From: addresses, as A-labels; [] when there is none usable."""
    domains = []
    for address in addresses(get_all(parse_headers(message), "From")):
        domain = _a_label(address.rpartition("@")[2].strip())
        if domain and domain.isascii():
            domains.append(domain)
    return domains


# -- the whole check ---------------------------------------------------------------

def check_message(message: bytes, *, client_ip: str, helo: str, mail_from: str,
                  authserv_id: str, dns: DNSSettings, timeout: float | None = None,
                  resolver: dns.resolver.Resolver | None = None) -> AuthResults:
    """SPF, DKIM and DMARC of one message. ``timeout`` bounds all its DNS lookups together
    (default: twice ``dns.timeout``); a lookup without answer in time is a temperror.
    ``resolver``: a (caching) resolver to share between checks; else a new one."""
    lookup = DNSLookup(dns, timeout, resolver)
    spf_result, spf_domain = check_spf(lookup, client_ip, helo, mail_from)
    try:
        dkim_results = check_dkim(lookup, message)
    except Exception:  # e.g. a message dkimpy cannot parse
        log.exception("dkim: verification failed")
        dkim_results = [("temperror", "", "")]
    dmarc, policy, from_domain = check_dmarc(lookup, from_domains(message), spf_result,
                                             spf_domain, dkim_results)
    null_sender = "@" not in mail_from  # then SPF checked the HELO identity
    header = format_header(authserv_id, spf_result, spf_domain, null_sender, dkim_results,
                           dmarc, policy, from_domain)
    return AuthResults(spf_result, spf_domain, dkim_results, dmarc, policy, from_domain, header)


def decide(
    results: AuthResults, *, reject_spf: bool = True, reject_dmarc: bool = True
) -> str | None:
    """The SMTP reply rejecting the message, or None to accept it.

    An SPF fail is forgiven when DMARC passes (an aligned DKIM signature): RFC 7489 10.1
    warns that rejecting on SPF before DMARC loses mail relayed by forwarders. DNS
    trouble (temperror) never rejects.
    """
    if reject_spf and results.spf == "fail" and results.dmarc != "pass":
        return f"550 5.7.23 SPF validation failed for {results.spf_domain}"
    if reject_dmarc and results.dmarc == "fail" and results.dmarc_policy == "reject":
        return f"550 5.7.1 DMARC policy of {results.from_domain} rejects this message"
    return None


# -- Authentication-Results ----------------------------------------------------------

# RFC 2045 token: what a property value may be without quotes (RFC 8601 2.2).
_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~\x80-\U0010ffff]+")


def _value(text: str) -> str:
    if _TOKEN.fullmatch(text):  # the usual case; a token has no control characters
        return text
    text = "".join(ch for ch in text if ch >= " " and ch != "\x7f")
    if _TOKEN.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_header(authserv_id: str, spf_result: str, spf_domain: str, null_sender: bool,
                  dkim_results: list[tuple[str, str, str]], dmarc: str, policy: str | None,
                  from_domain: str | None) -> bytes:
    """The field, one result per line (RFC 8601 2.2)."""
    parts = [f"spf={spf_result}"]
    if spf_domain:
        # The domain only: RFC 8601 2.7.2 advises against the local part.
        parts[0] += f" smtp.{'helo' if null_sender else 'mailfrom'}={_value(spf_domain)}"
    for result, domain, selector in dkim_results or [("none", "", "")]:
        clause = f"dkim={result}"
        if domain:
            clause += f" header.d={_value(domain)}"
        if selector:
            clause += f" header.s={_value(selector)}"
        parts.append(clause)
    clause = f"dmarc={dmarc}"
    if policy:
        clause += f" (p={policy})"
    if from_domain:
        clause += f" header.from={_value(from_domain)}"
    parts.append(clause)
    text = f"Authentication-Results: {_value(authserv_id)};\r\n\t" + ";\r\n\t".join(parts)
    return (text + "\r\n").encode("utf-8")


_LINE = re.compile(rb"[^\n]*\n|[^\n]+")


def strip_our_authentication_results(message: bytes, authserv_id: str) -> bytes:
    """The message without the Authentication-Results fields that carry our authserv-id:
    ones that arrive from outside are forged (RFC 8601 5). Other bytes are untouched."""
    ours = authserv_id.lower()
    kept: list[bytes] = []
    dropping = False
    position = 0
    for match in _LINE.finditer(message):
        line = match.group()
        position = match.end()
        if line in (b"\r\n", b"\n"):  # end of the header section
            kept.append(line)
            break
        if line[:1] in (b" ", b"\t"):  # a continuation line belongs to its field
            if not dropping:
                kept.append(line)
            continue
        name, colon, rest = line.partition(b":")
        dropping = (bool(colon) and name.strip().lower() == b"authentication-results"
                    and _authserv_id(rest, message[position:]) == ours)
        if not dropping:
            kept.append(line)
    else:
        position = len(message)
    return b"".join(kept) + message[position:]


def _authserv_id(first_line: bytes, following: bytes) -> str:
    """The authserv-id of a field value: after any comments, a token or quoted-string."""
    value = first_line
    for line in _LINE.findall(following):  # unfold
        if line[:1] not in (b" ", b"\t"):
            break
        value += line
    text = value.decode("utf-8", "replace")
    index, depth = 0, 0
    while index < len(text):  # skip whitespace and (nested) comments
        ch = text[index]
        if ch == "(":
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
        elif ch == "\\" and depth:
            index += 1
        elif depth == 0 and not ch.isspace():
            break
        index += 1
    text = text[index:]
    if text.startswith('"'):
        match = re.match(r'"((?:[^"\\]|\\.)*)"', text)
        return re.sub(r"\\(.)", r"\1", match.group(1)).lower() if match else ""
    return re.split(r"[\s;(]", text, maxsplit=1)[0].lower()
