"""``mailrelay send`` and the server's certificate, against the real server on loopback:
the certificate is checked before the password is asked (on a real pseudo-terminal),
``--tls-name`` names the certificate when ``--server`` is an address, and a name or
address mismatch gets a hint that names what the certificate is for."""

from __future__ import annotations

import asyncio
import re

import pytest

from tests.cli.test_send_cli import assert_one_line_error, queue_id, send
from tests.cli.test_user_password import on_terminal
from tests.support.relay import HOSTNAME, PASSWORD, USER, RelayEnv


def name_only_certificate(env: RelayEnv) -> None:
    """A certificate for the hostname alone (no IP address in it), as from Let's Encrypt."""
    cert = env.ca.issue_cert(HOSTNAME)
    directory = env.config_dir / "certs" / HOSTNAME
    cert.private_key_pem.write_to_path(str(directory / "privkey.pem"))
    cert.cert_chain_pems[0].write_to_path(str(directory / "fullchain.pem"))


@pytest.fixture
async def named(env: RelayEnv) -> RelayEnv:
    name_only_certificate(env)
    await env.start()
    return env


async def send_on_terminal(env: RelayEnv, *argv: str, answers: list[str]) -> tuple[int, str]:
    """``mailrelay send`` with a terminal to ask the password on (no --password-stdin)."""
    return await asyncio.to_thread(
        on_terminal, env.config_dir,
        ["send", "--to", USER, "--user", USER, *argv], answers)


async def test_an_untrusted_certificate_fails_before_the_password_is_asked(relay):
    code, shown = await send_on_terminal(relay, answers=[PASSWORD])
    assert code == 1, shown
    assert "certificate of mail.example.com did not verify" in shown
    assert "Password" not in shown  # never asked: it would have gone to that server
    assert relay.mailbox() == []


async def test_the_password_is_asked_once_tls_is_verified(relay):
    cafile = str(relay.config_dir / "test-ca.pem")
    code, shown = await send_on_terminal(relay, "--cafile", cafile, answers=[PASSWORD])
    assert code == 0, shown
    verified = shown.index("certificate verified for mail.example.com")
    asked = shown.index(f"Password for {USER}:")
    assert verified < asked < shown.index("\nAUTH ")
    assert PASSWORD not in shown
    assert re.search(r"queued as \S+", shown)
    await relay.wait_mailbox(1)


@pytest.mark.parametrize("port", ["submission", "submission_tls"])
async def test_an_address_mismatch_names_the_certificate_and_tls_name_fixes_it(named, port):
    server = f"127.0.0.1:{named.ports[port]}"
    result = await send(named, "--to", USER, "--user", USER, "--password-stdin",
                        "--server", server, stdin=PASSWORD + "\n")
    assert_one_line_error(
        result, "the certificate of 127.0.0.1 did not verify: IP address mismatch",
        f"it is for {HOSTNAME}, not 127.0.0.1: give --tls-name {HOSTNAME} (--server "
        f"{server} stays: it is only where to connect) (or --insecure)")
    assert "AUTH" not in result.out

    result = await send(named, "--to", USER, "--user", USER, "--password-stdin",
                        "--server", server, "--tls-name", HOSTNAME, stdin=PASSWORD + "\n")
    assert result.code == 0, result
    assert f"certificate verified for {HOSTNAME}" in result.out
    queue_id(result.out)


async def test_a_name_mismatch_names_the_certificate(named):
    """--tls-name that the certificate does not carry: the hint says which it does."""
    result = await send(named, "--to", USER, "--user", USER, "--password-stdin",
                        "--tls-name", "smtp.example.com", stdin=PASSWORD + "\n")
    assert_one_line_error(result, "certificate of smtp.example.com did not verify: Hostname "
                          "mismatch", f"it is for {HOSTNAME}, not smtp.example.com: give "
                          f"--tls-name {HOSTNAME} (or --insecure)")


async def test_tls_name_must_be_a_name(named):
    result = await send(named, "--to", USER, "--user", USER, "--password-stdin",
                        "--tls-name", "not a name", stdin=PASSWORD + "\n")
    assert_one_line_error(result, "--tls-name 'not a name' is not a host name")
    assert result.out == ""


