"""Finding where to deliver a domain's mail: MX lookup (RFC 5321 section 5.1, RFC 7505)."""

from __future__ import annotations

import asyncio
import ipaddress
import random
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver

from ..address import AddressError, normalize_domain
from ..dnsresolver import explain_dns_error

_rng = random.Random()


@dataclass(frozen=True)
class MXHost:
    name: str
    preference: int
    addresses: tuple[str, ...]  # IPv6 first, then IPv4


class TemporaryDNSError(Exception):
    """The lookup failed in a way that may go away: SERVFAIL, timeout, no server answering."""


class PermanentDNSError(Exception):
    """DNS says the domain cannot receive mail: no such domain, null MX, no addresses."""


def _temporary_reason(exc: BaseException) -> str:
    if isinstance(exc, dns.exception.Timeout):
        return "DNS timeout"
    if isinstance(exc, dns.resolver.NoNameservers):
        return "DNS server failure"
    return "DNS error"


def _is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


async def _lookup(
    resolver: dns.asyncresolver.Resolver, name: str, rdtype: str
) -> list[str] | BaseException:
    """Addresses of ``name``; [] when there definitely are none, the error when unsure."""
    try:
        answer = await resolver.resolve(name, rdtype, search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except (dns.exception.DNSException, OSError) as exc:
        return exc
    return [rdata.address for rdata in answer]


async def _host_addresses(
    resolver: dns.asyncresolver.Resolver, name: str
) -> tuple[tuple[str, ...], BaseException | None]:
    """(addresses, temporary error) of one host; some addresses are enough to use it."""
    results = await asyncio.gather(_lookup(resolver, name, "AAAA"), _lookup(resolver, name, "A"))
    addresses: list[str] = []
    error: BaseException | None = None
    for result in results:
        if isinstance(result, BaseException):
            error = result
            continue
        addresses.extend(a for a in result if a not in addresses)
    return tuple(addresses), error


def _order(candidates: dict[str, int], rng: random.Random) -> list[tuple[int, str]]:
    """By preference; random among equal preferences to spread the load (RFC 5321 5.1)."""
    ordered: list[tuple[int, str]] = []
    for preference in sorted(set(candidates.values())):
        # Sorted first so that a seeded rng gives the same order whatever the answer order.
        group = sorted(name for name, p in candidates.items() if p == preference)
        rng.shuffle(group)
        ordered.extend((preference, name) for name in group)
    return ordered


async def resolve_mx(
    domain: str,
    resolver: dns.asyncresolver.Resolver,
    max_hosts: int = 5,
    rng: random.Random | None = None,
) -> list[MXHost]:
    """The hosts to try for ``domain``, best first, each with at least one address.

    Raises PermanentDNSError when DNS definitely says no (the domain does not exist,
    null MX, no host with an address) and TemporaryDNSError when it may change.
    """
    rng = _rng if rng is None else rng
    try:
        domain = normalize_domain(domain)
        dns.name.from_text(domain)
    except (AddressError, dns.exception.DNSException):
        raise PermanentDNSError("invalid domain name") from None

    implicit = False
    try:
        answer = await resolver.resolve(domain, "MX", search=False)
    except dns.resolver.NXDOMAIN:
        raise PermanentDNSError("domain does not exist") from None
    except dns.resolver.NoAnswer:
        # No MX records: the domain itself is the implicit MX (RFC 5321 5.1).
        implicit = True
        candidates = {domain: 0}
    except (dns.exception.DNSException, OSError) as exc:
        raise TemporaryDNSError(f"{_temporary_reason(exc)} looking up MX records: "
                                f"{await explain_dns_error(resolver, exc)}") from None
    else:
        records = [(rdata.preference, rdata.exchange) for rdata in answer]
        if len(records) == 1 and records[0][1] == dns.name.root:
            raise PermanentDNSError("domain does not accept mail (null MX)")
        candidates = {}
        for preference, exchange in records:
            name = exchange.to_text(omit_final_dot=True).lower()
            # "." mixed with real hosts is a misconfiguration, and an MX must be a
            # host name, never an address (RFC 7505 section 3, RFC 5321 5.1): skip both.
            if exchange == dns.name.root or _is_ip_literal(name):
                continue
            candidates[name] = min(preference, candidates.get(name, preference))
        if not candidates:
            raise PermanentDNSError("no usable MX host (only IP addresses or \".\")")

    # Bounded before resolving, so a huge MX set cannot make us send a flood of queries.
    ordered = _order(candidates, rng)[: max(1, max_hosts)]
    results = await asyncio.gather(*(_host_addresses(resolver, name) for _, name in ordered))

    hosts: list[MXHost] = []
    errors: list[BaseException] = []
    for (preference, name), (addresses, error) in zip(ordered, results, strict=True):
        if addresses:
            hosts.append(MXHost(name, preference, addresses))
        elif error is not None:
            errors.append(error)
    if hosts:
        return hosts

    names = ", ".join(name for _, name in ordered)
    if errors:
        reason = _temporary_reason(errors[0])
        trouble = await explain_dns_error(resolver, errors[0])
        if implicit:
            raise TemporaryDNSError(f"{reason} looking up the domain's addresses: {trouble}")
        raise TemporaryDNSError(f"{reason} looking up the addresses of MX host(s) {names}: "
                                f"{trouble}")
    if implicit:
        raise PermanentDNSError("domain has no MX or address records")
    raise PermanentDNSError(f"MX host(s) {names} have no address")
