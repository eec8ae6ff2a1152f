"""``mailrelay init``: from nothing to a configuration that checks, serves, signs with
both keys and forwards, as issue 18's "Must show" asks.

The end-to-end test runs init, check and serve as a real subprocess without root: as
uid 65534 through setpriv when the tests run as root (they do in CI), else as the
caller. Then it switches the generated listeners to loopback ports, installs a
certificate where init's acme.sh command would, publishes the DKIM records init printed
in the loopback DNS server, and sends real mail.
"""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import dkim
import pytest
import yaml

from bench.ports import free_port
from mailrelay.cli import init as init_cli
from mailrelay.cli.main import main
from mailrelay.message.headers import get_all, parse_headers
from tests.support.client import RawSMTP
from tests.support.dkim_dns import dnsfunc_for
from tests.support.process import wait_ready
from tests.support.sink import Sink

NOBODY = 65534
PASSWORD = "correct horse battery staple"
UNIT = Path(__file__).resolve().parents[2] / "systemd" / "mailrelay.service"


def as_unprivileged() -> tuple[str, ...]:
    """The command prefix that runs a program without root (nothing when not root)."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to run init without root")
    return ("setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups")


def mailrelay(*argv: str, stdin: str | None = None, prefix: tuple[str, ...] = (),
              new_session: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "mailrelay.cli.main", *argv],
        capture_output=True, text=True, timeout=120, cwd="/", input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        start_new_session=new_session,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mailrelay: ")
    return lines[0]


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory under /tmp that the unprivileged user owns."""
    directory = Path(tempfile.mkdtemp(prefix="mailrelay-init-"))
    directory.chmod(0o755)
    if os.geteuid() == 0:
        os.chown(directory, NOBODY, NOBODY)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def init_args(workdir: Path, *extra: str, domain: str = "example.com",
              hostname: str = "mail.example.com", forward_to: str = "me@gmail.test",
              user: str = "me@example.com") -> list[str]:
    return ["init", domain, "--hostname", hostname, "--forward-to", forward_to,
            "--user", user, "-c", str(workdir / "etc"), "--data-dir", str(workdir / "var"),
            "--no-systemd", "--ip", "192.0.2.7", *extra]


def tree(directory: Path) -> dict[str, tuple[bytes | None, int, int]]:
    """Path -> (content, mode, uid) of everything under ``directory``."""
    found = {}
    for path in sorted(directory.rglob("*")):
        st = path.lstat()
        found[str(path.relative_to(directory))] = (
            path.read_bytes() if path.is_file() else None, stat.S_IMODE(st.st_mode), st.st_uid)
    return found


def published_dkim_records(output: str) -> dict[str, str]:
    """The ``<selector>._domainkey`` TXT records init printed, name -> value."""
    records = {}
    for match in re.finditer(r"^(\S+\._domainkey\.\S+)\. IN TXT \( (.*) \)$", output, re.M):
        records[match.group(1)] = "".join(re.findall(r'"([^"]*)"', match.group(2)))
    return records


# -- the whole first day -------------------------------------------------------------------


