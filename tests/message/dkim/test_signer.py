"""The DKIM signer: its signatures verify with dkimpy and with OpenDKIM, the keys being
served by the real loopback DNS server; tampering breaks them."""

from __future__ import annotations

import base64
import random
import re
import time

import dkim
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.canonicalization import Relaxed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailrelay.message.dkim import signer
from mailrelay.message.dkim.keys import dns_record
from mailrelay.message.dkim.signer import OVERSIGNED, DKIMKey, sign
from mailrelay.message.headers import to_crlf
from tests.message.dkim.dkimtools import (
    opendkim_unavailable,
    publish,
    random_message,
    run_opendkim,
)
from tests.support.dkim_dns import txt_lookup
from tests.support.linear import assert_linear

DOMAIN = "example.com"


@pytest.fixture(scope="module")
def rsa_key() -> DKIMKey:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return DKIMKey.from_private_key(DOMAIN, "rsa1", private)


@pytest.fixture(scope="module")
def ed_key() -> DKIMKey:
    return DKIMKey.from_private_key(DOMAIN, "ed1", ed25519.Ed25519PrivateKey.generate())


@pytest.fixture
def dnsfunc(dns_server, rsa_key, ed_key):
    publish(dns_server, rsa_key, ed_key)
    return txt_lookup(dns_server.port)


@pytest.fixture(params=["rsa", "ed25519"])
def key(request, rsa_key, ed_key) -> DKIMKey:
    return rsa_key if request.param == "rsa" else ed_key


def signed_headers(header_block: bytes) -> tuple[tuple[bytes, ...], bytes]:
    """The h= names and the relaxed canonical form of the fields they select."""
    layout, canonical = signer._header_fields(header_block)
    return layout.names, canonical


def verify(message: bytes, dnsfunc, idx: int = 0) -> bool:
    """dkimpy's verdict on signature ``idx`` (dkim.verify() only checks the first)."""
    try:
        return bool(dkim.DKIM(message).verify(idx=idx, dnsfunc=dnsfunc))
    except dkim.DKIMException:
        return False


def tags(field: bytes) -> dict[str, str]:
    value = field.decode().split(":", 1)[1]
    value = re.sub(r"\s+", "", value)
    return dict(item.split("=", 1) for item in value.strip(";").split(";"))


BASIC = (b"From: Me <me@example.com>\r\nTo: you@remote.test\r\nSubject: hi\r\n"
         b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <1@example.com>\r\n"
         b"\r\nHello.\r\n")

MESSAGES = {
    "basic": BASIC,
    "lf-only": BASIC.replace(b"\r\n", b"\n"),
    "mixed-line-endings": b"From: a@example.com\nTo: b@x.test\r\nSubject: s\n\r\nl1\nl2\r\n",
    "folded-and-whitespace": (
        b"From: \"Me\"\r\n\t<me@example.com>\r\nTo: a@x.test,\r\n    b@x.test ,\r\n"
        b" c@x.test\r\nSubject:   lots \t of   space\t \r\n  \r\n continued  \r\n"
        b"Content-Type: text/plain;\r\n\tcharset=utf-8\r\n\r\n"
        b"  leading\r\ntrailing \t \r\n in  the \t\t middle\r\n\t\r\n \r\n\r\n\r\n"),
    "8bit": ("From: Jörg <j@example.com>\r\nSubject: Grüße, ça va?\r\nTo: é@x.test\r\n"
             "\r\nBody with 8-bit: ÄÖÜ ß € \r\n").encode() + b"raw \xff\xfe latin1 \xe9\r\n",
    "empty-body": b"From: a@example.com\r\nSubject: nothing\r\n\r\n",
    "no-body-separator": b"From: a@example.com\r\nSubject: headers only\r\n",
    "only-blank-body-lines": b"From: a@example.com\r\n\r\n\r\n \r\n\t\r\n",
    "no-final-newline": b"From: a@example.com\r\n\r\nlast line",
    "repeated-fields": (b"From: a@example.com\r\nTo: one@x.test\r\nReceived: x\r\n"
                        b"To: two@x.test\r\nSubject: s\r\nTo: three@x.test\r\n\r\nb\r\n"),
    "case-insensitive-names": (b"FROM: a@example.com\r\nsubject: s\r\nMESSAGE-id: <m@x>\r\n"
                               b"content-TYPE: text/plain\r\n\r\nb\r\n"),
    "list-headers": (b"From: list@example.com\r\nList-Id: <l.example.com>\r\n"
                     b"List-Unsubscribe: <mailto:u@example.com>\r\n"
                     b"List-Post: <mailto:l@example.com>\r\nSubject: s\r\n\r\nb\r\n"),
    "repeated-list-fields": (b"From: a@example.com\r\nList-Post: <mailto:1@x>\r\n"
                             b"Received: one\r\nList-Post: <mailto:2@x>\r\n"
                             b"Received: two\r\nSubject: s\r\n\r\nb\r\n"),
    "mbox-from-line": b"From someone Mon Jan  1 00:00:00 2024\nFrom: a@example.com\n\nb\n",
    "long-body": b"From: a@example.com\r\n\r\n" + b"line  of \ttext  \r\n" * 5000,
}


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_dkimpy_verifies(name, key, dnsfunc):
    message = MESSAGES[name]
    field = sign(message, [key], timestamp=1_700_000_000)
    assert field.startswith(b"DKIM-Signature: ") and field.endswith(b"\r\n")
    assert all(len(line) <= 78 for line in field.split(b"\r\n"))
    if name == "no-final-newline":
        message += b"\r\n"  # what SMTP transmits; see the module docstring
    assert verify(field + message, dnsfunc), name


