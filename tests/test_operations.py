"""Running it for real: the server as its own process, driven by signals the way systemd
drives it, with real TLS on loopback.

- sd_notify: READY=1 once listening, RELOADING=1/READY=1 around SIGHUP, STOPPING=1 at SIGTERM;
- SIGHUP reloads each kind of file (users, aliases, DKIM keys, a new domain directory)
  and reports mailrelay.yaml changes that need a restart;
- certificates rotated on disk (as acme.sh renews them) are served to new clients while
  sessions already open finish on the old one; a half-written renewal is not loaded;
- SIGTERM: no new connections, the transaction in flight completes, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import dkim
import pytest
import trustme
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mailrelay.config import TLSSettings
from mailrelay.message.headers import get_all, parse_headers
from mailrelay.ops.sdnotify import Notifier, monotonic_usec
from mailrelay.smtp.tls import CertificateStore
from tests.support.client import RawSMTP
from tests.support.dkim_dns import dnsfunc_for, publish_new_key
from tests.support.relay import HOSTNAME, PASSWORD, USER, RelayEnv, free_port

MESSAGE = (
    b"From: Me <me@example.com>\r\n"
    b"To: Friend <friend@remote.test>\r\n"
    b"Subject: operations\r\n"
    b"Message-ID: <ops-1@example.com>\r\n"
    b"Date: Sun, 22 Nov 2026 10:00:00 +0000\r\n"
    b"\r\n"
    b"Hello.\r\n"
)


# --- the server process, with systemd's notification socket ------------------------------


class Running:
    """``mailrelay serve`` in its own process; its log and sd_notify messages collected."""

    def __init__(self, process: asyncio.subprocess.Process, notify: socket.socket):
        self.process = process
        self.notify_socket = notify
        self.log: list[str] = []
        self._reader = asyncio.ensure_future(self._read_log())

    async def _read_log(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            self.log.append(line.decode("utf-8", "replace").rstrip("\n"))

    def log_text(self) -> str:
        return "\n".join(self.log)

    async def wait_log(self, text: str, timeout: float = 10.0, start: int = 0) -> str:
        """The first log line from index ``start`` on that contains ``text``."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log[start:]:
                if text in line:
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line with {text!r} in:\n{self.log_text()}")
            await asyncio.sleep(0.05)

    async def notification(self, timeout: float = 10.0) -> dict[str, str]:
        """The next datagram on the notification socket, as a dict."""
        loop = asyncio.get_running_loop()
        try:
            data = await asyncio.wait_for(loop.sock_recv(self.notify_socket, 4096), timeout)
        except TimeoutError:
            raise AssertionError(f"no notification; log:\n{self.log_text()}") from None
        return dict(line.split("=", 1) for line in data.decode().splitlines())

    async def reload(self) -> dict[str, str]:
        """SIGHUP, as `systemctl reload` sends it; returns the READY=1 that ends the reload."""
        self.process.send_signal(signal.SIGHUP)
        reloading = await self.notification()
        assert reloading.get("RELOADING") == "1", reloading
        ready = await self.notification()
        assert ready.get("READY") == "1", ready
        return ready

    async def stop(self, timeout: float = 40.0) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.process.wait(), timeout)
        await self._reader
        return code


def bind_notify_socket() -> tuple[socket.socket, str]:
    """A datagram socket standing in for systemd's, in the abstract namespace (as systemd's
    own ``@/org/freedesktop/systemd1/notify/…``), so no path length limits apply."""
    name = f"@mailrelay-test/{os.getpid()}/{secrets.token_hex(6)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name[1:].encode())
    sock.setblocking(False)
    return sock, name


async def start(env: RelayEnv) -> Running:
    sock, name = bind_notify_socket()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mailrelay.cli.main", "serve", "-c", str(env.config_dir),
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "NOTIFY_SOCKET": name})
    running = Running(process, sock)
    ready = await running.notification(timeout=30)
    assert ready.get("READY") == "1", ready
    return running


