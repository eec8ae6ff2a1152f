"""ARC sealing of forwarded mail, verified by dkimpy against keys in the loopback test DNS."""

from __future__ import annotations

import logging
import re

import dkim
import pytest
from dkim.util import parse_tag_value

from mailrelay.config import DNSSettings
from mailrelay.message.arc import arc_seal
from mailrelay.message.dkim.keys import load_key
from mailrelay.message.dkim.signer import DKIMKey, sign
from mailrelay.policy.authres import check_message
from tests.support.dkim_dns import dnsfunc_for, publish_new_key
from tests.support.dns_server import TestDNSServer
from tests.support.linear import assert_linear

AUTHSERV_ID = "mx.example.com"
ORIGINAL = (b"From: Alice <alice@sender.test>\r\nTo: me@example.com\r\nSubject: news\r\n"
            b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <1@sender.test>\r\n\r\n"
            b"Hello,\r\nthis gets forwarded.\r\n")


def new_key(server: TestDNSServer, tmp_path, domain: str, selector: str, algo: str) -> DKIMKey:
    path = publish_new_key(server, tmp_path / domain, domain, selector, algo)
    return load_key(path, domain, selector)


@pytest.fixture
def dns(dns_server: TestDNSServer) -> DNSSettings:
    return DNSSettings(nameservers=[dns_server.address], timeout=1.0)


@pytest.fixture
def received(dns_server: TestDNSServer, tmp_path, dns: DNSSettings) -> tuple[bytes, bytes]:
    """A message from sender.test as it arrived on port 25, with our results prepended."""
    dns_server.add("sender.test", "TXT", "v=spf1 ip4:127.0.0.1 -all")
    dns_server.add("_dmarc.sender.test", "TXT", "v=DMARC1; p=reject")
    author_key = new_key(dns_server, tmp_path, "sender.test", "s2024", "rsa2048")
    data = sign(ORIGINAL, [author_key]) + ORIGINAL
    results = check_message(data, client_ip="127.0.0.1", helo="mail.sender.test",
                            mail_from="bounce@sender.test", authserv_id=AUTHSERV_ID, dns=dns)
    assert (results.spf, results.dmarc) == ("pass", "pass")
    return results.header + data, results.header


def seal_tags(sealed: bytes) -> list[dict[str, str]]:
    fields = re.findall(rb"^ARC-Seal:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", sealed, re.MULTILINE)
    return [{k.decode(): v.decode() for k, v in parse_tag_value(f).items()} for f in fields]


def test_seal_verifies_and_keeps_the_dkim_signature(dns_server, tmp_path, dns, received) -> None:
    data, header = received
    forwarder = new_key(dns_server, tmp_path, "example.com", "arc1", "rsa2048")
    arc_set = arc_seal(data, key=forwarder, authserv_id=AUTHSERV_ID,
                       results_header_value=header, dns=dns, timestamp=1700000000)
    names = [line.split(b":")[0] for line in arc_set.split(b"\r\n") if line[:1] not in b" \t"]
    assert names == [b"ARC-Seal", b"ARC-Message-Signature", b"ARC-Authentication-Results"]
    sealed = arc_set + data
    cv, _results, reason = dkim.arc_verify(sealed, dnsfunc=dnsfunc_for(dns_server))
    assert cv == b"pass", reason
    [tags] = seal_tags(sealed)
    assert {k: v for k, v in tags.items() if k != "b"} == {
        "i": "1", "cv": "none", "a": "rsa-sha256", "d": "example.com", "s": "arc1",
        "t": "1700000000"}
    # The AAR carries what we saw on arrival.
    aar = re.search(rb"ARC-Authentication-Results:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)",
                    sealed).group(1)
    assert b"i=1; mx.example.com" in aar and b"dkim=pass" in aar and b"spf=pass" in aar
    # We only prepend: the author's signature still verifies.
    assert dkim.verify(sealed, dnsfunc=dnsfunc_for(dns_server))


def test_second_seal_extends_the_chain(dns_server, tmp_path, dns, received) -> None:
    data, header = received
    first = new_key(dns_server, tmp_path, "example.com", "arc1", "rsa2048")
    sealed = arc_seal(data, key=first, authserv_id=AUTHSERV_ID,
                      results_header_value=header, dns=dns) + data
    second = new_key(dns_server, tmp_path, "forward.test", "f1", "rsa2048")
    their_results = b"mx.forward.test; spf=fail smtp.mailfrom=example.com"
    twice = arc_seal(sealed, key=[second], authserv_id="MX.Forward.test",
                     results_header_value=their_results, dns=dns) + sealed
    cv, _results, reason = dkim.arc_verify(twice, dnsfunc=dnsfunc_for(dns_server))
    assert cv == b"pass", reason
    tags = seal_tags(twice)
    assert [(t["i"], t["cv"], t["d"]) for t in tags] == [
        ("2", "pass", "forward.test"), ("1", "none", "example.com")]
    assert b"arc=pass" in twice  # the second AAR records the chain it validated
    assert dkim.verify(twice, dnsfunc=dnsfunc_for(dns_server))