def test_both_keys_sign(rsa_key, ed_key, dnsfunc):
    fields = sign(BASIC, [rsa_key, ed_key])
    assert fields.count(b"DKIM-Signature:") == 2
    signed = fields + BASIC
    assert verify(signed, dnsfunc, 0) and verify(signed, dnsfunc, 1)
    first, second = fields.split(b"\r\nDKIM-Signature:")
    assert tags(first)["a"] == "rsa-sha256" and tags(first)["s"] == "rsa1"
    assert tags(b"DKIM-Signature:" + second)["a"] == "ed25519-sha256"
    assert tags(first)["bh"] == tags(b"DKIM-Signature:" + second)["bh"]


def test_no_keys_no_signature():
    assert sign(BASIC, []) == b""


def test_tags(rsa_key):
    field = sign(MESSAGES["list-headers"], [rsa_key], timestamp=1_234_567_890)
    found = tags(field)
    assert found["v"] == "1" and found["c"] == "relaxed/relaxed"
    assert found["d"] == DOMAIN and found["s"] == "rsa1" and found["t"] == "1234567890"
    assert base64.b64decode(found["bh"]) and len(base64.b64decode(found["b"])) == 256
    h = found["h"].split(":")
    # Present ones as often as they occur, oversigned ones once more, absent cc/to once.
    assert h.count("from") == 2 and h.count("subject") == 2
    assert h.count("to") == 1 and h.count("cc") == 1 and h.count("date") == 1
    assert h.count("list-id") == 1 and h.count("list-unsubscribe") == 1
    assert "reply-to" not in h and "received" not in h


def test_repeated_fields_counted(rsa_key):
    h = tags(sign(MESSAGES["repeated-fields"], [rsa_key]))["h"].split(":")
    assert h.count("to") == 4  # three present, plus one
    assert "received" not in h
    assert set(OVERSIGNED) <= set(h)


def test_timestamp_defaults_to_now(rsa_key):
    before = int(time.time())
    assert before <= int(tags(sign(BASIC, [rsa_key]))["t"]) <= int(time.time())


def test_rsa_signature_is_deterministic(rsa_key):
    assert sign(BASIC, [rsa_key], timestamp=1) == sign(BASIC, [rsa_key], timestamp=1)
    # Line endings do not matter to relaxed canonicalisation.
    assert sign(BASIC, [rsa_key], timestamp=1) == sign(MESSAGES["lf-only"], [rsa_key],
                                                       timestamp=1)


@pytest.mark.parametrize("change", [
    pytest.param((b"Hello.", b"Hellp."), id="body"),
    pytest.param((b"Hello.\r\n", b"Hello.\r\nmore\r\n"), id="body-appended"),
    pytest.param((b"Subject: hi", b"Subject: ho"), id="subject"),
    pytest.param((b"From: Me", b"From: He"), id="from"),
    pytest.param((b"To: you@", b"To: them@"), id="to"),
    pytest.param((b"Subject: hi\r\n", b"Subject: hi\r\nSubject: buy now\r\n"),
                 id="second-subject-below"),
    pytest.param((b"From: Me", b"Subject: buy now\r\nFrom: Me"), id="second-subject-above"),
    pytest.param((b"Subject: hi\r\n", b"Subject: hi\r\nCc: extra@x.test\r\n"), id="added-cc"),
])
def test_tampering_breaks_the_signature(change, key, dnsfunc):
    signed = sign(BASIC, [key]) + BASIC
    assert verify(signed, dnsfunc)
    old, new = change
    assert old in signed
    assert not verify(signed.replace(old, new, 1), dnsfunc)