async def test_init_check_serve_sign_and_forward(workdir, dns_server, ca):
    prefix = as_unprivileged()
    uid = NOBODY if prefix else os.geteuid()
    etc, var = workdir / "etc", workdir / "var"

    result = await asyncio.to_thread(mailrelay, *init_args(workdir, "--password-stdin"),
                                     stdin=PASSWORD + "\n", prefix=prefix)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    if prefix:
        assert out.startswith("note: not root: no service user is created and everything "
                              "belongs to nobody")
    domain_dir = etc / "domains" / "example.com"
    keys = sorted(domain_dir.glob("dkim:*.pem"))
    assert [k.name.rsplit("-", 1)[1] for k in keys] == ["ed25519.pem", "rsa.pem"]
    for path in (etc, etc / "domains", domain_dir, domain_dir / "users", domain_dir / "aliases",
                 *keys, etc / "certs" / "mail.example.com", var, etc / "mailrelay.yaml"):
        assert re.search(rf"^created +{re.escape(str(path))}/? ", out, re.M), (path, out)
        assert path.stat().st_uid == uid, path
    modes = {etc: 0o750, domain_dir / "users": 0o600, var: 0o700, etc / "mailrelay.yaml": 0o640,
             **dict.fromkeys(keys, 0o600)}
    for path, expected in modes.items():
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
    # The acme.sh commands for the hostname, installing where certs_dir looks.
    assert "acme.sh --issue -d mail.example.com" in out
    cert_dir = etc / "certs" / "mail.example.com"
    assert (f"acme.sh --install-cert -d mail.example.com \\\n      --fullchain-file "
            f"{cert_dir / 'fullchain.pem'} \\\n      --key-file {cert_dir / 'privkey.pem'} \\\n"
            "      --reloadcmd '") in out
    # The records `dns records` prints, with both keys.
    assert "example.com. IN MX 10 mail.example.com." in out
    assert "mail.example.com. IN A 192.0.2.7" in out
    records = published_dkim_records(out)
    assert len(records) == 2 and {v.split(";")[1].strip() for v in records.values()} == {
        "k=rsa", "k=ed25519"}

    # Run again: everything is kept, nothing is asked or changed.
    before = tree(workdir)
    again = await asyncio.to_thread(mailrelay, *init_args(workdir), prefix=prefix)
    assert again.returncode == 0, again.stderr
    steps = [line for line in again.stdout.splitlines() if re.match(r"(kept|created) ", line)]
    assert steps and all(line.startswith("kept ") for line in steps), steps
    assert tree(workdir) == before
    assert published_dkim_records(again.stdout) == records

    # What the operator and acme.sh do next, in a test's way: loopback ports and DNS, a
    # certificate from the test CA where --install-cert puts it.
    sink_port = free_port()
    ports = {name: free_port() for name in ("smtp", "submission", "submission_tls")}
    settings = yaml.safe_load((etc / "mailrelay.yaml").read_text())
    assert settings["listen"]["smtp"][0] == "0.0.0.0:25"
    settings["listen"] = {name: [f"127.0.0.1:{port}"] for name, port in ports.items()}
    settings["dns"] = {"nameservers": [f"127.0.0.1:{dns_server.port}"], "timeout": "2s"}
    settings["delivery"] = {"smtp_port": sink_port, "ca_file": str(etc / "test-ca.pem"),
                            "retry_intervals": ["1s"]}
    (etc / "mailrelay.yaml").write_text(yaml.safe_dump(settings))
    ca.cert_pem.write_to_path(str(etc / "test-ca.pem"))
    cert = ca.issue_cert("mail.example.com", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(cert_dir / "privkey.pem"))
    cert.cert_chain_pems[0].write_to_path(str(cert_dir / "fullchain.pem"))
    (cert_dir / "privkey.pem").chmod(0o600)
    for path in (etc / "test-ca.pem", cert_dir / "privkey.pem", cert_dir / "fullchain.pem"):
        os.chown(path, uid, uid)
    for name, value in records.items():
        dns_server.add(name, "TXT", value)
    for domain, host, ip in (("remote.test", "mx.remote.test", "127.0.0.2"),
                             ("gmail.test", "mx.gmail.test", "127.0.0.7")):
        dns_server.add(domain, "MX", (10, host))
        dns_server.add(host, "A", ip)

    checked = await asyncio.to_thread(mailrelay, "check", "-c", str(etc), prefix=prefix)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stderr == ""
    assert "domain example.com: 1 user(s), 3 alias(es) + catch-all, 2 DKIM key(s)" \
        in checked.stdout

    remote = Sink("127.0.0.2", sink_port, ca_context(ca, "mx.remote.test"),
                  hostname="mx.remote.test")
    gmail = Sink("127.0.0.7", sink_port, ca_context(ca, "mx.gmail.test"),
                 hostname="mx.gmail.test")
    remote.start()
    gmail.start()
    server = await start_serve(etc, prefix)
    try:
        # An authenticated submission: signed with both keys, delivered to remote.test.
        client_tls = ca_client_context(ca)
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=ports["submission"],
                               tls_context=client_tls, start_tls=True)
        await smtp.connect()
        await smtp.ehlo()
        await smtp.auth_plain("me@example.com", PASSWORD)
        await smtp.sendmail("me@example.com", ["friend@remote.test"],
                            b"From: me@example.com\r\nTo: friend@remote.test\r\n"
                            b"Subject: first mail\r\n\r\nHello from the new server.\r\n")
        await smtp.quit()
        [sent] = await remote.until(1)
        assert sent.recipients == ["friend@remote.test"]
        dnsfunc = dnsfunc_for(dns_server)
        signatures = get_all(parse_headers(sent.data), "DKIM-Signature")
        algorithms = sorted(re.search(r"a=([\w-]+)", s).group(1) for s in signatures)
        assert algorithms == ["ed25519-sha256", "rsa-sha256"]
        for index in range(len(signatures)):
            assert dkim.DKIM(sent.data).verify(idx=index, dnsfunc=dnsfunc), index

        # Mail from outside to any address of the domain reaches --forward-to, with SRS
        # and an ARC set.
        stranger = f"random-{secrets.token_hex(4)}@example.com"
        client = await RawSMTP.connect("127.0.0.1", ports["smtp"])
        await client.cmd("EHLO mx.sender.test")
        code = await client.send_message("alice@sender.test", [stranger], (
            b"From: alice@sender.test\r\nTo: " + stranger.encode() +
            b"\r\nSubject: hi\r\nMessage-ID: <a1@sender.test>\r\n\r\nHello.\r\n"))
        assert code == 250
        await client.cmd("QUIT")
        await client.close()
        [forwarded] = await gmail.until(1)
        assert forwarded.recipients == ["me@gmail.test"]
        assert re.fullmatch(r"SRS0=[^=]{4}=[A-Z2-7]{2}=sender\.test=alice@example\.com",
                            forwarded.sender), forwarded.sender
        fields = parse_headers(forwarded.data)
        for name in ("ARC-Seal", "ARC-Message-Signature", "ARC-Authentication-Results"):
            assert len(get_all(fields, name)) == 1, name
        cv, _, reason = dkim.arc_verify(forwarded.data, dnsfunc=dnsfunc)
        assert cv == dkim.CV_Pass, reason
    finally:
        await stop_serve(server)
        remote.stop()
        gmail.stop()


