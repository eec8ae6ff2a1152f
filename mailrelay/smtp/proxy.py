"""The PROXY protocol, v1 and v2, for listeners behind haproxy (chasquid's ``haproxy_incoming``).

haproxy's ``send-proxy`` (v1, a text line) or ``send-proxy-v2`` (binary) puts a header in
front of the client's bytes that says who the client really is. The spec
(https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt) requires the receiver to
expect the header on every connection of such a listener and never to guess: so a
listener with the PROXY protocol on takes connections only from the trusted networks of
its proxies, reads the header before anything else (before the SMTP greeting, before a
TLS handshake on port 465), and closes the connection when it is missing or malformed.

- v1: ``PROXY TCP4|TCP6 <src> <dst> <srcport> <dstport>\\r\\n``, at most 107 bytes,
  single spaces, canonical addresses of the stated family, ports without leading zeros;
  ``PROXY UNKNOWN …\\r\\n`` means "use the real connection".
- v2: the 12-byte signature, version 2, command LOCAL (health checks: use the real
  connection) or PROXY, family and protocol, and a length; the address block must fit the
  family; TLVs after it are checked for structure and skipped. The length is capped at
  ``V2_MAX_LENGTH``. AF_UNSPEC, AF_UNIX and UDP mean "use the real connection".

Everything is read with exact-size reads, never past the header, so what follows (an
SMTP command, a TLS ClientHello) stays for whoever reads next; the whole header must
arrive within a timeout. Parsing is linear in the header's size. IPv4-mapped IPv6
addresses are given as IPv4.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from ..config import IPNetwork, parse_network  # noqa: F401 (parse_network: part of this API)

DEFAULT_TIMEOUT = 5.0
V1_MAX_LENGTH = 107  # the spec's worst case, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_LENGTH = 16
# Address block and TLVs after the 16 fixed bytes. The spec allows up to 65535; haproxy
# sends 12 or 36 (plus a few TLVs when asked to), AF_UNIX needs 216.
V2_MAX_LENGTH = 2048

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_V1_PORT = re.compile(r"0|[1-9][0-9]{0,4}")
_V2_ADDRESS_LENGTH = {0x1: 12, 0x2: 36, 0x3: 216}  # AF_INET, AF_INET6, AF_UNIX


class ProxyError(Exception):
    """No valid PROXY header: malformed, truncated, oversized, or too slow (says which)."""


@dataclass(frozen=True)
class ProxiedAddress:
    """The original connection, as the proxy saw it."""

    source_ip: str
    source_port: int
    dest_ip: str
    dest_port: int
    version: int  # 1 or 2


def unmap(address: IPAddress) -> IPAddress:
    """``::ffff:192.0.2.1`` is the IPv4 client 192.0.2.1."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_trusted(ip: str | IPAddress, networks: Iterable[IPNetwork]) -> bool:
    """Whether the peer ``ip`` (as from getpeername) is in one of ``networks``."""
    try:
        address = ip if not isinstance(ip, str) else ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return False
    address = unmap(address)
    return any(address in network for network in networks)


# -- parsing (pure: bytes in, result or ProxyError out) -------------------------------------

def parse_v1(line: bytes) -> ProxiedAddress | None:
    """A complete v1 line, CRLF included. None for ``UNKNOWN`` (keep the real peer)."""
    if len(line) > V1_MAX_LENGTH:
        raise ProxyError(f"v1 header longer than {V1_MAX_LENGTH} bytes")
    if not line.endswith(b"\r\n") or b"\r" in line[:-2] or b"\n" in line[:-2]:
        raise ProxyError("v1 header does not end with one CRLF")
    try:
        text = line[:-2].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyError("v1 header is not ASCII") from None
    fields = text.split(" ")
    if fields[0] != "PROXY" or len(fields) < 2:
        raise ProxyError("v1 header does not start with 'PROXY '")
    protocol = fields[1]
    if protocol == "UNKNOWN":
        return None  # the rest of the line is to be ignored
    if protocol not in ("TCP4", "TCP6"):
        raise ProxyError(f"v1 header: unknown protocol {protocol[:10]!r}")
    if len(fields) != 6:
        raise ProxyError(f"v1 header: {len(fields)} fields separated by single spaces, "
                         "expected 6")
    version = 4 if protocol == "TCP4" else 6
    source = _v1_address(fields[2], version, "source")
    dest = _v1_address(fields[3], version, "destination")
    return ProxiedAddress(str(source), _v1_port(fields[4], "source"),
                          str(dest), _v1_port(fields[5], "destination"), 1)


def _v1_address(text: str, version: int, what: str) -> IPAddress:
    try:
        # ipaddress refuses leading zeros in IPv4 ("010.0.0.1") as the spec wants.
        if "%" in text:
            raise ValueError
        address: IPAddress = (ipaddress.IPv4Address(text) if version == 4
                              else ipaddress.IPv6Address(text))
    except ValueError:
        raise ProxyError(f"v1 header: {what} {text[:45]!r} is not an IPv{version} "
                         "address") from None
    return unmap(address)


def _v1_port(text: str, what: str) -> int:
    if not _V1_PORT.fullmatch(text) or int(text) > 65535:
        raise ProxyError(f"v1 header: {what} port {text[:10]!r} is not a port number")
    return int(text)