def test_unsigned_changes_and_refolding_keep_it_valid(key, dnsfunc):
    signed = sign(BASIC, [key]) + BASIC
    # A relay adds Received, refolds a field and adds trailing blank lines: still valid.
    changed = b"Received: from somewhere\r\n" + signed.replace(
        b"Subject: hi", b"Subject:\r\n \t hi").replace(b"Hello.\r\n", b"Hello.  \r\n\r\n\r\n")
    assert verify(changed, dnsfunc)


def test_wrong_key_fails(dnsfunc):
    other = DKIMKey.from_private_key(DOMAIN, "rsa1", rsa.generate_private_key(65537, 2048))
    assert not verify(sign(BASIC, [other]) + BASIC, dnsfunc)


# -- canonicalisation against RFC 6376 ------------------------------------------------------

def canonical_body(body: bytes) -> bytes:
    stripped = signer._relaxed_body(to_crlf(body))
    return stripped + b"\r\n" if stripped else b""


def test_rfc6376_example_3_4_5():
    # RFC 6376 3.4.5, relaxed: "A: X\r\nB : Y\t\r\n\tZ  \r\n" -> "a:X\r\nb:Y Z\r\n";
    # the body " C \r\nD \t E\r\n\r\n\r\n" -> " C\r\nD E\r\n". Our fields stand in for A, B.
    names, canonical = signed_headers(b"From: X\r\nSubject : Y\t\r\n\tZ  ")
    assert canonical == b"from:X\r\nsubject:Y Z\r\n"
    assert names == (b"from", b"from", b"subject", b"subject", b"date", b"to", b"cc",
                     b"message-id")
    assert canonical_body(b" C \r\nD \t E\r\n\r\n\r\n") == b" C\r\nD E\r\n"


def test_body_edge_cases():
    assert canonical_body(b"") == b""
    assert canonical_body(b"\r\n\r\n \r\n\t\r\n") == b""
    assert canonical_body(b"x") == b"x\r\n"
    assert canonical_body(b"x \t") == b"x\r\n"
    assert canonical_body(b"a\n \nb  \n\n") == b"a\r\n\r\nb\r\n"
    # A bare CR ends a line, as on the wire (aiosmtplib sends it as CRLF).
    assert canonical_body(b"a \r\rb\r\n") == b"a\r\n\r\nb\r\n"
    # VT and FF are not WSP.
    assert canonical_body(b"a\x0b \x0c\r\n") == b"a\x0b \x0c\r\n"


def test_header_edge_cases():
    # Bottom-up selection of repeated fields; VT and FF in a value are not whitespace.
    _, canonical = signed_headers(b"To: 1\r\nTo:  2 \r\nSubject: a\x0b \x0c \t b ")
    assert canonical == b"to:2\r\nto:1\r\nsubject:a\x0b \x0c b\r\n"
    _, canonical = signed_headers(b"Subject: a\x0b\r\n \tb \r\nTo: x")
    assert canonical == b"subject:a\x0b b\r\nto:x\r\n"
    # Field names with bytes outside printable ASCII are never listed in h=.
    names, _ = signed_headers(b"From: a\r\nList-\xe9: x\r\nList-Id: y")
    assert b"list-id" in names and all(name.isascii() for name in names)


def test_header_names_and_folding_edge_cases():
    # A name folded away from its colon makes no field; "List-" alone is a list-* name;
    # a value's leading folding goes; VT is not WSP.
    names, canonical = signed_headers(
        b"Subject\r\n : x\r\nList-: y\r\nTo:\r\n \r\n\tz \r\nFROM : a\x0b\r\n b")
    assert canonical == b"list-:y\r\nto:z\r\nfrom:a\x0b b\r\n"
    assert names[:5] == (b"list-", b"to", b"to", b"from", b"from")


def test_body_with_a_long_part_without_spaces():
    # What follows the last SP or HTAB, when long, skips the whitespace work: both sides
    # of that point must still come out right.
    base64_lines = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2\r\n" * 20
    for body in (b"two  spaces, a trailing one \r\n\t\r\n" + base64_lines,
                 b"a \r\n" + base64_lines + b"\r\n\r\n",
                 b"x \t" + base64_lines,
                 b" \r\n" + base64_lines + b" \r\n" + base64_lines):
        assert canonical_body(body) == Relaxed.canonicalize_body(body), body[:40]


def test_signs_what_aiosmtplib_transmits(key, dnsfunc):
    from aiosmtplib.protocol import LINE_ENDINGS_REGEX
    message = b"From: a@example.com\rSubject: bare\n CR and LF\r\n\r\nx \ry\n\n"
    wire = LINE_ENDINGS_REGEX.sub(b"\r\n", message)
    assert verify(sign(message, [key]) + wire, dnsfunc)


