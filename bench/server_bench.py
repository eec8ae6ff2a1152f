"""Whole-server benchmark: mailrelay and chasquid side by side, on loopback.

    .venv/bin/python -m bench.server_bench [--repeat R] [--results DIR] [--no-chasquid]
                                           [--install-chasquid] [--scale F] [--time-budget S]

Writes DIR/server.md (the table), server.json and server.png (throughput against
concurrency); DIR defaults to bench/results/<UTC timestamp>/. ``python -m bench.run_all``
runs this with the other benches.

Both servers run as their own processes on high loopback ports, with the same bench
certificate, the same local user and the same discard MDA: a shell script that reads the
message to EOF, exits 0 and appends one byte to a counter file per server, so "delivered"
is observed the same way for both. A load generator in this process (asyncio, raw SMTP,
no pipelining, 127.0.0.1 only) runs the scenarios:

  a  mx-1KiB        port 25, 1 KiB messages, 10 connections x 20 messages
  b  submit-unsigned-1KiB  submission: STARTTLS + AUTH PLAIN, 1 KiB, 8 connections x 20,
                    from plain@plain.test: a domain without a DKIM key, so neither server
                    signs (chasquid without its post-data hook)
  b-signed  submit-signed-1KiB  the same, 8 x 5 messages (the hook is slow), from
                    bench@bench.test, whose domain has an RSA-2048 key: mailrelay
                    signs itself; chasquid 1.11 signs the way its users do,
                    through Debian's stock post-data hook (/etc/chasquid/hooks/post-data)
                    calling dkimpy's dkimsign (python3-dkim), which reads
                    domains/bench.test/dkim_selector and certs/bench.test/dkim_privkey.pem.
                    Reported against chasquid signing and against chasquid unsigned (b).
  c  mx-conn-per-msg  port 25, 1 KiB, one connection per message, 200 messages, 10 at a time
  d  mx-100KiB      port 25, 100 KiB messages, 10 connections x 20
  sweep             scenario a at 1, 4, 10 (= a) and 32 connections, about 200 messages each

Connections of a, b, d and the sweep are opened (and TLS + AUTH done) before the clock
starts. Per scenario and server:

- accepted msg/s: messages accepted / (first MAIL sent .. last 250 after the data received);
- end-to-end msg/s: the same, until the discard MDA has counted every accepted message;
- DATA->250 latency p50/p99: from sending DATA to the 250 after the final dot (the 354
  round trip and the body included); MAIL->250 p50: the whole transaction;
- server CPU ms/msg: utime+stime of all the server's processes (all their threads): the
  server process and every long-lived descendant, that is every descendant but the MDAs
  and hooks it runs, from the moment the
  clock starts (the sessions' TLS and AUTH left out) until every message was delivered,
  so delivery work is included; the MDA processes it ran (reaped children,
  cutime+cstime) are shown apart ("MDA CPU"), and so is chasquid's post-data hook in
  b-signed (sh + dkimsign, also reaped children);
- peak RSS: VmHWM of each of the server's processes, summed, each reset before each
  measurement (clear_refs);
- client CPU ms/msg: the load generator's own CPU, to see when it is the bottleneck;
- machine busy %: how busy all the machine's CPUs were over the same span (/proc/stat).
  Near 100 %, the rate is set by the CPU every part spends per message (server, MDA,
  load generator, kernel), not by waiting.

The servers take turns (a measurement of one, then the same of the other, the order
flipping every time) for --repeat rounds; the medians are reported with the ratio
mailrelay/chasquid. Shared machines drift, so only alternated medians are comparable.

DNS stays on loopback. mailrelay's resolver is pointed (dns.nameservers) at a dnslib
server of the bench on 127.0.0.1. chasquid resolves with Go's resolver, which reads
/etc/resolv.conf (its SPF check of the MAIL FROM domain on port 25 queries TXT records);
it is therefore started in a private mount namespace (unshare -m, needs root) whose
/etc/resolv.conf names a second bench DNS server on 127.0.0.153:53. Senders on port 25
are under sender.invalid, which both DNS servers answer NXDOMAIN at once. Without root
chasquid is not run. The queries each server made are listed in the report. chasquid's
PATH holds only the commands its stock hook needs (a private directory of links: cat,
mktemp, rm, cut, grep, diff, dkimsign), so the hook's optional filters (spamc, rspamc,
clamdscan, greylist), when another package installed them here, stay out of the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import importlib
import ipaddress
import json
import math
import os
import platform
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.ports import free_port
from bench.report import emit

REPO = Path(__file__).resolve().parents[1]
HOSTNAME = "mail.bench.test"
DOMAIN = "bench.test"
USER = f"bench@{DOMAIN}"  # the recipient of every message, and the signing sender of b-signed
PLAIN_DOMAIN = "plain.test"  # a local domain without a DKIM key
PLAIN_USER = f"plain@{PLAIN_DOMAIN}"  # the sender of b (unsigned)
PASSWORD = "bench-password-1"
SELECTOR = "bench"
SENDER = "alice@sender.invalid"  # port 25: a domain both DNS servers answer NXDOMAIN
CLIENT_HELO = "client.bench.test"
CHASQUID_DNS = ("127.0.0.153", 53)  # resolv.conf takes no port: 53 on a spare loopback IP
KIB = 1024


@dataclass(frozen=True)
class Scenario:
    name: str
    label: str  # the brief's letter: a, b, c, d, sweep
    port: str  # "smtp" (25) or "submission" (587: STARTTLS + AUTH PLAIN)
    size: int  # message bytes
    connections: int  # at once
    per_connection: int  # messages per connection (per worker with reconnect)
    reconnect: bool = False  # one connection per message
    # Submission from the domain with a DKIM key (mailrelay signs; chasquid gets its
    # post-data hook); otherwise from PLAIN_DOMAIN, which neither server signs for.
    signed: bool = False

    @property
    def user(self) -> str:
        """Who authenticates and sends (submission only)."""
        return USER if self.signed else PLAIN_USER

    @property
    def messages(self) -> int:
        return self.connections * self.per_connection

    def describe(self) -> str:
        where = "submission, STARTTLS + AUTH PLAIN" if self.port == "submission" else "port 25"
        if self.port == "submission":
            where += (", DKIM-signed (chasquid: stock post-data hook + dkimsign)" if self.signed
                      else ", unsigned (a domain without a key; chasquid: no hook)")
        size = f"{self.size // KIB} KiB" if self.size % KIB == 0 else f"{self.size} B"
        if self.reconnect:
            shape = (f"one connection per message, {self.messages} messages, "
                     f"{self.connections} at a time")
        else:
            shape = f"{self.connections} connections x {self.per_connection} messages"
        return f"{self.label}: {where}, {size}, {shape}"


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("mx-1KiB", "a", "smtp", KIB, 10, 20),
    Scenario("submit-unsigned-1KiB", "b", "submission", KIB, 8, 20),
    # Fewer messages: chasquid's stock hook costs about a second of CPU per message here
    # (two dkimsign starts), so 8 x 20 would take minutes per round.
    Scenario("submit-signed-1KiB", "b-signed", "submission", KIB, 8, 5, signed=True),
    Scenario("mx-conn-per-msg", "c", "smtp", KIB, 10, 20, reconnect=True),
    Scenario("mx-100KiB", "d", "smtp", 100 * KIB, 10, 20),
)
SWEEP = (1, 4, 10, 32)  # connections, scenario a's settings
SWEEP_MESSAGES = 200  # about this many messages per sweep point


def sweep_scenarios(connections: Sequence[int], base: Scenario,
                    messages: int = SWEEP_MESSAGES) -> list[Scenario]:
    """Scenario ``base`` at each concurrency; the one equal to ``base`` is ``base`` itself."""
    points = []
    for count in connections:
        per = max(1, math.ceil(messages / count))
        if count == base.connections and per == base.per_connection:
            points.append(base)
        else:
            points.append(Scenario(f"sweep-{count}", "sweep", base.port, base.size, count, per))
    return points


# -- messages --------------------------------------------------------------------------

_LINE = b"The quick brown fox jumps over the lazy dog, and the bench counts every byte.\r\n"


def make_message(size: int, sender: str, recipient: str, number: int) -> bytes:
    """A plain-text message of exactly ``size`` bytes (no line starts with a dot)."""
    header = (f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: bench message {number}\r\n"
              f"Date: Mon, 01 Jan 2024 09:30:00 +0000\r\n"
              f"Message-ID: <bench.{number}.{os.getpid()}@{CLIENT_HELO}>\r\n"
              f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
              ).encode()
    need = size - len(header)
    body = bytearray((_LINE * (need // len(_LINE) + 1))[:need])
    body[-2:] = b"\r\n"  # the cut may fall anywhere in a line: end it properly...
    if body[-3:-2] == b"\r":
        body[-3:-2] = b"x"  # ...without leaving a bare CR
    return header + bytes(body)


# -- the load generator ----------------------------------------------------------------


class SMTPFailure(Exception):
    """A reply other than the one expected."""


def check_loopback(host: str) -> None:
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"the bench talks to loopback addresses only, not {host}")


class Client:
    """One SMTP connection, one command at a time (no pipelining)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, host: str, port: int) -> Client:
        check_loopback(host)
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        client = cls(reader, writer)
        await client.expect(220)
        return client

    async def reply(self) -> tuple[int, bytes]:
        last = b""
        while True:
            line = await self.reader.readline()
            if not line:
                raise SMTPFailure("connection closed by the server")
            last = line
            if line[3:4] != b"-":
                break
        try:
            return int(last[:3]), last.rstrip()
        except ValueError:
            raise SMTPFailure(f"bad reply {last!r}") from None

    async def expect(self, code: int) -> bytes:
        got, text = await self.reply()
        if got != code:
            raise SMTPFailure(text.decode("utf-8", "replace"))
        return text

    async def command(self, line: bytes, code: int) -> bytes:
        self.writer.write(line + b"\r\n")
        return await self.expect(code)

    async def hello(self, tls: ssl.SSLContext | None = None, user: str = USER) -> None:
        await self.command(b"EHLO " + CLIENT_HELO.encode(), 250)
        if tls is not None:
            await self.command(b"STARTTLS", 220)
            await self.writer.start_tls(tls, server_hostname=HOSTNAME)
            await self.command(b"EHLO " + CLIENT_HELO.encode(), 250)
            token = base64.b64encode(f"\0{user}\0{PASSWORD}".encode())
            await self.command(b"AUTH PLAIN " + token, 235)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(b"QUIT\r\n")
            await asyncio.wait_for(self.reply(), 5)
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


