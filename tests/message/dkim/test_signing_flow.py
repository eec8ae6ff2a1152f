"""DKIM through the real server: what leaves is signed by every key of our domain and
verifies with dkimpy against the keys served by the loopback DNS."""

from __future__ import annotations

import asyncio
import re

import aiosmtplib
import dkim
import pytest

from mailrelay.message.dkim.keys import load_key
from mailrelay.message.dkim.signer import sign
from mailrelay.message.headers import get_all, parse_headers
from tests.support.client import RawSMTP
from tests.support.dkim_dns import dnsfunc_for, publish_new_key
from tests.support.relay import PASSWORD, USER
from tests.support.sink import SinkBehaviour

MESSAGE = (
    b"From: Me <me@example.com>\r\n"
    b"To: Friend <friend@remote.test>\r\n"
    b"Subject: signed\r\n"
    b"Message-ID: <sig-1@example.com>\r\n"
    b"Date: Sun, 22 Nov 2026 10:00:00 +0000\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Hello,  \r\n"
    b"\xc3\xa9t\xc3\xa9 \t with spaces\r\n"
    b"\r\n"
    b"\r\n"
)


def signatures(data: bytes) -> list[str]:
    return get_all(parse_headers(data), "DKIM-Signature")


def verify_all(data: bytes, dns_server) -> list[bool]:
    """Verify each DKIM-Signature separately (dkimpy checks one index at a time)."""
    dnsfunc = dnsfunc_for(dns_server)
    count = len(signatures(data))
    results = []
    for index in range(count):
        try:
            results.append(dkim.DKIM(data).verify(idx=index, dnsfunc=dnsfunc))
        except dkim.ValidationError:  # dkimpy raises for a body hash mismatch
            results.append(False)
    return results


@pytest.fixture
async def signing_relay(env):
    domain_dir = env.config_dir / "domains" / "example.com"
    publish_new_key(env.dns, domain_dir, "example.com", "rsa1", "rsa2048")
    publish_new_key(env.dns, domain_dir, "example.com", "ed1", "ed25519")
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    env.sink = env.add_sink("127.0.0.2")
    await env.start()
    return env


async def test_submission_is_signed_by_every_key(signing_relay):
    env = signing_relay
    await env.submit(["friend@remote.test"], MESSAGE)
    [received] = await env.sink.until(1)
    found = signatures(received.data)
    assert len(found) == 2
    assert any("a=rsa-sha256" in s for s in found)
    assert any("a=ed25519-sha256" in s for s in found)
    assert all("d=example.com" in s and "c=relaxed/relaxed" in s for s in found)
    assert verify_all(received.data, env.dns) == [True, True]


async def test_tampering_breaks_the_signatures(signing_relay):
    env = signing_relay
    await env.submit(["friend@remote.test"], MESSAGE)
    [received] = await env.sink.until(1)
    body_changed = received.data.replace(b"Hello,", b"Hallo,")
    assert verify_all(body_changed, env.dns) == [False, False]
    subject_changed = received.data.replace(b"Subject: signed", b"Subject: altered")
    assert verify_all(subject_changed, env.dns) == [False, False]
    # Over-signing: adding a second Subject header also breaks them.
    added = received.data.replace(b"Subject: signed\r\n", b"Subject: signed\r\nSubject: x\r\n")
    assert verify_all(added, env.dns) == [False, False]


async def test_missing_message_id_and_date_are_added_and_signed(signing_relay):
    env = signing_relay
    bare = b"From: me@example.com\r\nTo: friend@remote.test\r\nSubject: bare\r\n\r\nhi\r\n"
    await env.submit(["friend@remote.test"], bare)
    [received] = await env.sink.until(1)
    header = received.data.split(b"\r\n\r\n", 1)[0]
    assert re.search(rb"^Message-ID: <[^>]+@example\.com>", header, flags=re.M)
    assert re.search(rb"^Date: ", header, flags=re.M)
    for signature in signatures(received.data):
        assert "message-id" in signature.replace(" ", "").lower()
    assert verify_all(received.data, env.dns) == [True, True]


async def test_a_message_signed_before_submission_keeps_its_signature(signing_relay, tmp_path):
    """A client (or a mailing list) signed it already, without Message-ID and Date but
    with h= listing them: adding them would break that signature, so nothing is added
    (chasquid's t-21-dkim)."""
    env = signing_relay
    outside = publish_new_key(env.dns, tmp_path / "keys", "example.com", "client", "ed25519")
    key = load_key(outside, "example.com", "client")
    bare = b"From: me@example.com\r\nTo: friend@remote.test\r\nSubject: pre\r\n\r\nhi\r\n"
    presigned = sign(bare, [key]) + bare
    h_tag = presigned.replace(b"\r\n ", b"").lower().split(b"h=", 1)[1].split(b";", 1)[0]
    assert {b"date", b"message-id"} <= set(h_tag.split(b":"))
    await env.submit(["friend@remote.test"], presigned)
    [received] = await env.sink.until(1)
    header = received.data.split(b"\r\n\r\n", 1)[0]
    assert not re.search(rb"^(Message-ID|Date):", header, flags=re.M | re.I)
    assert verify_all(received.data, env.dns) == [True, True, True]  # ours two, theirs


