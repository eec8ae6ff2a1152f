"""``mailrelay dns records|check`` against the real loopback DNS server (TestDNSServer).

The good zone is exactly what ``dns records --json`` says to publish; each broken zone
changes one thing and ``dns check`` must name that record.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from mailrelay.cli import main as cli_main
from mailrelay.message.dkim.keys import dns_record, generate_key, load_key, write_key
from tests.support.dns_server import TestDNSServer

DOMAIN = "example.com"
HOST = "mail.example.com"
IP4 = "127.0.0.5"
IP6 = "::1"
PTR4 = "5.0.0.127.in-addr.arpa"
PTR6 = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.ip6.arpa"


def write_config(confdir: Path, dns_server: TestDNSServer, timeout: str = "2s") -> None:
    host, port = dns_server.address
    (confdir / "mailrelay.yaml").write_text(
        f"hostname: {HOST}\ndata_dir: var\n"
        f"dns:\n  nameservers: ['{host}:{port}']\n  timeout: {timeout}\n")


@pytest.fixture
def confdir(tmp_path: Path, dns_server: TestDNSServer) -> Path:
    write_config(tmp_path, dns_server)
    domain_dir = tmp_path / "domains" / DOMAIN
    domain_dir.mkdir(parents=True)
    (tmp_path / "domains" / "example.org").mkdir()
    # RSA (a record longer than one 255-byte string) beside Ed25519, as dual signing does.
    write_key(domain_dir, "rsa1", generate_key("rsa2048"))
    write_key(domain_dir, "ed1", generate_key("ed25519"))
    return tmp_path


def mailrelay(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """main() in-process, as the installed command runs it."""
    code = cli_main.main(list(argv))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def plan(capsys: pytest.CaptureFixture[str], confdir: Path, *extra: str) -> dict:
    code, out, _ = mailrelay(capsys, "dns", "records", DOMAIN, "-c", str(confdir),
                             "--json", *extra)
    assert code == 0
    return json.loads(out)


def publish(dns_server: TestDNSServer, data: dict, skip: tuple[str, ...] = ()) -> None:
    """Put every record of ``dns records --json`` into the test DNS, except ``skip`` kinds."""
    for record in data["records"]:
        if record["kind"] in skip:
            continue
        assert not record["placeholder"]
        value: object = record["value"]
        if record["rtype"] == "MX":
            preference, exchange = record["value"].split()
            value = (int(preference), exchange)
        dns_server.add(record["name"], record["rtype"], value)


def check(capsys: pytest.CaptureFixture[str], confdir: Path, *extra: str
          ) -> tuple[int, dict[str, dict], str]:
    """``dns check --json``: exit code, results by kind and name, and the text output."""
    code, out, _ = mailrelay(capsys, "dns", "check", DOMAIN, "-c", str(confdir), "--json",
                             *extra)
    data = json.loads(out)
    assert data["ok"] == (code == 0)
    text_code, text, _ = mailrelay(capsys, "dns", "check", DOMAIN, "-c", str(confdir), *extra)
    assert text_code == code
    results = {}
    for result in data["results"]:
        results[result["kind"]] = result
        results[f"{result['kind']} {result['name']}"] = result
    return code, results, text


def good_zone(capsys, confdir, dns_server, skip: tuple[str, ...] = ()) -> dict:
    data = plan(capsys, confdir, "--ip", IP4, "--ip", IP6)
    publish(dns_server, data, skip)
    return data


def zone_records(output: str) -> dict[tuple[str, str], list[str]]:
    """(name, type) -> values of the zone-file lines in ``records`` text output; TXT
    strings are joined back after checking each is at most 255 bytes."""
    found: dict[tuple[str, str], list[str]] = {}
    for line in output.splitlines():
        if line.startswith(";") or not line.strip():
            continue
        match = re.fullmatch(r'(\S+)\. IN TXT \( ((?:"[^"]*" ?)+)\)', line)
        if match:
            strings = re.findall(r'"([^"]*)"', match.group(2))
            assert all(len(s.encode()) <= 255 for s in strings)
            found.setdefault((match.group(1), "TXT"), []).append("".join(strings))
            continue
        name, klass, rtype, value = line.split(None, 3)
        assert name.endswith(".") and klass == "IN", line
        found.setdefault((name[:-1], rtype), []).append(value)
    return found


def public_key_of(path: Path) -> bytes:
    private = serialization.load_pem_private_key(path.read_bytes(), None)
    public = private.public_key()
    try:
        return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    except ValueError:
        return public.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


# -- records ------------------------------------------------------------------------

def test_records_prints_every_line(capsys, confdir):
    code, out, _ = mailrelay(capsys, "dns", "records", DOMAIN, "--ip", IP4, "--ip", IP6,
                             "-c", str(confdir))
    assert code == 0
    found = zone_records(out)
    assert found[(DOMAIN, "MX")] == [f"10 {HOST}."]
    assert found[(HOST, "A")] == [IP4]
    assert found[(HOST, "AAAA")] == [IP6]
    assert found[(PTR4, "PTR")] == [f"{HOST}."]
    assert found[(PTR6, "PTR")] == [f"{HOST}."]
    assert found[(DOMAIN, "TXT")] == ["v=spf1 mx ~all"]
    assert found[(HOST, "TXT")] == ["v=spf1 a -all"]
    assert found[(f"_dmarc.{DOMAIN}", "TXT")] == [
        f"v=DMARC1; p=quarantine; rua=mailto:postmaster@{DOMAIN}"]
    assert found[(f"_smtp._tls.{DOMAIN}", "TXT")][0].startswith("v=TLSRPTv1; rua=mailto:")
    assert re.fullmatch(r"v=STSv1; id=[A-Za-z0-9]{1,32}",
                        found[(f"_mta-sts.{DOMAIN}", "TXT")][0])
    # Each DKIM p= is the public half of the key file, read back from the printed line.
    for selector, kind in (("rsa1", "rsa"), ("ed1", "ed25519")):
        value = found[(f"{selector}._domainkey.{DOMAIN}", "TXT")][0]
        assert value.startswith(f"v=DKIM1; k={kind}; p=")
        path = confdir / "domains" / DOMAIN / f"dkim:{selector}.pem"
        assert base64.b64decode(value.split("p=")[1]) == public_key_of(path)
    # Every record comes with an explanation, and the MTA-STS policy file is shown.
    assert "; SPF: " in out and "; DMARC: " in out and "; PTR: " in out
    assert ";   mode: testing" in out and f";   mx: {HOST}" in out


def test_records_strict_spf(capsys, confdir):
    _, out, _ = mailrelay(capsys, "dns", "records", DOMAIN, "--ip", IP4, "--strict-spf",
                          "-c", str(confdir))
    assert zone_records(out)[(DOMAIN, "TXT")] == ["v=spf1 mx -all"]


def test_records_takes_addresses_from_dns(capsys, confdir, dns_server):
    dns_server.add(HOST, "A", IP4)
    data = plan(capsys, confdir)
    assert data["ips"] == [IP4] and data["ip_source"] == "dns"
    ptr = [r for r in data["records"] if r["kind"] == "PTR"]
    assert [(r["name"], r["value"]) for r in ptr] == [(PTR4, f"{HOST}.")]


def test_records_without_addresses_comments_the_placeholders(capsys, confdir):
    code, out, _ = mailrelay(capsys, "dns", "records", DOMAIN, "-c", str(confdir))
    assert code == 0
    assert f"; {HOST}. IN A <IPv4 address of this server>" in out
    assert (HOST, "A") not in zone_records(out)  # commented out: the zone still loads
    assert "--ip ADDRESS" in out


def test_records_without_dkim_key_says_how_to_make_one(capsys, confdir):
    code, out, _ = mailrelay(capsys, "dns", "records", "example.org", "--ip", IP4,
                             "-c", str(confdir))
    assert code == 0
    assert "mailrelay dkim keygen example.org" in out
    assert not [k for k in zone_records(out) if "_domainkey" in k[0]]


@pytest.mark.parametrize("action", ["records", "check"])
def test_unknown_domain_is_one_line(capsys, confdir, action):
    code, out, err = mailrelay(capsys, "dns", action, "other.test", "-c", str(confdir))
    assert code == 1 and out == ""
    assert err.splitlines() == [err.strip()]
    assert err.startswith("mailrelay: other.test is not a local domain")


def test_bad_ip_is_one_line(capsys, confdir):
    code, _, err = mailrelay(capsys, "dns", "check", DOMAIN, "--ip", "1.2.3",
                             "-c", str(confdir))
    assert code == 1 and err == "mailrelay: --ip 1.2.3: not an IPv4 or IPv6 address\n"


# -- check --------------------------------------------------------------------------

def test_check_good_zone(capsys, confdir, dns_server):
    good_zone(capsys, confdir, dns_server)
    code, results, text = check(capsys, confdir, "--ip", IP4, "--ip", IP6)
    assert code == 0, text
    assert {r["status"] for r in results.values()} == {"ok"}, text
    for kind in ("MX", "A", "SPF", "DMARC", "SPF-HELO", "MTA-STS", "TLS-RPT"):
        assert kind in results
    assert results[f"PTR {PTR4}"]["status"] == results[f"PTR {PTR6}"]["status"] == "ok"
    assert results[f"DKIM rsa1._domainkey.{DOMAIN}"]["status"] == "ok"
    assert results[f"DKIM ed1._domainkey.{DOMAIN}"]["status"] == "ok"
    assert text.splitlines()[-1] == f"{DOMAIN}: all required records are right"
    assert re.search(rf"^ok +MX +{DOMAIN}: MX is 10 {HOST}$", text, re.MULTILINE)


def test_check_good_zone_addresses_from_dns(capsys, confdir, dns_server):
    """Without --ip, the hostname's A/AAAA records are the addresses checked."""
    good_zone(capsys, confdir, dns_server)
    code, results, text = check(capsys, confdir)
    assert code == 0, text
    assert results[f"PTR {PTR4}"]["status"] == "ok"
    assert results[f"PTR {PTR6}"]["status"] == "ok"