@dataclass
class LoadResult:
    messages: int = 0
    accepted: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # seconds, DATA .. 250
    transactions: list[float] = field(default_factory=list)  # seconds, MAIL .. 250
    first_mail: float = math.inf  # perf_counter
    last_ok: float = 0.0


class Load:
    """Runs one scenario against one server's ports and collects the timings."""

    def __init__(self, host: str, port: int, scenario: Scenario, sender: str,
                 tls: ssl.SSLContext | None, on_start: Callable[[], None] = lambda: None):
        self.host = host
        self.on_start = on_start  # called when the clock starts (sessions set up)
        self.port = port
        self.scenario = scenario
        self.sender = sender
        self.tls = tls
        self.result = LoadResult(messages=scenario.messages)
        self.data = [make_message(scenario.size, sender, USER, n) + b".\r\n"
                     for n in range(scenario.messages)]
        self.mail = f"MAIL FROM:<{sender}> SIZE={scenario.size}".encode()
        self.rcpt = f"RCPT TO:<{USER}>".encode()

    async def open(self) -> Client:
        client = await Client.connect(self.host, self.port)
        await client.hello(self.tls, self.sender)  # submission: the sender authenticates
        return client

    async def transaction(self, client: Client, number: int) -> None:
        result = self.result
        try:
            begin = time.perf_counter()
            result.first_mail = min(result.first_mail, begin)
            await client.command(self.mail, 250)
            await client.command(self.rcpt, 250)
            start = time.perf_counter()
            await client.command(b"DATA", 354)
            client.writer.write(self.data[number])
            await client.expect(250)
        except SMTPFailure as exc:
            result.errors.append(str(exc))
            if "closed" in str(exc):
                raise
            await client.command(b"RSET", 250)
            return
        end = time.perf_counter()
        result.latencies.append(end - start)
        result.transactions.append(end - begin)
        result.accepted += 1
        result.last_ok = max(result.last_ok, end)

    async def run(self) -> LoadResult:
        scenario = self.scenario
        numbers = [range(worker * scenario.per_connection, (worker + 1) * scenario.per_connection)
                   for worker in range(scenario.connections)]
        if scenario.reconnect:
            self.on_start()
            await asyncio.gather(*(self._one_per_message(n) for n in numbers))
        else:
            # Sessions first (TLS and AUTH included), then the clock starts.
            clients = await asyncio.gather(*(self.open() for _ in numbers))
            self.on_start()
            await asyncio.gather(*(self._many(c, n) for c, n in zip(clients, numbers,
                                                                     strict=True)))
        return self.result

    async def _many(self, client: Client, numbers: range) -> None:
        try:
            for number in numbers:
                await self.transaction(client, number)
        except (SMTPFailure, OSError) as exc:
            self.result.errors.append(f"session ended: {exc}")
        finally:
            await client.close()

    async def _one_per_message(self, numbers: range) -> None:
        for number in numbers:
            try:
                client = await self.open()
            except (SMTPFailure, OSError) as exc:
                self.result.errors.append(f"connect: {exc}")
                continue
            try:
                await self.transaction(client, number)
            except (SMTPFailure, OSError) as exc:
                self.result.errors.append(f"session ended: {exc}")
            finally:
                await client.close()


