"""Certificate discovery, SNI selection and reload, checked with real loopback handshakes."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import os
import ssl
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mailrelay.config import TLSSettings
from mailrelay.errors import ConfigError
from mailrelay.smtp.tls import CertificateStore, ensure_self_signed, find_certificates

HOSTNAME = "mail.example.com"


# --- helpers -------------------------------------------------------------------------------


def replace_file(path: Path, data: bytes) -> None:
    """Swap a file in by rename, as certbot/acme.sh deploy hooks and editors do."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_pair(directory: Path, leaf: trustme.LeafCert,
               cert_name: str = "fullchain.pem", key_name: str = "privkey.pem") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    replace_file(directory / cert_name, b"".join(b.bytes() for b in leaf.cert_chain_pems))
    replace_file(directory / key_name, leaf.private_key_pem.bytes())


def fingerprint(leaf: trustme.LeafCert) -> str:
    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


class Env:
    def __init__(self, tmp_path: Path):
        self.ca = trustme.CA()
        self.certs_dir = tmp_path / "certs"
        self.acme = tmp_path / "acme.sh"
        self.self_signed_dir = tmp_path / "data" / "tls"
        self.mail = self.ca.issue_cert(HOSTNAME)
        self.wild = self.ca.issue_cert("*.other.test")
        self.ecc = self.ca.issue_cert("example.org", key_type=trustme.KeyType.ECDSA)
        self.rsa = self.ca.issue_cert("example.net", key_type=trustme.KeyType.RSA)
        write_pair(self.certs_dir / HOSTNAME, self.mail)
        write_pair(self.certs_dir / "other", self.wild)
        (self.certs_dir / "incomplete").mkdir()  # only a cert: skipped
        (self.certs_dir / "incomplete" / "fullchain.pem").write_bytes(
            self.mail.cert_chain_pems[0].bytes())
        write_pair(self.acme / "example.org_ecc", self.ecc, "fullchain.cer", "example.org.key")
        write_pair(self.acme / "example.net", self.rsa, "fullchain.cer", "example.net.key")
        # Things a real acme.sh home has beside the certificates.
        (self.acme / "ca").mkdir()
        (self.acme / "deploy").mkdir()
        (self.acme / "account.conf").write_text("x\n")

    def settings(self, self_signed: bool = False, acme: bool = True) -> TLSSettings:
        return TLSSettings(certs_dir=self.certs_dir, acme_sh_home=self.acme if acme else None,
                           self_signed=self_signed)

    def store(self, **kwargs: bool) -> CertificateStore:
        store = CertificateStore(self.settings(**kwargs), HOSTNAME, self.self_signed_dir)
        store.load()
        return store

    def client_context(self, check_hostname: bool = True) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        context.check_hostname = check_hostname
        return context


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[CertificateStore], asyncio.Future[asyncio.Server]]]:
    """Start line-echo TLS servers on loopback; everything is closed at the end."""
    servers: list[asyncio.Server] = []
    writers: list[asyncio.StreamWriter] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        try:
            while line := await reader.readline():
                writer.write(line)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def start(store: CertificateStore) -> asyncio.Server:
        server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=store.server_context())
        servers.append(server)
        return server

    yield start  # type: ignore[misc]
    for writer in writers:
        writer.close()
    for server in servers:
        server.close()
        await server.wait_closed()


async def connect(server: asyncio.Server, context: ssl.SSLContext, server_name: str | None
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    """Open a TLS connection and return the SHA-256 of the certificate the server sent."""
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname=server_name if server_name else "",
    ), 10)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return reader, writer, hashlib.sha256(der).hexdigest()


async def peer_fingerprint(server: asyncio.Server, context: ssl.SSLContext,
                           server_name: str | None) -> str:
    _, writer, fp = await connect(server, context, server_name)
    writer.close()
    return fp


async def echo_works(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"ping\r\n")
    await writer.drain()
    return await asyncio.wait_for(reader.readline(), 10) == b"ping\r\n"


# --- discovery -----------------------------------------------------------------------------


def test_find_certificates_layouts(env: Env) -> None:
    found = {(s.name, s.cert_path.name, s.key_path.name): s for s in find_certificates(
        env.settings())}
    assert set(found) == {
        (HOSTNAME, "fullchain.pem", "privkey.pem"),
        ("other", "fullchain.pem", "privkey.pem"),
        ("example.org", "fullchain.cer", "example.org.key"),
        ("example.net", "fullchain.cer", "example.net.key"),
    }
    assert found[HOSTNAME, "fullchain.pem", "privkey.pem"].names == (HOSTNAME,)
    assert found["other", "fullchain.pem", "privkey.pem"].names == ("*.other.test",)
    ecc = found["example.org", "fullchain.cer", "example.org.key"]
    assert ecc.cert_path == env.acme / "example.org_ecc" / "fullchain.cer"
    assert ecc.not_after > dt.datetime.now(dt.UTC)