def test_check_optional_records_do_not_fail(capsys, confdir, dns_server):
    good_zone(capsys, confdir, dns_server, skip=("MTA-STS", "TLS-RPT", "SPF-HELO"))
    code, results, text = check(capsys, confdir, "--ip", IP4)
    assert code == 0, text
    assert results["MTA-STS"]["status"] == "missing" and not results["MTA-STS"]["required"]
    assert "(optional)" in text


def bad(results: dict[str, dict], key: str, status: str) -> dict:
    """``key`` has ``status``, and is the only required record that is not ok."""
    assert results[key]["status"] == status, results[key]
    others = [k for k, r in results.items()
              if r["required"] and r["status"] != "ok" and r is not results[key]]
    assert not others, [results[k] for k in others]
    return results[key]


def test_hostname_is_the_domain(capsys, confdir, dns_server):
    """hostname = the domain: one SPF record serves both, so no second one is printed."""
    (confdir / "mailrelay.yaml").write_text(
        (confdir / "mailrelay.yaml").read_text().replace(f"hostname: {HOST}",
                                                         f"hostname: {DOMAIN}"))
    data = plan(capsys, confdir, "--ip", IP4)
    spf = [r for r in data["records"] if r["rtype"] == "TXT" and r["name"] == DOMAIN]
    assert [r["value"] for r in spf] == ["v=spf1 mx ~all"]
    assert [r["value"] for r in data["records"] if r["kind"] == "MX"] == [f"10 {DOMAIN}."]
    publish(dns_server, data)
    code, results, text = check(capsys, confdir, "--ip", IP4)
    assert code == 0, text
    assert "SPF-HELO" not in results