# -- measuring the server process ------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> tuple[float, float]:
    """(own, reaped children) CPU seconds of ``pid``: utime+stime (all its threads) and
    cutime+cstime (children it has waited for)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return (utime + stime) / _TICK, (cutime + cstime) / _TICK


def proc_status_kib(pid: int, key: str = "VmHWM") -> int | None:
    """A memory line of /proc/<pid>/status (VmHWM: peak RSS, VmRSS: now), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def reset_hwm(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so a peak is per measurement."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def process_table() -> dict[int, tuple[int, bytes]]:
    """pid -> (ppid, command line) of every process now."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            table[int(entry.name)] = (int(stat[stat.rindex(")") + 2:].split()[1]),
                                      (entry / "cmdline").read_bytes())
        except (OSError, ValueError):
            continue  # gone meanwhile
    return table


def server_pids(root: int, exclude: Sequence[str] = ()) -> list[int]:
    """``root`` and its descendants, leaving out every process whose command line contains
    one of ``exclude`` (the MDA, the hooks) and everything under it: the server's own
    processes, however many it runs."""
    table = process_table()
    markers = [marker.encode() for marker in exclude]
    found, todo = [root], [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, cmdline) in table.items():
            if ppid == parent and not any(m in cmdline for m in markers):
                found.append(pid)
                todo.append(pid)
    return sorted(found)


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


# -- the servers -----------------------------------------------------------------------

DISCARD_MDA = """#!/bin/sh
# The bench's discard MDA, shared by both servers: read the message to EOF, then count it
# with one byte appended to the counter file named by $1 (O_APPEND: one atomic write).
# While "$1.keep" exists the message is kept in "$1.last" (the bench checks signatures).
if [ -e "$1.keep" ]; then cat >"$1.last" || exit 75; else cat >/dev/null || exit 75; fi
printf x >>"$1"
"""
# The commands chasquid's stock post-data hook runs when only dkimsign is there to run.
HOOK_COMMANDS = ("cat", "mktemp", "rm", "cut", "grep", "diff", "dkimsign")
STOCK_HOOK = Path("/etc/chasquid/hooks/post-data")  # Debian's chasquid package


class DNSServer:
    """A TestDNSServer (tests/support/dns_server.py) in its own process, so answering
    queries does not take the load generator's GIL. It knows no names: everything is
    NXDOMAIN. Stopping it returns the queries it saw, counted by type and name."""

    def __init__(self, host: str, port: int = 0):
        check_loopback(host)
        self.host = host
        self.port = port
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        """Start serving; on a fixed port (chasquid's: resolv.conf names no port) at a
        spare address, once more at the next if another bench took it meanwhile."""
        first = self.host
        for attempt in range(3 if self.port else 1):
            if self.port:
                self.host = spare_address(first, self.port, skip=attempt)
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bench.server_bench", "--serve-dns",
                 f"{self.host}:{self.port}"],
                cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert self.process.stdout is not None
            line = self.process.stdout.readline().split()
            if len(line) == 2 and line[0] == "ready":
                self.port = int(line[1])
                return
            self.process.kill()
            self.process.wait()
            self.process = None
        raise RuntimeError(f"DNS server on {self.host}:{self.port} did not start")

    def stop(self) -> dict[str, int]:
        if self.process is None:
            return {}
        try:
            out, _ = self.process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out = ""
        self.process = None
        lines = out.strip().splitlines()
        return json.loads(lines[-1]) if lines else {}


def spare_address(host: str, port: int, skip: int = 0) -> str:
    """``host``, or the first of the next 127.0.N.x where nothing holds UDP ``port`` (two
    benches at once, e.g. parallel tests, each need a DNS server on port 53), passing
    over the first ``skip`` free ones."""
    octets = host.split(".")
    for spare in range(16):
        candidate = ".".join([*octets[:2], str((int(octets[2]) + spare) % 256), octets[3]])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((candidate, port))
            except OSError:
                continue
        if skip == 0:
            return candidate
        skip -= 1
    return host


def serve_dns(where: str) -> int:
    """The --serve-dns child: serve until stdin closes, then print the query counts."""
    from tests.support.dns_server import TestDNSServer

    host, _, port = where.rpartition(":")
    server = TestDNSServer(host, int(port))
    server.start()
    print(f"ready {server.port}", flush=True)
    sys.stdin.read()
    server.stop()
    print(json.dumps(dict(Counter(f"{rtype} {name}" for name, rtype in server.queries))),
          flush=True)
    return 0


def write_aliases(config: Path) -> None:
    """postmaster@ for each domain (RFC 5321 4.5.1; `mailrelay check` requires it), in the
    aliases syntax both servers read, so their configurations stay alike."""
    for address in (USER, PLAIN_USER):
        local, domain = address.split("@")
        (config / "domains" / domain / "aliases").write_text(f"postmaster: {local}\n")


def write_cert(directory: Path, ca: Any) -> None:
    """certs/<hostname>/fullchain.pem + privkey.pem (both servers read this layout)."""
    cert_dir = directory / HOSTNAME
    cert_dir.mkdir(parents=True, exist_ok=True)
    cert = ca.issue_cert(HOSTNAME, "127.0.0.1")
    cert.private_key_pem.write_to_path(str(cert_dir / "privkey.pem"))
    (cert_dir / "privkey.pem").chmod(0o600)  # as a real one: `mailrelay check` insists
    (cert_dir / "fullchain.pem").write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))


def wait_listening(host: str, port: int, process: subprocess.Popen[bytes], log: Path,
                   timeout: float = 30.0) -> None:
    """Until the server answers 220 on (host, port)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited ({process.returncode}): "
                               f"{log.read_text(errors='replace')[-2000:]}")
        try:
            with socket.create_connection((host, port), timeout=2) as sock:
                if sock.recv(512).startswith(b"220"):
                    sock.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server not answering on {host}:{port} after {timeout:.0f}s")


@functools.cache
def bench_dkim_key() -> Any:
    """The RSA-2048 DKIM key of DOMAIN, one per run, given to both servers."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def dkim_txt(key: Any) -> str:
    """The DNS TXT value publishing ``key`` (RFC 6376 3.6.1)."""
    from cryptography.hazmat.primitives import serialization

    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


def write_private_key(path: Path, key: Any, pkcs8: bool) -> None:
    """PEM, mode 0600: PKCS#8 for mailrelay, PKCS#1 ("RSA PRIVATE KEY") for dkimpy's
    dkimsign, which every dkimpy release reads."""
    from cryptography.hazmat.primitives import serialization

    layout = (serialization.PrivateFormat.PKCS8 if pkcs8
              else serialization.PrivateFormat.TraditionalOpenSSL)
    pem = key.private_bytes(serialization.Encoding.PEM, layout, serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)


def signature_check(message: bytes | None) -> str:
    """What a delivered message says about DKIM: "unsigned", "signed d=… s=…, verified"
    (dkimpy, against the bench key's record) or why not."""
    if message is None:
        return "no message kept"
    head = message.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
    unfolded = head.replace(b"\n ", b" ").replace(b"\n\t", b" ")  # RFC 5322 folding
    found = [line for line in unfolded.split(b"\n")
             if line.lower().startswith(b"dkim-signature:")]
    if not found:
        return "unsigned"
    try:
        import dkim
    except ImportError:
        return "signed (not verified: dkimpy is not installed)"
    record = dkim_txt(bench_dkim_key()).encode()
    wanted = f"{SELECTOR}._domainkey.{DOMAIN}".encode()

    def dnsfunc(name: bytes | str, timeout: float = 5) -> bytes | None:
        name = name.encode() if isinstance(name, str) else name
        return record if name.rstrip(b".").lower() == wanted else None

    try:
        ok = dkim.verify(message, dnsfunc=dnsfunc)
    except Exception as exc:  # dkimpy raises its own and ValueError alike
        return f"signed, not verifiable: {exc}"
    fields = dict(part.strip().split("=", 1) for part in
                  found[0].decode(errors="replace").split(":", 1)[1].split(";")
                  if "=" in part)
    where = f"d={fields.get('d', '?')} s={fields.get('s', '?')}"
    return f"signed {where}, verified" if ok else f"signed {where}, verification FAILED"


class Server:
    """A server under test: its process, its ports, its delivery counter."""

    name = ""

    def __init__(self, work: Path, mda: Path, ca: Any, dns: DNSServer):
        self.root = work / self.name
        self.root.mkdir(parents=True)
        self.mda = mda
        self.ca = ca
        self.dns = dns
        self.counter = work / f"{self.name}.delivered"
        self.counter.touch()
        self.log = self.root / "server.log"
        self.ports = {name: free_port() for name in ("smtp", "submission", "submission_tls")}
        self.process: subprocess.Popen[bytes] | None = None
        self.version = ""
        self.comm = ""  # the name of the process measured (/proc/<pid>/comm)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def delivered(self) -> int:
        return self.counter.stat().st_size

    def keep_messages(self, keep: bool) -> None:
        """While on, the discard MDA keeps the message it got last (last_message)."""
        flag = self.counter.with_name(self.counter.name + ".keep")
        if keep:
            flag.touch()
        else:
            flag.unlink(missing_ok=True)

    def last_message(self) -> bytes | None:
        with contextlib.suppress(OSError):
            return self.counter.with_name(self.counter.name + ".last").read_bytes()
        return None

    def command(self) -> list[str]:
        raise NotImplementedError

    def launch(self, env: dict[str, str] | None = None) -> float:
        """Start the server's process without waiting for it; the perf_counter of the
        moment just before."""
        with self.log.open("ab") as log:
            started = time.perf_counter()
            self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=log, start_new_session=True,
                                            env=None if env is None else {**os.environ, **env})
        return started

    def start(self) -> None:
        self.launch()
        assert self.process is not None
        wait_listening("127.0.0.1", self.ports["smtp"], self.process, self.log)
        wait_listening("127.0.0.1", self.ports["submission"], self.process, self.log)
        self.comm = Path(f"/proc/{self.pid}/comm").read_text().strip()

    def processes(self) -> list[int]:
        """The pids whose CPU and memory are the server's: its process and all its
        descendants but the MDAs and hooks it runs (counted apart, as reaped children)."""
        return server_pids(self.pid, self.helpers())

    def helpers(self) -> list[str]:
        """Markers of the short-lived programs the server runs for each message."""
        return [str(self.mda)]

    def supports(self, scenario: Scenario) -> str | None:
        """None when this server can run ``scenario``, else why not."""
        return None

    def prepare(self, scenario: Scenario) -> None:
        """Set up what ``scenario`` needs before it is measured."""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


def _mailrelay_user_db() -> Any:
    """mailrelay's UserDB class where this checkout has it (before and after the package's
    restructure), or None: then the CLI adds the users."""
    for module in ("mailrelay.policy.users", "mailrelay.users"):
        with contextlib.suppress(ImportError):
            found = getattr(importlib.import_module(module), "UserDB", None)
            if found is not None:
                return found
    return None


class Mailrelay(Server):
    name = "mailrelay"

    def __init__(self, work: Path, mda: Path, ca: Any, dns: DNSServer,
                 cli: Sequence[str] | None = None):
        super().__init__(work, mda, ca, dns)
        self.cli = list(cli) if cli else None  # the `mailrelay` command to run
        self.settings: dict[str, Any] = {}  # mailrelay.yaml, as configure() writes it

    def _cli(self) -> list[str]:
        if self.cli:
            return self.cli
        script = Path(sys.executable).with_name("mailrelay")
        return [str(script)] if script.exists() else [sys.executable, "-m",
                                                      "mailrelay.cli.main"]

    @property
    def config_dir(self) -> Path:
        return self.root / "config"

    def configure(self) -> None:
        config = self.config_dir
        self.settings = {
            "hostname": HOSTNAME,
            "listen": {name: [f"127.0.0.1:{port}"] for name, port in self.ports.items()},
            "data_dir": "var",
            "tls": {"certs_dir": "certs", "self_signed": False},
            "dns": {"nameservers": [f"{self.dns.host}:{self.dns.port}"], "timeout": "2s"},
            "delivery": {"local_mda": f"{self.mda} {self.counter} {{address}}"},
            "limits": {"max_connections_per_ip": 200, "auth_failure_delay": "0s"},
        }
        for domain in (DOMAIN, PLAIN_DOMAIN):  # a directory makes a local domain
            (config / "domains" / domain).mkdir(parents=True)
        write_aliases(config)
        self.write_settings()
        write_cert(config / "certs", self.ca)
        self.add_users()
        # The key as `mailrelay dkim keygen` writes it (README: Files); PLAIN_DOMAIN has none.
        write_private_key(config / "domains" / DOMAIN / f"dkim:{SELECTOR}.pem",
                          bench_dkim_key(), pkcs8=True)
        self.version = git_version()

    def write_settings(self) -> None:
        import yaml

        (self.config_dir / "mailrelay.yaml").write_text(yaml.safe_dump(self.settings))

    def add_users(self) -> None:
        # In-process, as `mailrelay user add` does it: CLI starts would cost seconds per
        # bench run; the CLI only when this checkout's UserDB is not where we look.
        user_db = _mailrelay_user_db()
        for address in (USER, PLAIN_USER):
            local, domain = address.split("@")
            try:
                if user_db is None:
                    raise AttributeError("no UserDB")
                users = user_db.load(self.config_dir / "domains" / domain / "users", domain)
                users.set_password(local, PASSWORD)
                users.save()
            except (AttributeError, TypeError):
                subprocess.run([*self._cli(), "-c", str(self.config_dir), "user", "add",
                                address, "--password-stdin"], input=PASSWORD + "\n",
                               text=True, capture_output=True, check=True)

    def _check(self) -> tuple[str | None, list[str]]:
        """``mailrelay check`` of the configuration as it is: (None when valid, else its
        first error line; every line it printed)."""
        done = subprocess.run([*self._cli(), "-c", str(self.config_dir), "check"],
                              capture_output=True, text=True)
        lines = (done.stdout + "\n" + done.stderr).strip().splitlines()
        if done.returncode == 0:
            return None, lines
        errors = [line for line in done.stderr.splitlines() if line.startswith("error")]
        return (errors or lines or [f"exit status {done.returncode}"])[0], lines

    def check(self) -> str | None:
        return self._check()[0]

    def command(self) -> list[str]:
        return [*self._cli(), "serve", "-c", str(self.config_dir)]


class Chasquid(Server):
    name = "chasquid"

    def __init__(self, work: Path, mda: Path, ca: Any, dns: DNSServer):
        super().__init__(work, mda, ca, dns)
        self.hook_problem: str | None = "not configured"
        self.binary = shutil.which("chasquid") or "chasquid"

    @property
    def config_dir(self) -> Path:
        return self.root / "config"

    @property
    def hook(self) -> Path:
        return self.config_dir / "hooks" / "post-data"

    def configure(self) -> None:
        config = self.config_dir
        for domain in (DOMAIN, PLAIN_DOMAIN):
            (config / "domains" / domain).mkdir(parents=True)
        write_aliases(config)
        write_cert(config / "certs", self.ca)
        lines = [
            f'hostname: "{HOSTNAME}"',
            f'smtp_address: "127.0.0.1:{self.ports["smtp"]}"',
            f'submission_address: "127.0.0.1:{self.ports["submission"]}"',
            f'submission_over_tls_address: "127.0.0.1:{self.ports["submission_tls"]}"',
            f'data_dir: "{self.root / "data"}"',
            f'mail_delivery_agent_bin: "{self.mda}"',
            f'mail_delivery_agent_args: "{self.counter}"',
            'mail_delivery_agent_args: "%to%"',
            f'mail_log_path: "{self.root / "mail.log"}"',
        ]
        (config / "chasquid.conf").write_text("\n".join(lines) + "\n")
        for address in (USER, PLAIN_USER):
            subprocess.run(["chasquid-util", f"--configdir={config}", "user-add", address,
                            f"--password={PASSWORD}"], check=True, capture_output=True)
        # What the stock hook looks for (relative to the configuration directory, where
        # chasquid runs): domains/$DOMAIN/dkim_selector and certs/$DOMAIN/dkim_privkey.pem.
        (config / "domains" / DOMAIN / "dkim_selector").write_text(SELECTOR + "\n")
        write_private_key(config / "certs" / DOMAIN / "dkim_privkey.pem", bench_dkim_key(),
                          pkcs8=False)
        (config / "hooks").mkdir()
        self.hook_problem = self._hook_bin()
        # Go's resolver reads /etc/resolv.conf: chasquid gets its own, naming our server.
        (self.root / "resolv.conf").write_text(
            f"nameserver {self.dns.host}\noptions timeout:1 attempts:1\n")
        done = subprocess.run([self.binary, "-version"], capture_output=True, text=True)
        self.version = (done.stdout + done.stderr).strip().splitlines()[0]

    def _hook_bin(self) -> str | None:
        """Links to the commands the stock hook runs, in the directory that is chasquid's
        PATH; None when the hook can sign here, else why not."""
        bin_dir = self.root / "bin"
        bin_dir.mkdir()
        missing = []
        for name in HOOK_COMMANDS:
            found = shutil.which(name)
            if found is None:
                missing.append(name)
            else:
                (bin_dir / name).symlink_to(found)
        if not STOCK_HOOK.is_file():
            return f"chasquid's stock hook {STOCK_HOOK} is missing"
        if "dkimsign" in missing:
            return "dkimsign is not installed (apt-get install python3-dkim)"
        if missing:
            return f"the stock hook needs {', '.join(missing)}"
        done = subprocess.run([str(bin_dir / "dkimsign"), "--help"], capture_output=True,
                              text=True)
        if "--identity" not in done.stdout + done.stderr:  # the hook's own test
            return "dkimsign is not dkimpy's (python3-dkim)"
        return None

    def helpers(self) -> list[str]:
        return [str(self.mda), str(self.hook)]

    def supports(self, scenario: Scenario) -> str | None:
        return self.hook_problem if scenario.signed else None

    def prepare(self, scenario: Scenario) -> None:
        # chasquid looks for the hook at every message: present only where it signs.
        if scenario.signed and self.hook_problem is None:
            if not self.hook.exists():
                shutil.copyfile(STOCK_HOOK, self.hook)
                self.hook.chmod(0o755)
        else:
            self.hook.unlink(missing_ok=True)

    def command(self) -> list[str]:
        # unshare execs sh, sh execs chasquid: the pid we hold is chasquid's.
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind "$1" /etc/resolv.conf && PATH="$3" && export PATH && '
                'exec "$4" -config_dir "$2"',
                "sh", str(self.root / "resolv.conf"), str(self.config_dir),
                str(self.root / "bin"), self.binary]


