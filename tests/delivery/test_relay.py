"""Delivery through a smarthost (delivery.relay), end to end on loopback.

The server is the real one (in-process), the relay a real submission server (aiosmtpd)
on 127.0.0.9 that requires STARTTLS (or implicit TLS) and AUTH, with a certificate from
the test CA for smtp.relay.test, which the test DNS server resolves; the recipient
domain's MX is a second sink, which must never see the mail.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import subprocess
import sys

import pytest
import trustme

from tests.support.relay import USER, delivery_lines, free_port, wait_for
from tests.support.sink import Sink, SinkBehaviour

RELAY_HOST = "smtp.relay.test"
RELAY_IP = "127.0.0.9"
RELAY_USER = "AKIAEXAMPLERELAYUSER"
RELAY_PASSWORD = "Pa55-relay-secret-7f3a"
MESSAGE = (f"From: {USER}\r\nTo: friend@remote.test\r\nSubject: via the relay\r\n"
           "Message-ID: <relay.1@example.com>\r\n\r\nhello\r\n").encode()


@pytest.fixture(scope="module")
def other_ca() -> trustme.CA:
    """A CA the server does not trust."""
    return trustme.CA()


def configure_relay(env, *, port: int, tls: str = "starttls", password: str = RELAY_PASSWORD,
                    domains: list[str] | None = None, **delivery) -> None:
    env.dns.add(RELAY_HOST, "A", RELAY_IP)
    password_file = env.config_dir / "relay.password"
    password_file.write_text(password + "\n")
    os.chmod(password_file, 0o600)
    relay = {"host": RELAY_HOST, "port": port, "tls": tls, "username": RELAY_USER,
             "password_file": "relay.password"}
    if domains is not None:
        relay["domains"] = domains
    env.write_config(delivery={"relay": relay, **delivery})


def start_relay(env, *, tls: str = "starttls", ca: trustme.CA | None = None,
                **options) -> Sink:
    port = free_port()
    sink = env.add_sink(RELAY_IP, hostname=RELAY_HOST, ca=ca, port=port,
                        users={RELAY_USER: RELAY_PASSWORD}, implicit_tls=tls == "implicit",
                        **options)
    sink.relay_port = port  # type: ignore[attr-defined]
    return sink


def remote_mx(env) -> Sink:
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    return env.add_sink("127.0.0.2", hostname="mx1.remote.test")


def queue_cli(env, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailrelay.cli.main", "queue", *argv, "-c", str(env.config_dir)],
        capture_output=True, text=True, timeout=60)


def password_forms() -> list[str]:
    return [RELAY_PASSWORD,
            base64.b64encode(RELAY_PASSWORD.encode()).decode(),
            base64.b64encode(f"\0{RELAY_USER}\0{RELAY_PASSWORD}".encode()).decode()]


def assert_no_password(text: str) -> None:
    for form in password_forms():
        assert form not in text


# -- the message goes to the relay --------------------------------------------------------

@pytest.mark.parametrize("tls", ["starttls", "implicit"])
async def test_remote_mail_goes_to_the_relay_and_not_to_the_mx(env, caplog, tls):
    caplog.set_level(logging.DEBUG)
    mx = remote_mx(env)
    relay = start_relay(env, tls=tls)
    configure_relay(env, port=relay.relay_port, tls=tls)
    await env.start()
    await env.submit(["friend@remote.test", USER], MESSAGE)

    [got] = await relay.until(1)
    assert got.recipients == ["friend@remote.test"]  # local mail never goes to the relay
    assert got.login == RELAY_USER and got.tls
    assert b"Subject: via the relay" in got.data
    await env.wait_mailbox(1)  # the local copy went to the mailbox
    await env.wait_queue_empty()
    assert mx.connections == 0 and mx.messages == []
    assert relay.logins == [(RELAY_USER, True, True)]  # one login, under TLS

    [line] = [x for x in delivery_lines(caplog) if "friend@remote.test" in x]
    assert f"host={RELAY_HOST} via=relay tls=verified" in line
    assert "result=sent final=yes" in line
    assert_no_password(caplog.text)


async def test_one_relay_connection_carries_several_messages(env):
    relay = start_relay(env)
    configure_relay(env, port=relay.relay_port, connection_idle_time="10s")
    await env.start()
    for n in range(3):
        await env.submit([f"friend{n}@remote.test"], MESSAGE)
        await relay.until(n + 1)
    assert relay.connections == 1
    assert len(relay.logins) == 1


async def test_auth_login_when_the_relay_offers_no_plain(env):
    relay = start_relay(env, exclude_auth=("PLAIN",))
    configure_relay(env, port=relay.relay_port)
    await env.start()
    await env.submit(["friend@remote.test"], MESSAGE)
    [got] = await relay.until(1)
    assert got.login == RELAY_USER
    assert relay.logins == [(RELAY_USER, True, True)]


async def test_relay_domains_take_only_their_recipients(env):
    mx = remote_mx(env)
    relay = start_relay(env)
    configure_relay(env, port=relay.relay_port, domains=["gmail.test"])
    await env.start()
    await env.submit(["friend@remote.test", "me@gmail.test"], MESSAGE)
    [via_relay] = await relay.until(1)
    [direct] = await mx.until(1)
    assert via_relay.recipients == ["me@gmail.test"]
    assert direct.recipients == ["friend@remote.test"]


# -- failures: temporary, named, and nothing in the clear ------------------------------------

async def test_wrong_password_is_temporary_and_retried_with_the_relays_reply(env, caplog):
    caplog.set_level(logging.DEBUG)
    mx = remote_mx(env)
    relay = start_relay(env)
    # The server has an old password; the relay knows RELAY_PASSWORD.
    configure_relay(env, port=relay.relay_port, password="an-old-password-1234")
    await env.start()
    await env.submit(["friend@remote.test"], MESSAGE)
    await wait_for(lambda: len(delivery_lines(caplog)) >= 2, what="a retried login")
    assert all(not ok and under_tls for _, ok, under_tls in relay.logins)
    assert relay.messages == [] and mx.messages == []

    lines = delivery_lines(caplog)
    assert len(lines) >= 2
    for line in lines:
        # TLS was up when the login was refused: the log says so (README's example).
        assert f"host={RELAY_HOST} via=relay tls=verified" in line
        assert "result=temporary final=no" in line
        assert re.search(r'reply="451 4\.7\.0 .*535 5\.7\.8', line), line

    [item_id] = list(env.server.queue.items)
    shown = await asyncio.to_thread(queue_cli, env, "show", item_id)
    assert shown.returncode == 0, shown.stderr
    assert "535 5.7.8" in shown.stdout
    assert f"host={RELAY_HOST} via=relay" in shown.stdout
    as_json = await asyncio.to_thread(queue_cli, env, "show", item_id, "--json")
    [rcpt] = json.loads(as_json.stdout)["message"]["recipients"]
    assert rcpt["status"] == "pending" and rcpt["last_host"] == RELAY_HOST
    assert rcpt["last_via"] == "relay" and "535 5.7.8" in rcpt["last_error"]
    for text in (caplog.text, shown.stdout, as_json.stdout):
        assert_no_password(text)
    assert "an-old-password-1234" not in caplog.text + shown.stdout + as_json.stdout

    # The owner fixes the file: the next attempt logs in (the file is read per login).
    (env.config_dir / "relay.password").write_text(RELAY_PASSWORD + "\n")
    env.server.delivery.flush()
    await relay.until(1)
    await env.wait_queue_empty()


async def test_a_relay_echoing_the_password_does_not_get_it_logged(env, caplog):
    """A (hostile or buggy) relay that repeats the credentials in its refusal: the log
    and the queue show the reply with them cut out."""
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-Pa55-echoed-9c1d"

    def echo(credentials) -> str:
        password = credentials.password.decode()
        blob = base64.b64encode(f"\0{RELAY_USER}\0{password}".encode()).decode()
        encoded = base64.b64encode(credentials.password).decode()
        return f"535 5.7.8 no: {password} {blob} {encoded}"

    relay = start_relay(env, auth_failure=echo)
    configure_relay(env, port=relay.relay_port, password=wrong)
    await env.start()
    await env.submit(["friend@remote.test"], MESSAGE)
    await wait_for(lambda: delivery_lines(caplog), what="an attempt")
    [line] = delivery_lines(caplog)[:1]
    assert "535 5.7.8 no: [redacted] [redacted] [redacted]" in line
    [item_id] = list(env.server.queue.items)
    shown = await asyncio.to_thread(queue_cli, env, "show", item_id, "--json")
    # (The sink's own aiosmtpd log has the echo, of course: only ours counts.)
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("mailrelay"))
    for text in (ours, shown.stdout):
        assert wrong not in text
        assert base64.b64encode(wrong.encode()).decode() not in text


async def test_unreachable_relay_is_retried(env, caplog):
    caplog.set_level(logging.INFO)
    mx = remote_mx(env)
    configure_relay(env, port=free_port())  # nothing listens there
    await env.start()
    await env.submit(["friend@remote.test"], MESSAGE)
    await wait_for(lambda: len(delivery_lines(caplog)) >= 2, what="a retry")
    for line in delivery_lines(caplog):
        assert "result=temporary final=no" in line and f"host={RELAY_HOST}" in line
        assert "tls=-" in line  # never connected, so no TLS state
        assert 'reply="451 4.4.1 connection to relay' in line
    assert mx.connections == 0
    assert list(env.server.queue.items)


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
async def test_relay_certificate_that_does_not_verify_gets_nothing(env, caplog, other_ca, tls):
    caplog.set_level(logging.INFO)
    relay = start_relay(env, tls=tls, ca=other_ca)
    configure_relay(env, port=relay.relay_port, tls=tls)
    await env.start()
    await env.submit(["friend@remote.test"], MESSAGE)
    await wait_for(lambda: len(delivery_lines(caplog)) >= 2, what="a retry")
    for line in delivery_lines(caplog):
        assert "result=temporary final=no" in line
        assert re.search(r'reply="451 4\.7\.5 .*certificate does not verify', line), line
        # STARTTLS: the greeting and EHLO came in the clear; 465: nothing was said.
        assert f"via=relay tls={'plain' if tls == 'starttls' else '-'} " in line, line
    # No login and no mail: with a certificate that fails there is no fallback.
    assert relay.logins == [] and relay.messages == []


async def test_relay_without_starttls_gets_no_password_in_the_clear(env, caplog):
    """A relay that offers AUTH without TLS (and no STARTTLS) is refused before AUTH."""
    caplog.set_level(logging.INFO)
    port = free_port()
    relay = env.add_sink(RELAY_IP, tls=False, hostname=RELAY_HOST, port=port,
                         users={RELAY_USER: RELAY_PASSWORD}, auth_require_tls=False)
    configure_relay(env, port=port)
    await env.start()
    await env.submit(["friend@remote.test"], MESSAGE)
    await wait_for(lambda: delivery_lines(caplog), what="an attempt")
    assert "does not offer STARTTLS" in delivery_lines(caplog)[0]
    assert 'reply="451 4.7.5' in delivery_lines(caplog)[0]
    assert "via=relay tls=plain " in delivery_lines(caplog)[0]
    assert relay.logins == [] and relay.messages == []


async def test_relay_refusing_a_recipient_bounces_naming_the_relay(env, caplog):
    caplog.set_level(logging.INFO)
    relay = start_relay(env)
    relay.behaviour = SinkBehaviour(
        rcpt=lambda a: "550 5.1.1 no such recipient at the relay" if a.startswith("nobody")
        else None)
    configure_relay(env, port=relay.relay_port)
    await env.start()
    await env.submit(["nobody@remote.test", "friend@remote.test"], MESSAGE)
    [got] = await relay.until(1)
    assert got.recipients == ["friend@remote.test"]
    [dsn] = await env.wait_mailbox(1)  # the sender is our user: the DSN lands here
    assert b"Undelivered Mail Returned to Sender" in dsn
    assert f"Remote-MTA: dns; {RELAY_HOST}".encode() in dsn
    assert b"Diagnostic-Code: smtp; 550 5.1.1" in dsn
    assert f"our relay {RELAY_HOST} said: 550 5.1.1".encode() in dsn
    [line] = [x for x in delivery_lines(caplog) if "nobody@" in x]
    assert "result=permanent final=yes" in line and "via=relay" in line


async def test_relay_without_smtputf8_refuses_a_utf8_address_for_good(env):
    relay = start_relay(env, smtputf8=False)
    configure_relay(env, port=relay.relay_port)
    await env.start()
    await env.submit_utf8(["pingüino@remote.test"], MESSAGE)
    [dsn] = await env.wait_mailbox(1)
    assert b"Status: 5.6.7" in dsn and RELAY_HOST.encode() in dsn
    assert relay.messages == []


# -- configuration --------------------------------------------------------------------------

def test_password_file_must_be_private_and_present(env):
    from mailrelay.config import load_config
    from mailrelay.errors import ConfigError

    configure_relay(env, port=587)
    password_file = env.config_dir / "relay.password"
    load_config(env.config_dir)  # 0600: fine
    os.chmod(password_file, 0o640)
    with pytest.raises(ConfigError, match=r"relay\.password is open to group or others "
                                          r"\(mode 0640\)") as raised:
        load_config(env.config_dir)
    assert_no_password(str(raised.value))
    password_file.unlink()
    with pytest.raises(ConfigError, match=r"password_file: .*relay\.password does not exist"):
        load_config(env.config_dir)


def test_relay_settings_are_checked(env):
    from mailrelay.config import load_config
    from mailrelay.errors import ConfigError

    env.add_domain("example.com")
    configure_relay(env, port=587, domains=["example.com"])
    with pytest.raises(ConfigError, match=r"example\.com is a local domain"):
        load_config(env.config_dir)
    env.write_config(delivery={"relay": {"host": RELAY_HOST, "username": "u"}})
    with pytest.raises(ConfigError, match="username and password_file go together"):
        load_config(env.config_dir)
    env.write_config(delivery={"relay": {"host": RELAY_HOST, "tls": "none"}})
    with pytest.raises(ConfigError, match="expected one of starttls, implicit"):
        load_config(env.config_dir)
    env.write_config(delivery={"relay": {"host": RELAY_HOST, "tls": "implicit"}})
    relay = load_config(env.config_dir).delivery.relay
    assert relay is not None and relay.port == 465 and relay.domains == ()


@pytest.mark.parametrize("relay_tls, configured", [("starttls", "implicit"),
                                                   ("implicit", "starttls")])
async def test_the_wrong_tls_mode_for_the_port_is_named(env, caplog, relay_tls, configured):
    """tls: implicit on a STARTTLS port said "Error connecting to 127.0.0.1 on port None"
    (aiosmtplib's words, about a socket it did not open). The log says what happened and
    which setting to change."""
    caplog.set_level(logging.INFO)
    relay = start_relay(env, tls=relay_tls)
    configure_relay(env, port=relay.relay_port, tls=configured)
    await env.start()
    await env.submit(["friend@remote.test"], MESSAGE)
    await wait_for(lambda: delivery_lines(caplog), what="an attempt")
    line = delivery_lines(caplog)[0]
    assert "result=temporary final=no" in line and 'reply="451 4.' in line
    assert "port None" not in line
    assert f"tls: {relay_tls}" in line, line
    assert relay.logins == [] and relay.messages == []


# -- how the relay's name is found -----------------------------------------------------------

def hosts_names(name: str) -> bool:
    from mailrelay.delivery.relay import hosts_file_addresses

    return bool(hosts_file_addresses(name))


@pytest.mark.skipif(not hosts_names("localhost"), reason="/etc/hosts has no localhost")
async def test_a_relay_named_in_etc_hosts_is_found_there(env, caplog):
    """relay.host: localhost failed "DNS lookup failed" with dns.nameservers set (the test
    network's resolver knows no localhost): /etc/hosts was never read. It is read first,
    as the C library does, then the configured resolver."""
    caplog.set_level(logging.INFO)
    port = free_port()
    relay = env.add_sink("127.0.0.1", hostname="localhost", port=port,
                         users={RELAY_USER: RELAY_PASSWORD})
    configure_relay(env, port=port)
    settings = env.settings["delivery"]["relay"] | {"host": "localhost"}
    env.write_config(delivery={**env.settings["delivery"], "relay": settings})
    await env.start()
    await env.submit(["friend@remote.test"], MESSAGE)
    [got] = await relay.until(1)
    assert got.login == RELAY_USER and got.tls
    await wait_for(lambda: delivery_lines(caplog), what="the delivery line")
    [line] = delivery_lines(caplog)
    assert "host=localhost via=relay tls=verified" in line and "result=sent" in line


async def test_a_relay_name_nobody_knows_names_where_it_was_looked_up(env, caplog):
    caplog.set_level(logging.INFO)
    configure_relay(env, port=free_port())
    settings = env.settings["delivery"]["relay"] | {"host": "nowhere.relay.test"}
    env.write_config(delivery={**env.settings["delivery"], "relay": settings})
    await env.start()
    await env.submit(["friend@remote.test"], MESSAGE)
    await wait_for(lambda: delivery_lines(caplog), what="an attempt")
    line = delivery_lines(caplog)[0]
    assert "host=nowhere.relay.test via=relay tls=- " in line
    assert (f'reply="451 4.4.3 relay nowhere.relay.test: no address: not in /etc/hosts, and '
            f'the resolver 127.0.0.1:{env.dns.port} has no A/AAAA record"') in line


def test_hosts_file_lines(tmp_path):
    from mailrelay.delivery.relay import hosts_file_addresses

    hosts = tmp_path / "hosts"
    hosts.write_text("# a comment naming relay.lan\n127.0.0.1 localhost\n"
                     "192.0.2.5  Relay.LAN relay   # the LAN's smarthost\n"
                     "2001:db8::5 relay.lan.\nnot-an-address relay.lan\n")
    assert hosts_file_addresses("relay.lan", hosts) == ("2001:db8::5", "192.0.2.5")
    assert hosts_file_addresses("RELAY", hosts) == ("192.0.2.5",)
    assert hosts_file_addresses("comment", hosts) == ()
    assert hosts_file_addresses("relay.lan", tmp_path / "missing") == ()