def ca_context(ca, hostname: str):
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(hostname).configure_cert(context)
    return context


def ca_client_context(ca):
    import ssl

    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def start_serve(etc: Path, prefix: tuple[str, ...]) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    process = await asyncio.create_subprocess_exec(
        *prefix, sys.executable, "-m", "mailrelay.cli.main", "serve", "-c", str(etc),
        stderr=asyncio.subprocess.PIPE, cwd="/", env=env)
    await wait_ready(process)
    return process


async def stop_serve(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            process.kill()
            await process.wait()
    await process.log_drain


# -- idempotence, dry run, bad input -------------------------------------------------------


def test_run_again_adds_only_what_is_missing(workdir):
    prefix = as_unprivileged()
    first = mailrelay(*init_args(workdir, "--password-stdin"), stdin=PASSWORD + "\n",
                      prefix=prefix)
    assert first.returncode == 0, first.stderr
    if prefix:  # not root: the last words say that 25, 587 and 465 are out of its reach
        assert (f"Then `mailrelay check -c {workdir / 'etc'}` and `mailrelay serve -c "
                f"{workdir / 'etc'}`. Ports 25, 587 and 465 need root or "
                "CAP_NET_BIND_SERVICE") in first.stdout
    domain_dir = workdir / "etc" / "domains" / "example.com"
    yaml_path = workdir / "etc" / "mailrelay.yaml"
    # Made with --no-systemd: nothing in it may send the owner to systemctl.
    assert "systemctl" not in yaml_path.read_text()
    assert "stop `mailrelay serve` (SIGTERM) and start it again" in yaml_path.read_text()
    [ed_key] = domain_dir.glob("dkim:*-ed25519.pem")
    ed_key.unlink()
    (domain_dir / "aliases").write_text("postmaster: me\n")
    # The owner moved the ports: the kept file is not said to have 25, 587 and 465.
    yaml_path.write_text(yaml_path.read_text().replace(":25\"", ":2525\""))
    kept = {p: p.read_bytes() for p in (domain_dir / "users", domain_dir / "aliases",
                                        workdir / "etc" / "mailrelay.yaml")}
    again = mailrelay(*init_args(workdir), prefix=prefix)
    assert again.returncode == 0, again.stderr
    created = [line for line in again.stdout.splitlines() if line.startswith("created ")]
    assert len(created) == 1 and "-ed25519.pem (DKIM ed25519 key" in created[0], created
    assert f"kept           {domain_dir / 'aliases'} (not replaced; it has no abuse, *" \
        in again.stdout
    assert f"kept           {yaml_path} (not replaced)\n" in again.stdout
    assert {p: p.read_bytes() for p in kept} == kept


def test_dry_run_writes_nothing(workdir):
    result = mailrelay(*init_args(workdir, "--dry-run"), prefix=as_unprivileged())
    assert result.returncode == 0, result.stderr
    assert f"would create   {workdir / 'etc'}/ (mode 0750)" in result.stdout
    assert re.search(r"would create +\S+/dkim:\d{8}-rsa\.pem \(DKIM rsa2048 key", result.stdout)
    assert "dry run: nothing written" in result.stdout
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize(("change", "expected"), [
    ({"hostname": "mail"}, "--hostname 'mail' is not a fully qualified host name"),
    ({"hostname": "192.0.2.7"}, "--hostname 192.0.2.7: an IP address"),
    ({"hostname": "mail..example.com"}, "is not a fully qualified host name"),
    ({"domain": "localhost"}, "'localhost' is not a domain name"),
    ({"forward_to": "me@example.com"}, "--forward-to me@example.com is an address this "
                                       "server receives mail for"),
    ({"forward_to": "postmaster@mail.example.com"}, "is an address this server receives"),
    ({"forward_to": "not-an-address"}, "--forward-to 'not-an-address' is not an address"),
    ({"forward_to": "me, you@gmail.test"}, "--forward-to me, you@gmail.test:"),
    ({"user": "me@example.org"}, "--user me@example.org: not an address of example.com"),
    ({"user": "me"}, "--user 'me' is not an address"),
])
def test_bad_input_is_one_line_and_writes_nothing(workdir, change, expected):
    result = mailrelay(*init_args(workdir, "--password-stdin", **change),
                       stdin="a good password\n", prefix=as_unprivileged())
    line = one_line_error(result)
    assert expected in line, line
    assert line.endswith("(nothing was written)")
    assert list(workdir.iterdir()) == []


def test_a_bad_ip_is_one_line_and_writes_nothing(workdir):
    result = mailrelay(*init_args(workdir, "--password-stdin", "--ip", "203.0.113.300"),
                       stdin="a good password\n", prefix=as_unprivileged())
    line = one_line_error(result)
    assert "--ip 203.0.113.300: not an IPv4 or IPv6 address" in line
    assert line.endswith("(nothing was written)")
    assert list(workdir.iterdir()) == []


def test_an_existing_different_configuration_is_refused(workdir):
    prefix = as_unprivileged()
    assert mailrelay(*init_args(workdir, "--password-stdin"), stdin="password-one\n",
                     prefix=prefix).returncode == 0
    before = tree(workdir)
    line = one_line_error(mailrelay(*init_args(workdir, "--password-stdin",
                                               hostname="mx.example.com"),
                                    stdin="pw\n", prefix=prefix))
    assert f"{workdir / 'etc' / 'mailrelay.yaml'} exists with hostname mail.example.com, not " \
           "mx.example.com" in line
    # A second domain into the same configuration is fine; the first one is untouched.
    result = mailrelay(*init_args(workdir, "--password-stdin", domain="example.org",
                                  user="me@example.org"), stdin="password-two\n", prefix=prefix)
    assert result.returncode == 0, result.stderr
    after = tree(workdir)
    assert {k: v for k, v in after.items() if k in before} == before
    assert "etc/domains/example.org/users" in after
    # Forwarding into a domain this server already has is a loop too.
    line = one_line_error(mailrelay(*init_args(workdir, "--password-stdin", domain="example.net",
                                               user="a@example.net",
                                               forward_to="me@example.org"),
                                    stdin="pw\n", prefix=prefix))
    assert "is an address this server receives mail for" in line


def test_passwords(workdir):
    prefix = as_unprivileged()
    line = one_line_error(mailrelay(*init_args(workdir, "--password-stdin"), stdin="\n",
                                    prefix=prefix))
    assert "password must not be empty" in line
    line = one_line_error(mailrelay(*init_args(workdir, "--password-stdin"), stdin="a\n",
                                    prefix=prefix))
    assert "the password is too short: 1 character, at least 8" in line
    # No terminal and no --password-stdin: said at once, not a getpass traceback.
    line = one_line_error(mailrelay(*init_args(workdir), prefix=prefix, new_session=True))
    assert "no terminal to ask for the password on" in line
    assert list(workdir.iterdir()) == []


def test_without_root_the_unit_needs_no_systemd(workdir):
    prefix = as_unprivileged()
    args = [a for a in init_args(workdir, "--password-stdin") if a != "--no-systemd"]
    line = one_line_error(mailrelay(*args, stdin="pw\n", prefix=prefix))
    assert "installing the systemd unit needs root" in line
    line = one_line_error(mailrelay(*init_args(workdir, "--service-user", "mail"), prefix=prefix))
    assert "--service-user needs root" in line


def test_a_failure_while_writing_removes_what_was_created(workdir, monkeypatch, capsys):
    """Planning catches what it can; if a write still fails, the run is undone."""
    if os.geteuid() == 0:
        monkeypatch.setattr(init_cli.os, "geteuid", lambda: NOBODY)  # plan as not root

    def broken(*_args, **_kwargs):
        raise OSError(28, "No space left on device", "dkim:x.pem")

    monkeypatch.setattr(init_cli, "write_key", broken)
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("pw-for-test\n"))
    assert main(init_args(workdir, "--password-stdin")) == 1
    err = capsys.readouterr().err
    assert "No space left on device; removed again the" in err
    assert list(workdir.iterdir()) == []


