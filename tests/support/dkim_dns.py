"""DKIM keys published in the loopback test DNS, and a dkimpy lookup function that asks it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import dns.resolver

from mailrelay.message.dkim.keys import dns_record, generate_key, load_key, write_key
from tests.support.dns_server import TestDNSServer


def txt_lookup(port: int, host: str = "127.0.0.1") -> Callable[..., bytes | None]:
    """A dkimpy ``dnsfunc`` asking the test DNS server (no system resolver, no mocks)."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [host]
    resolver.port = port
    resolver.lifetime = 5

    def dnsfunc(name: bytes | str, timeout: float = 5) -> bytes | None:
        qname = name.decode("ascii") if isinstance(name, bytes) else name
        try:
            answer = resolver.resolve(qname, "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        # One record; its character-strings are joined (RFC 6376 3.6.2.2).
        return b"".join(next(iter(answer)).strings)

    return dnsfunc


def dnsfunc_for(server: TestDNSServer) -> Callable[..., bytes | None]:
    return txt_lookup(server.port, server.host)


def publish_new_key(server: TestDNSServer, domain_dir: Path, domain: str, selector: str,
                    algo: str) -> Path:
    """Make a key in ``domain_dir`` and serve its public half in DNS."""
    domain_dir.mkdir(parents=True, exist_ok=True)
    path = write_key(domain_dir, selector, generate_key(algo))
    name, value = dns_record(load_key(path, domain, selector))
    server.add(name, "TXT", value)
    return path
