"""mailrelay.smtp.proxy: PROXY protocol v1/v2 headers, bounded, and behind a real haproxy."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import ssl
import struct
import textwrap
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trustme

from bench.ports import free_port
from mailrelay.config import load_config
from mailrelay.errors import ConfigError
from mailrelay.smtp.proxy import (
    V1_MAX_LENGTH,
    V2_MAX_LENGTH,
    V2_SIGNATURE,
    ProxiedAddress,
    ProxyError,
    is_trusted,
    parse_network,
    parse_v2,
    read_proxy_header,
    read_proxy_header_from_socket,
)
from tests.support.haproxy import haproxy, needs_haproxy

# --- helpers ---------------------------------------------------------------------------


def v2(body: bytes = b"", *, command: int = 1, family: int = 0x11, version: int = 2,
       length: int | None = None, signature: bytes = V2_SIGNATURE) -> bytes:
    size = len(body) if length is None else length
    return signature + bytes([version << 4 | command, family]) + struct.pack("!H", size) + body


def v2_inet(source: str, dest: str, source_port: int, dest_port: int,
            tlvs: bytes = b"") -> bytes:
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(dest)
    family = 0x11 if src.version == 4 else 0x21
    return v2(src.packed + dst.packed + struct.pack("!HH", source_port, dest_port) + tlvs,
              family=family)


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def stream(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


async def parse(data: bytes, timeout: float = 1.0) -> ProxiedAddress | None:
    return await read_proxy_header(stream(data), timeout)


async def remaining(reader: asyncio.StreamReader) -> bytes:
    return await reader.read()


# --- v1 --------------------------------------------------------------------------------


async def test_v1_tcp4():
    header = await parse(b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25\r\n")
    assert header == ProxiedAddress("192.0.2.7", 56324, "198.51.100.1", 25, 1)


async def test_v1_tcp6_and_extremes():
    header = await parse(b"PROXY TCP6 2001:db8::7 2001:db8::1 0 65535\r\n")
    assert header == ProxiedAddress("2001:db8::7", 0, "2001:db8::1", 65535, 1)
    longest = (b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
               b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n")
    assert len(longest) == 104
    assert (await parse(longest)).source_port == 65535


async def test_v1_ipv4_mapped_source_is_given_as_ipv4():
    header = await parse(b"PROXY TCP6 ::ffff:192.0.2.9 2001:db8::1 1000 25\r\n")
    assert header.source_ip == "192.0.2.9"


@pytest.mark.parametrize("line", [
    b"PROXY UNKNOWN\r\n",
    b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
    b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",  # 107 bytes: the maximum
    b"PROXY UNKNOWN anything at all\r\n",
])
async def test_v1_unknown_keeps_the_real_peer(line):
    assert len(line) <= V1_MAX_LENGTH
    assert await parse(line) is None


async def test_v1_leaves_what_follows_in_the_stream():
    reader = stream(b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25\r\nEHLO client.test\r\n")
    assert (await read_proxy_header(reader, 1)).source_ip == "192.0.2.7"
    assert await remaining(reader) == b"EHLO client.test\r\n"


@pytest.mark.parametrize("data, reason", [
    (b"PROXZ TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not a PROXY"),
    (b"EHLO client.test\r\n", "not a PROXY"),
    (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not a PROXY"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "CRLF"),  # a bare LF
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\rx\n", "CRLF"),
    (b"PROXY\r\n", "PROXY"),
    (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "fields"),  # two spaces
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "fields"),  # trailing space
    (b" PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not a PROXY"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "fields"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "fields"),
    (b"PROXY TCP4\t1.2.3.4 5.6.7.8 1 2\r\n", "protocol"),
    (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "protocol"),
    (b"PROXY  UNKNOWN\r\n", "protocol"),
    (b"PROXY UNKNOWNX\r\n", "protocol"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 080 25\r\n", "port"),  # leading zero
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 25\r\n", "port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 http 25\r\n", "port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 25\r\n", "port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 25\r\n", "port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 0x19\r\n", "port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 \xd9\xa1 25\r\n", "ASCII"),  # an Arabic-Indic digit
    (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "IPv4"),  # octal-looking
    (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "IPv4"),
    (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "IPv4"),
    (b"PROXY TCP4 2001:db8::1 5.6.7.8 1 2\r\n", "IPv4"),  # family mismatch
    (b"PROXY TCP6 1.2.3.4 2001:db8::1 1 2\r\n", "IPv6"),
    (b"PROXY TCP6 fe80::1%eth0 2001:db8::1 1 2\r\n", "IPv6"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2", "closed"),  # truncated: no CRLF, then EOF
    (b"PROXY TCP4 1.2.3.4", "closed"),
    (b"PRO", "closed"),
    (b"", "closed after 0 bytes"),
    (b"PROXY " + b"1" * 120 + b"\r\n", "107"),  # over the maximum line length
    (b"PROXY UNKNOWN " + b"x" * 100 + b"\r\n", "107"),
])
async def test_v1_malformed(data, reason):
    with pytest.raises(ProxyError, match=reason):
        await parse(data)


async def test_v1_line_over_107_bytes_is_refused_without_reading_on():
    data = b"PROXY UNKNOWN " + b"x" * 200 + b"\r\nEHLO x\r\n"
    reader = stream(data)
    with pytest.raises(ProxyError, match="107"):
        await read_proxy_header(reader, 1)
    assert await remaining(reader) == data[V1_MAX_LENGTH:]


# --- v2 --------------------------------------------------------------------------------


async def test_v2_tcp4_and_tcp6():
    assert await parse(v2_inet("192.0.2.7", "198.51.100.1", 40000, 465)) == \
        ProxiedAddress("192.0.2.7", 40000, "198.51.100.1", 465, 2)
    assert await parse(v2_inet("2001:db8::7", "2001:db8::1", 1, 587)) == \
        ProxiedAddress("2001:db8::7", 1, "2001:db8::1", 587, 2)
    mapped = await parse(v2_inet("::ffff:192.0.2.9", "::ffff:192.0.2.1", 2, 25))
    assert (mapped.source_ip, mapped.dest_ip) == ("192.0.2.9", "192.0.2.1")


async def test_v2_tlvs_are_skipped():
    tlvs = (tlv(0x01, b"smtp") + tlv(0x04, b"") + tlv(0x05, b"u" * 128)
            + tlv(0x20, b"\x01\x00\x00\x00\x00" + tlv(0x21, b"TLSv1.3")))
    header = await parse(v2_inet("192.0.2.7", "198.51.100.1", 3, 25, tlvs))
    assert header.source_ip == "192.0.2.7"


@pytest.mark.parametrize("data", [
    v2(command=0, family=0x00),  # LOCAL: a health check
    v2(b"\x7f\x00\x00\x01" * 2 + b"\x00\x01\x00\x02", command=0, family=0x11),  # LOCAL
    v2(b"anything", command=0, family=0x00),  # LOCAL: addresses ignored
    v2(b"", family=0x00),  # PROXY with AF_UNSPEC
    v2(b"\x00" * 216, family=0x31),  # AF_UNIX stream
    v2(b"\x7f\x00\x00\x01" * 2 + b"\x00\x01\x00\x02", family=0x12),  # UDP over IPv4
])
async def test_v2_without_a_tcp_address_keeps_the_real_peer(data):
    assert await parse(data) is None


async def test_v2_reads_exactly_the_header():
    reader = stream(v2_inet("192.0.2.7", "198.51.100.1", 3, 25, tlv(0x04, b"pad"))
                    + b"\x16\x03\x01\x02\x00")  # a TLS record right behind
    assert (await read_proxy_header(reader, 1)).source_port == 3
    assert await remaining(reader) == b"\x16\x03\x01\x02\x00"


ADDRESSES4 = b"\xc0\x00\x02\x07\xc6\x33\x64\x01\x00\x01\x00\x19"


@pytest.mark.parametrize("data, reason", [
    (v2(ADDRESSES4, signature=V2_SIGNATURE[:11] + b"X"), "signature"),
    (b"\r\n\r\n\x00\r\nQUIX\n" + b"\x21\x11\x00\x0c" + ADDRESSES4, "signature"),
    (v2(ADDRESSES4, version=1), "version 1"),
    (v2(ADDRESSES4, version=3), "version 3"),
    (v2(ADDRESSES4, command=2), "command"),
    (v2(ADDRESSES4, command=0xF), "command"),
    (v2(ADDRESSES4, family=0x41), "family"),
    (v2(ADDRESSES4, family=0x13), "family"),
    (v2(ADDRESSES4[:8], family=0x11), "cannot hold"),  # too short for IPv4
    (v2(ADDRESSES4 * 2, family=0x21), "cannot hold"),  # 24 bytes: too short for IPv6
    (v2(b"\x00" * 100, family=0x31), "cannot hold"),  # too short for AF_UNIX
    (v2(ADDRESSES4 + b"\x04\x00"), "truncated TLV"),
    (v2(ADDRESSES4 + b"\x04\x00\x05abc"), "runs past"),
    (v2(ADDRESSES4 + tlv(0x04, b"") + b"\x05"), "truncated TLV"),
    (v2(length=V2_MAX_LENGTH + 1), "more than"),
    (v2(length=65535), "more than"),
    (v2(ADDRESSES4)[:15], "closed after 15 bytes"),  # truncated fixed part
    (v2(ADDRESSES4)[:20], "closed after 20 bytes"),  # truncated addresses
    (v2(ADDRESSES4, length=40), "closed"),  # length beyond what arrives
])
async def test_v2_malformed(data, reason):
    with pytest.raises(ProxyError, match=reason):
        await parse(data)


def test_parse_v2_checks_the_body_length():
    with pytest.raises(ProxyError, match="expected 12"):
        parse_v2(v2(ADDRESSES4)[:16], ADDRESSES4[:11])


# --- bounded size and time ---------------------------------------------------------------
# (This thread's CPU time: the parsing runs here, and other work on the machine, such
# as tests in parallel, does not count.)


@pytest.mark.parametrize("factor", [1, 10, 100])
async def test_oversized_v1_is_cut_at_107_bytes(factor):
    data = b"PROXY TCP4 " + b"1" * (V1_MAX_LENGTH * factor) + b"\r\n"
    reader = stream(data)
    started = time.thread_time()
    with pytest.raises(ProxyError, match="107"):
        await read_proxy_header(reader, 1)
    assert time.thread_time() - started < 0.1
    assert len(await remaining(reader)) == len(data) - V1_MAX_LENGTH


@pytest.mark.parametrize("factor", [1, 10, 100])
async def test_oversized_v2_is_refused_before_its_body(factor):
    body = b"\x00" * min(65535, (V2_MAX_LENGTH + 1) * factor)
    reader = stream(v2(body, family=0x00))
    started = time.thread_time()
    with pytest.raises(ProxyError, match="more than"):
        await read_proxy_header(reader, 1)
    assert time.thread_time() - started < 0.1
    assert len(await remaining(reader)) == len(body)  # the body was never read


@pytest.mark.parametrize("count", [6, 68, 676])  # 676 empty TLVs fill V2_MAX_LENGTH
async def test_many_tlvs_parse_in_linear_time(count):
    body = ADDRESSES4 + tlv(0x04, b"") * count
    assert len(body) <= V2_MAX_LENGTH
    started = time.thread_time()
    for _ in range(100):
        assert (await parse(v2(body))).source_ip == "192.0.2.7"
    assert time.thread_time() - started < 0.5


@pytest.mark.parametrize("factor", [1, 10, 100])
async def test_garbage_is_refused_at_once(factor):
    data = os.urandom(1000 * factor).replace(b"P", b"p").replace(b"\r", b"r")
    started = time.thread_time()
    with pytest.raises(ProxyError, match="not a PROXY"):
        await parse(data)
    assert time.thread_time() - started < 0.1


@asynccontextmanager
async def tcp_server(handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_slow_drip_times_out():
    outcome: asyncio.Future = asyncio.get_running_loop().create_future()

    async def handler(reader, writer):
        started = time.monotonic()
        try:
            await read_proxy_header(reader, timeout=0.3)
        except ProxyError as exc:
            outcome.set_result((str(exc), time.monotonic() - started))
        writer.close()

    async with tcp_server(handler) as port:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        for byte in b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25\r\n":
            if outcome.done():
                break
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)
        reason, elapsed = await asyncio.wait_for(outcome, 2)
        writer.close()
    assert "within 0.3s" in reason
    assert 0.25 < elapsed < 1.0


async def test_silent_client_times_out():
    outcome: asyncio.Future = asyncio.get_running_loop().create_future()

    async def handler(reader, writer):
        try:
            await read_proxy_header(reader, timeout=0.2)
        except ProxyError as exc:
            outcome.set_result(str(exc))
        writer.close()

    async with tcp_server(handler) as port:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        assert "within 0.2s" in await asyncio.wait_for(outcome, 2)
        writer.close()


# --- from a raw socket, then TLS (port 465) -----------------------------------------------


async def test_socket_reader_takes_only_the_header():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 465\r\n\x16\x03\x01rest")
        header = await read_proxy_header_from_socket(ours, 1)
        assert header.source_ip == "192.0.2.7"
        assert ours.recv(100) == b"\x16\x03\x01rest"
        theirs.sendall(v2_inet("2001:db8::7", "2001:db8::1", 9, 465) + b"\x16more")
        assert (await read_proxy_header_from_socket(ours, 1)).source_ip == "2001:db8::7"
        assert ours.recv(100) == b"\x16more"


async def test_socket_reader_errors():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"PROXY TCP4 192.0")
        theirs.shutdown(socket.SHUT_WR)
        with pytest.raises(ProxyError, match="closed after 16 bytes"):
            await read_proxy_header_from_socket(ours, 1)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        started = time.monotonic()
        with pytest.raises(ProxyError, match=r"within 0\.2s"):
            await read_proxy_header_from_socket(ours, 0.2)
        assert time.monotonic() - started < 0.5


async def test_implicit_tls_after_a_header_in_the_same_segment(tmp_path):
    """The header and the TLS ClientHello arrive in one write: the header is read from
    the raw socket, then asyncio's TLS server gets the socket with the ClientHello still
    in the kernel's buffer, and the handshake completes."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mail.example.com").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    seen: asyncio.Future = loop.create_future()

    async def serve_one():
        conn, _ = await loop.sock_accept(listener)
        header = await read_proxy_header_from_socket(conn, 2)

        async def session(reader, writer):
            writer.write(f"220 hello {header.source_ip}\r\n".encode())
            await writer.drain()
            seen.set_result(await reader.readline())
            writer.close()

        reader = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(reader, session)
        await loop.connect_accepted_socket(lambda: protocol, conn, ssl=server_context,
                                           ssl_handshake_timeout=5)

    server_task = asyncio.ensure_future(serve_one())
    # A TLS client over a memory BIO, so the first flight goes out with the header.
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context.wrap_bio(incoming, outgoing, server_hostname="mail.example.com")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    client = socket.create_connection(("127.0.0.1", port))
    client.settimeout(5)
    try:
        client.sendall(v2_inet("203.0.113.9", "127.0.0.1", 4242, 465) + outgoing.read())

        def finish_handshake():
            while True:
                try:
                    tls.do_handshake()
                    return
                except ssl.SSLWantReadError:
                    if pending := outgoing.read():
                        client.sendall(pending)
                    incoming.write(client.recv(65536))

        await asyncio.to_thread(finish_handshake)
        tls.write(b"EHLO client.test\r\n")
        client.sendall(outgoing.read())

        def read_greeting():
            while True:
                try:
                    return tls.read(1024)
                except ssl.SSLWantReadError:
                    incoming.write(client.recv(65536))

        assert await asyncio.to_thread(read_greeting) == b"220 hello 203.0.113.9\r\n"
        assert await asyncio.wait_for(seen, 5) == b"EHLO client.test\r\n"
    finally:
        client.close()
        listener.close()
        await asyncio.wait_for(server_task, 5)