def test_check_missing_dkim(capsys, confdir, dns_server):
    good_zone(capsys, confdir, dns_server, skip=("DKIM",))
    dns_server.add(f"ed1._domainkey.{DOMAIN}", "TXT",
                   dns_record(load_key(confdir / "domains" / DOMAIN / "dkim:ed1.pem",
                                       DOMAIN, "ed1"))[1])
    code, results, text = check(capsys, confdir, "--ip", IP4)
    assert code == 1
    result = bad(results, f"DKIM rsa1._domainkey.{DOMAIN}", "missing")
    # The fix is the record to publish, with the key's p=.
    assert f"rsa1._domainkey.{DOMAIN}. IN TXT" in result["fix"][0]
    assert re.search(rf"^missing +DKIM +rsa1\._domainkey\.{DOMAIN}: ", text, re.MULTILINE)
    assert f"fix: rsa1._domainkey.{DOMAIN}. IN TXT" in text
    assert text.splitlines()[-1].startswith(f"{DOMAIN}: 1 required record to fix")


def test_check_wrong_dkim_key(capsys, confdir, dns_server, tmp_path):
    good_zone(capsys, confdir, dns_server, skip=("DKIM",))
    domain_dir = confdir / "domains" / DOMAIN
    dns_server.add(f"rsa1._domainkey.{DOMAIN}", "TXT",
                   dns_record(load_key(domain_dir / "dkim:rsa1.pem", DOMAIN, "rsa1"))[1])
    # ed1's name publishes some other key.
    (tmp_path / "elsewhere").mkdir()
    other = write_key(tmp_path / "elsewhere", "ed1", generate_key("ed25519"))
    dns_server.add(f"ed1._domainkey.{DOMAIN}", "TXT", dns_record(load_key(other, DOMAIN,
                                                                            "ed1"))[1])
    code, results, _ = check(capsys, confdir, "--ip", IP4)
    assert code == 1
    result = bad(results, f"DKIM ed1._domainkey.{DOMAIN}", "wrong")
    assert "p= is not the public half" in result["detail"]
    want = dns_record(load_key(domain_dir / "dkim:ed1.pem", DOMAIN, "ed1"))[1]
    assert want.split("p=")[1] in result["fix"][0]


