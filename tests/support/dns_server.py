"""A real, authoritative-looking DNS server on loopback (UDP and TCP), built with dnslib.

Tests point mailrelay's resolver at it and change its data while it runs::

    with TestDNSServer() as dns_server:
        dns_server.add("remote.test", "MX", (10, "mx1.remote.test"))
        dns_server.add("mx1.remote.test", "A", "127.0.0.2")
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import selectors
import socket
import struct
import threading
from dataclasses import dataclass

from dnslib import (
    AAAA,
    CNAME,
    EDNS0,
    MX,
    NS,
    PTR,
    QTYPE,
    RCODE,
    RR,
    SOA,
    TXT,
    A,
    DNSError,
    DNSRecord,
)

_UDP_DEFAULT_SIZE = 512  # without EDNS (RFC 1035 section 4.2.1)
_EDNS_SIZE = 4096
_MAX_CNAME_CHAIN = 8


@dataclass(frozen=True)
class _Record:
    rtype: str
    rdata: object  # a dnslib RD instance
    ttl: int

    def key(self) -> tuple[str, str]:
        return self.rtype, self.rdata.toZone().lower()  # type: ignore[attr-defined]


def _name_key(name: object) -> str:
    return str(name).rstrip(".").lower()


def _txt_strings(value: str | bytes | tuple | list) -> list[bytes]:
    # One TXT record is a list of <=255-byte character-strings; long values are split
    # the way SPF/DKIM publishers do it.
    parts = value if isinstance(value, tuple | list) else [value]
    strings: list[bytes] = []
    for part in parts:
        data = part.encode() if isinstance(part, str) else bytes(part)
        strings.extend(data[i : i + 255] for i in range(0, len(data), 255))
    return strings or [b""]


def _make_rdata(rtype: str, value: str | tuple, ttl: int) -> object:
    if rtype == "A":
        return A(str(ipaddress.IPv4Address(value)))
    if rtype == "AAAA":
        return AAAA(str(ipaddress.IPv6Address(value)))
    if rtype == "MX":
        preference, exchange = value
        return MX(exchange, int(preference))
    if rtype in ("CNAME", "PTR", "NS"):
        return {"CNAME": CNAME, "PTR": PTR, "NS": NS}[rtype](str(value))
    if rtype == "TXT":
        return TXT(_txt_strings(value))
    if rtype == "SOA":
        mname, rname, *times = value
        return SOA(mname, rname, tuple(times) or (1, 3600, 600, 86400, 60))
    # Anything else (SRV, TLSA, CAA...) in zone-file syntax.
    text = " ".join(map(str, value)) if isinstance(value, tuple) else str(value)
    return RR.fromZone(f"x. {ttl} IN {rtype} {text}")[0].rdata


class TestDNSServer:
    """An in-memory DNS server answering over UDP and TCP on one loopback port."""

    __test__ = False  # a helper, not a pytest test class

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host = host
        self.port = port
        # (name, type) of every query received; a UDP answer truncated and retried
        # over TCP shows up twice.
        self.queries: list[tuple[str, str]] = []
        self._records: dict[str, list[_Record]] = {}
        self._servfail: set[str] = set()
        self._down = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._connections: dict[socket.socket, threading.Thread] = {}

    # -- lifecycle ---------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def __enter__(self) -> TestDNSServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("already started")
        self._bind()
        self._stop.clear()
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name=f"dns-{self.port}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        assert self._wake_w is not None
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(timeout=5)
        self._thread = None
        with self._lock:
            connections = dict(self._connections)
        for conn, thread in connections.items():
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            thread.join(timeout=5)
        for sock in (self._udp, self._tcp, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._udp = self._tcp = self._wake_r = self._wake_w = None

    def _bind(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # With port 0 the kernel picks a free UDP port; the same TCP port may be taken,
        # in which case try another one.
        for _ in range(100):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            tcp = socket.socket(family, socket.SOCK_STREAM)
            try:
                udp.bind((self.host, self.port))
                port = udp.getsockname()[1]
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((self.host, port))
                tcp.listen(64)
            except OSError as exc:
                udp.close()
                tcp.close()
                if self.port or exc.errno != errno.EADDRINUSE:
                    raise
                continue
            self._udp, self._tcp, self.port = udp, tcp, port
            return
        raise OSError(errno.EADDRINUSE, "no port free for both UDP and TCP")

    # -- the data ----------------------------------------------------------------

    def add(self, name: str, rtype: str, value: str | tuple, ttl: int = 60) -> None:
        """``add("remote.test", "MX", (10, "mx1.remote.test"))``, ``add(n, "A", "127.0.0.2")``"""
        rtype = rtype.upper()
        record = _Record(rtype, _make_rdata(rtype, value, ttl), ttl)
        with self._lock:
            records = self._records.setdefault(_name_key(name), [])
            if all(r.key() != record.key() for r in records):
                records.append(record)

    def remove(self, name: str, rtype: str | None = None) -> None:
        key = _name_key(name)
        with self._lock:
            if rtype is None:
                self._records.pop(key, None)
                return
            remaining = [r for r in self._records.get(key, []) if r.rtype != rtype.upper()]
            if remaining:
                self._records[key] = remaining
            else:
                self._records.pop(key, None)

    def set_servfail(self, name: str, on: bool = True) -> None:
        with self._lock:
            if on:
                self._servfail.add(_name_key(name))
            else:
                self._servfail.discard(_name_key(name))

    def set_down(self, on: bool) -> None:
        """Simulate an unreachable server: queries are read and never answered."""
        with self._lock:
            self._down = on

    # -- answering ---------------------------------------------------------------

    def _respond(self, data: bytes, udp: bool) -> bytes | None:
        try:
            request = DNSRecord.parse(data)
        except (DNSError, struct.error, IndexError, ValueError):
            return None
        if not request.questions:
            return None
        question = request.q
        qtype = QTYPE.get(question.qtype, f"TYPE{question.qtype}")
        edns = [rr for rr in request.ar if rr.rtype == QTYPE.OPT]
        with self._lock:
            self.queries.append((_name_key(question.qname), qtype))
            if self._down:
                return None
            reply = request.reply(ra=0, aa=1)
            self._resolve(reply, question.qname, qtype)
        if edns:
            reply.add_ar(EDNS0(udp_len=_EDNS_SIZE))
        wire = reply.pack()
        limit = max(_UDP_DEFAULT_SIZE, edns[0].rclass) if edns else _UDP_DEFAULT_SIZE
        if udp and len(wire) > limit:
            # Too big for UDP: header and question only, TC set, so the client uses TCP.
            truncated = request.reply(ra=0, aa=1)
            truncated.header.tc = 1
            truncated.header.rcode = reply.header.rcode
            if edns:
                truncated.add_ar(EDNS0(udp_len=_EDNS_SIZE))
            wire = truncated.pack()
        return wire

    def _resolve(self, reply: DNSRecord, qname: object, qtype: str) -> None:
        """Fill ``reply`` for (qname, qtype), following CNAMEs within our data."""
        owner = qname
        for _ in range(_MAX_CNAME_CHAIN):
            key = _name_key(owner)
            if key in self._servfail:
                reply.rr = []
                reply.header.rcode = RCODE.SERVFAIL
                return
            records = self._records.get(key, [])
            matches = [r for r in records if r.rtype == qtype or qtype == "ANY"]
            if matches:
                for record in matches:
                    reply.add_answer(RR(owner, getattr(QTYPE, record.rtype), rdata=record.rdata,
                                        ttl=record.ttl))
                return
            cnames = [r for r in records if r.rtype == "CNAME"]
            if cnames and qtype != "CNAME":
                record = cnames[0]
                reply.add_answer(RR(owner, QTYPE.CNAME, rdata=record.rdata, ttl=record.ttl))
                owner = record.rdata.label  # type: ignore[attr-defined]
                continue
            exists = bool(records) or any(k.endswith("." + key) for k in self._records)
            if not exists:
                reply.header.rcode = RCODE.NXDOMAIN
            # Negative answers carry the zone's SOA (RFC 2308).
            zone = ".".join(key.split(".")[-2:]) or "."
            suffix = "" if zone == "." else f".{zone}"  # the root: no "ns.." (it would raise)
            reply.add_auth(RR(zone, QTYPE.SOA, ttl=60, rdata=SOA(
                f"ns{suffix}", f"hostmaster{suffix}", (1, 3600, 600, 86400, 60))))
            return
        reply.header.rcode = RCODE.SERVFAIL  # a CNAME loop

    # -- the network -------------------------------------------------------------

    def _serve(self) -> None:
        assert self._udp and self._tcp and self._wake_r
        with selectors.DefaultSelector() as selector:
            selector.register(self._udp, selectors.EVENT_READ)
            selector.register(self._tcp, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in selector.select():
                    if key.fileobj is self._udp:
                        self._serve_udp()
                    elif key.fileobj is self._tcp:
                        self._accept()

    def _serve_udp(self) -> None:
        assert self._udp is not None
        try:
            data, peer = self._udp.recvfrom(65535)
        except OSError:
            return
        wire = self._respond(data, udp=True)
        if wire is not None:
            with contextlib.suppress(OSError):
                self._udp.sendto(wire, peer)

    def _accept(self) -> None:
        assert self._tcp is not None
        try:
            conn, _ = self._tcp.accept()
        except OSError:
            return
        thread = threading.Thread(target=self._serve_tcp, args=(conn,), daemon=True)
        with self._lock:
            self._connections[conn] = thread
        thread.start()

    def _serve_tcp(self, conn: socket.socket) -> None:
        # DNS over TCP: each message is preceded by its length (RFC 1035 section 4.2.2);
        # a client may send several queries on one connection.
        try:
            with conn:
                while not self._stop.is_set():
                    header = _recv_exactly(conn, 2)
                    if header is None:
                        return
                    data = _recv_exactly(conn, struct.unpack("!H", header)[0])
                    if data is None:
                        return
                    wire = self._respond(data, udp=False)
                    if wire is not None:
                        conn.sendall(struct.pack("!H", len(wire)) + wire)
        except OSError:
            pass
        finally:
            with self._lock:
                self._connections.pop(conn, None)


def _recv_exactly(conn: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data
