"""The server's DNS resolver: the system's nameservers, or those from the config.

One resolver and one cache serve the whole server: delivery asks it from the event loop
(``make_resolver``), the checks of inbound mail from a thread (``blocking_twin``). Mail
from one sender domain comes in bursts, and each message costs SPF and DMARC lookups;
answers are kept for their TTL (negative ones for the SOA's minimum, RFC 2308).
"""

from __future__ import annotations

import logging

import dns.asyncresolver
import dns.name
import dns.nameserver
import dns.resolver

from .config import DNSSettings

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