# --- trusted networks ----------------------------------------------------------------------


def test_is_trusted():
    networks = [parse_network(n) for n in ("127.0.0.1", "10.0.0.0/8", "::1", "2001:db8::/32")]
    assert is_trusted("127.0.0.1", networks)
    assert is_trusted("10.200.3.4", networks)
    assert is_trusted("::ffff:10.1.2.3", networks)  # a dual-stack socket's IPv4 peer
    assert is_trusted(ipaddress.ip_address("::ffff:127.0.0.1"), networks)
    assert is_trusted("::1", networks)
    assert is_trusted("2001:db8:5::9", networks)
    assert not is_trusted("127.0.0.2", networks)
    assert not is_trusted("192.0.2.1", networks)
    assert not is_trusted("2001:db9::1", networks)
    assert not is_trusted("::ffff:192.0.2.1", networks)
    assert not is_trusted("not an address", networks)
    assert not is_trusted("", networks)
    assert not is_trusted("127.0.0.1", [])


def test_parse_network():
    assert parse_network("127.0.0.1") == ipaddress.ip_network("127.0.0.1/32")
    assert parse_network("::1") == ipaddress.ip_network("::1/128")
    assert parse_network("::ffff:10.0.0.0/104") == ipaddress.ip_network("10.0.0.0/8")
    with pytest.raises(ValueError, match="host bits"):
        parse_network("10.0.0.1/8")
    with pytest.raises(ValueError):
        parse_network("localhost")


