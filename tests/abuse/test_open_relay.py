"""Open relay battery (issue 7): on port 25 without AUTH, no trick in the recipient
address may get mail relayed to another domain, and nothing may reach the remote MX."""

from __future__ import annotations

import asyncio
import base64

import pytest

from tests.support.client import RawSMTP
from tests.support.relay import HOSTNAME, PASSWORD, USER

# (RCPT TO argument, MAIL FROM parameters). None of these is a local user: remote.test
# is the only other domain with an MX, answered by relay.sink on 127.0.0.2.
ATTEMPTS: list[tuple[str, str]] = [
    ("<friend@remote.test>", ""),
    ("<FRIEND@REMOTE.TEST>", ""),
    ("<Friend@Remote.Test>", ""),
    ("friend@remote.test", ""),  # without angle brackets
    ("<friend@remote.test> NOTIFY=NEVER", ""),
    ("<friend%remote.test@example.com>", ""),
    ("<FRIEND%REMOTE.TEST@EXAMPLE.COM>", ""),
    ("<friend%remote.test%example.com@example.com>", ""),
    ('<"friend@remote.test"@example.com>', ""),
    ('<"FRIEND@REMOTE.TEST"@EXAMPLE.COM>', ""),
    ('<"friend%remote.test"@example.com>', ""),
    ('<"me@example.com"@remote.test>', ""),
    ("<@example.com:friend@remote.test>", ""),
    ("<@EXAMPLE.COM:FRIEND@REMOTE.TEST>", ""),
    ("<@example.com,@mail.example.com:friend@remote.test>", ""),
    ("<@remote.test:friend@example.com>", ""),
    ("<remote.test!friend@example.com>", ""),
    ("<REMOTE.TEST!FRIEND@EXAMPLE.COM>", ""),
    ("<remote.test!friend>", ""),
    ("<friend@remote.test@example.com>", ""),
    ("<me@example.com@remote.test>", ""),
    ("<me@example.com,friend@remote.test>", ""),
    ("<me@example.com>,<friend@remote.test>", ""),
    ("<friend@[127.0.0.2]>", ""),
    ("<FRIEND@[127.0.0.2]>", ""),
    ("<friend@[127.0.0.1]>", ""),
    ("<friend@[IPv6:::1]>", ""),
    ("<friend%remote.test@[127.0.0.1]>", ""),
    ("<SRS0=abcd=AB=remote.test=friend@example.com>", ""),
    ("<srs0=abcd=ab=remote.test=friend@example.com>", ""),
    ("<SRS0=abcd=AB=REMOTE.TEST=FRIEND@EXAMPLE.COM>", ""),
    ("<SRS1=abcd=remote.test==efgh=AB=remote.test=friend@example.com>", ""),
    ("<friend@remote.test.>", ""),
    ("<FRIEND@REMOTE.TEST.>", ""),
    ("<friend@remote.test..>", ""),
    ("<friend@example.com.remote.test>", ""),
    ("<friend@mail.example.com>", ""),
    ("<friend@localhost>", ""),
    ("<postmaster@remote.test>", ""),
    ("<friend@remote.test\t>", ""),
    ("<friend@xn--bcher-kva.test>", ""),
    ("<friend@bücher.test>", " SMTPUTF8"),
    ("<friend@remоte.test>", " SMTPUTF8"),  # Cyrillic "о"
    ("<friend@remote.test>", " SMTPUTF8 BODY=8BITMIME"),
]

# (HELO name, MAIL FROM): a stranger, and ones that pretend to be us or local.
IDENTITIES = [
    ("client.test", "<someone@elsewhere.test>"),
    (HOSTNAME, f"<{USER}>"),
    ("localhost", "<>"),
    ("[127.0.0.1]", "<postmaster@example.com>"),
]

MESSAGE = b"Subject: relay test\r\nFrom: someone@elsewhere.test\r\n\r\nrelay me\r\n"


async def mx_client(relay, helo: str, starttls: bool = False) -> RawSMTP:
    client = await RawSMTP.connect("127.0.0.1", relay.ports["smtp"])
    assert (await client.cmd(f"EHLO {helo}"))[0] == 250
    if starttls:
        await client.starttls(relay.client_tls(), HOSTNAME)
        assert (await client.cmd(f"EHLO {helo}"))[0] == 250
    return client


async def push_data(client: RawSMTP) -> int:
    """DATA, and the message too if the server takes it; the last reply code."""
    code, _ = await client.cmd("DATA")
    if code != 354:
        return code
    await client.send(MESSAGE + b".")
    return (await client.reply())[0]