async def test_dsn_generated_by_the_queue_is_signed(signing_relay):
    env = signing_relay
    env.sink.behaviour = SinkBehaviour(rcpt=lambda addr: "550 5.1.1 no such user")
    await env.submit(["nobody@remote.test"], MESSAGE)
    [dsn] = await env.wait_mailbox(1)
    dsn = dsn.split(b"\r\n", 2)[2]  # our Return-Path and Delivered-To are not signed content
    assert b"From: Mail Delivery System <MAILER-DAEMON@example.com>" in dsn
    assert len(signatures(dsn)) == 2
    assert verify_all(dsn, env.dns) == [True, True]


async def test_inbound_mail_from_outside_is_not_signed(signing_relay):
    """Port 25 mail claiming to be from us is not ours to vouch for."""
    env = signing_relay
    client = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
    await client.cmd("EHLO outside.test")
    assert await client.send_message("me@example.com", [USER], MESSAGE) == 250
    [stored] = await env.wait_mailbox(1)
    assert signatures(stored) == []


async def test_new_key_signs_after_reload_and_broken_key_is_skipped(signing_relay):
    env = signing_relay
    domain_dir = env.config_dir / "domains" / "example.com"
    publish_new_key(env.dns, domain_dir, "example.com", "rsa2", "rsa2048")
    (domain_dir / "dkim:broken.pem").write_text("-----BEGIN PRIVATE KEY-----\nnope\n")
    assert env.server.reload() is False  # reported, but the good keys are in use
    await env.submit(["friend@remote.test"], MESSAGE)
    [received] = await env.sink.until(1)
    found = signatures(received.data)
    assert len(found) == 3
    assert any("s=rsa2" in s for s in found)
    assert verify_all(received.data, env.dns) == [True, True, True]


async def test_new_key_is_picked_up_without_a_signal(signing_relay):
    env = signing_relay
    domain_dir = env.config_dir / "domains" / "example.com"
    publish_new_key(env.dns, domain_dir, "example.com", "rsa3", "rsa2048")
    for _ in range(100):  # the file watcher polls every 2 s
        if len(env.server.keyring.keys_for("example.com")) == 3:
            break
        await asyncio.sleep(0.1)
    assert len(env.server.keyring.keys_for("example.com")) == 3


# -- sender rights ------------------------------------------------------------------

async def _try_send(env, mail_from: str, header_from: str) -> int:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=env.ports["submission"],
                           tls_context=env.client_tls(), start_tls=True)
    await smtp.connect()
    await smtp.ehlo()
    await smtp.auth_plain(USER, PASSWORD)
    try:
        message = f"From: {header_from}\r\nSubject: x\r\n\r\nbody\r\n".encode()
        await smtp.sendmail(mail_from, ["friend@remote.test"], message)
        return 250
    except aiosmtplib.SMTPSenderRefused as exc:
        return exc.code
    except aiosmtplib.SMTPDataError as exc:
        return exc.code
    finally:
        smtp.close()


@pytest.mark.parametrize(("mail_from", "header_from", "code"), [
    ("me@example.com", "Me <me@example.com>", 250),            # own address
    ("me+news@example.com", "me+news@example.com", 250),       # own address with a suffix
    ("ME@Example.COM", "me@example.com", 250),                 # case does not matter
    ("boss@example.com", "me@example.com", 550),               # foreign MAIL FROM
    ("me@example.com", "Boss <boss@example.com>", 550),        # foreign From: header
    ("me@example.com", "me@gmail.test", 550),                  # foreign domain in From:
    ("me@gmail.test", "me@gmail.test", 550),                   # foreign MAIL FROM domain
])
async def test_sender_rights(relay, mail_from, header_from, code):
    assert await _try_send(relay, mail_from, header_from) == code


async def test_sender_rights_configured_patterns(env):
    env.write_config(
        senders={"allow": {"me@example.com": ["*@lists.example.com"],
                           "example.com": ["noreply@example.com"]}},
        limits={"auth_failure_delay": "0s"})
    env.add_user()
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    env.add_sink("127.0.0.2")
    await env.start()
    assert await _try_send(env, "news@lists.example.com", "news@lists.example.com") == 250
    assert await _try_send(env, "noreply@example.com", "noreply@example.com") == 250
    assert await _try_send(env, "other@example.com", "other@example.com") == 550


async def test_sender_rights_can_be_turned_off(env):
    env.write_config(senders={"restrict": False}, limits={"auth_failure_delay": "0s"})
    env.add_user()
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    env.add_sink("127.0.0.2")
    await env.start()
    assert await _try_send(env, "anyone@elsewhere.test", "anyone@elsewhere.test") == 250


async def test_user_may_send_as_an_alias_that_delivers_to_them(env):
    (env.config_dir / "domains" / "example.com" / "aliases").write_text(
        "sales: me\nteam: me, someone@elsewhere.test\n*: me\n")
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    env.add_sink("127.0.0.2")
    await env.start()
    assert await _try_send(env, "sales@example.com", "Sales <sales@example.com>") == 250
    assert await _try_send(env, "team@example.com", "team@example.com") == 250
    # The catch-all delivers everything to me, but does not make every address mine.
    assert await _try_send(env, "ceo@example.com", "ceo@example.com") == 550