# --- configuration -------------------------------------------------------------------------


def write_config(directory: Path, extra: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "mailrelay.yaml").write_text(
        "hostname: mail.example.com\n" + textwrap.dedent(extra).lstrip("\n"))
    return directory


def test_config_proxy_protocol(tmp_path):
    config = load_config(write_config(tmp_path, """
        proxy_protocol:
          smtp: [127.0.0.1/32, "::1", "::ffff:192.0.2.0/120"]
          submission_tls:
            - 10.0.0.0/8
          timeout: 3s
        """))
    proxy = config.proxy_protocol
    assert proxy.trusted("smtp") == (ipaddress.ip_network("127.0.0.1/32"),
                                     ipaddress.ip_network("::1/128"),
                                     ipaddress.ip_network("192.0.2.0/24"))
    assert proxy.trusted("submission") == ()
    assert proxy.trusted("submission_tls") == (ipaddress.ip_network("10.0.0.0/8"),)
    assert proxy.trusted("bogus") == ()
    assert proxy.timeout == 3.0
    default = load_config(write_config(tmp_path / "d", "")).proxy_protocol
    assert (default.smtp, default.submission, default.submission_tls, default.timeout) == \
        ((), (), (), 5.0)


@pytest.mark.parametrize("text, line, words", [
    ("proxy_protocol:\n  smtp: [10.0.0.1/8]\n", 3, "host bits"),
    ("proxy_protocol:\n  smtp: [everyone]\n", 3, "proxy_protocol.smtp"),
    ("proxy_protocol:\n  imap: []\n", 3, "unknown setting proxy_protocol.imap"),
    ("proxy_protocol:\n  timeout: soon\n", 3, "proxy_protocol.timeout"),
])
def test_config_proxy_protocol_errors(tmp_path, text, line, words):
    write_config(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.line == line
    assert words in str(info.value)


# --- behind a real haproxy -------------------------------------------------------------------

@asynccontextmanager
async def haproxy_pair(tmp_path: Path, backend_port: int, checks: bool = False):
    """haproxy on loopback: frontend ports (send-proxy, send-proxy-v2) to ``backend_port``."""
    check = " check check-send-proxy inter 100ms" if checks else ""
    async with haproxy(tmp_path, {"v1": (backend_port, "send-proxy"),
                                  "v2": (backend_port, "send-proxy-v2" + check)}) as ports:
        yield ports["v1"], ports["v2"]


class Backend:
    """The part of a listener this module serves: trust check, header, then a greeting
    that names the client as the session would see it."""

    def __init__(self, trusted):
        self.trusted = trusted
        self.headers: list[ProxiedAddress | None] = []
        self.errors: list[str] = []
        self.port = free_port()
        self.server: asyncio.Server | None = None

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()

    async def handle(self, reader, writer):
        peer_ip, peer_port = writer.get_extra_info("peername")[:2]
        try:
            if not is_trusted(peer_ip, self.trusted):
                writer.write(b"554 5.7.1 not a trusted proxy\r\n")
                return
            try:
                header = await read_proxy_header(reader, timeout=2)
            except ProxyError as exc:
                self.errors.append(str(exc))
                return
            self.headers.append(header)
            ip, port = (header.source_ip, header.source_port) if header else (peer_ip, peer_port)
            version = header.version if header else 0
            writer.write(f"220 {ip} {port} v{version}\r\n".encode())
            await writer.drain()
        finally:
            writer.close()


@needs_haproxy
@pytest.mark.parametrize("version", [1, 2])
async def test_haproxy_send_proxy_gives_the_original_client(tmp_path, version):
    async with Backend([parse_network("127.0.0.1")]) as backend, \
            haproxy_pair(tmp_path, backend.port) as (v1_port, v2_port):
        port = v1_port if version == 1 else v2_port
        for source in ("127.0.0.5", "127.0.0.77"):
            sock = socket.socket()
            sock.bind((source, 0))
            local_port = sock.getsockname()[1]
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            reader, writer = await asyncio.open_connection(sock=sock)
            line = (await asyncio.wait_for(reader.readline(), 5)).decode()
            writer.close()
            assert line == f"220 {source} {local_port} v{version}\r\n"
        assert backend.errors == []
        assert [h.dest_ip for h in backend.headers] == ["127.0.0.1", "127.0.0.1"]
        assert {h.dest_port for h in backend.headers} == {port}


@needs_haproxy
async def test_haproxy_health_checks_send_local(tmp_path):
    async with Backend([parse_network("127.0.0.0/8")]) as backend, \
            haproxy_pair(tmp_path, backend.port, checks=True):
        deadline = time.monotonic() + 5
        while None not in backend.headers:
            assert time.monotonic() < deadline, (backend.headers, backend.errors)
            await asyncio.sleep(0.05)
        assert backend.errors == []


@needs_haproxy
async def test_haproxy_from_an_untrusted_network_is_refused(tmp_path):
    async with Backend([parse_network("192.0.2.0/24")]) as backend, \
            haproxy_pair(tmp_path, backend.port) as (_, v2_port):
        reader, writer = await asyncio.open_connection("127.0.0.1", v2_port)
        line = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        assert line.startswith(b"554 5.7.1")
        assert backend.headers == []