def test_missing_acme_home_is_an_error(env: Env, tmp_path: Path) -> None:
    settings = TLSSettings(certs_dir=env.certs_dir, acme_sh_home=tmp_path / "nope")
    with pytest.raises(ConfigError) as info:
        find_certificates(settings)
    assert info.value.path == tmp_path / "nope"


def test_mismatched_key_names_the_key_file(env: Env) -> None:
    key_path = env.certs_dir / HOSTNAME / "privkey.pem"
    replace_file(key_path, env.wild.private_key_pem.bytes())
    with pytest.raises(ConfigError) as info:
        find_certificates(env.settings())
    assert info.value.path == key_path
    assert "does not match" in str(info.value)


def test_garbage_certificate_names_the_cert_file(env: Env) -> None:
    cert_path = env.acme / "example.net" / "fullchain.cer"
    replace_file(cert_path, b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError) as info:
        env.store()
    assert str(cert_path) in str(info.value)


def test_expired_certificate_is_served_with_a_warning(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    now = dt.datetime.now(dt.UTC)
    old = env.ca.issue_cert("old.example.com", not_before=now - dt.timedelta(days=100),
                            not_after=now - dt.timedelta(days=10))
    write_pair(env.certs_dir / "old", old)
    with caplog.at_level(logging.WARNING, logger="mailrelay.tls"):
        store = env.store()
    assert store.fingerprint_for("old.example.com") == fingerprint(old)
    assert any("expired" in r.getMessage() and "old" in r.getMessage() for r in caplog.records)


# --- SNI over real handshakes ----------------------------------------------------------------


async def test_sni_selects_matching_certificate(env: Env, serve) -> None:
    store = env.store()
    server = await serve(store)
    strict = env.client_context()
    cases = {
        HOSTNAME: env.mail,
        "MAIL.example.com": env.mail,  # names are case-insensitive
        "smtp.other.test": env.wild,  # wildcard
        "example.org": env.ecc,  # acme.sh ECC dir
        "example.net": env.rsa,  # acme.sh RSA dir
    }
    for name, leaf in cases.items():
        assert await peer_fingerprint(server, strict, name) == fingerprint(leaf), name
        assert store.fingerprint_for(name) == fingerprint(leaf)

    # Unknown names, a wildcard two levels deep and no SNI at all get the hostname's cert.
    loose = env.client_context(check_hostname=False)
    for name in ("unknown.example.com", "a.b.other.test", "other.test", None):
        assert await peer_fingerprint(server, loose, name) == fingerprint(env.mail), name
        assert store.fingerprint_for(name) == fingerprint(env.mail)


async def test_rsa_certificate_is_really_rsa(env: Env, serve) -> None:
    server = await serve(env.store())
    _, writer, _ = await connect(server, env.client_context(), "example.net")
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    assert isinstance(x509.load_der_x509_certificate(der).public_key(), rsa.RSAPublicKey)


async def test_fallback_is_first_cert_when_hostname_not_covered(env: Env, serve) -> None:
    store = CertificateStore(env.settings(), "elsewhere.example", env.self_signed_dir)
    store.load()
    server = await serve(store)
    fp = await peer_fingerprint(server, env.client_context(check_hostname=False), "nobody.test")
    assert fp == fingerprint(env.mail)  # first in discovery order
    assert not env.self_signed_dir.exists()


# --- reload ----------------------------------------------------------------------------------


async def test_reload_serves_new_certificate_without_new_listener(env: Env, serve) -> None:
    store = env.store()
    context = store.server_context()
    server = await serve(store)
    port = server.sockets[0].getsockname()[1]
    client = env.client_context()

    reader, writer, before = await connect(server, client, HOSTNAME)
    assert before == fingerprint(env.mail)

    renewed = env.ca.issue_cert(HOSTNAME)
    write_pair(env.certs_dir / HOSTNAME, renewed)
    assert store.changed_on_disk()
    assert store.reload() is True
    assert not store.changed_on_disk()

    assert await peer_fingerprint(server, client, HOSTNAME) == fingerprint(renewed)
    assert store.fingerprint_for(HOSTNAME) == fingerprint(renewed)
    assert store.server_context() is context
    assert server.is_serving() and server.sockets[0].getsockname()[1] == port
    # The connection made before the reload is unaffected.
    assert await echo_works(reader, writer)
    writer.close()


async def test_reload_with_broken_key_keeps_old_certificate(
        env: Env, serve, caplog: pytest.LogCaptureFixture) -> None:
    store = env.store()
    server = await serve(store)
    key_path = env.certs_dir / HOSTNAME / "privkey.pem"
    replace_file(key_path, b"garbage\n")

    with caplog.at_level(logging.ERROR, logger="mailrelay.tls"):
        assert store.reload() is False
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and str(key_path) in errors[0].getMessage()

    assert await peer_fingerprint(server, env.client_context(), HOSTNAME) == fingerprint(env.mail)
    assert await peer_fingerprint(server, env.client_context(), "example.org") == fingerprint(
        env.ecc)
    # No retry storm: nothing changed since the failed attempt...
    assert not store.changed_on_disk()
    # ...until the file is fixed.
    replace_file(key_path, env.mail.private_key_pem.bytes())
    assert store.changed_on_disk()
    assert store.reload() is True

    replace_file(key_path, b"garbage\n")
    with pytest.raises(ConfigError) as info:
        CertificateStore(env.settings(), HOSTNAME, env.self_signed_dir).load()
    assert str(key_path) in str(info.value)


async def test_reload_picks_up_new_directory(env: Env, serve) -> None:
    store = env.store()
    server = await serve(store)
    assert not store.changed_on_disk()
    extra = env.ca.issue_cert("new.example.com")
    write_pair(env.certs_dir / "new.example.com", extra)
    assert store.changed_on_disk()
    assert store.reload()
    assert await peer_fingerprint(server, env.client_context(), "new.example.com") == (
        fingerprint(extra))


def test_changed_on_disk(env: Env) -> None:
    store = CertificateStore(env.settings(), HOSTNAME, env.self_signed_dir)
    assert store.changed_on_disk()  # never loaded
    store.load()
    assert not store.changed_on_disk()
    cert_path = env.acme / "example.org_ecc" / "fullchain.cer"
    replace_file(cert_path, cert_path.read_bytes())  # same bytes, new file
    assert store.changed_on_disk()
    store.load()
    assert not store.changed_on_disk()
    (env.acme / "example.org_ecc" / "example.org.key").unlink()
    assert store.changed_on_disk()


# --- self-signed -----------------------------------------------------------------------------


def test_no_certificates_without_self_signed_is_an_error(tmp_path: Path) -> None:
    settings = TLSSettings(certs_dir=tmp_path / "certs")
    store = CertificateStore(settings, HOSTNAME, tmp_path / "ss")
    with pytest.raises(ConfigError, match="no TLS certificate"):
        store.load()
    assert not (tmp_path / "ss").exists()
    assert store.reload() is False


async def test_self_signed_generated_once_and_reused(tmp_path: Path, serve) -> None:
    settings = TLSSettings(certs_dir=tmp_path / "certs", self_signed=True)
    directory = tmp_path / "data" / "tls"
    store = CertificateStore(settings, HOSTNAME, directory)
    store.load()
    key_path, cert_path = directory / "privkey.pem", directory / "fullchain.pem"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    first = store.fingerprint_for(HOSTNAME)
    assert store.certificates[0].names == (HOSTNAME,)
    assert not store.changed_on_disk()

    # Reused by a new store and by a reload.
    again = CertificateStore(settings, HOSTNAME, directory)
    again.load()
    assert again.fingerprint_for(HOSTNAME) == first
    assert store.reload() and store.fingerprint_for(HOSTNAME) == first
    assert ensure_self_signed(HOSTNAME, directory).cert_path == cert_path

    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime > dt.timedelta(days=3649)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)

    server = await serve(store)
    client = ssl.create_default_context(cadata=cert_path.read_text())
    assert await peer_fingerprint(server, client, HOSTNAME) == first


def test_self_signed_not_generated_when_hostname_covered(env: Env) -> None:
    store = env.store(self_signed=True)
    assert store.fingerprint_for(HOSTNAME) == fingerprint(env.mail)
    assert not env.self_signed_dir.exists()


def test_self_signed_regenerated_for_new_hostname(tmp_path: Path) -> None:
    first = ensure_self_signed("a.example.com", tmp_path)
    second = ensure_self_signed("b.example.com", tmp_path)
    assert first.names == ("a.example.com",) and second.names == ("b.example.com",)
    assert stat.S_IMODE((tmp_path / "privkey.pem").stat().st_mode) == 0o600