def test_check_spf_not_covering_the_ip(capsys, confdir, dns_server):
    good_zone(capsys, confdir, dns_server, skip=("SPF",))
    dns_server.add(DOMAIN, "TXT", "v=spf1 ip4:127.0.0.9 -all")
    code, results, _ = check(capsys, confdir, "--ip", IP4)
    assert code == 1
    result = bad(results, "SPF", "wrong")
    assert IP4 in result["detail"] and "fail" in result["detail"]
    assert result["fix"] == [f'{DOMAIN}. IN TXT ( "v=spf1 mx ip4:127.0.0.9 -all" )']


def test_check_spf_include_and_redirect(capsys, confdir, dns_server):
    """SPF is evaluated (pyspf through our resolver), not just matched as text."""
    good_zone(capsys, confdir, dns_server, skip=("SPF",))
    dns_server.add(DOMAIN, "TXT", "v=spf1 include:_spf.example.net redirect=_r.example.net")
    dns_server.add("_spf.example.net", "TXT", "v=spf1 ip4:10.0.0.0/8 -all")
    dns_server.add("_r.example.net", "TXT", f"v=spf1 ip4:{IP4}/32 ip6:{IP6} -all")
    code, results, text = check(capsys, confdir, "--ip", IP4, "--ip", IP6)
    assert code == 0, text
    assert results["SPF"]["status"] == "ok"


def test_check_spf_allowing_everybody(capsys, confdir, dns_server):
    good_zone(capsys, confdir, dns_server, skip=("SPF",))
    dns_server.add(DOMAIN, "TXT", "v=spf1 +all")
    code, results, _ = check(capsys, confdir, "--ip", IP4)
    assert code == 1
    assert "every address" in bad(results, "SPF", "wrong")["detail"]


def test_check_missing_spf(capsys, confdir, dns_server):
    good_zone(capsys, confdir, dns_server, skip=("SPF",))
    dns_server.add(DOMAIN, "TXT", "google-site-verification=abc")  # not SPF
    code, results, _ = check(capsys, confdir, "--ip", IP4)
    assert code == 1
    assert bad(results, "SPF", "missing")["fix"] == [f'{DOMAIN}. IN TXT ( "v=spf1 mx ~all" )']


def test_check_no_dmarc(capsys, confdir, dns_server):
    good_zone(capsys, confdir, dns_server, skip=("DMARC",))
    code, results, _ = check(capsys, confdir, "--ip", IP4)
    assert code == 1
    result = bad(results, "DMARC", "missing")
    assert "p=quarantine" in result["fix"][0]