# -- as root: the service user and the unit ------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("useradd") is None,
                    reason="creating a system user needs root and useradd")
def test_root_creates_the_service_user(workdir):
    name = f"mrtest{secrets.token_hex(3)}"
    try:
        result = mailrelay(*init_args(workdir, "--password-stdin", "--service-user", name),
                           stdin="password-root\n")
        assert result.returncode == 0, result.stderr
        assert re.search(rf"^created +user {name} \(useradd --system --user-group ", result.stdout,
                         re.M), result.stdout
        entry = pwd.getpwnam(name)
        assert grp.getgrgid(entry.pw_gid).gr_name == name
        assert entry.pw_shell == "/usr/sbin/nologin"
        for path in [workdir / "etc", *(workdir / "etc").rglob("*"), workdir / "var"]:
            assert (path.stat().st_uid, path.stat().st_gid) == (entry.pw_uid, entry.pw_gid), path
        # The acme.sh reload hands the renewed files to the service user.
        assert f"--reloadcmd 'chown -R {name}: {workdir / 'etc' / 'certs'}" in result.stdout
        again = mailrelay(*init_args(workdir, "--service-user", name))
        assert again.returncode == 0, again.stderr
        assert re.search(rf"^kept +user {name} \(uid {entry.pw_uid}\)", again.stdout, re.M)
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=60)
        subprocess.run(["groupdel", name], capture_output=True, timeout=60)


