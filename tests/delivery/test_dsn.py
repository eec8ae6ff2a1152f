"""Tests for mailrelay.delivery.dsn: RFC 3464 delivery status notifications."""

from __future__ import annotations

import email
import email.policy
import re
from email.message import EmailMessage, Message
from email.utils import parsedate_to_datetime

import pytest

from mailrelay.delivery import dsn
from mailrelay.delivery.dsn import FailedRecipient, build_dsn, is_auto_generated, returned_headers
from tests.support.linear import assert_linear

ORIGINAL_HEADERS = (
    b"Received: from client.example.test by mx.example.test;\r\n"
    b"\tMon, 13 Nov 2023 10:00:00 +0000\r\n"
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@remote.test, carol@remote.test\r\n"
    b"Subject: lunch\r\n"
    b"Message-ID: <orig-1@example.test>\r\n"
    b"\r\n"
)
ORIGINAL_BODY = b"Hi Bob,\r\n\r\nlunch at noon?\r\n\r\n-- \r\nAlice\r\n"
ORIGINAL = ORIGINAL_HEADERS + ORIGINAL_BODY

NOW = 1_700_000_100.0
ARRIVAL = 1_700_000_000.0


def bounce(**overrides: object) -> bytes:
    kwargs: dict[str, object] = {
        "reporting_mta": "mx.example.test",
        "original_sender": "alice@example.test",
        "original_message": ORIGINAL,
        "recipients": [
            FailedRecipient(
                address="bob@remote.test",
                status="5.1.1",
                diagnostic="smtp; 550 5.1.1 no such user",
                remote_mta="mx1.remote.test",
                original_recipient="rfc822;Bob@remote.test",
            )
        ],
        "now": NOW,
    }
    kwargs.update(overrides)
    return build_dsn(**kwargs)  # type: ignore[arg-type]


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def parts(msg: EmailMessage) -> list[EmailMessage]:
    return list(msg.iter_parts())  # type: ignore[arg-type]


def status_blocks(msg: EmailMessage) -> list[Message]:
    part = parts(msg)[1]
    assert part.get_content_type() == "message/delivery-status"
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    return blocks


def raw_part_bodies(data: bytes) -> list[bytes]:
    """The exact bytes of each part body, cut at the delimiters (and their leading CRLF)."""
    boundary = parse(data).get_boundary()
    assert boundary
    marker = b"\r\n--" + boundary.encode()
    chunks = data.split(marker)
    # chunks[0] is the top-level header + preamble, the last is the closing "--\r\n".
    assert chunks[-1] == b"--\r\n"
    bodies = []
    for chunk in chunks[1:-1]:
        _, sep, body = chunk.partition(b"\r\n\r\n")
        assert sep
        bodies.append(body)
    return bodies


# -- structure and top-level headers ------------------------------------------------------


def test_multipart_report_structure() -> None:
    msg = parse(bounce())
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert parts(msg)[0].get_content_charset() == "utf-8"
    assert msg.defects == []
    for part in parts(msg):
        assert part.defects == []


def test_top_level_headers() -> None:
    data = bounce(from_domain="example.test")
    msg = parse(data)
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@example.test>"
    assert b"\r\nTo: <alice@example.test>\r\n" in data
    assert msg["To"].addresses[0].addr_spec == "alice@example.test"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert parsedate_to_datetime(msg["Date"]).timestamp() == NOW
    assert re.fullmatch(r"<[0-9a-f]+@mx\.example\.test>", msg["Message-ID"])


def test_the_dsn_refers_to_the_original_message_id() -> None:
    """Mail programs thread the bounce with the message it is about (the chasquid peer's
    note: In-Reply-To and References were missing)."""
    msg = parse(bounce())
    assert msg["In-Reply-To"] == "<orig-1@example.test>"
    assert msg["References"] == "<orig-1@example.test>"
    without = ORIGINAL.replace(b"Message-ID: <orig-1@example.test>\r\n", b"")
    assert b"In-Reply-To" not in bounce(original_message=without).split(b"\r\n\r\n")[0]
    odd = ORIGINAL.replace(b"<orig-1@example.test>", b"not an id\r\n\tstill not")
    assert b"In-Reply-To" not in bounce(original_message=odd).split(b"\r\n\r\n")[0]


def test_from_defaults_to_reporting_mta() -> None:
    msg = parse(bounce())
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mx.example.test>"


def test_message_ids_are_unique() -> None:
    assert parse(bounce())["Message-ID"] != parse(bounce())["Message-ID"]


def test_human_readable_part_lists_recipients_and_replies() -> None:
    text = parts(parse(bounce()))[0].get_content()
    assert "mx.example.test" in text
    assert "<bob@remote.test>" in text
    assert "550 5.1.1 no such user" in text
    assert "smtp;" not in text  # the diagnostic type is for machines