def chasquid_status(install: bool, log: Callable[[str], None]) -> str | None:
    """None when chasquid can run here, else why not. With ``install`` (root), apt-get
    installs chasquid, and python3-dkim for its stock hook's dkimsign, when missing."""
    if install and shutil.which("chasquid") is None and os.geteuid() != 0:
        return "chasquid is not installed and --install-chasquid needs root"
    if install and os.geteuid() == 0 and (shutil.which("chasquid") is None
                                          or shutil.which("dkimsign") is None):
        install_chasquid(log)
    if shutil.which("chasquid") is None or shutil.which("chasquid-util") is None:
        return "chasquid is not installed (apt-get install chasquid, or --install-chasquid)"
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return ("chasquid needs root here: its SPF lookups use /etc/resolv.conf, and the "
                "bench gives it a private one (unshare -m) to keep DNS on loopback")
    return None


def install_chasquid(log: Callable[[str], None]) -> None:
    before = set(pids_named("chasquid"))
    log("installing chasquid and python3-dkim with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    wait = ["-o", "DPkg::Lock::Timeout=300"]  # a shared machine: another apt-get may run
    subprocess.run(["apt-get", *wait, "update"], check=True, capture_output=True, env=env)
    subprocess.run(["apt-get", *wait, "install", "-y", "chasquid", "python3-dkim"],
                   check=True, capture_output=True, env=env)
    # The package may start its own daemon (systemd): stop exactly that one.
    for pid in set(pids_named("chasquid")) - before:
        log(f"stopping the chasquid daemon the package started (pid {pid})")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    if shutil.which("systemctl"):
        subprocess.run(["systemctl", "disable", "--now", "chasquid.service",
                        "chasquid-smtp.socket", "chasquid-submission.socket",
                        "chasquid-submission_tls.socket"], capture_output=True)


def pids_named(name: str) -> list[int]:
    done = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True)
    return [int(p) for p in done.stdout.split()]


