"""``mailrelay send`` as a subprocess against the real server on loopback."""

from __future__ import annotations

import asyncio
import io
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from mailrelay.cli import common
from mailrelay.cli import send as send_cli
from mailrelay.cli.main import build_parser
from mailrelay.errors import MailrelayError
from tests.support.relay import PASSWORD, USER, RelayEnv, free_port


@dataclass
class Result:
    code: int
    out: str
    err: str


async def send(relay: RelayEnv, *argv: str, stdin: str | None = None,
               cafile: bool = True, config: bool = True) -> Result:
    """Run ``mailrelay send`` without blocking the loop the server runs on."""
    args = [sys.executable, "-m", "mailrelay.cli.main", "send", *argv]
    if config:
        args += ["-c", str(relay.config_dir)]
    if cafile:
        args += ["--cafile", str(relay.config_dir / "test-ca.pem")]
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(
        proc.communicate(stdin.encode() if stdin is not None else b""), 60)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


def queue_id(out: str) -> str:
    match = re.search(r"^DATA +250 2\.0\.0 Ok: queued as (\S+)$", out, re.M)
    assert match, out
    assert out.rstrip().endswith(f"queued as {match.group(1)}")
    return match.group(1)


def assert_one_line_error(result: Result, *parts: str) -> None:
    assert result.code == 1, result
    assert result.err.count("\n") == 1 and result.err.startswith("mailrelay: "), result.err
    assert "Traceback" not in result.err + result.out
    for part in parts:
        assert part in result.err, result.err


async def test_starttls_submission_from_config(relay):
    """Defaults from -c: first submission listener, STARTTLS, --from = --user."""
    result = await send(relay, "--to", USER, "--user", USER, "--password-stdin",
                        stdin=PASSWORD + "\n")
    assert result.code == 0, result
    assert result.err == ""
    out = result.out
    assert f"127.0.0.1:{relay.ports['submission']}" in out
    assert re.search(r"^STARTTLS +220 ", out, re.M)
    assert re.search(r"^TLS +TLSv1\.[23] \S+ \(\d+ bits\), certificate verified for "
                     r"mail\.example\.com$", out, re.M)
    assert re.search(rf"^AUTH +PLAIN as {re.escape(USER)}: 235 ", out, re.M)
    assert re.search(rf"^MAIL +FROM:<{re.escape(USER)}> 250 ", out, re.M)
    assert re.search(rf"^RCPT +TO:<{re.escape(USER)}> 250 ", out, re.M)
    assert PASSWORD not in out
    qid = queue_id(out)

    [message] = await relay.wait_mailbox(1)
    assert f"id {qid}".encode() in message
    assert b"Subject: mailrelay test message" in message
    assert b"Message-ID: <" in message and b"Date: " in message


async def test_implicit_tls_port_from_config_is_implicit(relay):
    """The config's submission_tls port means implicit TLS without --tls."""
    result = await send(relay, "--to", USER, "--from", USER, "--password-stdin",
                        "--server", f"127.0.0.1:{relay.ports['submission_tls']}",
                        "--subject", "over 465", stdin=PASSWORD + "\n")
    assert result.code == 0, result
    assert "STARTTLS" not in result.out
    assert re.search(r"^TLS +TLSv1\.[23] .*certificate verified for 127\.0\.0\.1$",
                     result.out, re.M)
    qid = queue_id(result.out)
    [message] = await relay.wait_mailbox(1)
    assert f"id {qid}".encode() in message and b"Subject: over 465" in message


async def test_without_config_server_is_required_and_tls_mode_explicit(relay):
    result = await send(relay, "--to", USER, config=False, cafile=False)
    assert_one_line_error(result, "--server HOST:PORT is required")

    result = await send(relay, "--to", USER, "--user", USER, "--password-stdin", "--tls",
                        "implicit", "--server", f"127.0.0.1:{relay.ports['submission_tls']}",
                        "-c", str(relay.root / "nowhere"), config=False,
                        stdin=PASSWORD + "\n")
    assert result.code == 0, result
    queue_id(result.out)