# -- message/delivery-status --------------------------------------------------------------


def test_per_message_fields() -> None:
    msg = parse(bounce(envid="QQ314159", arrival_date=ARRIVAL))
    per_message = status_blocks(msg)[0]
    assert per_message["Reporting-MTA"] == "dns; mx.example.test"
    assert per_message["Original-Envelope-Id"] == "QQ314159"
    assert parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == ARRIVAL


def test_per_message_optional_fields_omitted() -> None:
    per_message = status_blocks(parse(bounce()))[0]
    assert per_message["Original-Envelope-Id"] is None
    assert per_message["Arrival-Date"] is None


def test_per_recipient_fields() -> None:
    recipients = [
        FailedRecipient(
            address="bob@remote.test",
            status="5.1.1",
            diagnostic="smtp; 550 5.1.1 no such user",
            remote_mta="mx1.remote.test",
            original_recipient="rfc822;Bob@remote.test",
        ),
        FailedRecipient(
            address="carol@remote.test",
            status="5.2.2",
            diagnostic="552 5.2.2 mailbox full",
        ),
    ]
    blocks = status_blocks(parse(bounce(recipients=recipients)))
    assert len(blocks) == 3

    bob = blocks[1]
    assert bob["Original-Recipient"] == "rfc822;Bob@remote.test"
    assert bob["Final-Recipient"] == "rfc822; bob@remote.test"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx1.remote.test"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert parsedate_to_datetime(bob["Last-Attempt-Date"]).timestamp() == NOW

    carol = blocks[2]
    assert carol["Original-Recipient"] is None
    assert carol["Remote-MTA"] is None
    assert carol["Final-Recipient"] == "rfc822; carol@remote.test"
    assert carol["Status"] == "5.2.2"
    # A bare remote reply gets the "smtp" diagnostic type.
    assert carol["Diagnostic-Code"] == "smtp; 552 5.2.2 mailbox full"


def test_field_order_within_block() -> None:
    block = status_blocks(parse(bounce()))[1]
    assert block.keys() == [
        "Original-Recipient",
        "Final-Recipient",
        "Action",
        "Status",
        "Remote-MTA",
        "Diagnostic-Code",
        "Last-Attempt-Date",
    ]


def test_bare_orcpt_gets_address_type() -> None:
    rcpt = FailedRecipient("bob@remote.test", "5.1.1", "550 no", original_recipient="B@remote.test")
    block = status_blocks(parse(bounce(recipients=[rcpt])))[1]
    assert block["Original-Recipient"] == "rfc822; B@remote.test"


def test_custom_diagnostic_type_kept() -> None:
    rcpt = FailedRecipient("bob@remote.test", "5.4.4", "x-mailrelay; no MX or A for remote.test")
    block = status_blocks(parse(bounce(recipients=[rcpt])))[1]
    assert block["Diagnostic-Code"] == "x-mailrelay; no MX or A for remote.test"


def test_malformed_status_replaced() -> None:
    rcpts = [
        FailedRecipient("a@remote.test", "550", "550 nope"),
        FailedRecipient("b@remote.test", "bogus", "451 later", action="delayed"),
    ]
    blocks = status_blocks(parse(bounce(recipients=rcpts)))
    assert blocks[1]["Status"] == "5.0.0"
    assert blocks[2]["Status"] == "4.0.0"


def test_long_diagnostic_is_folded_and_unfolds_back() -> None:
    reply = "550 5.7.1 " + " ".join(f"word{i}" for i in range(60))
    rcpt = FailedRecipient("bob@remote.test", "5.7.1", reply)
    data = bounce(recipients=[rcpt])
    assert max(len(line) for line in data.split(b"\r\n")) <= 100
    block = status_blocks(parse(data))[1]
    assert block["Diagnostic-Code"] == "smtp; " + reply


def test_non_ascii_address_uses_utf8_address_type() -> None:
    rcpt = FailedRecipient("jos\u00e9@remote.test", "5.1.1", "550 no such user")
    data = bounce(recipients=[rcpt])
    # RFC 6533: UTF-8 addresses go in message/global-delivery-status with type "utf-8".
    assert b"Content-Type: message/global-delivery-status\r\n" in data
    assert "Final-Recipient: utf-8; jos\u00e9@remote.test\r\n".encode() in data


# -- returned original ---------------------------------------------------------------------


