"""``mailrelay dns check`` when the resolver does not answer (issue 18: 53 s of silence,
then ten "no answer (timeout)" lines naming no resolver): it names the resolver, says so
within one short lookup timeout, and prints each line as soon as it is known.

Real sockets on loopback: one that reads queries and never answers (a firewall that drops
them), a port where nothing listens (the kernel refuses), and a nameserver that answers
REFUSED to everything."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.rcode
import pytest

from mailrelay.config import load_config
from mailrelay.ops.dnsrecords import (
    ERROR,
    describe_resolver,
    iter_check_records,
    resolver_addresses,
)
from tests.support.dns_server import TestDNSServer

DOMAIN = "example.com"


def write_config(confdir: Path, nameserver: str | None, timeout: str = "5s") -> Path:
    servers = f"['{nameserver}']" if nameserver else "[]"
    (confdir / "mailrelay.yaml").write_text(
        f"hostname: mail.{DOMAIN}\ndata_dir: var\n"
        f"dns:\n  nameservers: {servers}\n  timeout: {timeout}\n")
    (confdir / "domains" / DOMAIN).mkdir(parents=True, exist_ok=True)
    return confdir


@pytest.fixture
def dropping() -> Iterator[int]:
    """A UDP port that takes queries and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture
def closed() -> int:
    """A UDP port where nothing listens."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


@pytest.fixture
def refusing() -> Iterator[int]:
    """A nameserver that answers every query with REFUSED."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            reply = dns.message.make_response(dns.message.from_wire(data))
            reply.set_rcode(dns.rcode.REFUSED)
            sock.sendto(reply.to_wire(), peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    stop.set()
    thread.join()
    sock.close()


def dns_check(confdir: Path, *extra: str) -> tuple[int, list[tuple[float, str]], float]:
    """The real command; (exit status, each stdout line with the time it arrived, total)."""
    start = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "mailrelay.cli.main", "dns", "check", DOMAIN, "-c",
         str(confdir), "--ip", "192.0.2.1", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    assert process.stdout is not None
    lines = [(time.monotonic() - start, line.rstrip("\n")) for line in process.stdout]
    code = process.wait(timeout=60)
    assert process.stderr is not None
    assert "Traceback" not in process.stderr.read()
    return code, lines, time.monotonic() - start


def test_a_resolver_that_drops_queries(tmp_path, dropping):
    confdir = write_config(tmp_path, f"127.0.0.1:{dropping}")
    code, lines, total = dns_check(confdir)
    assert code == 1
    assert total < 10, total  # one short timeout (3 s), not one per record
    text = [line for _, line in lines]
    where = f"127.0.0.1:{dropping} (dns.nameservers in mailrelay.yaml)"
    assert text[0] == f"{DOMAIN}: asking {where}, 3s per lookup"
    assert text[1] == (f"error:  the resolver {where} does not answer: no answer from "
                       f"127.0.0.1:{dropping} within 3s")
    records = [line for line in text[2:] if not line.startswith((" ", DOMAIN))]
    assert len(records) >= 8
    assert all("not checked: the resolver does not answer" in line for line in records
               if not line.startswith("missing DKIM"))
    assert text[-1].startswith(f"{DOMAIN}: ") and "the resolver does not answer" in text[-1]
    # Printed as it goes: the first line came before the probe's 3 s were over.
    assert lines[0][0] < lines[-1][0] - 2, lines


def test_a_port_where_nothing_listens(tmp_path, closed):
    confdir = write_config(tmp_path, f"127.0.0.1:{closed}")
    code, lines, total = dns_check(confdir)
    assert code == 1 and total < 10
    text = [line for _, line in lines]
    assert text[1] == (f"error:  the resolver 127.0.0.1:{closed} (dns.nameservers in "
                       f"mailrelay.yaml) does not answer: 127.0.0.1:{closed} refused the "
                       "connection (nothing listens there)")


def test_a_resolver_that_refuses_every_query(tmp_path, refusing):
    confdir = write_config(tmp_path, f"127.0.0.1:{refusing}")
    code, lines, total = dns_check(confdir)
    assert code == 1 and total < 10
    text = [line for _, line in lines]
    where = f"127.0.0.1:{refusing} (dns.nameservers in mailrelay.yaml)"
    assert not any(line.startswith("error: ") for line in text)  # it answers
    (mx,) = [line for line in text if " MX " in line]
    assert mx == (f"error   MX       {DOMAIN}: DNS lookup failed: {DOMAIN}/MX: {where} "
                  "refused the query")


def test_a_shorter_timeout_on_the_command_line(tmp_path, dropping):
    confdir = write_config(tmp_path, f"127.0.0.1:{dropping}")
    code, lines, total = dns_check(confdir, "--timeout", "500ms")
    assert code == 1 and total < 5
    assert lines[0][1].endswith(", 0.5s per lookup")
    assert lines[1][1].endswith("within 0.5s")


def test_a_resolver_that_stops_answering_during_the_check(tmp_path):
    """Up for the first probe, then down: the record that timed out names the resolver and
    the rest are not checked, so it still ends within about two timeouts."""
    with TestDNSServer() as server:
        host, port = server.address
        config = load_config(write_config(tmp_path, f"{host}:{port}"))
        server.set_down(True)
        start = time.monotonic()
        results = list(iter_check_records(config, DOMAIN, [], [], timeout=0.5))
        elapsed = time.monotonic() - start
    assert elapsed < 3, elapsed
    first, *rest = results
    assert first.kind == "MX" and first.status == ERROR
    assert first.detail == (f"DNS lookup failed: the resolver {host}:{port} (dns.nameservers "
                            f"in mailrelay.yaml) does not answer: no answer from "
                            f"{host}:{port} within 0.5s")
    assert all(r.detail == "not checked: the resolver does not answer" for r in rest
               if r.kind != "DKIM")


def test_the_system_resolver_is_named(tmp_path):
    config = load_config(write_config(tmp_path, None))
    servers = resolver_addresses(config)
    assert servers
    assert describe_resolver(config) == (
        ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in servers)
        + " (the system's, from /etc/resolv.conf)")