def test_a_config_that_does_not_load_is_named_as_such(tmp_path):
    """It said "--server HOST:PORT is required (…)", as if there were no configuration."""
    (tmp_path / "mailrelay.yaml").write_text("hostname: mail.example.com\nlimits:\n  nope: 1\n")
    result = subprocess.run([sys.executable, "-m", "mailrelay.cli.main", "send", "-c",
                             str(tmp_path), "--to", USER, "--user", USER],
                            capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert_one_line_error(Result(result.returncode, result.stdout, result.stderr),
                          "the configuration does not load",
                          "mailrelay.yaml:3: unknown setting limits.nope",
                          f"mailrelay check -c {tmp_path}")
    assert "is required" not in result.stderr


async def test_wrong_password_is_one_line_535(relay):
    secret = "wrong-password-123"
    result = await send(relay, "--to", USER, "--user", USER, "--password-stdin",
                        stdin=secret + "\n")
    assert_one_line_error(result, f"authentication as {USER} failed: 535 5.7.8")
    assert re.search(r"^AUTH +PLAIN as .*: 535 ", result.out, re.M)
    assert "MAIL" not in result.out
    for text in (secret, PASSWORD):
        assert text not in result.out + result.err
    assert relay.mailbox() == []


async def test_untrusted_certificate_suggests_insecure(relay):
    result = await send(relay, "--to", USER, "--user", USER, "--password-stdin",
                        stdin=PASSWORD + "\n", cafile=False)
    assert_one_line_error(result, "certificate of mail.example.com did not verify",
                          "--insecure")
    assert "AUTH" not in result.out

    # Implicit TLS fails the same way, before the greeting.
    result = await send(relay, "--to", USER, "--user", USER, "--password-stdin",
                        "--server", f"127.0.0.1:{relay.ports['submission_tls']}",
                        stdin=PASSWORD + "\n", cafile=False)
    assert_one_line_error(result, "certificate of 127.0.0.1 did not verify", "--insecure")

    result = await send(relay, "--to", USER, "--user", USER, "--password-stdin",
                        "--insecure", stdin=PASSWORD + "\n", cafile=False)
    assert result.code == 0, result
    assert "certificate NOT verified (--insecure)" in result.out
    queue_id(result.out)


async def test_connection_refused_is_one_line(relay):
    port = free_port()
    result = await send(relay, "--to", USER, "--user", USER, "--password-stdin",
                        "--server", f"127.0.0.1:{port}", stdin=PASSWORD + "\n")
    assert_one_line_error(result, f"cannot connect to 127.0.0.1:{port}: Connection refused")


async def test_plaintext_auth_refused_client_side(relay):
    result = await send(relay, "--to", USER, "--user", USER, "--password-stdin",
                        "--tls", "none", stdin=PASSWORD + "\n")
    assert_one_line_error(result, "refusing to send a password without TLS")
    assert result.out == ""


async def test_relay_denied_on_the_mx_port(relay):
    result = await send(relay, "--to", "friend@remote.test", "--from", "a@remote.test",
                        "--no-auth", "--server", f"127.0.0.1:{relay.ports['smtp']}")
    assert_one_line_error(result, "recipient <friend@remote.test> refused: 554 5.7.1")
    assert re.search(r"^MAIL +FROM:<a@remote\.test> 250 ", result.out, re.M)


async def test_no_password_without_terminal(relay):
    result = await send(relay, "--to", USER, "--user", USER)
    assert_one_line_error(result, "add --password-stdin" if _has_tty()
                          else "no terminal to ask for the password on")
    assert result.out == ""  # said before connecting


def _has_tty() -> bool:
    try:
        open("/dev/tty", "rb").close()
    except OSError:
        return False
    return True


async def test_wrong_tls_mode_gets_a_hint(relay):
    result = await send(relay, "--to", USER, "--user", USER, "--password-stdin",
                        "--tls", "implicit", stdin=PASSWORD + "\n")
    assert_one_line_error(result, "TLS handshake", "try --tls starttls")


async def test_relay_denied_shows_the_refused_step(relay):
    result = await send(relay, "--to", USER, "--from", "other@example.com", "--user", USER,
                        "--password-stdin", stdin=PASSWORD + "\n")
    assert_one_line_error(result, "sender <other@example.com> refused: 550 5.7.1")
    assert re.search(r"^MAIL +FROM:<other@example\.com> 550 ", result.out, re.M)


# -- defaults, decided without a server ---------------------------------------------------


def plan_for(*argv: str, stdin: str = "pw\n", monkeypatch=None) -> send_cli.Plan:
    args = build_parser().parse_args(["send", *argv])
    if monkeypatch is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return send_cli.make_plan(args)


def test_example_config_defaults(monkeypatch):
    example = Path(__file__).resolve().parents[2] / "config"
    plan = plan_for("-c", str(example), "--to", "me@example.com", "--user", "me@example.com",
                    "--password-stdin", monkeypatch=monkeypatch)
    assert (plan.host, plan.port, plan.tls, plan.tls_name) == (
        "127.0.0.1", 2587, "starttls", "mail.example.com")
    assert plan.sender == plan.user == "me@example.com" and plan.password == "pw"

    plan = plan_for("-c", str(example), "--to", "me@example.com", "--from", "me@example.com",
                    "--server", "127.0.0.1:2465", "--password-stdin", monkeypatch=monkeypatch)
    assert (plan.tls, plan.user, plan.tls_name) == ("implicit", "me@example.com", "127.0.0.1")


def test_wildcard_listener_means_loopback(tmp_path, monkeypatch):
    (tmp_path / "mailrelay.yaml").write_text(
        "hostname: mx.example.org\nlisten:\n  submission: []\n"
        "  submission_tls: ['0.0.0.0:465']\n")
    plan = plan_for("-c", str(tmp_path), "--to", "a@example.org", "--user", "b@example.org",
                    "--password-stdin", monkeypatch=monkeypatch)
    assert (plan.host, plan.port, plan.tls, plan.tls_name) == (
        "127.0.0.1", 465, "implicit", "mx.example.org")
    assert plan.sender == "b@example.org"
    assert b"Subject: mailrelay test message" in send_cli.build_message(plan)


def test_needs_a_sender(tmp_path):
    with pytest.raises(MailrelayError, match="give --from"):
        plan_for("-c", str(tmp_path), "--server", "127.0.0.1:587", "--to", "a@example.org")


def test_password_prompt_only_on_a_terminal(tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    argv = ("-c", str(tmp_path), "--server", "127.0.0.1:587", "--to", "a@example.org",
            "--user", "b@example.org")
    monkeypatch.setattr(send_cli, "check_terminal", common.check_terminal)
    monkeypatch.setattr(common, "open", lambda *a: (_ for _ in ()).throw(OSError()),
                        raising=False)
    with pytest.raises(MailrelayError, match="--password-stdin"):
        plan_for(*argv, monkeypatch=monkeypatch)  # stdin is no terminal, and no /dev/tty
    monkeypatch.setattr(sys, "stdin", Terminal())
    # On a terminal the password is not asked yet: only once the certificate is verified.
    assert plan_for(*argv).password is None
