"""Hostile replies from a remote MX host (or a relay): dripped multi-line replies, endless
and overlong lines, a reply that never ends. Each must cost the delivery loop time linear
in its size, stay under aiosmtplib's caps and the command timeout, and end as one
temporary failure.

The remote side is a raw TCP server in its own thread (not aiosmtpd, which would not
misbehave), on 127.0.0.7 at the sinks' port; CPU is measured on the delivery loop's
thread only (time.thread_time), so the server's own work does not count.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import pytest

from mailrelay.config import DNSSettings
from mailrelay.delivery.remote import RemoteDelivery
from mailrelay.delivery.results import Outcome
from mailrelay.dnsresolver import make_resolver

MESSAGE = b"From: me@example.com\r\nTo: x@remote.test\r\nSubject: t\r\n\r\nbody\r\n"
HOST_IP = "127.0.0.7"


class HostileServer:
    """Answers like an SMTP server, but EHLO gets what ``ehlo`` sends on the socket."""

    def __init__(self, port: int, ehlo: Callable[[socket.socket], None]):
        self.ehlo = ehlo
        self.listener = socket.create_server((HOST_IP, port))
        self.listener.settimeout(0.2)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = conn.makefile("rb")
        try:
            conn.sendall(b"220 hostile.test ESMTP\r\n")
            while not self.stop.is_set():
                line = reader.readline()
                if not line:
                    return
                verb = line[:4].upper()
                if verb == b"EHLO":
                    self.ehlo(conn)
                elif verb == b"DATA":
                    conn.sendall(b"354 go on\r\n")
                    while reader.readline() not in (b".\r\n", b""):
                        pass
                    conn.sendall(b"250 2.0.0 taken\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    conn.sendall(b"250 2.0.0 ok\r\n")
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.listener.close()


def drip(lines: int, pause: float = 0.0001) -> Callable[[socket.socket], None]:
    """A multi-line EHLO reply, one line per TCP segment."""
    def send(conn: socket.socket) -> None:
        for _ in range(lines):
            conn.sendall(b"250-x\r\n")
            time.sleep(pause)
        conn.sendall(b"250 SIZE 1000000\r\n")
    return send


@pytest.fixture
def hostile(env):
    env.dns.add("remote.test", "MX", (10, "mx.hostile.test"))
    env.dns.add("mx.hostile.test", "A", HOST_IP)
    servers: list[HostileServer] = []

    def start(ehlo: Callable[[socket.socket], None]) -> HostileServer:
        server = HostileServer(env.sink_port, ehlo)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


async def deliver(env, command_timeout: float = 10.0) -> tuple[list, float, float]:
    """(results, CPU seconds of this thread, wall seconds) of one delivery."""
    resolver = make_resolver(DNSSettings(nameservers=[("127.0.0.1", env.dns.port)],
                                         timeout=2.0))
    remote = RemoteDelivery("mail.example.com", resolver, smtp_port=env.sink_port,
                            connect_timeout=3.0, command_timeout=command_timeout,
                            connection_idle_time=0)
    cpu, wall = time.thread_time(), time.monotonic()
    try:
        results = await remote.deliver("remote.test", "me@example.com", ["x@remote.test"],
                                       MESSAGE)
    finally:
        await remote.close()
    return results, time.thread_time() - cpu, time.monotonic() - wall


async def test_a_dripped_multi_line_reply_costs_linear_time(env, hostile):
    """40, 400 and 4000 lines (4000 is near aiosmtplib's 32 KiB cap), one per segment:
    10x the lines costs about 10x the CPU, not 100x (before: 4000 took over 4 s)."""
    server = hostile(drip(40))
    cpu: dict[int, float] = {}
    for lines in (40, 400, 4000):
        server.ehlo = drip(lines)
        [result], cpu[lines], _ = await deliver(env)
        assert result.outcome is Outcome.SENT
    assert cpu[4000] < 0.05 + 4000 * 0.0002, cpu  # about 50 µs a line here
    assert cpu[4000] < 30 * max(cpu[400], 0.005), cpu


async def test_an_overlong_reply_line_is_refused(env, hostile):
    hostile(lambda conn: conn.sendall(b"250-" + b"x" * 20_000 + b"\r\n250 ok\r\n"))
    [result], cpu, wall = await deliver(env)
    assert result.outcome is Outcome.TEMPORARY and "too long" in result.reply
    assert wall < 3 and cpu < 0.5


async def test_an_endless_reply_is_cut_at_the_cap(env, hostile):
    def endless(conn: socket.socket) -> None:
        try:
            while True:
                conn.sendall(b"250-more\r\n" * 1000)
        except OSError:  # we hung up
            pass
    hostile(endless)
    [result], cpu, wall = await deliver(env)
    assert result.outcome is Outcome.TEMPORARY and "too long" in result.reply
    assert wall < 3 and cpu < 0.5


async def test_a_reply_that_never_ends_times_out(env, hostile):
    hostile(drip(100_000, pause=0.2))  # one line every 0.2 s, for hours
    [result], _, wall = await deliver(env, command_timeout=1.0)
    assert result.outcome is Outcome.TEMPORARY
    assert wall < 5