def git_version() -> str:
    done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO,
                          capture_output=True, text=True)
    return f"mailrelay {done.stdout.strip() or 'unknown'}"


# -- one measurement -------------------------------------------------------------------


async def wait_delivered(server: Server, target: int, timeout: float) -> float | None:
    """perf_counter when the server's counter reached ``target``, None on timeout."""
    deadline = time.perf_counter() + timeout
    while True:
        now = time.perf_counter()
        if server.delivered() >= target:
            return now
        if now > deadline:
            return None
        await asyncio.sleep(0.002)


async def measure(server: Server, scenario: Scenario, tls: ssl.SSLContext) -> dict[str, Any]:
    port = server.ports[scenario.port]
    submission = scenario.port == "submission"
    server.prepare(scenario)
    base = server.delivered()
    # The server's processes as they are now; one that is gone at the end is left out.
    pids = server.processes()
    rss_before = sum_kib(pids, "VmRSS")
    hwm_reset = all([reset_hwm(pid) for pid in pids])  # a list: reset every one
    before: dict[str, Any] = {}

    def clock_started() -> None:
        # CPU is counted from here: connection set-up before the clock (TLS handshakes,
        # AUTH's scrypt) is left out, as it is of the rates.
        before.update(cpu=own_cpu(pids), children=own_cpu(pids, reaped=True),
                      client=time.process_time(), machine=machine_ticks())

    load = Load("127.0.0.1", port, scenario, scenario.user if submission else SENDER,
                tls if submission else None, on_start=clock_started)
    result = await asyncio.wait_for(load.run(), 120 + scenario.messages)
    client_cpu = time.process_time() - before["client"]
    done = await wait_delivered(server, base + result.accepted, 60 + scenario.messages * 0.5)
    await asyncio.sleep(0.05)  # let the last MDA be reaped, so children's CPU is counted
    machine_after = machine_ticks()
    children_after = own_cpu(pids, reaped=True)
    cpu_before, children_before = before["cpu"], before["children"]
    cpu_after = own_cpu(pids)
    alive = [pid for pid in pids if pid in cpu_before and pid in cpu_after]
    cpu = sum(cpu_after[pid] - cpu_before[pid] for pid in alive)
    # The MDAs (and chasquid's hooks) each of the server's processes ran and reaped.
    reaped = sum(children_after[pid] - children_before[pid] for pid in alive)
    count = max(result.accepted, 1)
    start = result.first_mail
    accept_seconds = result.last_ok - start if result.accepted else math.nan
    e2e_seconds = done - start if done is not None and result.accepted else math.nan
    return {
        "messages": result.messages,
        "accepted": result.accepted,
        "delivered": server.delivered() - base,
        "errors": result.messages - result.accepted,
        "error_samples": sorted(set(result.errors))[:3],
        "accept_seconds": accept_seconds,
        "e2e_seconds": e2e_seconds,
        "accepted_per_s": result.accepted / accept_seconds if result.accepted else 0.0,
        "e2e_per_s": result.accepted / e2e_seconds if done is not None else 0.0,
        "latency_p50_ms": percentile(result.latencies, 0.50) * 1000,
        "latency_p99_ms": percentile(result.latencies, 0.99) * 1000,
        # MAIL .. 250: also counts what a server does at MAIL and RCPT (chasquid's SPF).
        "transaction_p50_ms": percentile(result.transactions, 0.50) * 1000,
        "server_cpu_ms_per_msg": cpu * 1000 / count,
        "mda_cpu_ms_per_msg": reaped * 1000 / count,
        "client_cpu_ms_per_msg": client_cpu * 1000 / count,
        "machine_busy_pct": busy_percent(before["machine"], machine_after),
        "rss_before_kib": rss_before,
        "peak_rss_kib": sum_kib(alive),
        "peak_rss_per_measurement": hwm_reset,
        "server_processes": len(alive),
    }


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs so far, from /proc/stat's "cpu" line; idle
    and iowait are not busy (steal, guest are left out of both)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    total = sum(fields)  # user nice system idle iowait irq softirq
    return total - fields[3] - fields[4], total