def test_check_dmarc_without_policy(capsys, confdir, dns_server):
    good_zone(capsys, confdir, dns_server, skip=("DMARC",))
    dns_server.add(f"_dmarc.{DOMAIN}", "TXT", "v=DMARC1; pct=100")
    code, results, _ = check(capsys, confdir, "--ip", IP4)
    assert code == 1
    assert "no valid policy" in bad(results, "DMARC", "wrong")["detail"]


def test_check_mx_elsewhere(capsys, confdir, dns_server):
    good_zone(capsys, confdir, dns_server, skip=("MX", "SPF"))
    dns_server.add(DOMAIN, "MX", (10, "mx.provider.test"))
    dns_server.add(DOMAIN, "TXT", f"v=spf1 ip4:{IP4} ~all")  # SPF stays right
    code, results, text = check(capsys, confdir, "--ip", IP4)
    assert code == 1
    result = bad(results, "MX", "wrong")
    assert "mx.provider.test" in result["detail"]
    assert result["fix"][0] == f"{DOMAIN}. IN MX 10 {HOST}."
    assert re.search(rf"^wrong +MX +{DOMAIN}: MX is 10 mx.provider.test, not {HOST}$",
                     text, re.MULTILINE)


def test_check_mx_preferring_another_host(capsys, confdir, dns_server):
    good_zone(capsys, confdir, dns_server)
    dns_server.add(DOMAIN, "MX", (5, "old.provider.test"))
    code, results, _ = check(capsys, confdir, "--ip", IP4)
    assert code == 1
    assert "preferred" in bad(results, "MX", "wrong")["detail"]


def test_check_ptr_missing(capsys, confdir, dns_server):
    good_zone(capsys, confdir, dns_server, skip=("PTR",))
    code, results, text = check(capsys, confdir, "--ip", IP4)
    assert code == 1
    result = bad(results, f"PTR {PTR4}", "missing")
    assert result["fix"][0] == f"{PTR4}. IN PTR {HOST}."
    assert "VPS provider" in text


def test_check_ptr_not_matching(capsys, confdir, dns_server):
    good_zone(capsys, confdir, dns_server, skip=("PTR",))
    dns_server.add(PTR4, "PTR", "vps-127-0-0-5.provider.test")
    code, results, _ = check(capsys, confdir, "--ip", IP4)
    assert code == 1
    result = bad(results, f"PTR {PTR4}", "wrong")
    assert "vps-127-0-0-5.provider.test" in result["detail"]


def test_check_ptr_not_forward_confirmed(capsys, confdir, dns_server):
    """The PTR names the hostname, but the hostname does not resolve to that address."""
    good_zone(capsys, confdir, dns_server)
    dns_server.add("6.0.0.127.in-addr.arpa", "PTR", HOST)
    code, results, _ = check(capsys, confdir, "--ip", "127.0.0.6")
    assert code == 1
    ptr = results["PTR 6.0.0.127.in-addr.arpa"]
    assert ptr["status"] == "wrong" and "forward-confirmed" in ptr["detail"]
    assert results["A"]["status"] == "wrong"  # the A record lacks the address, too
    assert results["SPF"]["status"] == "wrong"  # ...and so "mx" does not cover it


def test_check_dns_trouble_is_per_record(capsys, confdir, dns_server):
    good_zone(capsys, confdir, dns_server)
    dns_server.set_servfail(f"_dmarc.{DOMAIN}")
    code, results, text = check(capsys, confdir, "--ip", IP4)
    assert code == 1
    host, port = dns_server.address
    assert bad(results, "DMARC", "error")["detail"] == (
        f"DNS lookup failed: _dmarc.{DOMAIN}/TXT: SERVFAIL from {host}:{port} "
        "(dns.nameservers in mailrelay.yaml)")
    assert results["MX"]["status"] == "ok"
    assert text.splitlines()[-1] == (f"{DOMAIN}: 1 required record not checked because of "
                                     "DNS trouble (DMARC); try again")


