"""The server's DNS resolver: the system's nameservers, or those from the config.

One resolver and one cache serve the whole server: delivery asks it from the event loop
(``make_resolver``), the checks of inbound mail from a thread (``blocking_twin``). Mail
from one sender domain comes in bursts, and each message costs SPF and DMARC lookups;
answers are kept for their TTL (negative ones for the SOA's minimum, RFC 2308).
"""

from __future__ import annotations

import asyncio
import logging
import socket

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.resolver

from .config import DNSSettings, format_hostport

log = logging.getLogger("mailrelay.dns")

# Large enough for big MX/TXT sets over UDP, small enough to avoid IP fragmentation
# (the DNS flag day 2020 recommendation).
_EDNS_PAYLOAD = 1232
CACHE_SIZE = 10_000  # names: a bound on memory, far above what one owner's mail needs


def make_resolver(settings: DNSSettings) -> dns.asyncresolver.Resolver:
    """A caching resolver that answers within ``settings.timeout`` seconds per lookup."""
    if settings.nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(host, port) for host, port in settings.nameservers
        ]
    else:
        try:
            resolver = dns.asyncresolver.Resolver(configure=True)
        except dns.resolver.NoResolverConfiguration as exc:
            # What the C library does without a usable /etc/resolv.conf.
            log.warning("dns: no system resolver configuration (%s); using 127.0.0.1", exc)
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = ["127.0.0.1"]
    # Mail domains are always fully qualified: a search domain would turn a typo
    # into a delivery to some local host.
    resolver.search = []
    resolver.use_search_by_default = False
    resolver.domain = dns.name.root
    resolver.use_edns(0, 0, _EDNS_PAYLOAD)
    # The whole lookup is bounded by the configured timeout; each attempt gets a share
    # of it so a lost UDP packet is retransmitted and every server is tried at least once.
    resolver.lifetime = settings.timeout
    resolver.timeout = settings.timeout / (len(resolver.nameservers) + 1)
    resolver.cache = dns.resolver.LRUCache(CACHE_SIZE)  # thread-safe
    return resolver


def blocking_twin(resolver: dns.asyncresolver.Resolver) -> dns.resolver.Resolver:
    """A blocking resolver with the same servers, settings and cache, for threads."""
    twin = dns.resolver.Resolver(configure=False)
    twin.nameservers = resolver.nameservers
    twin.search = []
    twin.use_search_by_default = False
    twin.domain = dns.name.root
    twin.use_edns(resolver.edns, resolver.ednsflags, resolver.payload)
    twin.timeout = resolver.timeout
    twin.lifetime = resolver.lifetime
    twin.cache = resolver.cache
    return twin


def _servers(resolver: dns.resolver.BaseResolver) -> list[tuple[str, int]]:
    """(address, port) of each nameserver ``resolver`` asks."""
    found = []
    for server in getattr(resolver, "nameservers", ()):
        if isinstance(server, dns.nameserver.Do53Nameserver):
            found.append((server.address, server.port))
        elif isinstance(server, str):
            found.append((server, getattr(resolver, "port", 53)))
        else:
            found.append((str(server), getattr(resolver, "port", 53)))
    return found


def describe_resolver(resolver: dns.resolver.BaseResolver) -> str:
    """The nameservers of ``resolver`` in words: ``the resolver 127.0.0.1:5353``."""
    shown = ", ".join(format_hostport(host, port) for host, port in _servers(resolver))
    return f"the resolver {shown or 'none'}"


# What probe_nameserver finds wrong with a nameserver (None: it answers DNS).
NO_ANSWER = "no-answer"  # nothing within the timeout (or a firewall dropping queries)
REFUSED = "refused"  # ICMP port unreachable: nothing listens there
UNREACHABLE = "unreachable"  # the OS says why (detail)
NOT_DNS = "not-dns"  # an answer, but not a DNS message


def probe_nameserver(host: str, port: int, timeout: float) -> tuple[str, str] | None:
    """None when the nameserver at ``host``:``port`` answers DNS at all; else (what,
    detail), ``what`` one of NO_ANSWER, REFUSED, UNREACHABLE, NOT_DNS. Blocking.

    It is asked for the root's NS records, which a resolver has at hand. Any answer will
    do (a REFUSED one too: each lookup then says so at once); what is looked for is no
    answer at all, which costs each lookup its whole timeout. A connected UDP socket
    hears the ICMP "port unreachable" of an address where nothing listens, which the
    resolver's own lookups cannot tell from a lost packet."""
    query = dns.message.make_query(".", "NS")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0][0]
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            sock.connect((host, port))
            sock.send(query.to_wire())
            data = sock.recv(65535)
    except TimeoutError:
        return NO_ANSWER, ""
    except ConnectionRefusedError:
        return REFUSED, ""
    except OSError as exc:
        return UNREACHABLE, exc.strerror or str(exc)
    try:
        dns.message.from_wire(data)
    except dns.exception.DNSException:
        return NOT_DNS, ""
    return None


async def _probe(host: str, port: int, timeout: float) -> str | None:
    """None when the nameserver answers at all; else why not, in words (in a thread:
    it is asked only after a lookup failed)."""
    found = await asyncio.to_thread(probe_nameserver, host, port, timeout)
    if found is None or found[0] == NOT_DNS:
        return None
    what, detail = found
    if what == NO_ANSWER:
        return f"does not answer (nothing within {timeout:g}s)"
    if what == REFUSED:
        return "refused the connection (nothing listens there)"
    return f"cannot be reached ({detail})"


async def explain_dns_error(resolver: dns.resolver.BaseResolver, exc: BaseException) -> str:
    """What went wrong with a lookup, naming the resolver: for a timeout, each nameserver
    is probed once (at most 1 s), so that "nothing listens there" is said as such."""
    where = describe_resolver(resolver)
    if isinstance(exc, dns.exception.Timeout):
        timeout = min(1.0, max(0.1, float(getattr(resolver, "timeout", 1.0))))
        servers = _servers(resolver)
        reasons = []
        for host, port in servers:
            reason = await _probe(host, port, timeout)
            if reason is not None:
                reasons.append((format_hostport(host, port), reason))
        if len(servers) == 1 and reasons:
            return f"{where} {reasons[0][1]}"
        if reasons:
            return f"no answer from {where}: " + "; ".join(f"{s} {r}" for s, r in reasons)
        return f"{where} did not answer in time"
    if isinstance(exc, dns.resolver.NoNameservers):
        return f"{where} failed the query (SERVFAIL or refused)"
    return f"{where}: {exc}"