async def test_relay_battery_on_port_25(relay):
    accepted: list[str] = []  # forged recipients that got 250
    data_taken: list[str] = []  # forged-only transactions that got 354
    local_queued = 0
    for index, (rcpt, mail_params) in enumerate(ATTEMPTS):
        helo, sender = IDENTITIES[index % len(IDENTITIES)]
        client = await mx_client(relay, helo, starttls=index % 3 == 0)

        # The forged recipient alone; then DATA anyway.
        code, lines = await client.cmd(f"MAIL FROM:{sender}{mail_params}")
        assert code == 250, (rcpt, code, lines)
        code, lines = await client.cmd(f"RCPT TO:{rcpt}")
        assert 500 <= code < 600, (rcpt, code, lines)
        if code == 250:
            accepted.append(rcpt)
        code = await push_data(client)
        if code in (250, 354):
            data_taken.append(rcpt)
        else:
            assert code in (503, 554), (rcpt, code)
        assert (await client.cmd("RSET"))[0] == 250

        # Next to a real local user, so DATA does go through: the forged one is dropped.
        assert (await client.cmd(f"MAIL FROM:{sender}{mail_params}"))[0] == 250
        assert (await client.cmd(f"RCPT TO:<{USER}>"))[0] == 250
        code, lines = await client.cmd(f"RCPT TO:{rcpt}")
        assert 500 <= code < 600, (rcpt, code, lines)
        code = await push_data(client)
        assert code == 250, (rcpt, code)
        local_queued += 1
        assert (await client.cmd("QUIT"))[0] == 221
        await client.close()

    assert accepted == [], f"relay recipients accepted: {accepted}"
    assert data_taken == [], f"DATA accepted without a valid recipient: {data_taken}"
    await relay.wait_queue_empty()
    await asyncio.sleep(1.0)  # anything relayed would have reached the sink by now
    assert relay.sink.messages == [], [m.recipients for m in relay.sink.messages]
    assert not relay.server.queue.items
    # The local copies went to the one local recipient only.
    stored = await relay.wait_mailbox(local_queued)
    assert len(stored) == local_queued
    for message in stored:
        delivered_to = [line for line in message.split(b"\r\n")
                        if line.lower().startswith(b"delivered-to:")]
        assert delivered_to == [b"Delivered-To: " + USER.encode()], delivered_to


async def test_relay_from_loopback_helo_tricks_over_one_session(relay):
    """One long session mixing the tricks with RSET, HELO changes and pipelining."""
    client = await mx_client(relay, "client.test")
    refused = 0
    batch = [rcpt for rcpt, params in ATTEMPTS if not params][:8]
    for helo in ("mail.example.com", "[127.0.0.1]"):
        pipeline = [f"EHLO {helo}", "MAIL FROM:<me@example.com>",
                    *(f"RCPT TO:{rcpt}" for rcpt in batch), "DATA"]
        await client.send("\r\n".join(pipeline).encode() + b"\r\n")
        for command in pipeline:
            code, lines = await client.reply()
            if command.startswith("RCPT"):
                assert 500 <= code < 600, (command, code, lines)
                refused += 1
            elif command == "DATA":
                assert code == 554, (code, lines)
            else:
                assert code == 250, (command, code, lines)
        # Well under max_errors so far; start over with a fresh connection next time.
        await client.cmd("QUIT")
        await client.close()
        client = await mx_client(relay, "client.test")
    await client.close()
    assert refused == 2 * len(batch)
    await asyncio.sleep(1.0)
    assert relay.sink.messages == []
    assert not relay.server.queue.items


async def test_auth_on_port_25_without_tls_is_refused(relay):
    client = await mx_client(relay, "client.test")
    blob = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    for command in (f"AUTH PLAIN {blob}", "AUTH LOGIN", "AUTH CRAM-MD5"):
        code, lines = await client.cmd(command)
        assert code == 503 and lines[0].startswith("5.5.1"), (command, code, lines)
    assert (await client.cmd(f"MAIL FROM:<{USER}>"))[0] == 250
    code, lines = await client.cmd("RCPT TO:<friend@remote.test>")
    assert code == 554 and lines[0].startswith("5.7.1"), (code, lines)
    await client.close()


async def submission_client(relay, port: str) -> RawSMTP:
    implicit = port == "submission_tls"
    client = await RawSMTP.connect("127.0.0.1", relay.ports[port],
                                   tls=relay.client_tls() if implicit else None,
                                   server_hostname=HOSTNAME)
    assert (await client.cmd("EHLO client.test"))[0] == 250
    if not implicit:
        # Before TLS as well as after it.
        code, lines = await client.cmd(f"MAIL FROM:<{USER}>")
        assert code == 530 and lines[0].startswith("5.7.0"), (code, lines)
        await client.starttls(relay.client_tls(), HOSTNAME)
        assert (await client.cmd("EHLO client.test"))[0] == 250
    return client


@pytest.mark.parametrize("port", ["submission", "submission_tls"])
async def test_mail_on_submission_without_auth_is_refused(relay, port):
    # (Fresh connections now and then: every refusal counts towards max_errors.)
    client = await submission_client(relay, port)
    for sender in (USER, "someone@elsewhere.test", ""):
        code, lines = await client.cmd(f"MAIL FROM:<{sender}>")
        assert code == 530 and lines[0].startswith("5.7.0"), (sender, code, lines)
    # No way around it: RCPT and DATA without a transaction, failed and aborted AUTH.
    assert (await client.cmd("RCPT TO:<friend@remote.test>"))[0] == 503
    assert (await client.cmd("DATA"))[0] == 503
    await client.close()
    client = await submission_client(relay, port)
    assert (await client.auth_plain(USER, "wrong password"))[0] == 535
    assert (await client.cmd(f"MAIL FROM:<{USER}>"))[0] == 530
    assert (await client.cmd("AUTH LOGIN"))[0] == 334
    assert (await client.cmd("*"))[0] == 501
    assert (await client.cmd(f"MAIL FROM:<{USER}>"))[0] == 530
    blob = base64.b64encode(f"{USER}\0other@example.com\0{PASSWORD}".encode()).decode()
    assert (await client.cmd(f"AUTH PLAIN {blob}"))[0] == 535  # authzid must match
    assert (await client.cmd(f"MAIL FROM:<{USER}>"))[0] == 530
    assert (await client.cmd("RCPT TO:<friend@remote.test>"))[0] == 503
    await client.close()
    await asyncio.sleep(0.5)
    assert relay.sink.messages == []
    assert not relay.server.queue.items
