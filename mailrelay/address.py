"""Email address handling: splitting and normalising addresses and domains; and the one
reading of a client's IP address (``parse_ip``)."""

from __future__ import annotations

import functools
import ipaddress
import unicodedata


class AddressError(ValueError):
    """An address that cannot be parsed."""


# Pure, and called several times per message (each command, alias and sender check) on
# a handful of domains: the IDNA codec is the costly part. Errors are not cached.
@functools.lru_cache(maxsize=4096)
def normalize_domain(domain: str) -> str:
    """Lower-case a domain and convert it to its ASCII (IDNA) form."""
    domain = domain.strip().rstrip(".")
    if not domain:
        raise AddressError("empty domain")
    try:
        ascii_domain = domain.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise AddressError(f"invalid domain {domain!r}") from exc
    return ascii_domain.lower()


def normalize_local(local: str) -> str:
    """Case-fold a local part the way chasquid does (PRECIS-like: NFC + casefold)."""
    return unicodedata.normalize("NFC", local).casefold()


def split(address: str) -> tuple[str, str]:
    """Split ``local@domain``; the domain is returned as written (lower-cased)."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise AddressError(f"not an address: {address!r}")
    return local, domain.lower()


def normalize(address: str) -> str:
    """Canonical form used for lookups: folded local part, IDNA lower-case domain."""
    local, domain = split(address)
    return f"{normalize_local(local)}@{normalize_domain(domain)}"


def domain_of(address: str) -> str:
    """The normalised domain of an address."""
    return normalize_domain(split(address)[1])


def strip_suffix(local: str, separators: str = "+") -> str:
    """``me+tag`` -> ``me``: the part before the first suffix separator (chasquid's rule)."""
    for index, ch in enumerate(local):
        if ch in separators and index > 0:
            return local[:index]
    return local


def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A client's IP address as we name it: a zone (``%eth0``) dropped, and an
    IPv4-mapped IPv6 address (a dual-stack socket's view of an IPv4 client) as that IPv4
    address. None when ``text`` is not an IP address."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