def test_broken_chain_is_sealed_as_failed(dns_server, tmp_path, dns, received) -> None:
    data, header = received
    first = new_key(dns_server, tmp_path, "example.com", "arc1", "rsa2048")
    sealed = arc_seal(data, key=first, authserv_id=AUTHSERV_ID,
                      results_header_value=header, dns=dns) + data
    tampered = sealed.replace(b"this gets forwarded.", b"this was changed.")
    second = new_key(dns_server, tmp_path, "forward.test", "f1", "rsa2048")
    arc_set = arc_seal(tampered, key=second, authserv_id="mx.forward.test",
                       results_header_value="mx.forward.test; none", dns=dns)
    assert seal_tags(arc_set)[0]["cv"] == "fail"


def test_ed25519_only_domain_cannot_seal(dns_server, tmp_path, dns, received) -> None:
    data, header = received
    ed_key = new_key(dns_server, tmp_path, "example.com", "ed1", "ed25519")
    assert arc_seal(data, key=ed_key, authserv_id=AUTHSERV_ID,
                    results_header_value=header, dns=dns) == b""
    assert arc_seal(data, key=[ed_key], authserv_id=AUTHSERV_ID,
                    results_header_value=header, dns=dns) == b""


def test_the_rsa_key_of_a_domain_is_picked(dns_server, tmp_path, dns, received) -> None:
    data, header = received
    ed_key = new_key(dns_server, tmp_path, "example.com", "ed1", "ed25519")
    rsa_key = new_key(dns_server, tmp_path, "example.com", "rsa1", "rsa2048")
    arc_set = arc_seal(data, key=[ed_key, rsa_key], authserv_id=AUTHSERV_ID,
                       results_header_value=header.decode(), dns=dns)
    assert seal_tags(arc_set)[0]["s"] == "rsa1"
    cv, _, reason = dkim.arc_verify(arc_set + data, dnsfunc=dnsfunc_for(dns_server))
    assert cv == b"pass", reason


def test_existing_chain_needs_dns(dns_server, tmp_path, dns, received) -> None:
    data, header = received
    key = new_key(dns_server, tmp_path, "example.com", "arc1", "rsa2048")
    sealed = arc_seal(data, key=key, authserv_id=AUTHSERV_ID,
                      results_header_value=header, dns=dns) + data
    with pytest.raises(ValueError):
        arc_seal(sealed, key=key, authserv_id=AUTHSERV_ID, results_header_value=header)
    # DNS down while validating it: no seal rather than a wrong cv=.
    dns_server.set_down(True)
    assert arc_seal(sealed, key=key, authserv_id=AUTHSERV_ID,
                    results_header_value=header, dns=dns) == b""


def test_results_of_another_authserv_id_are_refused(dns_server, tmp_path, dns, received) -> None:
    data, _header = received
    key = new_key(dns_server, tmp_path, "example.com", "arc1", "rsa2048")
    with pytest.raises(ValueError):
        arc_seal(data, key=key, authserv_id=AUTHSERV_ID,
                 results_header_value="someone.else; spf=pass", dns=dns)


@pytest.mark.parametrize("chain", [
    # More sets than RFC 8617 allows (dkimpy validates each against all ARC fields)...
    b"".join(b"ARC-Seal: i=%d; a=rsa-sha256; cv=pass; d=x.test; s=s; b=AAAA\r\n" % i
             for i in range(51, 0, -1)),
    # ...or an ARC-Message-Signature naming more fields than we look up.
    b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=x.test; s=s; b=AAAA\r\n"
    b"ARC-Message-Signature: i=1; a=rsa-sha256; d=x.test; s=s; h="
    + b":".join(b"x-%d" % i for i in range(100)) + b"; bh=AAAA; b=AAAA\r\n"
    b"ARC-Authentication-Results: i=1; x.test; spf=pass\r\n",
])
def test_a_chain_beyond_the_caps_is_not_validated_or_sealed(dns_server, tmp_path, dns, received,
                                                             chain, caplog) -> None:
    data, header = received
    key = new_key(dns_server, tmp_path, "example.com", "arc1", "rsa2048")
    dns_server.set_down(True)  # not one lookup: the caps decide before dkimpy does
    caplog.set_level(logging.INFO, "mailrelay.arc")
    assert arc_seal(chain + data, key=key, authserv_id=AUTHSERV_ID,
                    results_header_value=header, dns=dns) == b""
    [line] = [r.getMessage() for r in caplog.records if r.name == "mailrelay.arc"]
    assert line.startswith("arc: not sealing: ")


def test_sealing_is_linear_in_folded_lines(dns_server, tmp_path, dns, received) -> None:
    # dkimpy parses the message for the seal (through authres.rfc822_parse: linear).
    data, header = received
    key = new_key(dns_server, tmp_path, "example.com", "arc1", "rsa2048")

    def folded(lines: int) -> bytes:
        return data.replace(b"Subject: news\r\n", b"Subject: news\r\n" + b" y\r\n" * lines)
    sealed = arc_seal(folded(3), key=key, authserv_id=AUTHSERV_ID,
                      results_header_value=header, dns=dns) + folded(3)
    assert dkim.arc_verify(sealed, dnsfunc=dnsfunc_for(dns_server))[0] == b"pass"
    assert_linear(lambda message: arc_seal(message, key=key, authserv_id=AUTHSERV_ID,
                                           results_header_value=header, dns=dns),
                  folded, 10_000, repeat=1, label="arc_seal, folded lines")