def test_check_dns_down(capsys, confdir, dns_server):
    write_config(confdir, dns_server, timeout="300ms")
    good_zone(capsys, confdir, dns_server)
    dns_server.set_down(True)
    code, out, _ = mailrelay(capsys, "dns", "check", DOMAIN, "-c", str(confdir), "--ip", IP4)
    assert code == 1 and "Traceback" not in out
    host, port = dns_server.address
    asking, down, *lines, summary = out.splitlines()
    assert asking == (f"{DOMAIN}: asking {host}:{port} (dns.nameservers in mailrelay.yaml), "
                      "0.3s per lookup")
    assert down == (f"error:  the resolver {host}:{port} (dns.nameservers in mailrelay.yaml) "
                    f"does not answer: no answer from {host}:{port} within 0.3s")
    assert len(lines) >= 9 and all(line.startswith("error ") for line in lines), out
    assert all(line.endswith("not checked: the resolver does not answer")
               or line.endswith("does not answer (optional)") for line in lines), out
    assert "not checked because the resolver does not answer" in summary


def test_real_command(confdir, dns_server):
    """The installed entry point, as a subprocess: records, publish, check."""
    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mailrelay.cli.main", *argv],
                              capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)

    made = run("dns", "records", DOMAIN, "--ip", IP4, "--json", "-c", str(confdir))
    assert made.returncode == 0, made.stderr
    publish(dns_server, json.loads(made.stdout), skip=("DMARC",))
    checked = run("-c", str(confdir), "dns", "check", DOMAIN, "--ip", IP4)
    assert checked.returncode == 1 and "Traceback" not in checked.stderr
    assert re.search(rf"^missing +DMARC +_dmarc\.{DOMAIN}: ", checked.stdout, re.MULTILINE)
    dns_server.add(f"_dmarc.{DOMAIN}", "TXT", f"v=DMARC1; p=reject; rua=mailto:a@{DOMAIN}")
    checked = run("-c", str(confdir), "dns", "check", DOMAIN, "--ip", IP4)
    assert checked.returncode == 0, checked.stdout


# -- what delivery uses: source addresses, families, a relay ---------------------------------

def set_delivery(confdir: Path, dns_server: TestDNSServer, delivery: str) -> None:
    """Rewrite mailrelay.yaml with this ``delivery:`` section (YAML, indented two spaces)."""
    write_config(confdir, dns_server)
    with (confdir / "mailrelay.yaml").open("a") as handle:
        handle.write("delivery:\n" + delivery)


def test_check_fcrdns_per_family_of_the_source_addresses(capsys, confdir, dns_server):
    """Delivery sends from 127.0.0.5 and ::1; only the IPv4 one has its PTR: the IPv6 one
    is wrong, required, and carries the warning about Gmail."""
    set_delivery(confdir, dns_server, f"  source_ipv4: {IP4}\n  source_ipv6: '{IP6}'\n")
    good_zone(capsys, confdir, dns_server)
    dns_server.remove(PTR6, "PTR")
    code, results, text = check(capsys, confdir, "--ip", IP4, "--ip", IP6)
    assert code == 1
    ipv4 = results[f"PTR {PTR4}"]
    assert ipv4["status"] == "ok" and ipv4["required"]
    assert f"{IP4} -> {HOST} -> {IP4}" in ipv4["detail"]
    assert "delivery's IPv4 source address" in ipv4["detail"]
    ipv6 = bad(results, f"PTR {PTR6}", "missing")
    assert "delivery's IPv6 source address" in ipv6["detail"]
    assert any("Gmail refuses this: set the PTR or use `ip_families: [ipv4]`" in fix
               for fix in ipv6["fix"])
    assert "Gmail refuses this" in text


def test_check_ipv6_left_out_by_ip_families_is_not_required(capsys, confdir, dns_server):
    set_delivery(confdir, dns_server, "  ip_families: [ipv4]\n")
    good_zone(capsys, confdir, dns_server)
    dns_server.remove(PTR6, "PTR")
    code, results, text = check(capsys, confdir, "--ip", IP4, "--ip", IP6)
    assert code == 0, text
    ipv6 = results[f"PTR {PTR6}"]
    assert ipv6["status"] == "missing" and not ipv6["required"]
    assert "not used for sending: delivery.ip_families is [ipv4]" in ipv6["detail"]
    assert "Gmail refuses" not in " ".join(ipv6["fix"])


