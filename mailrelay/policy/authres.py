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

from ..address import parse_ip
from ..config import DNSSettings
from ..dnsresolver import blocking_twin, make_resolver
from ..message.headers import (
    addresses,
    get_all,
    header_end,
    header_section,
    parse_headers,
)

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
    ip = parse_ip(client_ip)
    if ip is None:
        return "permerror", domain
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


# dkimpy's rfc822_parse appends each continuation line to its field's bytes (a copy of the
# field every time: quadratic in a field's lines; 1M folded lines took minutes) and splits
# the whole body into lines. This one returns the same (headers, body) in linear time;
# every dkimpy entry point (DKIM, ARC: verify and sign) parses through it. It raises
# dkimpy's MessageFormatError where dkimpy raised it, and also for a continuation line
# before any field (an IndexError in dkimpy).
_DKIMPY_FIELD_NAME = re.compile(rb"([\x21-\x7e]+?):")
_CRLF_LINE = re.compile(rb"\r?\n")


def rfc822_parse(message: bytes) -> tuple[list[list[bytes]], bytes]:
    """dkim.rfc822_parse, linear: ([[name, value with its CRLFs]...], body with CRLFs)."""
    end = header_end(message)
    if end is None:  # all header; a last line without its line break is one too
        head, rest = message, None
    else:
        lf = message.index(b"\n", end)  # the LF ending the last header line
        head = message[:lf + 1] if end else b""
        rest = message[lf + 1 + (2 if message[lf + 1:lf + 2] == b"\r" else 1):]
        if end == 0:  # the message starts with the empty line
            rest = message[2 if message.startswith(b"\r\n") else 1:]
    headers: list[list[bytes]] = []
    parts: list[list[bytes]] = []
    lines = _CRLF_LINE.split(head)
    if lines and lines[-1] == b"":
        lines.pop()
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if not parts:
                raise dkim.MessageFormatError("continuation line before any header field")
            parts[-1].append(line)
            continue
        match = _DKIMPY_FIELD_NAME.match(line)
        if match is not None:
            headers.append([match.group(1), b""])
            parts.append([line[match.end():]])
        elif not line.startswith(b"From "):
            raise dkim.MessageFormatError(f"Unexpected characters in RFC822 header: {line!r}")
    for field, lines_of in zip(headers, parts, strict=True):
        field[1] = b"\r\n".join(lines_of) + b"\r\n"
    if rest is None:
        return headers, b""
    if rest.count(b"\n") != rest.count(b"\r\n"):  # bare LFs become CRLF, as dkimpy does
        rest = _CRLF_LINE.sub(b"\r\n", rest)
    return headers, rest


DKIMPY_RFC822_PARSE = dkim.rfc822_parse  # its own, for the tests that compare the two
if getattr(DKIMPY_RFC822_PARSE, "__module__", "") == __name__:  # a re-import of this module
    DKIMPY_RFC822_PARSE = DKIMPY_RFC822_PARSE.__wrapped__  # type: ignore[attr-defined]
rfc822_parse.__wrapped__ = DKIMPY_RFC822_PARSE  # type: ignore[attr-defined]
dkim.rfc822_parse = rfc822_parse

# More names in one signature's h= than any signer uses; dkimpy looks each one up among
# all the fields (names x fields), so a signature listing 100,000 is refused unchecked.
MAX_SIGNED_NAMES = 100


def check_dkim(lookup: DNSLookup, message: bytes,
               fields: list[tuple[str, str]] | None = None) -> list[tuple[str, str, str]]:
    """(result, d=, s=) for each DKIM-Signature, top down (RFC 8601 2.7.1 results).
    ``fields``: the message's parsed header, when the caller has it."""
    head = header_section(message)
    if b"dkim-signature" not in head.lower():
        return []  # unsigned: spare dkimpy's parse of the whole message
    try:
        verifier = dkim.DKIM(message, logger=_DKIMPY_LOG, minkey=1024,
                             timeout=lookup.per_lookup)
    except dkim.DKIMException:  # a header section dkimpy cannot parse (common in spam)
        signed = get_all(fields if fields is not None else parse_headers(message),
                         "DKIM-Signature")
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
    if tags.get(b"h", b"").count(b":") >= MAX_SIGNED_NAMES:
        return "policy", domain, selector  # RFC 8601 2.7.1: not acceptable to us
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


def from_domains(message: bytes, fields: list[tuple[str, str]] | None = None) -> list[str]:
    """The domains of the From: addresses, as A-labels; [] when there is none usable.
    HeaderError for a From: over the caps of message.headers.addresses."""
    if fields is None:
        fields = parse_headers(message)
    domains = []
    for address in addresses(get_all(fields, "From"), "From:"):
        domain = _a_label(address.rpartition("@")[2].strip())
        if domain and domain.isascii():
            domains.append(domain)
    return domains