def test_returned_headers_byte_identical() -> None:
    data = bounce()
    returned = parts(parse(data))[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned.get_payload(decode=True) == ORIGINAL_HEADERS
    assert raw_part_bodies(data)[2] == ORIGINAL_HEADERS
    assert ORIGINAL_BODY not in data


def test_full_return_embeds_original_unchanged() -> None:
    original = ORIGINAL_HEADERS + b"caf\xc3\xa9 \xff\xfe raw 8-bit\r\n.leading dot\r\n"
    data = bounce(original_message=original, return_full=True)
    msg = parse(data)
    returned = parts(msg)[2]
    assert returned.get_content_type() == "message/rfc822"
    assert returned["Content-Transfer-Encoding"] == "8bit"
    assert msg["Content-Transfer-Encoding"] == "8bit"
    assert raw_part_bodies(data)[2] == original
    inner = returned.get_payload()[0]
    assert inner["Message-ID"] == "<orig-1@example.test>"


def test_full_return_ascii_is_7bit() -> None:
    data = bounce(return_full=True)
    msg = parse(data)
    assert parts(msg)[2]["Content-Transfer-Encoding"] == "7bit"
    assert msg["Content-Transfer-Encoding"] == "7bit"
    assert raw_part_bodies(data)[2] == ORIGINAL


def test_oversize_full_return_falls_back_to_headers() -> None:
    big = ORIGINAL_HEADERS + b"x" * 70 + b"\r\n" * 1000
    data = bounce(original_message=big, return_full=True, max_returned_bytes=1024)
    msg = parse(data)
    returned = parts(msg)[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert raw_part_bodies(data)[2] == ORIGINAL_HEADERS
    assert "too large" in parts(msg)[0].get_content()


def test_full_return_at_exact_limit() -> None:
    data = bounce(return_full=True, max_returned_bytes=len(ORIGINAL))
    assert parts(parse(data))[2].get_content_type() == "message/rfc822"


def test_8bit_headers_returned_byte_identical() -> None:
    headers = b"From: a@example.test\r\nSubject: caf\xe9 latin-1\r\n\r\n"
    data = bounce(original_message=headers + b"body\r\n")
    assert raw_part_bodies(data)[2] == headers
    assert parts(parse(data))[2]["Content-Transfer-Encoding"] == "8bit"


def test_original_without_trailing_newline() -> None:
    original = b"From: a@example.test\r\nSubject: x\r\n\r\nno newline at end"
    data = bounce(original_message=original, return_full=True)
    assert raw_part_bodies(data)[2] == original


def test_lf_only_original_is_converted_to_crlf() -> None:
    original = b"From: a@example.test\nSubject: x\n\nline 1\nline 2\n"
    data = bounce(original_message=original, return_full=True)
    assert raw_part_bodies(data)[2] == original.replace(b"\n", b"\r\n")
    assert not re.search(rb"(?<!\r)\n", data)


# -- delayed --------------------------------------------------------------------------------


def test_delayed_subject_and_action() -> None:
    rcpt = FailedRecipient(
        "bob@remote.test", "4.4.1", "smtp; 421 4.4.1 try later", action="delayed"
    )
    msg = parse(bounce(recipients=[rcpt]))
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    assert status_blocks(msg)[1]["Action"] == "delayed"
    text = parts(msg)[0].get_content()
    assert "retrying" in text
    assert "421 4.4.1 try later" in text


def test_mixed_failed_and_delayed_is_undelivered() -> None:
    rcpts = [
        FailedRecipient("bob@remote.test", "5.1.1", "550 5.1.1 no such user"),
        FailedRecipient("carol@remote.test", "4.4.1", "421 try later", action="delayed"),
    ]
    msg = parse(bounce(recipients=rcpts))
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert [b["Action"] for b in status_blocks(msg)[1:]] == ["failed", "delayed"]


def test_expired_is_failed_with_4xx_status() -> None:
    rcpt = FailedRecipient("bob@remote.test", "4.4.7", "421 4.4.7 timeout")
    msg = parse(bounce(recipients=[rcpt]))
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert status_blocks(msg)[1]["Status"] == "4.4.7"


# -- line endings and injection -------------------------------------------------------------


def test_crlf_everywhere() -> None:
    rcpts = [
        FailedRecipient("bob@remote.test", "5.1.1", "550 a\nb\rc"),
        FailedRecipient("carol@remote.test", "4.4.1", "421 later", action="delayed"),
    ]
    data = bounce(recipients=rcpts, envid="E1", arrival_date=ARRIVAL, return_full=True)
    assert not re.search(rb"(?<!\r)\n", data), "bare LF"
    assert not re.search(rb"\r(?!\n)", data), "bare CR"
    assert data.endswith(b"--\r\n")


def test_diagnostic_injection_sanitized() -> None:
    rcpt = FailedRecipient(
        "bob@remote.test",
        "5.1.1",
        "smtp; 550 no\r\nBcc: victim@evil.test\r\n\r\nAction: delivered",
        remote_mta="mx1.remote.test\r\nX-Evil: 1",
    )
    data = bounce(recipients=[rcpt])
    for line in data.split(b"\r\n"):
        assert not line.startswith((b"Bcc:", b"X-Evil:", b"Action: delivered"))
    block = status_blocks(parse(data))[1]
    assert block["Action"] == "failed"
    assert "\r" not in block["Diagnostic-Code"] and "\n" not in block["Diagnostic-Code"]
    assert block["Diagnostic-Code"].startswith("smtp; 550 no Bcc: victim@evil.test")
    assert block["Remote-MTA"] == "dns; mx1.remote.test X-Evil: 1"


def test_address_and_envid_injection_sanitized() -> None:
    rcpt = FailedRecipient("bob@remote.test\r\nBcc: x@evil.test", "5.1.1", "550 no")
    data = bounce(
        recipients=[rcpt],
        original_sender="alice@example.test\r\nBcc: y@evil.test",
        envid="E1\r\nX-Evil: 1",
    )
    for line in data.split(b"\r\n"):
        assert not line.startswith((b"Bcc:", b"X-Evil:"))
    msg = parse(data)
    assert msg["Bcc"] is None
    assert len(status_blocks(msg)) == 2


def test_boundary_not_in_content(monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = iter(["collide", "fresh", "msgid"])
    monkeypatch.setattr(dsn.secrets, "token_hex", lambda n=None: next(tokens))
    original = ORIGINAL_HEADERS + b"--=_mailrelay_collide\r\n"
    data = bounce(original_message=original, return_full=True)
    msg = parse(data)
    assert msg.get_boundary() == "=_mailrelay_fresh"
    assert raw_part_bodies(data)[2] == original


# -- argument checks ------------------------------------------------------------------------


def test_requires_recipients() -> None:
    with pytest.raises(ValueError):
        bounce(recipients=[])


def test_refuses_null_sender() -> None:
    with pytest.raises(ValueError):
        bounce(original_sender="")


def test_requires_reporting_mta() -> None:
    with pytest.raises(ValueError):
        bounce(reporting_mta=" \r\n")


def test_rejects_unknown_action() -> None:
    with pytest.raises(ValueError):
        bounce(recipients=[FailedRecipient("b@remote.test", "5.0.0", "x", action="bounced")])


# -- returned_headers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (ORIGINAL, ORIGINAL_HEADERS),
        (b"A: 1\nB: 2\n\nbody\n\nmore\n", b"A: 1\nB: 2\n\n"),
        (b"A: 1\r\nB: 2\r\n", b"A: 1\r\nB: 2\r\n"),  # no body: all header
        (b"A: 1", b"A: 1"),
        (b"\r\nbody\r\n", b"\r\n"),  # empty header section
        (b"A: 1\r\n\r\n", b"A: 1\r\n\r\n"),
        (b"A: 1\r\n \r\nB: 2\r\n\r\nbody", b"A: 1\r\n \r\nB: 2\r\n\r\n"),  # whitespace != empty
    ],
)
def test_returned_headers(message: bytes, expected: bytes) -> None:
    assert returned_headers(message) == expected


# -- is_auto_generated ---------------------------------------------------------------------


def test_dsn_output_is_auto_generated() -> None:
    assert is_auto_generated(bounce())


def test_normal_mail_is_not_auto_generated() -> None:
    assert not is_auto_generated(ORIGINAL)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (b"Auto-Submitted: no\r\n", False),
        (b"Auto-Submitted: No (comment)\r\n", False),
        (b"Auto-Submitted: auto-replied\r\n", True),
        (b"auto-submitted:auto-generated\r\n", True),
        (b"Auto-Submitted: auto-notified; owner-email=x@example.test\r\n", True),
        (b"Content-Type: multipart/report; report-type=delivery-status\r\n", True),
        (b"Content-Type:\r\n MULTIPART/REPORT;\r\n\treport-type=x\r\n", True),
        (b"Content-Type: multipart/mixed; boundary=x\r\n", False),
        (b"Content-Type: text/plain\n", False),
        (b"Auto-Submitted: auto-generated\n", True),
    ],
)
def test_is_auto_generated_headers(headers: bytes, expected: bool) -> None:
    message = b"From: a@example.test\r\n" + headers + b"\r\nbody\r\n"
    assert is_auto_generated(message) is expected


def test_is_auto_generated_ignores_body() -> None:
    message = b"From: a@example.test\r\n\r\nAuto-Submitted: auto-replied\r\n"
    assert not is_auto_generated(message)


def test_is_auto_generated_is_linear_in_folded_lines() -> None:
    # The header splitting is message.headers' (issue 16 row 1: it was quadratic here too).
    def folded(lines: int) -> bytes:
        return (b"Subject: x\r\n" + b" y\r\n" * lines
                + b"Auto-Submitted: auto-replied\r\n\r\nbody\r\n")
    assert is_auto_generated(folded(3))
    assert_linear(is_auto_generated, folded, 10_000, label="dsn.is_auto_generated")
