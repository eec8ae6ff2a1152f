"""SPF, DKIM and DMARC of inbound mail against the loopback test DNS (no mocked DNS)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import authres
import dkim
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailrelay.config import DNSSettings
from mailrelay.dnsresolver import blocking_twin, make_resolver
from mailrelay.message.dkim.keys import load_key
from mailrelay.message.dkim.signer import DKIMKey, sign
from mailrelay.policy.authres import (
    DKIMPY_RFC822_PARSE,
    MAX_SIGNED_NAMES,
    DNSLookup,
    check_message,
    decide,
    org_domain,
    rfc822_parse,
    strip_our_authentication_results,
)
from tests.support.dkim_dns import publish_new_key
from tests.support.dns_server import TestDNSServer
from tests.support.linear import assert_linear

AUTHSERV_ID = "mx.example.com"


@dataclass
class World:
    server: TestDNSServer
    dns: DNSSettings
    sender_key: DKIMKey

    def check(self, message: bytes, *, client_ip: str = "127.0.0.1", helo: str = "mail.test",
              mail_from: str = "bounce@sender.test"):
        return check_message(message, client_ip=client_ip, helo=helo, mail_from=mail_from,
                             authserv_id=AUTHSERV_ID, dns=self.dns)


@pytest.fixture
def world(dns_server: TestDNSServer, tmp_path) -> World:
    dns_server.add("sender.test", "TXT", "v=spf1 ip4:127.0.0.1 -all")
    dns_server.add("_dmarc.sender.test", "TXT", "v=DMARC1; p=reject")
    dns_server.add("soft.test", "TXT", "v=spf1 ip4:192.0.2.1 ~all")
    dns_server.add("strict.test", "TXT", "v=spf1 ip4:192.0.2.1 -all")
    dns_server.add("_dmarc.strict.test", "TXT", "v=DMARC1; p=reject; adkim=s; aspf=s")
    dns_server.add("other.test", "TXT", "v=spf1 ip4:127.0.0.1 -all")
    dns_server.add("org.test", "TXT", "v=spf1 -all")
    dns_server.add("_dmarc.org.test", "TXT", "v=DMARC1; p=reject; sp=quarantine")
    dns_server.add("mx.helo.test", "TXT", "v=spf1 ip4:127.0.0.1 -all")
    path = publish_new_key(dns_server, tmp_path / "sender.test", "sender.test", "sel1", "rsa2048")
    key = load_key(path, "sender.test", "sel1")
    dns = DNSSettings(nameservers=[dns_server.address], timeout=1.0)
    return World(dns_server, dns, key)


def message(from_addr: str = "Alice <alice@sender.test>", body: bytes = b"Hello.\r\n") -> bytes:
    return (f"From: {from_addr}\r\nTo: bob@example.com\r\nSubject: test\r\n"
            "Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <1@sender.test>\r\n\r\n"
            ).encode() + body


def signed(key: DKIMKey, data: bytes) -> bytes:
    return sign(data, [key]) + data


def parse_header(header: bytes) -> authres.core.AuthenticationResultsHeader:
    assert header.endswith(b"\r\n")
    assert all(len(line) <= 78 for line in header.split(b"\r\n"))
    unfolded = re.sub(rb"\r\n[ \t]+", b" ", header).decode().rstrip("\r\n")
    return authres.all_features().parse(unfolded)


def results_of(header: bytes) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for result in parse_header(header).results:
        found.setdefault(result.method, []).append(result.result)
    return found


# -- SPF ---------------------------------------------------------------------------

def test_spf_pass(world: World) -> None:
    results = world.check(signed(world.sender_key, message()))
    assert (results.spf, results.spf_domain) == ("pass", "sender.test")
    assert decide(results) is None
    header = parse_header(results.header)
    assert header.authserv_id == AUTHSERV_ID
    spf = next(r for r in header.results if r.method == "spf")
    assert spf.smtp_mailfrom == "sender.test"


def test_spf_fail_rejects(world: World) -> None:
    results = world.check(message(), client_ip="127.0.0.9")
    assert results.spf == "fail"
    reply = decide(results)
    assert reply is not None and reply.startswith("550 5.7.23 ")
    assert "sender.test" in reply


def test_spf_fail_forgiven_when_dmarc_passes(world: World) -> None:
    # A forwarder that keeps the author's envelope: SPF fails, the aligned DKIM
    # signature makes DMARC pass (RFC 7489 10.1), so the mail is not lost.
    results = world.check(signed(world.sender_key, message()), client_ip="127.0.0.9")
    assert (results.spf, results.dmarc) == ("fail", "pass")
    assert decide(results) is None


def test_softfail_is_recorded_not_rejected(world: World) -> None:
    results = world.check(message("carol@soft.test"), mail_from="carol@soft.test")
    assert results.spf == "softfail"
    assert decide(results) is None
    assert results_of(results.header)["spf"] == ["softfail"]


def test_helo_is_checked_for_the_null_sender(world: World) -> None:
    results = world.check(message("MAILER-DAEMON@mx.helo.test"), helo="mx.helo.test",
                          mail_from="")
    assert (results.spf, results.spf_domain) == ("pass", "mx.helo.test")
    spf = next(r for r in parse_header(results.header).results if r.method == "spf")
    assert spf.smtp_helo == "mx.helo.test"
    bad = world.check(message(), client_ip="127.0.0.9", helo="mx.helo.test", mail_from="<>")
    assert (bad.spf, bad.spf_domain) == ("fail", "mx.helo.test")


def test_no_spf_record(world: World) -> None:
    results = world.check(message("x@nowhere.test"), mail_from="x@nowhere.test")
    assert (results.spf, results.dmarc) == ("none", "none")
    assert decide(results) is None


# -- DKIM --------------------------------------------------------------------------

def test_dkim_pass_and_unsigned(world: World) -> None:
    results = world.check(signed(world.sender_key, message()))
    assert results.dkim == [("pass", "sender.test", "sel1")]
    dkim = next(r for r in parse_header(results.header).results if r.method == "dkim")
    assert (dkim.header_d, dkim.header_s) == ("sender.test", "sel1")
    unsigned = world.check(message())
    assert unsigned.dkim == []
    assert results_of(unsigned.header)["dkim"] == ["none"]


def test_dkim_fail_on_tampered_body(world: World) -> None:
    data = signed(world.sender_key, message()).replace(b"Hello.", b"Hello!")
    results = world.check(data, client_ip="127.0.0.9")
    assert results.dkim == [("fail", "sender.test", "sel1")]
    assert results.dmarc == "fail"


def test_dkim_ed25519_and_several_signatures(world: World, tmp_path) -> None:
    path = publish_new_key(world.server, tmp_path / "ed", "sender.test", "ed1", "ed25519")
    ed_key = load_key(path, "sender.test", "ed1")
    data = message()
    data = sign(data, [world.sender_key, ed_key]) + data
    results = world.check(data)
    assert results.dkim == [("pass", "sender.test", "sel1"), ("pass", "sender.test", "ed1")]
    assert results_of(results.header)["dkim"] == ["pass", "pass"]


def test_dkim_missing_key_is_permerror(world: World) -> None:
    world.server.remove("sel1._domainkey.sender.test")
    results = world.check(signed(world.sender_key, message()))
    assert results.dkim == [("permerror", "sender.test", "sel1")]


def test_dkim_of_a_header_section_dkimpy_cannot_parse(world: World) -> None:
    data = signed(world.sender_key, message())
    broken = data.replace(b"Subject: test\r\n", b"Subject: test\r\nno colon here\r\n")
    assert world.check(broken).dkim == [("neutral", "", "")]
    unsigned = message().replace(b"Subject: test\r\n", b"Subject: test\r\nno colon here\r\n")
    results = world.check(unsigned)
    assert (results.dkim, results.spf, results.dmarc) == ([], "pass", "pass")


def test_dkim_of_a_long_folded_header_is_linear(world: World) -> None:
    # dkimpy's own parser appended each continuation line to its field (quadratic); ours
    # replaces it for every dkimpy call.
    def folded(lines: int) -> bytes:
        data = message().replace(b"Subject: test\r\n",
                                 b"Subject: test\r\n" + b" y\r\n" * lines)
        return signed(world.sender_key, data)
    assert world.check(folded(3)).dkim == [("pass", "sender.test", "sel1")]
    lookup = DNSLookup(world.dns, budget=60)
    assert_linear(lambda data: dkim.DKIM(data).verify(dnsfunc=lookup.dkim_dnsfunc), folded,
                  10_000, label="dkimpy verify, folded lines")


def test_a_signature_naming_too_many_fields_is_not_checked(world: World) -> None:
    data = message()
    names = ":".join(f"x-{i}" for i in range(MAX_SIGNED_NAMES))
    forged = signed(world.sender_key, data).replace(b"h=", f"h={names}:".encode(), 1)
    assert world.check(forged).dkim == [("policy", "sender.test", "sel1")]


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.tuples(
    st.sampled_from([b"A: 1", b"B:2", b" c", b"\tz", b"", b"From x", b"bad", b"\r", b"x:y:z",
                     b" ", b"C :d", b"D:\re"]),
    st.sampled_from([b"\r\n", b"\n"])), max_size=8), st.integers(0, 2))
def test_rfc822_parse_gives_what_dkimpys_gives(lines, cut) -> None:
    data = b"".join(line + end for line, end in lines)
    data = data[:len(data) - cut] if cut and data else data
    try:
        expected = DKIMPY_RFC822_PARSE(data)
    except (dkim.MessageFormatError, IndexError):
        with pytest.raises(dkim.MessageFormatError):
            rfc822_parse(data)
        return
    assert rfc822_parse(data) == expected


def test_dkimpy_parses_through_ours() -> None:
    assert dkim.rfc822_parse is rfc822_parse


# -- DMARC -------------------------------------------------------------------------

def test_dmarc_pass_through_spf_alignment(world: World) -> None:
    results = world.check(message("Alice <alice@news.sender.test>"))
    assert (results.dmarc, results.dmarc_policy, results.from_domain) == (
        "pass", "reject", "news.sender.test")
    dmarc = next(r for r in parse_header(results.header).results if r.method == "dmarc")
    assert dmarc.header_from == "news.sender.test"


def test_dmarc_fail_with_reject_policy(world: World) -> None:
    # Envelope from a domain whose SPF passes, From: a domain it does not align with.
    results = world.check(message("ceo@strict.test"), mail_from="x@other.test")
    assert (results.spf, results.dmarc, results.dmarc_policy) == ("pass", "fail", "reject")
    reply = decide(results)
    assert reply is not None and reply.startswith("550 5.7.1 ")
    assert "strict.test" in reply
    assert decide(results, reject_dmarc=False) is None


def test_dmarc_strict_alignment(world: World, tmp_path) -> None:
    path = publish_new_key(world.server, tmp_path / "st", "strict.test", "s1", "rsa2048")
    key = load_key(path, "strict.test", "s1")
    aligned = world.check(signed(key, message("ceo@strict.test")), mail_from="x@other.test")
    assert aligned.dmarc == "pass"
    # adkim=s: d=strict.test does not align with a subdomain's From.
    sub = world.check(signed(key, message("ceo@mail.strict.test")), mail_from="x@other.test")
    assert (sub.dmarc, sub.dmarc_policy) == ("fail", "reject")


def test_dmarc_subdomain_policy(world: World) -> None:
    results = world.check(message("a@mail.org.test"), mail_from="x@other.test")
    assert (results.dmarc, results.dmarc_policy) == ("fail", "quarantine")
    assert decide(results) is None


def test_dmarc_several_from_domains_take_the_worst(world: World) -> None:
    data = signed(world.sender_key, message("alice@sender.test, ceo@strict.test"))
    results = world.check(data, mail_from="x@other.test")
    assert (results.dmarc, results.from_domain) == ("fail", "strict.test")


def test_dmarc_partial_rollout_never_rejects(world: World) -> None:
    world.server.add("pct.test", "TXT", "v=spf1 -all")
    world.server.add("_dmarc.pct.test", "TXT", "v=DMARC1; p=reject; pct=10")
    results = world.check(message("a@pct.test"), mail_from="x@other.test")
    assert (results.dmarc, results.dmarc_policy) == ("fail", "quarantine")
    assert decide(results) is None


def test_org_domain_uses_the_public_suffix_list() -> None:
    assert org_domain("a.b.sender.test") == "sender.test"
    assert org_domain("mail.example.co.uk") == "example.co.uk"
    assert org_domain("x.y.github.io") == "y.github.io"


# -- DNS trouble -------------------------------------------------------------------

def test_servfail_is_temperror(world: World) -> None:
    for name in ("sender.test", "_dmarc.sender.test", "sel1._domainkey.sender.test"):
        world.server.set_servfail(name)
    start = time.monotonic()
    results = world.check(signed(world.sender_key, message()), client_ip="127.0.0.9")
    assert time.monotonic() - start < 1.0
    assert results.spf == "temperror"
    assert results.dkim == [("temperror", "sender.test", "sel1")]
    assert results.dmarc == "temperror"
    assert decide(results) is None


def test_dns_down_is_temperror_within_bounded_time(world: World) -> None:
    world.server.set_down(True)
    start = time.monotonic()
    results = world.check(signed(world.sender_key, message()), client_ip="127.0.0.9")
    elapsed = time.monotonic() - start
    # One time budget for the whole message: twice the DNS timeout (1 s here).
    assert elapsed < 3.0
    assert (results.spf, results.dmarc) == ("temperror", "temperror")
    assert results.dkim == [("temperror", "sender.test", "sel1")]
    assert decide(results) is None
    assert parse_header(results.header).authserv_id == AUTHSERV_ID


# -- forged Authentication-Results ---------------------------------------------------

def test_strip_our_authentication_results() -> None:
    data = (b"Received: from x\r\n"
            b"Authentication-Results: mx.example.com; spf=pass\r\n"
            b"Authentication-Results: other.example; dkim=fail\r\n"
            b"authentication-results : (forged) MX.Example.COM;\r\n"
            b"\tdkim=pass header.d=bank.test\r\n"
            b"Authentication-Results: \"mx.example.com\" 1; dmarc=pass\r\n"
            b"Authentication-Results: mx.example.com.evil; spf=pass\r\n"
            b"Subject: hi\r\n\r\n"
            b"Authentication-Results: mx.example.com; this is the body\r\n")
    assert strip_our_authentication_results(data, "mx.example.com") == (
        b"Received: from x\r\n"
        b"Authentication-Results: other.example; dkim=fail\r\n"
        b"Authentication-Results: mx.example.com.evil; spf=pass\r\n"
        b"Subject: hi\r\n\r\n"
        b"Authentication-Results: mx.example.com; this is the body\r\n")
    lf = b"Authentication-Results: mx.example.com; spf=pass\nSubject: x\n\nbody"
    assert strip_our_authentication_results(lf, "MX.example.com") == b"Subject: x\n\nbody"
    untouched = b"Subject: x\r\n\r\nbody"
    assert strip_our_authentication_results(untouched, "mx.example.com") == untouched


@pytest.mark.parametrize("field", [
    b"Authentication-Results: mx.example.com.; spf=pass\r\n",  # trailing dot
    b"Authentication-Results: MX.EXAMPLE.COM.;\r\n\tspf=pass\r\n",
    b'Authentication-Results: "mx.example.com."; spf=pass\r\n',  # quoted
    b'Authentication-Results: "mx\\.example\\.com" 1; spf=pass\r\n',  # quoted-pairs
    b"Authentication-Results: (a (nested) comment)\r\n mx.example.com; spf=pass\r\n",
    b"Authentication-Results:mx.example.com(comment);spf=pass\r\n",
    b"ARC-Authentication-Results: i=1; mx.example.com; spf=pass\r\n",
    b"arc-authentication-results : i = 2 ;\r\n\t(x) Mx.Example.Com.; dkim=pass\r\n",
    b'ARC-Authentication-Results: i=1; "mx.example.com"; spf=pass\r\n',
])
def test_every_form_of_our_authserv_id_is_stripped(field: bytes) -> None:
    kept = (b"Authentication-Results: other.example; spf=pass\r\n"
            b"ARC-Authentication-Results: i=1; other.example; spf=pass\r\n"
            b"ARC-Authentication-Results: i=2; mx.example.com.evil; spf=pass\r\n")
    data = b"Received: from x\r\n" + field + kept + b"Subject: hi\r\n\r\nbody\r\n"
    expected = b"Received: from x\r\n" + kept + b"Subject: hi\r\n\r\nbody\r\n"
    assert strip_our_authentication_results(data, "mx.example.com", arc=True) == expected


def test_arc_results_of_ours_stay_unless_asked() -> None:
    # arc.arc_seal strips only plain Authentication-Results: the chain it extends keeps
    # its ARC-Authentication-Results.
    data = b"ARC-Authentication-Results: i=1; mx.example.com; spf=pass\r\n\r\nbody"
    assert strip_our_authentication_results(data, "mx.example.com") == data
    assert strip_our_authentication_results(data, "mx.example.com", arc=True) == b"\r\nbody"


def test_strip_is_linear_in_the_number_of_results_fields() -> None:
    # Each field's authserv-id used to be read by scanning the rest of the message: 20,000
    # fields took 19 s.
    def fields(n: int) -> bytes:
        return (b"Authentication-Results: other.test; spf=pass\r\n"
                b"Authentication-Results: mx.example.com; spf=pass\r\n") * n + b"\r\nbody"
    assert strip_our_authentication_results(fields(2), "mx.example.com").count(b"mx.") == 0
    assert_linear(lambda data: strip_our_authentication_results(data, "mx.example.com"),
                  fields, 500, label="strip_our_authentication_results, fields")


def test_strip_is_linear_in_folded_lines_and_comments() -> None:
    def folded(n: int) -> bytes:
        return (b"Authentication-Results: (" + b"\r\n (x\\()" * n + b")\r\n mx.example.com;"
                b"\r\nSubject: s\r\n" + b" y\r\n" * n + b"\r\nbody")
    assert b"mx.example.com" not in strip_our_authentication_results(folded(3),
                                                                     "mx.example.com")
    assert_linear(lambda data: strip_our_authentication_results(data, "mx.example.com"),
                  folded, 5_000, label="strip_our_authentication_results, folded")


# -- the server's caching resolver, from a thread -----------------------------------

def test_caching_resolver_asks_once_per_ttl_also_for_names_that_do_not_exist(
        world: World) -> None:
    resolver = blocking_twin(make_resolver(world.dns))
    for sender in ("bounce@sender.test", "x@nowhere.test"):
        for _ in range(3):
            check_message(message(), client_ip="127.0.0.1", helo="mail.test", mail_from=sender,
                          authserv_id=AUTHSERV_ID, dns=world.dns, resolver=resolver)
    assert world.server.queries.count(("sender.test", "TXT")) == 1
    assert world.server.queries.count(("_dmarc.sender.test", "TXT")) == 1
    # NXDOMAIN is kept for the SOA's minimum TTL (RFC 2308), like a positive answer.
    assert world.server.queries.count(("nowhere.test", "TXT")) == 1
