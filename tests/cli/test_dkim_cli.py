"""``mailrelay dkim keygen|dns`` through a parser built from the module's register(),
plus one run of the real command."""

from __future__ import annotations

import argparse
import base64
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization

from mailrelay.cli import dkim as dkim_cli
from mailrelay.cli.main import common_options
from mailrelay.errors import MailrelayError
from mailrelay.message.dkim.keys import load_domain_keys
from mailrelay.message.dkim.signer import sign
from tests.support.dkim_dns import txt_lookup
from tests.support.process import python_for_other_users


@pytest.fixture
def confdir(tmp_path: Path) -> Path:
    (tmp_path / "mailrelay.yaml").write_text("hostname: mail.example.com\ndata_dir: var\n")
    (tmp_path / "domains" / "example.com").mkdir(parents=True)
    (tmp_path / "domains" / "example.org").mkdir(parents=True)
    return tmp_path


def run(confdir: Path, *argv: str) -> int:
    """Parse like ``mailrelay dkim ... -c DIR`` and report errors the way main() does."""
    parser = argparse.ArgumentParser(prog="mailrelay")
    subparsers = parser.add_subparsers(dest="command", required=True)
    dkim_cli.register(subparsers.add_parser("dkim", parents=[common_options()]),
                      common_options())
    args = parser.parse_args(["dkim", *argv, "-c", str(confdir)])
    try:
        return int(args.func(args) or 0)
    except MailrelayError as exc:
        print(f"mailrelay: {exc}", file=sys.stderr)
        return 1


def records(output: str) -> dict[str, str]:
    """name -> joined value of every zone-file TXT line in ``output``."""
    found = {}
    for line in output.splitlines():
        match = re.fullmatch(r'(\S+)\. IN TXT \( ((?:"[^"]*" ?)+)\)', line)
        if match:
            strings = re.findall(r'"([^"]*)"', match.group(2))
            assert all(len(s) <= 255 for s in strings)
            found[match.group(1)] = "".join(strings)
    return found


def test_keygen_rsa(confdir, capsys):
    assert run(confdir, "keygen", "example.com", "--selector", "s1") == 0
    out = capsys.readouterr().out
    path = confdir / "domains" / "example.com" / "dkim:s1.pem"
    assert f"wrote {path} (rsa2048)" in out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8

    found = records(out)
    assert list(found) == ["s1._domainkey.example.com"]
    value = found["s1._domainkey.example.com"]
    assert value.startswith("v=DKIM1; k=rsa; p=")
    # The printed p= is the public half of the key written.
    private = serialization.load_pem_private_key(path.read_bytes(), None)
    public = serialization.load_der_public_key(base64.b64decode(value.split("p=")[1]))
    assert public.public_numbers() == private.public_key().public_numbers()


def test_keygen_ed25519_and_default_selector(confdir, capsys):
    assert run(confdir, "keygen", "Example.ORG", "--algo", "ed25519") == 0
    out = capsys.readouterr().out
    today = time.strftime("%Y%m%d")
    path = confdir / "domains" / "example.org" / f"dkim:{today}.pem"
    assert path.exists()
    value = records(out)[f"{today}._domainkey.example.org"]
    assert value.startswith("v=DKIM1; k=ed25519; p=")
    private = serialization.load_pem_private_key(path.read_bytes(), None)
    raw = private.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw)
    assert base64.b64decode(value.split("p=")[1]) == raw


def test_keygen_refuses_to_overwrite(confdir, capsys):
    assert run(confdir, "keygen", "example.com", "--selector", "s1", "--algo", "ed25519") == 0
    path = confdir / "domains" / "example.com" / "dkim:s1.pem"
    before = path.read_bytes()
    capsys.readouterr()
    assert run(confdir, "keygen", "example.com", "--selector", "s1") == 1
    err = capsys.readouterr().err
    assert err.startswith("mailrelay: ") and "already exists" in err and str(path) in err
    assert path.read_bytes() == before


def test_keygen_unknown_domain(confdir, capsys):
    assert run(confdir, "keygen", "other.test") == 1
    err = capsys.readouterr().err
    assert "other.test is not a local domain" in err and "example.com" in err
    assert not (confdir / "domains" / "other.test").exists()


def test_keygen_bad_selector(confdir, capsys):
    assert run(confdir, "keygen", "example.com", "--selector", "../x") == 1
    assert "selector" in capsys.readouterr().err


def test_keygen_unknown_algo_is_a_usage_error(confdir):
    with pytest.raises(SystemExit):
        run(confdir, "keygen", "example.com", "--algo", "dsa")


