"""The trace header and the submission fix-ups added to a message on its way in."""

from __future__ import annotations

import email.utils

from mailrelay.message.received import received_header, rfc5322_date, submission_fixups

WHEN = 1_795_000_000.75  # a fraction of a second: the date shows whole seconds


def test_the_date_is_utc_with_a_numeric_zone():
    for when in (WHEN, WHEN + 0.2, WHEN + 1, WHEN + 86_400.5, 0.0):
        expected = email.utils.formatdate(int(when), localtime=False).replace("-0000", "+0000")
        assert rfc5322_date(when) == expected
    assert rfc5322_date(0.0) == "Thu, 01 Jan 1970 00:00:00 +0000"


def test_received_header_names_the_client_us_the_queue_id_and_the_recipient():
    header = received_header(helo="client.example", peer_ip="192.0.2.7",
                             hostname="mx.example.com", queue_id="0123abcd",
                             protocol="ESMTPS", recipient="me@example.com",
                             tls="TLSv1.3 TLS_AES_256_GCM_SHA384", now=WHEN)
    date = rfc5322_date(WHEN)
    assert header == (
        "Received: from client.example ([192.0.2.7])\r\n"
        "\tby mx.example.com (mailrelay) with ESMTPS id 0123abcd\r\n"
        "\t(TLSv1.3 TLS_AES_256_GCM_SHA384)\r\n"
        f"\tfor <me@example.com>; {date}\r\n").encode()


def test_received_header_cleans_what_the_client_said_and_leaves_out_odd_recipients():
    header = received_header(helo="evil (x)\r\nX-Forged: 1", peer_ip="192.0.2.7",
                             hostname="mx.example.com", queue_id="1", protocol="SMTP",
                             recipient="a@b\r\nX: y", now=WHEN)
    lines = header.decode().split("\r\n")
    assert lines[0] == "Received: from evil??x???X-Forged:?1 ([192.0.2.7])"
    assert lines[1].endswith("id 1;") and "for <" not in header.decode()
    assert lines[2] == "\t" + rfc5322_date(WHEN)


def test_submission_fixups_add_a_missing_date_and_message_id_only():
    added = submission_fixups([("From", "me@example.com")], "example.com", now=WHEN).decode()
    assert f"Date: {rfc5322_date(WHEN)}\r\n" in added
    assert added.startswith("Message-ID: <") and added.count("@example.com>") == 1
    assert submission_fixups([("DATE", "x"), ("message-id", "<y@z>")], "example.com") == b""


def test_a_message_signed_already_gets_nothing_added():
    fields = [("DKIM-Signature", "v=1; a=ed25519-sha256; h=from:date:message-id:date"),
              ("From", "me@example.com")]
    assert submission_fixups(fields, "example.com") == b""