@pytest.fixture
async def run(env: RelayEnv) -> AsyncIterator:
    """``await run()`` starts the server on ``env``; it is stopped at the end."""
    started: list[Running] = []

    async def go() -> Running:
        running = await start(env)
        started.append(running)
        return running

    yield go
    for running in started:
        with contextlib.suppress(ProcessLookupError):
            await running.stop()
        running.notify_socket.close()


# --- clients -------------------------------------------------------------------------------


def peer_fingerprint(client: RawSMTP) -> str:
    der = client.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return hashlib.sha256(der).hexdigest()


def leaf_fingerprint(leaf: trustme.LeafCert) -> str:
    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


async def submission(env: RelayEnv, user: str = USER, password: str = PASSWORD,
                     ) -> tuple[RawSMTP, int]:
    """Port 587: EHLO, STARTTLS, EHLO, AUTH PLAIN; returns the client and AUTH's code."""
    client = await RawSMTP.connect("127.0.0.1", env.ports["submission"])
    await client.cmd("EHLO client.test")
    await client.starttls(env.client_tls(), HOSTNAME)
    await client.cmd("EHLO client.test")
    code, _ = await client.auth_plain(user, password)
    return client, code


async def implicit_tls(env: RelayEnv) -> RawSMTP:
    return await RawSMTP.connect("127.0.0.1", env.ports["submission_tls"], tls=env.client_tls(),
                                 server_hostname=HOSTNAME)


async def rcpt_code_port_25(env: RelayEnv, recipient: str) -> int:
    client = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
    try:
        await client.cmd("EHLO mx.sender.test")
        code, _ = await client.cmd("MAIL FROM:<alice@sender.test>")
        assert code == 250
        code, _ = await client.cmd(f"RCPT TO:<{recipient}>")
        await client.cmd("QUIT")
        return code
    finally:
        await client.close()


def install_in_place(path: Path, data: bytes) -> None:
    """Overwrite the file itself (same inode), as acme.sh --install-cert does (`cat >`)."""
    with open(path, "r+b") as file:
        file.truncate(0)
        file.write(data)


def chain_pem(leaf: trustme.LeafCert) -> bytes:
    return b"".join(pem.bytes() for pem in leaf.cert_chain_pems)


def cert_dir(env: RelayEnv) -> Path:
    return env.config_dir / "certs" / HOSTNAME


async def probe_fingerprint(env: RelayEnv) -> str:
    """What a new client sees now, over implicit TLS (465)."""
    client = await implicit_tls(env)
    try:
        return peer_fingerprint(client)
    finally:
        await client.close()


async def wait_fingerprint(env: RelayEnv, expected: str, timeout: float) -> float:
    started = time.monotonic()
    while (seen := await probe_fingerprint(env)) != expected:
        if time.monotonic() - started > timeout:
            raise AssertionError(f"still serving {seen} after {timeout}s")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


# --- sd_notify -----------------------------------------------------------------------------


async def test_notify_ready_reloading_ready_stopping_in_order(env: RelayEnv) -> None:
    sock, name = bind_notify_socket()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mailrelay.cli.main", "serve", "-c", str(env.config_dir),
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "NOTIFY_SOCKET": name})
    running = Running(process, sock)
    try:
        ready = await running.notification(timeout=30)
        assert ready["READY"] == "1" and ready["MAINPID"] == str(process.pid)
        assert "accepting mail" in ready["STATUS"]
        # READY=1 comes only after every listener is bound.
        for port in env.ports.values():
            socket.create_connection(("127.0.0.1", port), timeout=5).close()

        before = monotonic_usec()
        process.send_signal(signal.SIGHUP)
        reloading = await running.notification()
        assert reloading["RELOADING"] == "1"
        # systemd (>= 253) matches the reload by this CLOCK_MONOTONIC timestamp.
        assert before <= int(reloading["MONOTONIC_USEC"]) <= monotonic_usec()
        again = await running.notification()
        assert again["READY"] == "1" and "accepting mail" in again["STATUS"]
        await running.wait_log("reload: done")

        process.send_signal(signal.SIGTERM)
        stopping = await running.notification()
        assert stopping["STOPPING"] == "1"
        assert await running.stop() == 0
        assert "READY" not in stopping
        with pytest.raises(BlockingIOError):
            sock.recv(4096)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        sock.close()