def busy_percent(before: tuple[int, int], after: tuple[int, int]) -> float:
    """How busy the machine's CPUs were between two ``machine_ticks``, in percent."""
    total = after[1] - before[1]
    return 100.0 * (after[0] - before[0]) / total if total > 0 else math.nan


def own_cpu(pids: Sequence[int], reaped: bool = False) -> dict[int, float]:
    """utime+stime of each of ``pids`` (with ``reaped``: cutime+cstime, its children
    waited for), in seconds, leaving out the ones gone."""
    seconds = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            seconds[pid] = proc_cpu(pid)[1 if reaped else 0]
    return seconds


def sum_kib(pids: Sequence[int], key: str = "VmHWM") -> int | None:
    """A memory line of /proc/<pid>/status summed over ``pids``, leaving out the ones gone."""
    values = []
    for pid in pids:
        with contextlib.suppress(OSError):
            values.append(proc_status_kib(pid, key))
    known = [v for v in values if v is not None]
    return sum(known) if known else None


# -- the whole run ---------------------------------------------------------------------

METRICS = ("accepted_per_s", "e2e_per_s", "latency_p50_ms", "latency_p99_ms",
           "transaction_p50_ms", "server_cpu_ms_per_msg", "mda_cpu_ms_per_msg",
           "client_cpu_ms_per_msg", "machine_busy_pct")


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    # A figure older reports (--render) lack is None.
    summary: dict[str, Any] = {
        m: statistics.median(values) if (values := [r[m] for r in runs if m in r]) else None
        for m in METRICS}
    # The median like every other figure; memory a server keeps from earlier scenarios
    # (after AUTH, scrypt's buffers) is part of what it costs, and rss_before_kib says how
    # much of a peak was there before the scenario started.
    rss = [r["peak_rss_kib"] for r in runs if r["peak_rss_kib"] is not None]
    summary["peak_rss_kib"] = statistics.median(rss) if rss else None
    before = [r["rss_before_kib"] for r in runs if r["rss_before_kib"] is not None]
    summary["rss_before_kib"] = statistics.median(before) if before else None
    for key in ("messages", "accepted", "delivered", "errors"):
        summary[key] = sum(r[key] for r in runs)
    return summary


def client_context(ca: Any) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def run_rounds(servers: list[Server], measurements: list[Scenario], repeat: int,
                     tls: ssl.SSLContext, deadline: float, log: Callable[[str], None],
                     ) -> tuple[dict[str, dict[str, list]], int, dict[str, dict[str, str]]]:
    """The alternated rounds: (runs per server and scenario, rounds done, and per
    submission scenario what DKIM signature each server's delivered message carried)."""
    runs: dict[str, dict[str, list]] = {s.name: {m.name: [] for m in measurements}
                                        for s in servers}
    # Warm up (first TLS handshake, lazy imports, the hook's first dkimsign, Go's first GC)
    # outside the numbers. The submission warm-ups also show that the work is equal: the
    # message each server delivered is checked for a DKIM signature (b: none; b-signed: one
    # that verifies).
    signatures: dict[str, dict[str, str]] = {}
    for server in servers:
        for scenario in [m for m in measurements if m.label != "sweep"]:
            if server.supports(scenario):
                continue
            keep = scenario.port == "submission"
            server.keep_messages(keep)
            await measure(server, replace(scenario, connections=1, per_connection=2), tls)
            server.keep_messages(False)
            if keep:
                found = signature_check(server.last_message())
                signatures.setdefault(scenario.name, {})[server.name] = found
                log(f"warm-up {scenario.name} {server.name}: {found}")
    rounds = 0
    for round_ in range(repeat):
        if round_ and time.monotonic() > deadline:
            log(f"time budget used: stopping after {rounds} rounds")
            break
        for index, scenario in enumerate(measurements):
            order = servers if (round_ + index) % 2 == 0 else servers[::-1]
            for server in order:
                if server.supports(scenario):
                    continue  # said once, in the report's notes
                run = await measure(server, scenario, tls)
                run["order"] = order.index(server)
                runs[server.name][scenario.name].append(run)
                log(f"round {round_ + 1} {scenario.name:18} {server.name:9} "
                    f"accepted {run['accepted_per_s']:7.1f}/s  e2e {run['e2e_per_s']:7.1f}/s  "
                    f"p50 {run['latency_p50_ms']:6.1f} ms  cpu "
                    f"{run['server_cpu_ms_per_msg']:5.2f} ms/msg"
                    + (f"  errors {run['errors']}" if run["errors"] else ""))
                await asyncio.sleep(0.2)  # let the other server's queue settle
        rounds += 1
    return runs, rounds, signatures


