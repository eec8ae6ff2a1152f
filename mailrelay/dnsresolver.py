"""The server's DNS resolver: the system's nameservers, or those from the config.

One resolver and one cache serve the whole server: delivery asks it from the event loop
(``make_resolver``), the checks of inbound mail from a thread (``blocking_twin``). Mail
from one sender domain comes in bursts, and each message costs SPF and DMARC lookups;
answers are kept for their TTL (negative ones for the SOA's minimum, RFC 2308).
"""

from __future__ import annotations

import asyncio
import logging

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


class _Probe(asyncio.DatagramProtocol):
    def __init__(self, done: asyncio.Future[str | None]):
        self.done = done

    def datagram_received(self, data: bytes, addr: object) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def error_received(self, exc: Exception) -> None:
        if not self.done.done():
            reason = ("refused the connection (nothing listens there)"
                      if isinstance(exc, ConnectionRefusedError) else
                      f"cannot be reached ({getattr(exc, 'strerror', None) or exc})")
            self.done.set_result(reason)


async def _probe(host: str, port: int, timeout: float) -> str | None:
    """None when the nameserver answers a query at all; else why not. A connected UDP
    socket hears the ICMP "port unreachable" that the resolver's own lookups cannot tell
    from a lost packet (what `mailrelay dns check` does too, without a thread here)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[str | None] = loop.create_future()
    try:
        transport, _ = await loop.create_datagram_endpoint(lambda: _Probe(done),
                                                           remote_addr=(host, port))
    except OSError as exc:
        return f"cannot be reached ({exc.strerror or exc})"
    try:
        transport.sendto(dns.message.make_query(".", "NS").to_wire())
        return await asyncio.wait_for(done, timeout)
    except TimeoutError:
        return f"does not answer (nothing within {timeout:g}s)"
    finally:
        transport.close()


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
