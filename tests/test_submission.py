"""Submission (587 STARTTLS, 465 implicit TLS) and the MX port, end to end on loopback."""

from __future__ import annotations

import base64

import aiosmtplib
import pytest

from tests.support.client import RawSMTP
from tests.support.relay import HOSTNAME, PASSWORD, USER

MESSAGE = (
    b"From: Me <me@example.com>\r\n"
    b"To: Friend <friend@remote.test>\r\n"
    b"Subject: hello\r\n"
    b"Message-ID: <1@example.com>\r\n"
    b"Date: Sun, 22 Nov 2026 10:00:00 +0000\r\n"
    b"\r\n"
    b"Line one\r\n"
    b".leading dot stays\r\n"
    b"\xc3\xa9 8-bit body\r\n"
)


def strip_added_headers(data: bytes) -> bytes:
    """The message as the client sent it: drop the trace headers we prepend."""
    lines = data.split(b"\r\n")
    while lines and (lines[0].startswith(b"Received:") or lines[0][:1] in (b"\t", b" ")):
        lines.pop(0)
    return b"\r\n".join(lines)


async def submit_587(relay, mechanism: str) -> None:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.ports["submission"],
                           tls_context=relay.client_tls(), start_tls=True)
    await smtp.connect()
    await smtp.ehlo()  # RFC 3207: the server forgets the pre-TLS EHLO
    if mechanism == "PLAIN":
        await smtp.auth_plain(USER, PASSWORD)
    else:
        await smtp.auth_login(USER, PASSWORD)
    await smtp.sendmail(USER, ["friend@remote.test"], MESSAGE)
    await smtp.quit()


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_submission_starttls_reaches_remote_mx(relay, mechanism):
    await submit_587(relay, mechanism)
    [received] = await relay.sink.until(1)
    assert received.sender == USER
    assert received.recipients == ["friend@remote.test"]
    assert strip_added_headers(received.data) == MESSAGE
    assert received.data.startswith(b"Received: from ")
    assert b"with ESMTPSA" in received.data.split(b"\r\n\r\n")[0]
    assert received.tls, "delivery to a STARTTLS-capable MX must use TLS"
    await relay.wait_queue_empty()


async def test_submission_implicit_tls_465(relay):
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.ports["submission_tls"],
                           tls_context=relay.client_tls(), use_tls=True)
    await smtp.connect()
    await smtp.ehlo()  # RFC 3207: the server forgets the pre-TLS EHLO
    await smtp.auth_plain(USER, PASSWORD)
    await smtp.sendmail(USER, ["friend@remote.test"], MESSAGE)
    await smtp.quit()
    [received] = await relay.sink.until(1)
    assert strip_added_headers(received.data) == MESSAGE


async def test_auth_not_offered_or_accepted_before_tls(relay):
    client = await RawSMTP.connect("127.0.0.1", relay.ports["submission"])
    code, lines = await client.cmd("EHLO client.test")
    assert code == 250
    assert "STARTTLS" in lines
    assert not any(line.startswith("AUTH") for line in lines)
    blob = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    code, lines = await client.cmd(f"AUTH PLAIN {blob}")
    assert code == 538
    assert lines[0].startswith("5.7.11")
    code, _ = await client.cmd(f"MAIL FROM:<{USER}>")
    assert code == 530
    await client.close()


async def test_wrong_password_and_mail_without_auth(relay):
    client = await RawSMTP.connect("127.0.0.1", relay.ports["submission"])
    await client.cmd("EHLO client.test")
    await client.starttls(relay.client_tls(), HOSTNAME)
    code, lines = await client.cmd("EHLO client.test")
    assert "AUTH PLAIN LOGIN" in lines
    code, lines = await client.cmd(f"MAIL FROM:<{USER}>")
    assert code == 530 and lines[0].startswith("5.7.0")
    code, lines = await client.auth_plain(USER, "wrong password")
    assert code == 535 and lines[0].startswith("5.7.8")
    code, lines = await client.auth_plain(USER, PASSWORD)
    assert code == 235
    await client.close()


async def test_port_25_refuses_relay_and_accepts_local_user(relay):
    client = await RawSMTP.connect("127.0.0.1", relay.ports["smtp"])
    code, lines = await client.cmd("EHLO client.test")
    assert "STARTTLS" in lines
    assert not any(line.startswith("AUTH") for line in lines)
    code, _ = await client.cmd("MAIL FROM:<someone@elsewhere.test>")
    assert code == 250
    code, lines = await client.cmd("RCPT TO:<friend@remote.test>")
    assert code in (550, 554) and lines[0].startswith("5.7.1")
    code, lines = await client.cmd("RCPT TO:<nobody@example.com>")
    assert code == 550 and lines[0].startswith("5.1.1")
    code, _ = await client.cmd(f"RCPT TO:<{USER}>")
    assert code == 250
    code, _ = await client.cmd("DATA")
    assert code == 354
    await client.send(b"Subject: inbound\r\n\r\nhello local\r\n.")
    code, lines = await client.reply()
    assert code == 250 and lines[0].startswith("2.0.0")
    await client.cmd("QUIT")
    await client.close()
    await relay.wait_queue_empty()
    maildir = relay.data_dir / "mail" / "example.com" / "me" / "new"
    [stored] = list(maildir.iterdir())
    content = stored.read_bytes()
    assert b"hello local" in content
    assert b"Delivered-To: me@example.com" in content
    assert relay.sink.messages == [], "nothing may be relayed from port 25"


async def test_sender_must_be_own_address(relay):
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.ports["submission"],
                           tls_context=relay.client_tls(), start_tls=True)
    await smtp.connect()
    await smtp.ehlo()  # RFC 3207: the server forgets the pre-TLS EHLO
    await smtp.auth_plain(USER, PASSWORD)
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
        await smtp.mail("boss@example.com")
    assert refused.value.code == 550
    await smtp.rset()
    response = await smtp.mail("me+tag@example.com")
    assert response.code == 250
    await smtp.quit()


async def test_suffix_address_reaches_the_real_user(relay):
    client = await RawSMTP.connect("127.0.0.1", relay.ports["smtp"])
    await client.cmd("EHLO client.test")
    code = await client.send_message("a@elsewhere.test", ["Me+Lists@Example.com"],
                                     b"Subject: tagged\r\n\r\nhi\r\n")
    assert code == 250
    [stored] = await relay.wait_mailbox(1)
    assert b"Delivered-To: me@example.com" in stored
    assert b"for <Me+Lists@Example.com>" in stored