# -- the whole check ---------------------------------------------------------------

def check_message(message: bytes, *, client_ip: str, helo: str, mail_from: str,
                  authserv_id: str, dns: DNSSettings, timeout: float | None = None,
                  resolver: dns.resolver.Resolver | None = None,
                  fields: list[tuple[str, str]] | None = None) -> AuthResults:
    """SPF, DKIM and DMARC of one message. ``timeout`` bounds all its DNS lookups together
    (default: twice ``dns.timeout``); a lookup without answer in time is a temperror.
    ``resolver``: a (caching) resolver to share between checks; else a new one.
    ``fields``: the message's header as message.headers parsed it (else parsed here).
    HeaderError for a From: over the caps of message.headers.addresses."""
    if fields is None:
        fields = parse_headers(message)
    domains = from_domains(message, fields)  # before any lookup: it may refuse the message
    lookup = DNSLookup(dns, timeout, resolver)
    spf_result, spf_domain = check_spf(lookup, client_ip, helo, mail_from)
    try:
        dkim_results = check_dkim(lookup, message, fields)
    except Exception:  # a bug (dkimpy's or ours) must not cost the message
        log.exception("dkim: verification failed")
        dkim_results = [("temperror", "", "")]
    dmarc, policy, from_domain = check_dmarc(lookup, domains, spf_result,
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


# A raw field: a line (cut at LF, with its end) and its continuation lines; possessive,
# so a field of a million lines is one match without backtracking state.
_RAW_FIELD = re.compile(rb"(?:[^\n]*+\n|[^\n]++$)(?:[ \t][^\n]*+(?:\n|$))*+")
_RESULTS_FIELDS = (b"authentication-results", b"arc-authentication-results")
_NOT_SPACE = re.compile(r"\S")
_COMMENT_SPECIAL = re.compile(r"[()\\]")
_ARC_INSTANCE = re.compile(r"i[ \t]*=[ \t]*[0-9]+[ \t]*;", re.IGNORECASE)
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*+)"')


def strip_our_authentication_results(message: bytes, authserv_id: str, *,
                                     arc: bool = False) -> bytes:
    """The message without the Authentication-Results fields that carry our authserv-id:
    ones that arrive from outside are forged (RFC 8601 5). With ``arc``, also the
    ARC-Authentication-Results fields naming us (inbound mail: a forged ARC set in our
    name). Any case, a trailing dot, a quoted form and comments are all the same id.
    Other bytes are untouched; one pass over the header section (linear)."""
    end = header_end(message)
    # The header section with its last line's line break (all of it when no blank line).
    head_length = len(message) if end is None else message.index(b"\n", end) + 1
    head = message[:head_length]
    if b"authentication-results" not in head.lower():
        return message
    ours = _normal_id(authserv_id)
    names = _RESULTS_FIELDS if arc else _RESULTS_FIELDS[:1]
    kept = []
    for raw in _RAW_FIELD.findall(head):
        name, colon, value = raw.partition(b":")
        if colon and name.strip().lower() in names and _authserv_id(
                value, arc=name.strip().lower() == _RESULTS_FIELDS[1]) == ours:
            continue
        kept.append(raw)
    return b"".join(kept) + message[head_length:]


def _normal_id(authserv_id: str) -> str:
    return authserv_id.strip().rstrip(".").lower()


def _authserv_id(value: bytes, arc: bool = False) -> str:
    """The authserv-id of a field value: after any comments (and, in an ARC field, the
    instance tag ``i=N;``), a token or quoted-string; normalised for comparison. Only
    white space, parentheses and backslashes are visited one by one (linear)."""
    text = value.decode("utf-8", "replace").replace("\r\n", "").replace("\n", "")  # unfold
    index = _skip_cfws(text, 0)
    if arc:
        match = _ARC_INSTANCE.match(text, index)
        if match is None:
            return ""
        index = _skip_cfws(text, match.end())
    if text.startswith('"', index):
        match = _QUOTED.match(text, index)
        return _normal_id(re.sub(r"\\(.)", r"\1", match.group(1))) if match else ""
    return _normal_id(re.split(r"[\s;(]", text[index:index + 1024], maxsplit=1)[0])


def _skip_cfws(text: str, index: int) -> int:
    """The index past white space and (nested) comments from ``index``."""
    while True:
        match = _NOT_SPACE.search(text, index)
        if match is None:
            return len(text)
        index = match.start()
        if text[index] != "(":
            return index
        depth = 0
        for special in _COMMENT_SPECIAL.finditer(text, index):
            if special.start() < index:
                continue  # the character a backslash quoted
            char = special.group()
            if char == "\\":
                index = special.end() + 1
                continue
            depth += 1 if char == "(" else -1
            index = special.end()
            if depth == 0:
                break
        else:
            return len(text)  # a comment never closed runs to the end
