"""DKIM keys on disk, the key ring and the DNS records that publish them."""

from __future__ import annotations

import base64
import re
import shutil
import stat
import subprocess

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailrelay.config import load_config
from mailrelay.errors import ConfigError, MailrelayError
from mailrelay.message.dkim.keys import (
    KeyRing,
    dns_record,
    format_txt,
    generate_key,
    load_domain_keys,
    write_key,
)
from mailrelay.message.dkim.signer import ED25519_SHA256, RSA_SHA256, DKIMKey, sign
from tests.support.dkim_dns import txt_lookup

MESSAGE = b"From: me@example.com\r\nSubject: hi\r\nDate: now\r\n\r\nHello.\r\n"


@pytest.fixture(scope="module")
def rsa_private() -> rsa.RSAPrivateKey:
    return generate_key("rsa2048")  # type: ignore[return-value]


def pem(key, fmt=serialization.PrivateFormat.PKCS8) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def parse_txt(line: str) -> tuple[str, list[str]]:
    """Name and character-strings of a zone-file line written by format_txt."""
    match = re.fullmatch(r'(\S+)\. IN TXT \( ((?:"(?:[^"\\]|\\.)*" ?)+)\)', line)
    assert match, line
    strings = re.findall(r'"((?:[^"\\]|\\.)*)"', match.group(2))
    return match.group(1), [re.sub(r"\\(.)", r"\1", s) for s in strings]


# -- loading -------------------------------------------------------------------------------

def test_load_pkcs8_traditional_and_ed25519(tmp_path, rsa_private):
    (tmp_path / "dkim:a.pem").write_bytes(pem(rsa_private))
    traditional = pem(rsa_private, serialization.PrivateFormat.TraditionalOpenSSL)
    assert traditional.startswith(b"-----BEGIN RSA PRIVATE KEY-----")  # chasquid's format
    (tmp_path / "dkim:b.pem").write_bytes(traditional)
    (tmp_path / "dkim:c.pem").write_bytes(pem(ed25519.Ed25519PrivateKey.generate()))
    (tmp_path / "users").write_text("")  # other files of the domain are not keys
    (tmp_path / "dkim:d.pem.bak").write_text("x")
    keys, errors = load_domain_keys(tmp_path, "example.com")
    assert errors == []
    assert [(k.selector, k.algorithm) for k in keys] == [
        ("a", RSA_SHA256), ("b", RSA_SHA256), ("c", ED25519_SHA256)]
    assert all(k.domain == "example.com" and k.path == tmp_path / f"dkim:{k.selector}.pem"
               for k in keys)


def test_broken_files_are_reported_and_the_others_load(tmp_path, rsa_private):
    (tmp_path / "dkim:good.pem").write_bytes(pem(rsa_private))
    (tmp_path / "dkim:garbage.pem").write_text("this is not a key\n")
    (tmp_path / "dkim:cert.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n"
                                             b"-----END CERTIFICATE-----\n")
    encrypted = rsa_private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"))
    (tmp_path / "dkim:locked.pem").write_bytes(encrypted)
    (tmp_path / "dkim:bad_selector!.pem").write_bytes(pem(rsa_private))
    keys, errors = load_domain_keys(tmp_path, "example.com")
    assert [k.selector for k in keys] == ["good"]
    by_file = {e.path.name: e for e in errors}
    assert set(by_file) == {"dkim:garbage.pem", "dkim:cert.pem", "dkim:locked.pem",
                            "dkim:bad_selector!.pem"}
    assert all(isinstance(e, ConfigError) and str(e).startswith(str(e.path)) for e in errors)
    assert "passphrase" in str(by_file["dkim:locked.pem"])
    assert "selector" in str(by_file["dkim:bad_selector!.pem"])


def test_unreadable_key_is_reported(tmp_path, rsa_private):
    path = tmp_path / "dkim:x.pem"
    path.write_bytes(pem(rsa_private))
    path.chmod(0)
    try:
        if path.read_bytes():  # root reads anything: nothing to test then
            pytest.skip("running as root")
    except PermissionError:
        pass
    try:
        keys, errors = load_domain_keys(tmp_path, "example.com")
        assert keys == [] and "cannot read" in str(errors[0])
    finally:
        path.chmod(0o600)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_small_rsa_key_is_refused(tmp_path):
    # cryptography will not generate one; openssl (as old setups did) will.
    path = tmp_path / "dkim:old.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(path), "512"], check=True,
                   capture_output=True)
    keys, errors = load_domain_keys(tmp_path, "example.com")
    assert keys == [] and "too small" in str(errors[0]) and str(path) in str(errors[0])


def test_missing_domain_dir(tmp_path):
    assert load_domain_keys(tmp_path / "nope", "example.com") == ([], [])