def test_notifier_path_socket_and_no_socket(tmp_path: Path) -> None:
    assert Notifier({}).address is None
    assert Notifier({}).ready("x") is False  # outside systemd: nothing, no error
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        notifier = Notifier({"NOTIFY_SOCKET": str(path)})
        assert notifier.stopping("bye")
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=bye"
        notifier.close()
    # systemd gone: reported in the log, never raised.
    assert Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}).ready("x") is False


# --- SIGHUP reloads each kind of file -------------------------------------------------------


async def test_sighup_new_user_can_authenticate(env: RelayEnv, run) -> None:
    server = await run()
    client, code = await submission(env, "new@example.com", "new password")
    await client.close()
    assert code == 535
    env.add_user("new@example.com", "new password")
    await server.reload()
    client, code = await submission(env, "new@example.com", "new password")
    assert code == 235
    await client.close()


async def test_sighup_new_alias_routes(env: RelayEnv, run) -> None:
    server = await run()
    assert await rcpt_code_port_25(env, "team@example.com") == 550
    (env.config_dir / "domains" / "example.com" / "aliases").write_text("team: me\n")
    await server.reload()
    assert await rcpt_code_port_25(env, "team@example.com") == 250


async def test_sighup_new_dkim_selector_signs(env: RelayEnv, run) -> None:
    domain_dir = env.config_dir / "domains" / "example.com"
    publish_new_key(env.dns, domain_dir, "example.com", "old", "rsa2048")
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    sink = env.add_sink("127.0.0.2")
    server = await run()

    async def send_and_selectors(count: int) -> list[str]:
        client, code = await submission(env)
        assert code == 235
        assert await client.send_message(USER, ["friend@remote.test"], MESSAGE) == 250
        await client.close()
        received = (await sink.until(count, timeout=20))[-1]
        signatures = get_all(parse_headers(received.data), "DKIM-Signature")
        dnsfunc = dnsfunc_for(env.dns)
        assert all(dkim.DKIM(received.data).verify(idx=i, dnsfunc=dnsfunc)
                   for i in range(len(signatures)))
        return sorted(s.split("s=")[1].split(";")[0].strip() for s in signatures)

    assert await send_and_selectors(1) == ["old"]
    publish_new_key(env.dns, domain_dir, "example.com", "new", "ed25519")
    await server.reload()
    assert await send_and_selectors(2) == ["new", "old"]


async def test_sighup_new_domain_directory_is_local(env: RelayEnv, run) -> None:
    server = await run()
    assert await rcpt_code_port_25(env, "bob@new.test") == 554  # not ours: relaying denied
    env.add_user("bob@new.test", "bob's password")
    await server.reload()
    await server.wait_log("domains added: new.test")
    assert await rcpt_code_port_25(env, "bob@new.test") == 250
    # ...and its user can log in and gets mail in its own Maildir.
    client, code = await submission(env, "bob@new.test", "bob's password")
    assert code == 235
    assert await client.send_message("bob@new.test", ["bob@new.test"],
                                     MESSAGE.replace(b"me@example.com", b"bob@new.test")) == 250
    await client.close()
    await env.wait_mailbox(1, "bob@new.test")