@st.composite
def bodies(draw) -> bytes:
    line = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
    wsp = st.sampled_from([b"", b" ", b"\t", b"  \t "])
    lines = draw(st.lists(st.tuples(wsp, line, wsp), max_size=12))
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    return b"".join(a + text + b + eol for a, text, b in lines) + eol * draw(st.integers(0, 3))


@given(bodies())
def test_body_canonicalisation_matches_dkimpy(body):
    assert canonical_body(body) == Relaxed.canonicalize_body(to_crlf(body))


# -- property: random messages verify --------------------------------------------------

_VALUE_PIECES = st.one_of(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E),
    st.sampled_from([" ", "\t", "  ", "\r\n ", "\r\n\t", "\n "]),
    st.characters(min_codepoint=0x80, max_codepoint=0x2FFF),
)
_VALUES = st.lists(_VALUE_PIECES, max_size=40).map("".join)
_NAMES = st.sampled_from(["From", "from", "To", "Cc", "Subject", "Date", "Message-ID",
                          "Reply-To", "References", "Content-Type", "MIME-Version",
                          "List-Id", "List-Archive", "X-Other", "Received"])


@st.composite
def messages(draw) -> bytes:
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    fields = draw(st.lists(st.tuples(_NAMES, _VALUES),
                           min_size=0, max_size=10))
    fields.insert(draw(st.integers(0, len(fields))), ("From", "a@example.com"))
    head = b"".join(name.encode() + b":" + value.encode("utf-8").replace(b"\r\n", eol) + eol
                    for name, value in fields)
    return head + eol + draw(bodies()).replace(b"\r\n", eol)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(message=messages(), use_ed25519=st.booleans())
def test_random_messages_verify_with_dkimpy(message, use_ed25519, rsa_key, ed_key, dnsfunc):
    key = ed_key if use_ed25519 else rsa_key
    assert verify(sign(message, [key]) + message, dnsfunc)


# -- OpenDKIM, an independent C implementation ------------------------------------------

@pytest.fixture
def opendkim_records(rsa_key, ed_key):
    reason = opendkim_unavailable()
    if reason:
        pytest.skip(reason)
    return [dns_record(rsa_key), dns_record(ed_key)]


def _with_date(message: bytes) -> bytes:
    # OpenDKIM's test tool checks RFC 5322 field counts first: exactly one Date.
    if re.search(rb"(?im)^date:", message.split(b"\n\n")[0].split(b"\r\n\r\n")[0]):
        return message
    return b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n" + message


def test_opendkim_verifies(tmp_path, rsa_key, ed_key, opendkim_records):
    rng = random.Random(6376)
    # Not "repeated-fields" (three To: fields break RFC 5322, which OpenDKIM enforces) nor
    # an mbox "From " line.
    samples = [_with_date(m) for name, m in sorted(MESSAGES.items())
               if name not in ("repeated-fields", "mbox-from-line")]
    samples += [random_message(rng) for _ in range(40)]
    signed = [sign(m, [k]) + m for m in samples for k in (rsa_key, ed_key)]
    # Negative controls: the verifier must notice a change and a missing key.
    tampered = [(sign(BASIC, [rsa_key]) + BASIC).replace(b"Hello.", b"Hellp."),
                (sign(BASIC, [ed_key]) + BASIC).replace(b"Subject: hi", b"Subject: ho")]
    unknown = DKIMKey.from_private_key(DOMAIN, "nokey", ed25519.Ed25519PrivateKey.generate())
    results = run_opendkim(tmp_path, opendkim_records,
                           [*signed, *tampered, sign(BASIC, [unknown]) + BASIC])
    good, bad = results[:len(signed)], results[len(signed):]
    failures = [(i, err, signed[i][:400]) for i, (code, err) in enumerate(good) if code != 0]
    assert not failures, failures[:3]
    assert [code != 0 for code, _ in bad] == [True, True, True], bad
    assert "signature" in bad[0][1].lower()


def test_signing_is_linear_in_folded_lines_and_fields(ed_key, dnsfunc):
    # Issue 16 row 1: every parser of the header section, the signer's one pass included.
    def folded(lines: int) -> bytes:
        return (b"From: a@example.com\r\nSubject: x\r\n" + b" y\r\n" * lines
                + b"To: b@example.com\r\n" * (lines // 100) + b"\r\nbody\r\n")
    small = folded(3)
    assert verify(sign(small, [ed_key]) + small, dnsfunc)
    assert_linear(lambda data: sign(data, [ed_key]), folded, 10_000,
                  label="dkim sign, folded lines")