def test_check_source_address_other_than_the_servers(capsys, confdir, dns_server):
    """source_ipv4 is a second address: its PTR counts, the published one's does not."""
    set_delivery(confdir, dns_server, "  source_ipv4: 127.0.0.6\n")
    good_zone(capsys, confdir, dns_server)  # publishes a PTR for 127.0.0.6 too...
    dns_server.remove("6.0.0.127.in-addr.arpa", "PTR")  # ...which the provider did not set
    dns_server.add("6.0.0.127.in-addr.arpa", "PTR", "vps-6.provider.test")
    code, results, _ = check(capsys, confdir, "--ip", IP4)
    assert code == 1
    source = bad(results, "PTR 6.0.0.127.in-addr.arpa", "wrong")
    assert "vps-6.provider.test" in source["detail"]
    assert not results[f"PTR {PTR4}"]["required"]
    assert "delivery.source_ipv4 is 127.0.0.6" in results[f"PTR {PTR4}"]["detail"]
    # records prints the PTR to set for the source address too.
    data = plan(capsys, confdir, "--ip", IP4)
    assert "6.0.0.127.in-addr.arpa" in [r["name"] for r in data["records"]]


def relay_config(confdir: Path, dns_server: TestDNSServer, host: str,
                 domains: str = "[]") -> None:
    (confdir / "relay.password").write_text("secret\n")
    (confdir / "relay.password").chmod(0o600)
    set_delivery(confdir, dns_server,
                 f"  relay:\n    host: {host}\n    username: u\n"
                 f"    password_file: relay.password\n    domains: {domains}\n")


def test_relay_spf_include_from_the_table(capsys, confdir, dns_server):
    relay_config(confdir, dns_server, "email-smtp.eu-west-1.amazonaws.com")
    data = plan(capsys, confdir, "--ip", IP4)
    [spf] = [r for r in data["records"] if r["kind"] == "SPF"]
    assert spf["value"] == "v=spf1 mx include:amazonses.com ~all"
    assert "email-smtp.eu-west-1.amazonaws.com" in spf["why"]
    assert any("leaves through the relay" in note for note in data["notes"])

    # The old record, without the include: wrong, and the fix adds it.
    publish(dns_server, data, skip=("SPF", "PTR"))
    dns_server.add(DOMAIN, "TXT", "v=spf1 mx ~all")
    code, results, _ = check(capsys, confdir, "--ip", IP4)
    assert code == 1
    spf_result = bad(results, "SPF", "wrong")
    assert "include:amazonses.com" in spf_result["detail"]
    assert spf_result["fix"] == [f'{DOMAIN}. IN TXT ( "v=spf1 include:amazonses.com mx ~all" )']
    # All mail goes through the relay: this server's PTR does not count.
    assert not results[f"PTR {PTR4}"]["required"]
    assert "goes through the relay" in results[f"PTR {PTR4}"]["detail"]

    dns_server.remove(DOMAIN, "TXT")
    dns_server.add(DOMAIN, "TXT", "v=spf1 include:amazonses.com -all")
    code, results, text = check(capsys, confdir, "--ip", IP4)
    assert code == 0, text
    assert results["SPF"]["status"] == "ok"


def test_relay_spf_given_on_the_command_line(capsys, confdir, dns_server):
    relay_config(confdir, dns_server, "smtp.unknown-provider.test", domains="[gmail.com]")
    code, out, _ = mailrelay(capsys, "dns", "records", DOMAIN, "--ip", IP4, "-c",
                             str(confdir))
    assert code == 0 and "--relay-spf include:THEIR-DOMAIN" in out
    data = plan(capsys, confdir, "--ip", IP4, "--relay-spf", "spf.provider.test")
    [spf] = [r for r in data["records"] if r["kind"] == "SPF"]
    assert spf["value"] == "v=spf1 mx include:spf.provider.test ~all"
    publish(dns_server, data)
    # Only gmail.com goes through the relay: the server's own address must pass too.
    code, results, text = check(capsys, confdir, "--ip", IP4, "--relay-spf",
                                "include:spf.provider.test")
    assert code == 0, text
    assert results[f"PTR {PTR4}"]["required"]
    code, results, _ = check(capsys, confdir, "--ip", IP4)  # no table entry, no option
    assert results["SPF"]["status"] == "wrong"
    assert "--relay-spf" in results["SPF"]["fix"][0]