async def test_sighup_reports_settings_that_need_a_restart(env: RelayEnv, run) -> None:
    server = await run()
    old_port = env.ports["smtp"]
    new_port = free_port()
    settings = yaml.safe_load((env.config_dir / "mailrelay.yaml").read_text())
    settings["listen"]["smtp"] = [f"127.0.0.1:{new_port}"]
    settings["limits"]["max_recipients"] = 7
    (env.config_dir / "mailrelay.yaml").write_text(yaml.safe_dump(settings))
    env.add_domain("other.test")  # applied at once beside the report

    mark = len(server.log)
    await server.reload()
    line = await server.wait_log("need a restart", start=mark)
    assert "WARNING" in line and "listen.smtp" in line and "limits.max_recipients" in line
    assert "listen.submission" not in line  # unchanged settings are not listed
    # Still on the old address until a restart.
    assert await rcpt_code_port_25(env, USER) == 250
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", new_port)
    assert old_port != new_port
    await server.wait_log("domains added: other.test", start=mark)

    # A broken mailrelay.yaml: logged, the rest of the reload still happens.
    (env.config_dir / "mailrelay.yaml").write_text("hostname: [\n")
    env.add_user("late@example.com", "late password")
    mark = len(server.log)
    ready = await server.reload()
    assert "errors" in ready["STATUS"]
    line = await server.wait_log("keeping the running configuration", start=mark)
    assert "mailrelay.yaml" in line
    client, code = await submission(env, "late@example.com", "late password")
    assert code == 235
    await client.close()


# --- certificate rotation -------------------------------------------------------------------


async def test_certificate_rotation_without_restart(env: RelayEnv, ca: trustme.CA, run) -> None:
    server = await run()
    old = await probe_fingerprint(env)

    # A session opened before the renewal, in the middle of a transaction.
    early, code = await submission(env)
    assert code == 235 and peer_fingerprint(early) == old
    assert (await early.cmd(f"MAIL FROM:<{USER}>"))[0] == 250
    assert (await early.cmd(f"RCPT TO:<{USER}>"))[0] == 250

    renewed = ca.issue_cert(HOSTNAME, "127.0.0.1")
    install_in_place(cert_dir(env) / "fullchain.pem", chain_pem(renewed))
    install_in_place(cert_dir(env) / "privkey.pem", renewed.private_key_pem.bytes())
    await server.reload()  # acme.sh --reloadcmd "systemctl reload mailrelay"

    new = leaf_fingerprint(renewed)
    assert new != old
    assert await probe_fingerprint(env) == new  # implicit TLS, 465
    late, code = await submission(env)  # STARTTLS, 587
    assert code == 235 and peer_fingerprint(late) == new
    await late.close()

    # The early session finishes its transaction on the old certificate.
    assert (await early.cmd("DATA"))[0] == 354
    await early.send(MESSAGE.replace(b"friend@remote.test", USER.encode()) + b".")
    assert (await early.reply())[0] == 250
    assert peer_fingerprint(early) == old
    assert (await early.cmd("QUIT"))[0] == 221
    await early.close()
    await env.wait_mailbox(1)
    assert server.process.returncode is None


async def test_certificate_rotation_found_by_polling(env: RelayEnv, ca: trustme.CA,
                                                     run) -> None:
    """No signal at all (a renewal without --reloadcmd): the file watcher finds it."""
    await run()
    renewed = ca.issue_cert(HOSTNAME, "127.0.0.1")
    install_in_place(cert_dir(env) / "fullchain.pem", chain_pem(renewed))
    install_in_place(cert_dir(env) / "privkey.pem", renewed.private_key_pem.bytes())
    await wait_fingerprint(env, leaf_fingerprint(renewed), timeout=10)


async def test_half_renewed_certificate_keeps_the_old_one(env: RelayEnv, ca: trustme.CA,
                                                         run) -> None:
    """The chain is new but the key still old (a renewal caught half-way): the old pair
    keeps being served, and the completed renewal is picked up at a later poll."""
    server = await run()
    old = await probe_fingerprint(env)
    renewed = ca.issue_cert(HOSTNAME, "127.0.0.1")
    install_in_place(cert_dir(env) / "fullchain.pem", chain_pem(renewed))
    line = await server.wait_log("does not match")
    assert "keeping the previous certificates" in line
    assert await probe_fingerprint(env) == old
    client, code = await submission(env)  # STARTTLS still works, on the old pair
    assert code == 235 and peer_fingerprint(client) == old
    await client.close()

    install_in_place(cert_dir(env) / "privkey.pem", renewed.private_key_pem.bytes())
    await wait_fingerprint(env, leaf_fingerprint(renewed), timeout=10)
    assert server.process.returncode is None


