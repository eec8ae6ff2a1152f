"""A complete test network on loopback: mailrelay with a temporary config directory,
a DNS server, certificates from a test CA, and SMTP sinks for remote MX hosts."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib
import trustme
import yaml

from bench.ports import free_port
from mailrelay.config import load_config
from mailrelay.policy.users import UserDB
from mailrelay.server import Server
from tests.support.client import RawSMTP
from tests.support.dns_server import TestDNSServer
from tests.support.sink import Sink

HOSTNAME = "mail.example.com"
USER = "me@example.com"
PASSWORD = "correct horse battery staple"


@dataclass
class RelayEnv:
    root: Path
    dns: TestDNSServer
    ca: trustme.CA
    sink_port: int
    ports: dict[str, int] = field(default_factory=dict)
    server: Server | None = None
    sinks: list[Sink] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    @property
    def config_dir(self) -> Path:
        return self.root / "config"

    @property
    def data_dir(self) -> Path:
        return self.config_dir / "var"

    # -- building the configuration --------------------------------------------

    def write_config(self, **overrides: dict) -> None:
        self.ports = {name: free_port() for name in ("smtp", "submission", "submission_tls")}
        settings = {
            "hostname": HOSTNAME,
            "listen": {name: [f"127.0.0.1:{port}"] for name, port in self.ports.items()},
            "data_dir": "var",
            "tls": {"certs_dir": "certs", "self_signed": False},
            "dns": {"nameservers": [f"127.0.0.1:{self.dns.port}"], "timeout": "2s"},
            "delivery": {
                "smtp_port": self.sink_port, "retry_intervals": ["1s"],
                "give_up_after": "1h", "connect_timeout": "3s", "command_timeout": "10s",
                # Sinks have certificates from the test CA, so delivery can verify them.
                "ca_file": "test-ca.pem",
            },
            "limits": {"auth_failure_delay": "0s", "command_timeout": "30s"},
        }
        for section, values in overrides.items():
            if isinstance(values, dict):
                settings.setdefault(section, {}).update(values)
            else:
                settings[section] = values
        self.settings = settings
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.ca.cert_pem.write_to_path(str(self.config_dir / "test-ca.pem"))
        (self.config_dir / "mailrelay.yaml").write_text(yaml.safe_dump(settings))
        cert_dir = self.config_dir / "certs" / HOSTNAME
        cert_dir.mkdir(parents=True, exist_ok=True)
        cert = self.ca.issue_cert(HOSTNAME, "127.0.0.1")
        cert.private_key_pem.write_to_path(str(cert_dir / "privkey.pem"))
        cert.cert_chain_pems[0].write_to_path(str(cert_dir / "fullchain.pem"))
        for pem in cert.cert_chain_pems[1:]:
            pem.write_to_path(str(cert_dir / "fullchain.pem"), append=True)

    def add_user(self, address: str = USER, password: str = PASSWORD) -> None:
        local, domain = address.split("@")
        directory = self.config_dir / "domains" / domain
        directory.mkdir(parents=True, exist_ok=True)
        db = UserDB.load(directory / "users", domain)
        db.set_password(local, password)
        db.save()

    def add_domain(self, domain: str) -> None:
        (self.config_dir / "domains" / domain).mkdir(parents=True, exist_ok=True)

    # -- the remote side --------------------------------------------------------

    def add_sink(self, ip: str, tls: bool = True, hostname: str = "mx.remote.test",
                 ca: trustme.CA | None = None, *, port: int | None = None,
                 **options) -> Sink:
        """A sink on ``ip``; its certificate comes from the test CA, or from ``ca`` (e.g. a
        CA the server does not trust). ``options`` go to Sink (users, implicit_tls,
        smtputf8: a submission server standing in for a smarthost, an old MX)."""
        context = None
        if tls:
            cert = (ca or self.ca).issue_cert(hostname)
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            cert.configure_cert(context)
        sink = Sink(ip, port or self.sink_port, context, hostname=hostname, **options)
        sink.start()
        self.sinks.append(sink)
        return sink

    def add_mx(self, domain: str, *hosts: tuple[int, str, str]) -> None:
        """``add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))``"""
        for preference, name, ip in hosts:
            self.dns.add(domain, "MX", (preference, name))
            self.dns.add(name, "AAAA" if ":" in ip else "A", ip)

    # -- the server -------------------------------------------------------------

    async def start(self) -> Server:
        self.server = Server(load_config(self.config_dir))
        await self.server.start()
        return self.server

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=5)
            self.server = None

    async def restart(self) -> Server:
        await self.stop()
        return await self.start()

    def client_tls(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    async def submission_client(self, port: str = "submission_tls",
                                source: str | None = None) -> RawSMTP:
        """A raw client on a submission port (from ``source``): greeted, EHLO, STARTTLS
        where the port needs it, EHLO again; ready for AUTH."""
        implicit = port == "submission_tls"
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", self.ports[port], local_addr=(source, 0) if source else None,
            ssl=self.client_tls() if implicit else None,
            server_hostname=HOSTNAME if implicit else None)
        client = RawSMTP(reader, writer)
        assert (await client.reply())[0] == 220
        assert (await client.cmd("EHLO client.test"))[0] == 250
        if not implicit:
            await client.starttls(self.client_tls(), HOSTNAME)
            assert (await client.cmd("EHLO client.test"))[0] == 250
        return client

    async def submit(self, recipients: list[str], data: bytes, sender: str = USER,
                     password: str = PASSWORD) -> None:
        """Submit on 587 with STARTTLS and AUTH PLAIN, like a mail client."""
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.ports["submission"],
                               tls_context=self.client_tls(), start_tls=True)
        await smtp.connect()
        await smtp.ehlo()  # RFC 3207: the server forgets the pre-TLS EHLO
        await smtp.auth_plain(sender, password)
        await smtp.sendmail(sender, recipients, data)
        await smtp.quit()

    async def submit_utf8(self, recipients: list[str], data: bytes, sender: str = USER,
                          password: str = PASSWORD) -> None:
        """Submit like a client that speaks SMTPUTF8 (aiosmtplib's sendmail does not send
        UTF-8 addresses)."""
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.ports["submission"],
                               tls_context=self.client_tls(), start_tls=True)
        await smtp.connect()
        await smtp.ehlo()
        await smtp.auth_plain(sender, password)
        await smtp.mail(sender, options=["SMTPUTF8"], encoding="utf-8")
        for rcpt in recipients:
            await smtp.rcpt(rcpt, encoding="utf-8")
        await smtp.data(data)
        await smtp.quit()

    def mailbox(self, address: str = USER) -> list[bytes]:
        """Messages delivered to a local user's Maildir, oldest first."""
        local, domain = address.split("@")
        new = self.data_dir / "mail" / domain / local / "new"
        if not new.is_dir():
            return []
        return [p.read_bytes() for p in sorted(new.iterdir())]

    async def wait_mailbox(self, count: int, address: str = USER,
                           timeout: float = 10.0) -> list[bytes]:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(found := self.mailbox(address)) < count:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{address}: {len(found)} of {count} messages")
            await asyncio.sleep(0.05)
        return found

    async def wait_queue_empty(self, timeout: float = 10.0) -> None:
        assert self.server is not None
        deadline = asyncio.get_running_loop().time() + timeout
        while self.server.queue.items:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"queue not empty: {list(self.server.queue.items)}")
            await asyncio.sleep(0.05)

    def close(self) -> None:
        for sink in self.sinks:
            sink.stop()


def delivery_lines(caplog) -> list[str]:
    """The mail log's ``delivery`` lines captured so far (README, "Mail log")."""
    return [r.getMessage() for r in caplog.records
            if r.name == "mailrelay.mail" and r.getMessage().startswith("delivery ")]


async def wait_for(check, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