def test_key_ring(tmp_path, rsa_private):
    (tmp_path / "mailrelay.yaml").write_text("hostname: mail.example.com\ndata_dir: var\n")
    for domain in ("example.com", "example.org", "example.net"):
        (tmp_path / "domains" / domain).mkdir(parents=True)
    write_key(tmp_path / "domains" / "example.com", "s1", rsa_private)
    write_key(tmp_path / "domains" / "example.com", "s2", ed25519.Ed25519PrivateKey.generate())
    (tmp_path / "domains" / "example.org" / "dkim:broken.pem").write_text("no")
    ring, errors = KeyRing.load(load_config(tmp_path))
    assert ring.domains() == ["example.com"]
    assert [k.selector for k in ring.keys_for("Example.COM")] == ["s1", "s2"]
    assert ring.keys_for("example.org") == [] and ring.keys_for("unknown.test") == []
    assert len(errors) == 1 and errors[0].path.name == "dkim:broken.pem"


# -- generating and writing ------------------------------------------------------------

@pytest.mark.parametrize(("algo", "kind", "bits"), [
    ("rsa2048", rsa.RSAPrivateKey, 2048),
    ("rsa3072", rsa.RSAPrivateKey, 3072),
    ("ed25519", ed25519.Ed25519PrivateKey, None),
])
def test_generate_key(algo, kind, bits):
    key = generate_key(algo)
    assert isinstance(key, kind)
    if bits:
        assert key.key_size == bits


def test_generate_unknown_algo():
    with pytest.raises(MailrelayError, match="unknown key algorithm"):
        generate_key("dsa1024")


def test_write_key(tmp_path, rsa_private):
    path = write_key(tmp_path, "20240101", rsa_private)
    assert path == tmp_path / "dkim:20240101.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")  # PKCS#8
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left
    keys, errors = load_domain_keys(tmp_path, "example.com")
    assert errors == [] and keys[0].private_key.private_numbers() == rsa_private.private_numbers()

    with pytest.raises(MailrelayError, match="already exists"):
        write_key(tmp_path, "20240101", generate_key("ed25519"))
    assert keys[0].private_key.private_numbers() == load_domain_keys(
        tmp_path, "example.com")[0][0].private_key.private_numbers()  # untouched


@pytest.mark.parametrize("selector", ["", "a/b", "../x", "-a", "a_b", "a..b", "sel ector"])
def test_write_key_refuses_bad_selectors(tmp_path, selector, rsa_private):
    with pytest.raises(MailrelayError, match="selector"):
        write_key(tmp_path, selector, rsa_private)
    assert list(tmp_path.iterdir()) == []


# -- DNS records -----------------------------------------------------------------------

def test_rsa_record(rsa_private):
    key = DKIMKey.from_private_key("example.com", "s1", rsa_private)
    name, value = dns_record(key)
    assert name == "s1._domainkey.example.com"
    assert value.startswith("v=DKIM1; k=rsa; p=")
    der = base64.b64decode(value.split("p=", 1)[1])
    public = serialization.load_der_public_key(der)
    assert public.public_numbers() == rsa_private.public_key().public_numbers()


def test_ed25519_record():
    private = ed25519.Ed25519PrivateKey.generate()
    name, value = dns_record(DKIMKey.from_private_key("example.org", "ed", private))
    assert name == "ed._domainkey.example.org"
    assert value.startswith("v=DKIM1; k=ed25519; p=")
    raw = base64.b64decode(value.split("p=", 1)[1])
    assert len(raw) == 32  # RFC 8463: the bare key, not SubjectPublicKeyInfo
    assert raw == private.public_key().public_bytes(serialization.Encoding.Raw,
                                                    serialization.PublicFormat.Raw)


@pytest.mark.parametrize("length", [0, 10, 255, 256, 392, 510, 511, 800])
def test_format_txt_splits_into_255_byte_strings(length):
    value = ("v=DKIM1; k=rsa; p=" + "A" * 1000)[:length]
    name, strings = parse_txt(format_txt("s._domainkey.example.com", value))
    assert name == "s._domainkey.example.com"
    assert "".join(strings) == value
    assert all(len(s.encode()) <= 255 for s in strings)
    assert len(strings) == max(1, -(-length // 255))


def test_format_txt_escapes():
    name, strings = parse_txt(format_txt("x.example.com.", 'a"b\\c'))
    assert name == "x.example.com" and strings == ['a"b\\c']


@pytest.mark.parametrize("algo", ["rsa2048", "ed25519"])
def test_written_key_verifies_through_dns(tmp_path, dns_server, algo):
    """write_key -> load -> sign -> publish the record on the loopback DNS -> dkimpy."""
    write_key(tmp_path, "sel", generate_key(algo))
    (key,), _ = load_domain_keys(tmp_path, "example.com")
    name, value = dns_record(key)
    _, strings = parse_txt(format_txt(name, value))
    dns_server.add(name, "TXT", tuple(strings))  # as the owner would paste it
    signed = sign(MESSAGE, [key]) + MESSAGE
    assert dkim.verify(signed, dnsfunc=txt_lookup(dns_server.port))
    assert not dkim.verify(signed.replace(b"Hello", b"Hallo"),
                           dnsfunc=txt_lookup(dns_server.port))