def run_bench(work: Path, *, repeat: int = 3, with_chasquid: bool = True,
              install_chasquid: bool = False, scenarios: Sequence[Scenario] = SCENARIOS,
              sweep: Sequence[int] = SWEEP, sweep_messages: int = SWEEP_MESSAGES,
              time_budget: float = 420.0,
              log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Start the servers in ``work`` (an empty directory), measure, stop them."""
    import trustme

    started = time.monotonic()
    absent = chasquid_status(install_chasquid, log) if with_chasquid else "not asked for"
    if absent:
        log(f"chasquid: {absent}; mailrelay runs alone")
    mda = work / "discard-mda"
    mda.write_text(DISCARD_MDA)
    mda.chmod(0o755)
    ca = trustme.CA()
    dns_servers = {"mailrelay": DNSServer("127.0.0.1")}
    if not absent:
        dns_servers["chasquid"] = DNSServer(*CHASQUID_DNS)
    servers: list[Server] = []
    queries: dict[str, dict[str, int]] = {}
    try:
        dns_servers["mailrelay"].start()
        mailrelay = Mailrelay(work, mda, ca, dns_servers["mailrelay"])
        mailrelay.configure()
        mailrelay.start()
        servers.append(mailrelay)
        if not absent:
            chasquid = Chasquid(work, mda, ca, dns_servers["chasquid"])
            try:
                dns_servers["chasquid"].start()
                chasquid.configure()
                chasquid.start()
                servers.append(chasquid)
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                # A comparison needs both; a broken chasquid set-up should not hide
                # mailrelay's numbers, so say why and go on alone.
                chasquid.stop()
                absent = f"chasquid did not start: {' '.join(str(exc).split())[:300]}"
                log(f"{absent}; mailrelay runs alone")
        for server in servers:
            log(f"{server.version} listening on {server.ports} (pid {server.pid})")
        scenarios = list(scenarios)
        points = sweep_scenarios(sweep, scenarios[0], sweep_messages) if sweep else []
        measurements = scenarios + [p for p in points if p not in scenarios]
        skipped = {m.name: {s.name: why for s in servers if (why := s.supports(m))}
                   for m in measurements}
        skipped = {name: why for name, why in skipped.items() if why}
        for name, why in skipped.items():
            log(f"{name}: not measured for {', '.join(f'{s} ({w})' for s, w in why.items())}")
        runs, rounds, signatures = asyncio.run(run_rounds(
            servers, measurements, repeat, client_context(ca),
            started + time_budget, log))
    finally:
        for server in servers:
            server.stop()
        for name, dns in dns_servers.items():
            queries[name] = dns.stop()
        if absent:
            queries.pop("chasquid", None)
    names = [s.name for s in servers]
    results: dict[str, Any] = {}
    for scenario in measurements:
        entry: dict[str, Any] = {"title": scenario.describe(), "scenario": asdict(scenario)}
        for name in names:
            entry[name] = {"runs": runs[name][scenario.name]}
        results[scenario.name] = entry
    sweep_report = {"connections": list(sweep), "scenarios": [p.name for p in points]}
    return summarise_report({
        "repeat": repeat, "rounds": rounds,
        "seconds": time.monotonic() - started,
        "servers": {s.name: {"version": s.version, "ports": s.ports, "process": s.comm}
                    for s in servers},
        "chasquid_absent": absent,
        "skipped": skipped,
        "signatures": signatures,
        "machine": machine(work),
        "results": results,
        "sweep": sweep_report,
        "dns_queries": queries,
        "notes": notes(absent, skipped),
    })


def summarise_report(report: dict[str, Any]) -> dict[str, Any]:
    """Fill in the medians, the ratios and the sweep's series from the runs."""
    names = list(report["servers"])
    for entry in report["results"].values():
        for name in names:
            entry[name]["median"] = summarise(entry[name]["runs"])
        if len(names) == 2:
            entry["ratio_mailrelay_to_chasquid"] = ratios(entry["mailrelay"]["median"],
                                                          entry["chasquid"]["median"])
    if len(names) == 2:
        # b-signed is also held against chasquid unsigned (b), as issue 17 decided.
        for entry in report["results"].values():
            twin = unsigned_twin(report["results"], entry)
            if twin is not None:
                entry["unsigned_reference"] = twin
                entry["ratio_mailrelay_to_chasquid_unsigned"] = ratios(
                    entry["mailrelay"]["median"],
                    report["results"][twin]["chasquid"]["median"])
    sweep = report["sweep"]
    for name in names:
        sweep[name] = {m: [report["results"][p][name]["median"][m] for p in sweep["scenarios"]]
                       for m in ("accepted_per_s", "e2e_per_s")}
    return report


def ratios(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, float | None]:
    """mailrelay's medians over chasquid's, per metric both have."""
    return {m: ours[m] / theirs[m] if theirs[m] else None
            for m in (*METRICS, "peak_rss_kib")
            if m != "machine_busy_pct" and ours.get(m) is not None
            and theirs.get(m) is not None}


def unsigned_twin(results: dict[str, Any], entry: dict[str, Any]) -> str | None:
    """The name of the unsigned scenario of the same shape as ``entry``'s signed one (the
    same port, size and connections; b-signed sends fewer messages per connection)."""
    scenario = entry["scenario"]
    if not scenario.get("signed"):
        return None
    keys = ("port", "size", "connections", "reconnect")
    for name, other in results.items():
        theirs = other["scenario"]
        if (not theirs.get("signed") and theirs.get("label") != "sweep"
                and all(theirs.get(k) == scenario.get(k) for k in keys)):
            return name
    return None


def notes(absent: str | None, skipped: dict[str, dict[str, str]] | None = None) -> list[str]:
    found = [
        "Connections of a, b, d and the sweep are set up (EHLO, STARTTLS, AUTH) before the "
        "clock starts; c pays connection setup for every message.",
        "DATA→250: from sending DATA to the 250 after the final dot; MAIL→250: the whole "
        "transaction, from sending MAIL FROM (chasquid checks SPF there, mailrelay after the "
        "data). Ratios above 1 are better for mailrelay only in the msg/s columns.",
        "server CPU: utime+stime of all the server's processes (all threads): the server "
        "process and every descendant but the MDAs and hooks it runs (mailrelay's SMTP "
        "worker processes, while it has them), from the "
        "moment the clock starts (sessions, TLS and AUTH already set up) until the MDA "
        "counted the last one; the MDA processes (reaped "
        "children, cutime+cstime: sh + cat, the same script for both) are the 'MDA CPU' "
        "column, not included in server CPU.",
        "peak RSS: the sum of VmHWM over the server's processes (as for CPU), "
        "each reset to its current RSS before each measurement; the median of the rounds. "
        "Each server runs through all scenarios, so memory kept from an earlier one "
        "(scrypt's 16 MiB buffers after AUTH: mailrelay keeps them, chasquid's Go runtime "
        "gives them back) shows in later ones. Every round's figure and the RSS it started "
        "from are in the JSON.",
        "chasquid 1.11 writes each queue file and renames it into place without any fsync "
        "(seen with strace); mailrelay fsyncs the file and its directory before the 250. "
        "Both data directories are on the same filesystem (machine line).",
        "b: both unsigned (the sender's domain has no DKIM key; chasquid has no hook). "
        "b-signed: mailrelay signs (RSA-2048, the domain's key); chasquid 1.11 runs Debian's "
        "stock post-data hook, which calls dkimpy's dkimsign twice per message (--help, to "
        "tell dkimpy from driusan/dkim, then the signing) with the same key. The hook runs "
        "before the 250, so it is in the rates; its CPU (bash, dkimsign: reaped children) is "
        "in the 'MDA CPU' column, not in 'server CPU'. b-signed is also given over "
        "chasquid's b (unsigned): the 'mailrelay/chasquid unsigned' row.",
        "chasquid runs with a PATH of links to the commands its stock hook needs (cat, "
        "mktemp, rm, cut, grep, diff, dkimsign): the hook's optional filters (spamc, rspamc, "
        "clamdscan, greylist), if present on the machine, do not run.",
        "On port 25 mailrelay checks SPF, DKIM and DMARC after the data; chasquid 1.11 checks "
        "SPF at MAIL FROM. Both resolve through the bench's loopback DNS (NXDOMAIN).",
    ]
    if absent:
        found.append(f"chasquid not measured: {absent}.")
    for scenario, why in (skipped or {}).items():
        for server, reason in why.items():
            found.append(f"{scenario}: {server} not measured: {reason}.")
    return found


# -- output ----------------------------------------------------------------------------


def machine(work: Path) -> dict[str, Any]:
    from bench.queue_bench import filesystem_of

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()
    return {"cpu": cpu, "cpus": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "loadavg_at_end": [round(v, 2) for v in load],
            "work_dir": str(work), "filesystem": filesystem_of(work)}


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def table(report: dict[str, Any]) -> str:
    names = list(report["servers"])
    rows = [
        "| scenario | server | accepted msg/s | e2e msg/s | DATA→250 p50 ms | p99 ms | "
        "MAIL→250 p50 ms | server CPU ms/msg | MDA CPU ms/msg | peak RSS MiB | "
        "client CPU ms/msg | machine busy % | msgs (failed) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, entry in report["results"].items():
        for server in names:
            if not entry[server]["runs"]:
                continue  # not measured: the notes say why
            m = entry[server]["median"]
            rss = m["peak_rss_kib"] / 1024 if m["peak_rss_kib"] is not None else None
            rows.append(
                f"| {name} | {server} | {_fmt(m['accepted_per_s'])} | {_fmt(m['e2e_per_s'])} "
                f"| {_fmt(m['latency_p50_ms'], 2)} | {_fmt(m['latency_p99_ms'], 2)} "
                f"| {_fmt(m['transaction_p50_ms'], 2)} "
                f"| {_fmt(m['server_cpu_ms_per_msg'], 2)} | {_fmt(m['mda_cpu_ms_per_msg'], 2)} "
                f"| {_fmt(rss)} | {_fmt(m['client_cpu_ms_per_msg'], 2)} "
                f"| {_fmt(m.get('machine_busy_pct'), 0)} "
                f"| {m['accepted']}/{m['messages']} ({m['errors']}) |")
        for key, label in (("ratio_mailrelay_to_chasquid", "mailrelay/chasquid"),
                           ("ratio_mailrelay_to_chasquid_unsigned",
                            "mailrelay/chasquid unsigned")):
            ratio = entry.get(key)
            if ratio:
                rows.append(
                    f"| {name} | **{label}** | {_fmt(ratio.get('accepted_per_s'), 2)}x "
                    f"| {_fmt(ratio.get('e2e_per_s'), 2)}x "
                    f"| {_fmt(ratio.get('latency_p50_ms'), 2)}x "
                    f"| {_fmt(ratio.get('latency_p99_ms'), 2)}x "
                    f"| {_fmt(ratio.get('transaction_p50_ms'), 2)}x "
                    f"| {_fmt(ratio.get('server_cpu_ms_per_msg'), 2)}x | "
                    f"| {_fmt(ratio.get('peak_rss_kib'), 2)}x | | | |")
    lines = ["## Whole server: mailrelay vs chasquid (loopback)", "", *rows, ""]
    for name, entry in report["results"].items():
        lines.append(f"- **{name}**: {entry['title']}")
    lines.append("")
    info = report["machine"]
    versions = "; ".join(s["version"] for s in report["servers"].values())
    lines.append(f"Medians of {report['rounds']} alternated rounds ({versions}); "
                 f"{info['cpu']}, {info['cpus']} cpus, Linux {info['kernel']}, "
                 f"Python {info['python']}; data on "
                 f"{(info['filesystem'] or {}).get('type', '?')}; load average at the end "
                 f"{', '.join(map(str, info['loadavg_at_end']))}; {report['seconds']:.0f} s.")
    lines.append("")
    lines.extend(f"- {note}" for note in report["notes"])
    for scenario, found in report.get("signatures", {}).items():
        lines.append(f"- DKIM in the message delivered in {scenario}'s warm-up: "
                     + "; ".join(f"{server}: {what}" for server, what in found.items()))
    for server, counts in report["dns_queries"].items():
        top = ", ".join(f"{k} ×{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:6])
        lines.append(f"- DNS queries made by {server}: {top or 'none'}")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> bool:
    """Throughput against concurrency for each server; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sweep = report["sweep"]
    if not sweep["connections"]:
        return False
    figure, axes = plt.subplots(figsize=(7, 4.5))
    colours = {"mailrelay": "tab:blue", "chasquid": "tab:orange"}
    for server in report["servers"]:
        axes.plot(sweep["connections"], sweep[server]["accepted_per_s"], "o-",
                  color=colours.get(server), label=f"{server}: accepted")
        axes.plot(sweep["connections"], sweep[server]["e2e_per_s"], "s--",
                  color=colours.get(server), alpha=0.7, label=f"{server}: end to end")
    axes.set_xscale("log", base=2)
    axes.set_xticks(sweep["connections"], [str(c) for c in sweep["connections"]])
    axes.set_xlabel("concurrent connections (port 25, 1 KiB messages)")
    axes.set_ylabel("messages per second")
    axes.set_ylim(bottom=0)
    axes.grid(True, alpha=0.3)
    axes.legend()
    axes.set_title(f"Throughput vs concurrency, medians of {report['rounds']} rounds")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def default_results_dir() -> Path:
    return REPO / "bench" / "results" / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.server_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--results", type=Path, metavar="DIR",
                        help="write server.md, server.json, server.png here "
                             "(default bench/results/<UTC timestamp>/)")
    parser.add_argument("--no-chasquid", action="store_true", help="measure mailrelay alone")
    parser.add_argument("--install-chasquid", action="store_true",
                        help="apt-get install chasquid if it is missing (root only)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the messages per connection (e.g. 0.2 for a quick look)")
    parser.add_argument("--time-budget", type=float, default=420.0, metavar="SECONDS",
                        help="start no new round after this (default 420)")
    parser.add_argument("--dir", type=Path, metavar="DIR",
                        help="put the servers' configuration and data in a temporary "
                             "directory inside DIR (default: the system's temporary directory)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="measure nothing: redo the medians, table and plot of a "
                             "server.json (into --results, default its directory)")
    parser.add_argument("--serve-dns", metavar="HOST:PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_dns:
        return serve_dns(args.serve_dns)
    if args.render:
        report = summarise_report(json.loads(args.render.read_text()))
        report["notes"] = notes(report["chasquid_absent"], report.get("skipped"))
        write_results(report, args.results or args.render.parent)
        return 0
    if args.repeat < 1 or args.scale <= 0:
        parser.error("--repeat must be at least 1 and --scale positive")

    def progress(text: str) -> None:
        if not args.quiet:
            print(text, file=sys.stderr, flush=True)

    scenarios = [replace(s, per_connection=max(1, round(s.per_connection * args.scale)))
                 for s in SCENARIOS]
    results_dir = args.results or default_results_dir()
    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mailrelay-server-bench-", dir=args.dir) as work:
        report = run_bench(Path(work), repeat=args.repeat, with_chasquid=not args.no_chasquid,
                           install_chasquid=args.install_chasquid, scenarios=scenarios,
                           sweep=SWEEP,
                           sweep_messages=max(1, round(SWEEP_MESSAGES * args.scale)),
                           time_budget=args.time_budget,
                           log=progress)
    write_results(report, results_dir)
    progress(f"results in {results_dir}")
    return 0


def json_safe(value: Any) -> Any:
    """NaN (a measurement without any accepted message) becomes null: strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_results(report: dict[str, Any], results_dir: Path, show: bool = True) -> str:
    """server.md, server.json, server.png in ``results_dir``; with ``show`` the table and
    the JSON go to stdout too. Returns the table."""
    results_dir.mkdir(parents=True, exist_ok=True)
    report = json_safe(report)
    if plot(report, results_dir / "server.png"):
        report["plot"] = str(results_dir / "server.png")
    text = table(report)
    (results_dir / "server.md").write_text(text + "\n")
    if show:
        emit(report, text, results_dir / "server.json")
    else:
        (results_dir / "server.json").write_text(json.dumps(report, indent=2) + "\n")
    return text


if __name__ == "__main__":
    sys.exit(main())
