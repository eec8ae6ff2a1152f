"""SPF, DKIM and DMARC of inbound mail against the loopback test DNS (no mocked DNS)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import authres
import pytest

from mailrelay.config import DNSSettings
from mailrelay.dnsresolver import blocking_twin, make_resolver
from mailrelay.message.dkim.keys import load_key
from mailrelay.message.dkim.signer import DKIMKey, sign
from mailrelay.policy.authres import (
    check_message,
    decide,
    org_domain,
    strip_our_authentication_results,
)
from tests.support.dkim_dns import publish_new_key
from tests.support.dns_server import TestDNSServer

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