def test_dns_lists_every_key(confdir, capsys):
    run(confdir, "keygen", "example.com", "--selector", "a")
    run(confdir, "keygen", "example.com", "--selector", "b", "--algo", "ed25519")
    run(confdir, "keygen", "example.org", "--selector", "c", "--algo", "ed25519")
    capsys.readouterr()
    assert run(confdir, "dns", "example.com") == 0
    found = records(capsys.readouterr().out)
    assert sorted(found) == ["a._domainkey.example.com", "b._domainkey.example.com"]
    assert "k=rsa" in found["a._domainkey.example.com"]
    assert "k=ed25519" in found["b._domainkey.example.com"]

    assert run(confdir, "dns") == 0  # every domain
    assert len(records(capsys.readouterr().out)) == 3


def test_dns_reports_broken_key_and_prints_the_rest(confdir, capsys):
    run(confdir, "keygen", "example.com", "--selector", "good", "--algo", "ed25519")
    broken = confdir / "domains" / "example.com" / "dkim:broken.pem"
    broken.write_text("not a key")
    capsys.readouterr()
    assert run(confdir, "dns", "example.com") == 1
    captured = capsys.readouterr()
    assert list(records(captured.out)) == ["good._domainkey.example.com"]
    assert f"mailrelay: {broken}: not a PEM private key" in captured.err


def test_dns_without_keys(confdir, capsys):
    assert run(confdir, "dns", "example.com") == 1
    assert "no DKIM keys for example.com" in capsys.readouterr().err


def test_printed_record_verifies_through_dns(confdir, capsys, dns_server):
    """Paste the printed record into (real, loopback) DNS; dkimpy verifies our signature."""
    assert run(confdir, "keygen", "example.com", "--selector", "live") == 0
    for name, value in records(capsys.readouterr().out).items():
        dns_server.add(name, "TXT", value)
    keys, _ = load_domain_keys(confdir / "domains" / "example.com", "example.com")
    message = b"From: me@example.com\r\nDate: now\r\nSubject: s\r\n\r\nbody\r\n"
    assert dkim.verify(sign(message, keys) + message, dnsfunc=txt_lookup(dns_server.port))


def test_real_command(confdir):
    def mailrelay(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mailrelay.cli.main", *argv],
                              capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)

    made = mailrelay("-c", str(confdir), "dkim", "keygen", "example.com", "--selector", "x",
                     "--algo", "ed25519")
    assert made.returncode == 0, made.stderr
    listed = mailrelay("dkim", "dns", "example.com", "-c", str(confdir))
    assert listed.returncode == 0, listed.stderr
    assert records(listed.stdout) == records(made.stdout) != {}
    again = mailrelay("dkim", "keygen", "example.com", "--selector", "x", "-c", str(confdir))
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert len(again.stderr.splitlines()) == 1 and "already exists" in again.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (files of another uid)")
def test_keygen_warns_when_the_server_cannot_read_the_key(tmp_path):
    """root's `dkim keygen` into a domain directory root made: the key is root's, 0600,
    in a configuration the service (4242) owns. It said nothing (mail then left unsigned);
    now it warns and exits 1, as `user add` does when the server did not take its file."""
    open_dir = Path(tempfile.mkdtemp(prefix="mailrelay-dkim-"))
    try:
        open_dir.chmod(0o755)
        conf = open_dir / "conf"
        (conf / "domains" / "example.com").mkdir(parents=True)
        (conf / "domains" / "example.org").mkdir(parents=True)
        (conf / "mailrelay.yaml").write_text("hostname: mail.example.com\ndata_dir: var\n")
        for path in (conf, conf / "domains", conf / "domains" / "example.org",
                     conf / "mailrelay.yaml"):
            os.chown(path, 4242, 4242)

        def keygen(domain: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([python_for_other_users(), "-m", "mailrelay.cli.main",
                                   "dkim", "keygen", domain, "--selector", "s1",
                                   "--algo", "ed25519", "-c", str(conf)],
                                  capture_output=True, text=True, timeout=60, cwd="/")

        result = keygen("example.com")  # domains/example.com is root's
        key = conf / "domains" / "example.com" / "dkim:s1.pem"
        assert result.returncode == 1 and key.exists()
        assert f"wrote {key} (ed25519)" in result.stdout
        [warning] = result.stderr.splitlines()
        assert warning.startswith(f"warning: {key} is written, but 4242, the server's user")
        assert f"chown 4242: {key.parent} {key}" in warning

        result = keygen("example.org")  # the service's directory: its key
        assert (result.returncode, result.stderr) == (0, "")
    finally:
        shutil.rmtree(open_dir, ignore_errors=True)