def test_half_renewal_retried_though_the_key_looks_unchanged(tmp_path: Path) -> None:
    """The key written in place with the same size and mtime as before (a coarse clock
    tick, the same key type): the stat snapshot alone would never see it, so a mismatch
    is retried at the next polls; a pair that stays broken stops being retried."""
    ca = trustme.CA()
    directory = tmp_path / "certs" / HOSTNAME
    directory.mkdir(parents=True)
    # ECDSA P-256: every key has the same PEM size, as a renewal of the same type does.
    first, second = (ca.issue_cert(HOSTNAME, key_type=trustme.KeyType.ECDSA) for _ in "12")
    cert_path, key_path = directory / "fullchain.pem", directory / "privkey.pem"
    cert_path.write_bytes(chain_pem(first))
    key_path.write_bytes(first.private_key_pem.bytes())
    store = CertificateStore(TLSSettings(certs_dir=tmp_path / "certs"), HOSTNAME, tmp_path / "ss")
    store.load()

    key_stat = key_path.stat()
    install_in_place(cert_path, chain_pem(second))
    assert store.changed_on_disk() and store.reload() is False  # mismatch: old pair kept
    assert store.fingerprint_for(HOSTNAME) == leaf_fingerprint(first)

    new_key = second.private_key_pem.bytes()
    assert len(new_key) == key_stat.st_size  # same key type and size
    install_in_place(key_path, new_key)
    os.utime(key_path, ns=(key_stat.st_atime_ns, key_stat.st_mtime_ns))
    assert store.changed_on_disk()  # forced retry
    assert store.reload() is True
    assert store.fingerprint_for(HOSTNAME) == leaf_fingerprint(second)
    assert not store.changed_on_disk()

    # A pair that stays mismatched: a few retries, then only when the files change.
    install_in_place(cert_path, chain_pem(first))
    retries = 0
    while store.changed_on_disk():
        assert store.reload() is False
        retries += 1
        assert retries < 20
    assert 2 <= retries <= 10
    assert store.fingerprint_for(HOSTNAME) == leaf_fingerprint(second)


# --- SIGTERM --------------------------------------------------------------------------------


async def test_sigterm_drains_the_transaction_in_flight(env: RelayEnv, run) -> None:
    server = await run()
    client = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
    await client.cmd("EHLO mx.sender.test")
    assert (await client.cmd("MAIL FROM:<alice@sender.test>"))[0] == 250
    assert (await client.cmd(f"RCPT TO:<{USER}>"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354
    body = MESSAGE.replace(b"me@example.com", b"alice@sender.test").replace(
        b"friend@remote.test", USER.encode())
    half = len(body) // 2
    client.writer.write(body[:half])
    await client.writer.drain()

    stop_sent = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert (await server.notification())["STOPPING"] == "1"
    # New connections are refused from now on, on every port...
    for port in env.ports.values():
        deadline = time.monotonic() + 5
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except (ConnectionRefusedError, ConnectionResetError):
                break  # reset: it was in the backlog when the listening socket closed
            writer.close()
            assert time.monotonic() < deadline, f"port {port} still accepting"
            await asyncio.sleep(0.05)

    # ...while the transaction in flight completes.
    client.writer.write(body[half:] + b".\r\n")
    await client.writer.drain()
    code, lines = await client.reply()
    assert code == 250, lines
    # 221, or 421 / a closed connection if the server hurries idle sessions out.
    assert (await client.cmd("QUIT"))[0] in (221, 421, 0)
    await client.close()

    assert await server.stop(timeout=30) == 0
    elapsed = time.monotonic() - stop_sent
    assert elapsed < 15, f"took {elapsed:.1f}s to stop"  # well within the 30 s grace
    assert "stopped in" in server.log_text()
    # Accepted means kept: delivered already, or still queued for the next start.
    queued = list((env.data_dir / "queue").glob("*.msg"))
    assert len(env.mailbox()) + len(queued) == 1


async def test_sigterm_with_nothing_in_flight_stops_at_once(env: RelayEnv, run) -> None:
    server = await run()
    started = time.monotonic()
    assert await server.stop(timeout=30) == 0
    assert time.monotonic() - started < 5
