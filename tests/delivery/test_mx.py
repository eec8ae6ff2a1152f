"""MX resolution against a real DNS server on loopback, and that server itself."""

from __future__ import annotations

import random
import socket
import time

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from mailrelay.config import DNSSettings
from mailrelay.delivery.mx import MXHost, PermanentDNSError, TemporaryDNSError, resolve_mx
from mailrelay.dnsresolver import make_resolver
from tests.support.dns_server import TestDNSServer


@pytest.fixture
def resolver(dns_server: TestDNSServer):
    return make_resolver(DNSSettings(nameservers=[dns_server.address], timeout=2.0))


def add_mx(server: TestDNSServer, domain: str, *hosts: tuple[int, str, str]) -> None:
    for preference, name, ip in hosts:
        server.add(domain, "MX", (preference, name))
        server.add(name, "AAAA" if ":" in ip else "A", ip)


# -- resolve_mx ----------------------------------------------------------------


async def test_hosts_are_ordered_by_preference(dns_server, resolver):
    add_mx(dns_server, "remote.test", (20, "mx2.remote.test", "127.0.0.3"),
           (10, "mx1.remote.test", "127.0.0.2"), (30, "mx3.remote.test", "127.0.0.4"))
    hosts = await resolve_mx("remote.test", resolver)
    assert hosts == [
        MXHost("mx1.remote.test", 10, ("127.0.0.2",)),
        MXHost("mx2.remote.test", 20, ("127.0.0.3",)),
        MXHost("mx3.remote.test", 30, ("127.0.0.4",)),
    ]


async def test_equal_preferences_are_shuffled(dns_server, resolver):
    add_mx(dns_server, "remote.test", (10, "a.remote.test", "127.0.0.2"),
           (10, "b.remote.test", "127.0.0.3"), (20, "c.remote.test", "127.0.0.4"))
    orders = set()
    for seed in range(20):
        hosts = await resolve_mx("remote.test", resolver, rng=random.Random(seed))
        names = tuple(h.name for h in hosts)
        assert names[2] == "c.remote.test", "a worse preference never comes first"
        orders.add(names)
    assert orders == {
        ("a.remote.test", "b.remote.test", "c.remote.test"),
        ("b.remote.test", "a.remote.test", "c.remote.test"),
    }
    # The same seed gives the same order: the shuffle does not depend on answer order.
    first = await resolve_mx("remote.test", resolver, rng=random.Random(7))
    again = await resolve_mx("remote.test", resolver, rng=random.Random(7))
    assert first == again


async def test_no_mx_falls_back_to_the_domain_addresses(dns_server, resolver):
    dns_server.add("nomx.test", "A", "127.0.0.5")
    dns_server.add("nomx.test", "AAAA", "::1")
    assert await resolve_mx("nomx.test", resolver) == [MXHost("nomx.test", 0, ("::1", "127.0.0.5"))]


async def test_no_mx_and_no_address_is_permanent(dns_server, resolver):
    dns_server.add("textonly.test", "TXT", "v=spf1 -all")
    with pytest.raises(PermanentDNSError, match="no MX or address"):
        await resolve_mx("textonly.test", resolver)


async def test_null_mx_is_permanent(dns_server, resolver):
    dns_server.add("nullmx.test", "MX", (0, "."))
    with pytest.raises(PermanentDNSError, match=r"null MX"):
        await resolve_mx("nullmx.test", resolver)
    assert dns_server.queries == [("nullmx.test", "MX")], "no address lookups for a null MX"


async def test_dot_among_real_mx_hosts_is_ignored(dns_server, resolver):
    dns_server.add("odd.test", "MX", (0, "."))
    add_mx(dns_server, "odd.test", (10, "mx.odd.test", "127.0.0.2"))
    assert [h.name for h in await resolve_mx("odd.test", resolver)] == ["mx.odd.test"]


async def test_nxdomain_is_permanent(dns_server, resolver):
    with pytest.raises(PermanentDNSError, match="does not exist"):
        await resolve_mx("nowhere.test", resolver)