def parse_v2_header(header: bytes) -> int:
    """Check the 16 fixed bytes; the length of the rest (ProxyError when over the cap)."""
    if len(header) != V2_HEADER_LENGTH or header[:12] != V2_SIGNATURE:
        raise ProxyError("v2 header: bad signature")
    if header[12] >> 4 != 2:
        raise ProxyError(f"v2 header: version {header[12] >> 4}, expected 2")
    if header[12] & 0xF not in (0x0, 0x1):
        raise ProxyError(f"v2 header: unknown command {header[12] & 0xF}")
    (length,) = struct.unpack("!H", header[14:16])
    if length > V2_MAX_LENGTH:
        raise ProxyError(f"v2 header: {length} bytes of addresses and TLVs, more than "
                         f"{V2_MAX_LENGTH}")
    return length


def parse_v2(header: bytes, body: bytes) -> ProxiedAddress | None:
    """The 16 fixed bytes and the ``length`` bytes after them. None for LOCAL (health
    checks) and for families and protocols without a TCP address: keep the real peer."""
    length = parse_v2_header(header)
    if len(body) != length:
        raise ProxyError(f"v2 header: {len(body)} bytes after the header, expected {length}")
    if header[12] & 0xF == 0x0:  # LOCAL: "discard the protocol block including the family"
        return None
    family, protocol = header[13] >> 4, header[13] & 0xF
    if family > 0x3 or protocol > 0x2:
        raise ProxyError(f"v2 header: unknown family/protocol byte {header[13]:#04x}")
    needed = _V2_ADDRESS_LENGTH.get(family, 0)
    if len(body) < needed:
        raise ProxyError(f"v2 header: {len(body)} bytes cannot hold the addresses of "
                         f"family {family} ({needed} needed)")
    _check_tlvs(body[needed:])
    if family not in (0x1, 0x2) or protocol != 0x1:  # UNSPEC, UNIX, or UDP
        return None
    size = 4 if family == 0x1 else 16
    source = unmap(ipaddress.ip_address(body[:size]))
    dest = unmap(ipaddress.ip_address(body[size:2 * size]))
    source_port, dest_port = struct.unpack("!HH", body[2 * size:2 * size + 4])
    return ProxiedAddress(str(source), source_port, str(dest), dest_port, 2)


def _check_tlvs(data: bytes) -> None:
    """Each TLV is a type byte, a 2-byte length and that many bytes; they must tile
    ``data`` exactly. One pass, at most len(data) / 3 steps."""
    offset = 0
    while offset < len(data):
        if len(data) - offset < 3:
            raise ProxyError("v2 header: truncated TLV")
        (value_length,) = struct.unpack("!H", data[offset + 1:offset + 3])
        offset += 3 + value_length
        if offset > len(data):
            raise ProxyError("v2 header: a TLV runs past the header's length")


# -- reading from a connection ---------------------------------------------------------------

ReadExactly = Callable[[int], Awaitable[bytes]]


async def _read_header(read: ReadExactly) -> ProxiedAddress | None:
    start = await read(5)
    if start == b"PROXY":
        line = bytearray(start)
        # Byte by byte, so nothing after the CRLF is taken from the stream.
        while not line.endswith(b"\n"):
            if len(line) >= V1_MAX_LENGTH:
                raise ProxyError(f"v1 header: no CRLF in the first {V1_MAX_LENGTH} bytes")
            line += await read(1)
        return parse_v1(bytes(line))
    if start == V2_SIGNATURE[:5]:
        header = start + await read(V2_HEADER_LENGTH - 5)
        length = parse_v2_header(header)
        body = await read(length) if length else b""
        return parse_v2(header, body)
    raise ProxyError("not a PROXY protocol header")


async def _bounded(read: ReadExactly, timeout: float) -> ProxiedAddress | None:
    try:
        async with asyncio.timeout(timeout):
            return await _read_header(read)
    except TimeoutError:
        raise ProxyError(f"no complete PROXY header within {timeout:g}s") from None
    except OSError as exc:
        raise ProxyError(f"connection error: {exc.strerror or type(exc).__name__}") from None


async def read_proxy_header(
    reader: asyncio.StreamReader, timeout: float = DEFAULT_TIMEOUT
) -> ProxiedAddress | None:
    """Read one PROXY header (v1 or v2) from ``reader``, and nothing after it.

    The original client, or None when the header says to keep the real peer (v1
    ``UNKNOWN``, v2 ``LOCAL``). ProxyError (with the reason) for anything else; the
    caller closes the connection. For plain-text listeners (25, 587): bytes after the
    header stay in ``reader`` for the SMTP session.
    """
    received = 0

    async def read(count: int) -> bytes:
        nonlocal received
        try:
            data = await reader.readexactly(count)
        except asyncio.IncompleteReadError as exc:
            raise ProxyError("connection closed after "
                             f"{received + len(exc.partial)} bytes of a PROXY header") from None
        received += count
        return data

    return await _bounded(read, timeout)


async def read_proxy_header_from_socket(
    sock: socket.socket, timeout: float = DEFAULT_TIMEOUT
) -> ProxiedAddress | None:
    """Like ``read_proxy_header``, from an accepted socket before asyncio wraps it.

    For implicit TLS (465): read the header here, then hand the socket to
    ``loop.connect_accepted_socket(..., ssl=context)``. A StreamReader would already have
    buffered the client's TLS ClientHello, which the TLS layer would then never see.
    """
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    received = 0

    async def read(count: int) -> bytes:
        nonlocal received
        data = bytearray()
        while len(data) < count:
            chunk = await loop.sock_recv(sock, count - len(data))
            if not chunk:
                raise ProxyError("connection closed after "
                                 f"{received + len(data)} bytes of a PROXY header")
            data += chunk
        received += count
        return bytes(data)

    return await _bounded(read, timeout)
