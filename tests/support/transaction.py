"""One SMTP transaction against the server under test, and what the tests check of its
log: the helpers of the message-path tests (tests/policy/test_backend_message.py,
tests/message/filters/test_filters_server.py)."""

from __future__ import annotations

import aiosmtplib

from tests.support.client import RawSMTP
from tests.support.relay import PASSWORD, USER


async def port_25(env, data: bytes, rcpt: str = USER, sender: str = "alice@sender.test"
                  ) -> tuple[int, str]:
    """One message on port 25: the final (or first failing) code and its text."""
    client = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
    try:
        await client.cmd("EHLO mx.sender.test")
        for line in (f"MAIL FROM:<{sender}>", f"RCPT TO:<{rcpt}>", "DATA"):
            code, text = await client.cmd(line)
            if code not in (250, 354):
                return code, " ".join(text)
        body = data.replace(b"\r\n.", b"\r\n..")
        client.writer.write(body + b".\r\n")
        code, text = await client.reply(timeout=120)
        await client.cmd("QUIT")
        return code, " ".join(text)
    finally:
        await client.close()


async def submit(env, data: bytes, recipients: tuple[str, ...] = ("friend@remote.test",)
                 ) -> tuple[int, str]:
    """A submission on 587 (STARTTLS, AUTH PLAIN): the DATA reply."""
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=env.ports["submission"],
                           tls_context=env.client_tls(), start_tls=True, timeout=120)
    await smtp.connect()
    try:
        await smtp.ehlo()
        await smtp.auth_plain(USER, PASSWORD)
        await smtp.mail(USER)
        for rcpt in recipients:
            await smtp.rcpt(rcpt)
        try:
            response = await smtp.data(data)
        except aiosmtplib.SMTPResponseException as exc:
            return exc.code, exc.message
        return response.code, response.message
    finally:
        smtp.close()


def no_tracebacks(caplog) -> None:
    assert not [r for r in caplog.records if r.exc_info and r.name.startswith("mailrelay")], \
        "a traceback was logged"


def data_rejects(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mailrelay.mail"
            and r.getMessage().startswith("reject ") and "cmd=DATA" in r.getMessage()]