async def test_servfail_is_temporary(dns_server, resolver):
    add_mx(dns_server, "remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    dns_server.set_servfail("remote.test")
    with pytest.raises(TemporaryDNSError, match="DNS server failure"):
        await resolve_mx("remote.test", resolver)
    dns_server.set_servfail("remote.test", on=False)
    assert [h.name for h in await resolve_mx("remote.test", resolver)] == ["mx1.remote.test"]


async def test_unreachable_server_is_temporary_within_the_timeout(dns_server):
    resolver = make_resolver(DNSSettings(nameservers=[dns_server.address], timeout=0.5))
    add_mx(dns_server, "remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    dns_server.set_down(True)
    started = time.monotonic()
    with pytest.raises(TemporaryDNSError, match="timeout"):
        await resolve_mx("remote.test", resolver)
    assert time.monotonic() - started < 1.5
    assert ("remote.test", "MX") in dns_server.queries, "the query reached the server"


async def test_a_failing_mx_host_is_skipped(dns_server, resolver):
    add_mx(dns_server, "remote.test", (10, "mx1.remote.test", "127.0.0.2"),
           (20, "mx2.remote.test", "127.0.0.3"))
    dns_server.set_servfail("mx1.remote.test")
    assert await resolve_mx("remote.test", resolver) == [
        MXHost("mx2.remote.test", 20, ("127.0.0.3",))]


async def test_all_mx_hosts_failing_is_temporary(dns_server, resolver):
    add_mx(dns_server, "remote.test", (10, "mx1.remote.test", "127.0.0.2"),
           (20, "mx2.remote.test", "127.0.0.3"))
    dns_server.set_servfail("mx1.remote.test")
    dns_server.set_servfail("mx2.remote.test")
    with pytest.raises(TemporaryDNSError, match=r"mx1\.remote\.test"):
        await resolve_mx("remote.test", resolver)


async def test_mx_hosts_without_addresses_are_permanent(dns_server, resolver):
    dns_server.add("remote.test", "MX", (10, "gone.remote.test"))
    dns_server.add("remote.test", "MX", (20, "noaddr.remote.test"))
    dns_server.add("noaddr.remote.test", "TXT", "no address here")
    with pytest.raises(PermanentDNSError, match="have no address"):
        await resolve_mx("remote.test", resolver)


async def test_one_definite_and_one_temporary_failure_is_temporary(dns_server, resolver):
    dns_server.add("remote.test", "MX", (10, "gone.remote.test"))
    dns_server.add("remote.test", "MX", (20, "broken.remote.test"))
    dns_server.set_servfail("broken.remote.test")
    with pytest.raises(TemporaryDNSError):
        await resolve_mx("remote.test", resolver)


async def test_host_without_addresses_is_skipped(dns_server, resolver):
    dns_server.add("remote.test", "MX", (10, "gone.remote.test"))
    add_mx(dns_server, "remote.test", (20, "mx2.remote.test", "127.0.0.3"))
    assert [h.name for h in await resolve_mx("remote.test", resolver)] == ["mx2.remote.test"]


async def test_max_hosts_limits_the_lookups(dns_server, resolver):
    add_mx(dns_server, "remote.test",
           *[(10 * i, f"mx{i}.remote.test", f"127.0.0.{i + 1}") for i in range(1, 8)])
    hosts = await resolve_mx("remote.test", resolver, max_hosts=3)
    assert [h.name for h in hosts] == ["mx1.remote.test", "mx2.remote.test", "mx3.remote.test"]
    looked_up = {name for name, rtype in dns_server.queries if rtype == "A"}
    assert looked_up == {"mx1.remote.test", "mx2.remote.test", "mx3.remote.test"}


async def test_ipv6_and_ipv4_addresses_ipv6_first(dns_server, resolver):
    dns_server.add("remote.test", "MX", (10, "mx.remote.test"))
    dns_server.add("mx.remote.test", "A", "127.0.0.2")
    dns_server.add("mx.remote.test", "A", "127.0.0.3")
    dns_server.add("mx.remote.test", "AAAA", "::1")
    [host] = await resolve_mx("remote.test", resolver)
    assert host.addresses[0] == "::1"
    assert sorted(host.addresses[1:]) == ["127.0.0.2", "127.0.0.3"]
    assert {("mx.remote.test", "A"), ("mx.remote.test", "AAAA")} <= set(dns_server.queries)


async def test_cname_is_followed_for_the_host_addresses(dns_server, resolver):
    dns_server.add("remote.test", "MX", (10, "mx.remote.test"))
    dns_server.add("mx.remote.test", "CNAME", "real.hosting.test")
    dns_server.add("real.hosting.test", "A", "127.0.0.7")
    assert await resolve_mx("remote.test", resolver) == [
        MXHost("mx.remote.test", 10, ("127.0.0.7",))]


async def test_ip_literal_mx_is_ignored(dns_server, resolver):
    dns_server.add("remote.test", "MX", (5, "127.0.0.9"))
    add_mx(dns_server, "remote.test", (10, "mx.remote.test", "127.0.0.2"))
    assert [h.name for h in await resolve_mx("remote.test", resolver)] == ["mx.remote.test"]

    dns_server.add("literal.test", "MX", (10, "127.0.0.9"))
    with pytest.raises(PermanentDNSError):
        await resolve_mx("literal.test", resolver)


async def test_domain_is_normalised(dns_server, resolver):
    add_mx(dns_server, "remote.test", (10, "MX1.Remote.Test", "127.0.0.2"))
    hosts = await resolve_mx("Remote.TEST.", resolver)
    assert [h.name for h in hosts] == ["mx1.remote.test"]


async def test_duplicate_mx_names_keep_the_best_preference(dns_server, resolver):
    add_mx(dns_server, "remote.test", (20, "mx.remote.test", "127.0.0.2"))
    dns_server.add("remote.test", "MX", (10, "mx.remote.test"))
    assert await resolve_mx("remote.test", resolver) == [
        MXHost("mx.remote.test", 10, ("127.0.0.2",))]


async def test_invalid_domain_is_permanent(resolver):
    with pytest.raises(PermanentDNSError):
        await resolve_mx("a" * 64 + ".test", resolver)


def test_resolver_settings():
    resolver = make_resolver(DNSSettings(nameservers=[("127.0.0.1", 5353)], timeout=3.0))
    assert [(ns.address, ns.port) for ns in resolver.nameservers] == [("127.0.0.1", 5353)]
    assert resolver.lifetime == 3.0
    assert 0 < resolver.timeout < 3.0
    assert resolver.search == []

    system = make_resolver(DNSSettings(timeout=4.0))  # reads the system config, no query
    assert system.nameservers
    assert system.lifetime == 4.0
    assert system.search == []


# -- the test DNS server itself ------------------------------------------------


def query(server: TestDNSServer, name: str, rtype: str, tcp: bool = True) -> dns.message.Message:
    request = dns.message.make_query(name, rtype)
    send = dns.query.tcp if tcp else dns.query.udp
    return send(request, server.host, port=server.port, timeout=2)


def test_server_answers_over_tcp(dns_server):
    dns_server.add("Mail.Example.com", "A", "127.0.0.2")
    response = query(dns_server, "mail.example.COM", "A")
    assert response.rcode() == dns.rcode.NOERROR
    assert response.flags & dns.flags.AA
    [rrset] = response.answer
    assert [r.address for r in rrset] == ["127.0.0.2"]
    assert dns_server.queries == [("mail.example.com", "A")]


def test_server_negative_answers_over_tcp(dns_server):
    dns_server.add("x.test", "TXT", "hello")
    dns_server.add("deep.sub.y.test", "A", "127.0.0.1")

    nxdomain = query(dns_server, "nope.test", "A")
    assert nxdomain.rcode() == dns.rcode.NXDOMAIN
    assert nxdomain.authority[0].rdtype == dns.rdatatype.SOA

    no_answer = query(dns_server, "x.test", "A")
    assert no_answer.rcode() == dns.rcode.NOERROR
    assert no_answer.answer == []
    assert no_answer.authority[0].rdtype == dns.rdatatype.SOA

    empty_non_terminal = query(dns_server, "sub.y.test", "A")
    assert empty_non_terminal.rcode() == dns.rcode.NOERROR


def test_server_long_txt_is_split_and_truncated_over_udp(dns_server):
    value = "v=DKIM1; k=rsa; p=" + "A" * 600
    dns_server.add("sel._domainkey.example.com", "TXT", value)
    udp = query(dns_server, "sel._domainkey.example.com", "TXT", tcp=False)
    assert udp.flags & dns.flags.TC
    [rrset] = query(dns_server, "sel._domainkey.example.com", "TXT").answer
    [txt] = list(rrset)
    assert [len(s) for s in txt.strings] == [255, 255, len(value) - 510]
    assert b"".join(txt.strings).decode() == value


def test_server_several_queries_on_one_tcp_connection(dns_server):
    dns_server.add("1.0.0.127.in-addr.arpa", "PTR", "mail.example.com")
    dns_server.add("remote.test", "MX", (10, "mx1.remote.test"))
    with socket.create_connection(dns_server.address) as sock:
        ptr = dns.query.tcp(dns.message.make_query("1.0.0.127.in-addr.arpa", "PTR"), None,
                            timeout=2, sock=sock)
        mx = dns.query.tcp(dns.message.make_query("remote.test", "MX"), None,
                           timeout=2, sock=sock)
    assert ptr.answer[0][0].target.to_text() == "mail.example.com."
    assert mx.answer[0][0].exchange.to_text() == "mx1.remote.test."


def test_server_cname_servfail_remove_and_down(dns_server):
    dns_server.add("alias.test", "CNAME", "target.test")
    dns_server.add("target.test", "A", "127.0.0.8")
    answer = query(dns_server, "alias.test", "A").answer
    assert [rrset.rdtype for rrset in answer] == [dns.rdatatype.CNAME, dns.rdatatype.A]

    dns_server.set_servfail("target.test")
    assert query(dns_server, "target.test", "MX").rcode() == dns.rcode.SERVFAIL
    dns_server.set_servfail("target.test", on=False)

    dns_server.remove("target.test", "A")
    assert query(dns_server, "target.test", "A").rcode() == dns.rcode.NXDOMAIN

    dns_server.set_down(True)
    with pytest.raises(dns.exception.Timeout):
        dns.query.tcp(dns.message.make_query("alias.test", "A"), dns_server.host,
                      port=dns_server.port, timeout=0.3)
    with pytest.raises(dns.exception.Timeout):
        query_udp = dns.message.make_query("alias.test", "A")
        dns.query.udp(query_udp, dns_server.host, port=dns_server.port, timeout=0.3)


def test_server_on_ipv6_loopback():
    with TestDNSServer("::1") as server:
        server.add("v6.test", "AAAA", "::1")
        assert server.address == ("::1", server.port)
        response = query(server, "v6.test", "AAAA", tcp=False)
        assert [r.address for r in response.answer[0]] == ["::1"]
        assert query(server, "v6.test", "AAAA").answer[0][0].address == "::1"


async def test_a_resolver_where_nothing_listens_is_named_as_such():
    """Delivery logged "DNS timeout looking up MX records" when nothing listened on the
    resolver's port (`dns check` said "refused the connection"): the reply now names the
    resolver and the cause."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: nothing listens there
    resolver = make_resolver(DNSSettings(nameservers=[("127.0.0.1", port)], timeout=0.5))
    with pytest.raises(TemporaryDNSError) as raised:
        await resolve_mx("remote.test", resolver)
    assert str(raised.value) == (f"DNS timeout looking up MX records: the resolver "
                                 f"127.0.0.1:{port} refused the connection (nothing listens "
                                 "there)")


async def test_a_silent_resolver_is_named_too():
    """A resolver that takes the query and never answers (a firewall dropping it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        resolver = make_resolver(DNSSettings(nameservers=[("127.0.0.1", port)], timeout=0.5))
        with pytest.raises(TemporaryDNSError) as raised:
            await resolve_mx("remote.test", resolver)
    assert str(raised.value).startswith(f"DNS timeout looking up MX records: the resolver "
                                        f"127.0.0.1:{port} does not answer (nothing within ")