def test_unit_for_another_layout_passes_systemd_analyze(tmp_path):
    """The packaged unit, with this installation's paths: systemd's checker accepts it."""
    text = init_cli.render_unit(UNIT.read_text(), binary=init_cli.mailrelay_binary(),
                                config_dir=Path("/srv/mail/etc"),
                                data_dir=Path("/srv/mail/state"), user="relay",
                                group="relaygroup")
    lines = text.splitlines()
    assert f"ExecStart={init_cli.mailrelay_binary()} serve -c /srv/mail/etc" in lines
    assert "User=relay" in lines and "Group=relaygroup" in lines
    assert "ReadWritePaths=/srv/mail/state" in lines
    assert not any(line.startswith("StateDirectory") for line in lines)
    default = init_cli.render_unit(UNIT.read_text(),
                                   binary="/opt/mailrelay/.venv/bin/mailrelay",
                                   config_dir=Path("/etc/mailrelay"),
                                   data_dir=Path("/var/lib/mailrelay"), user="mailrelay",
                                   group="mailrelay")
    assert default == UNIT.read_text()  # README's layout is the packaged unit, unchanged
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed (scripts/setup installs it)")
    unit = tmp_path / "mailrelay.service"
    unit.write_text(text)
    result = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True,
                            timeout=60)
    complaints = [line for line in result.stderr.splitlines() if unit.name in line]
    assert result.returncode == 0 and complaints == [], result.stderr


def test_systemd_is_required_unless_no_systemd(workdir):
    if os.geteuid() != 0:
        pytest.skip("the systemd part is for root")
    if Path("/run/systemd/system").is_dir():
        pytest.skip("systemd runs here: init would install and enable the unit for real")
    args = [a for a in init_args(workdir, "--dry-run") if a != "--no-systemd"]
    line = one_line_error(mailrelay(*args))
    assert "systemd is not running on this machine" in line
    assert list(workdir.iterdir()) == []
