"""mailrelay.message.filters.verdict: applying a filter's verdict to the message."""

from __future__ import annotations

import time

import pytest

from mailrelay.message.filters.verdict import (
    Verdict,
    apply_verdict,
    fold_value,
    smtp_reply,
    subject_of,
)
from tests.support.linear import assert_linear

MESSAGE = b"From: a@example.org\r\nSubject: Hello\r\n  world\r\nX-Old: 1\r\n\r\nbody\r\n"


def test_accept_without_changes_is_the_same_bytes():
    assert apply_verdict(MESSAGE, Verdict("accept")) is MESSAGE


def test_headers_are_prepended():
    verdict = Verdict("accept", headers=[b"X-A: 1\r\n", b"X-B: 2\r\n\tmore\r\n"])
    assert apply_verdict(MESSAGE, verdict) == b"X-A: 1\r\nX-B: 2\r\n\tmore\r\n" + MESSAGE


def test_folded_subject_is_replaced_whole_and_removal_keeps_the_body():
    verdict = Verdict("accept", subject="New", remove_headers=[("x-old", 0)])
    assert apply_verdict(MESSAGE, verdict) == (
        b"From: a@example.org\r\nSubject: New\r\n\r\nbody\r\n")


@pytest.mark.parametrize(("message", "expected"), [
    # LF-only lines keep their ends.
    (b"Subject: a\nX-Old: 1\n\nX-Old: body\n", b"Subject: b\n\nX-Old: body\n"),
    # Only headers, no body.
    (b"X-Old: 1\r\nSubject: a", b"Subject: b"),
    # No header section at all: the Subject is added on top.
    (b"\r\nbody\r\n", b"Subject: b\r\n\r\nbody\r\n"),
])
def test_odd_messages(message, expected):
    verdict = Verdict("accept", subject="b", remove_headers=[("X-Old", 0)])
    assert apply_verdict(message, verdict) == expected


def test_subject_of():
    assert subject_of(MESSAGE) == "Hello  world"
    assert subject_of(b"From: a\r\n\r\nSubject: in the body\r\n") is None


def test_fold_value_never_ends_the_header_section():
    assert fold_value("a\r\n\r\nb\nc\x00\x1b") == "a\r\n\tb\r\n\tc"
    assert fold_value("one\n two") == "one\r\n two"


@pytest.mark.parametrize(("code", "text", "reply"), [
    (554, "spam detected", "554 5.7.1 spam detected"),
    (554, "5.7.0 virus", "554 5.7.0 virus"),
    (554, "4.7.0 virus", "554 5.7.1 virus"),
    (451, "", "451 4.3.0 fallback"),
    (451, "4.7.1", "451 4.7.1"),
    # Outside eyes: a hook that prints its own reply got "554 5.7.1 550 5.7.1 spam".
    (554, "550 5.7.1 spam", "554 5.7.1 spam"),
    (554, "550-spam", "554 5.7.1 spam"),
    (554, "550", "554 5.7.1 fallback"),
    (554, "5500 messages", "554 5.7.1 5500 messages"),
])
def test_smtp_reply(code, text, reply):
    enhanced = "5.7.1" if code == 554 else "4.3.0"
    assert smtp_reply(code, enhanced, text, "fallback") == reply


def test_apply_is_linear_in_the_number_of_fields():
    verdict = Verdict("accept", subject="s", remove_headers=[("X-F", 0), ("X-G", -1)])
    timings = []
    for count in (1_000, 10_000, 100_000):
        message = b"X-F: v\r\nX-G: w\r\n" * count + b"Subject: x\r\n\r\nbody\r\n"
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            result = apply_verdict(message, verdict)
            best = min(best, time.perf_counter() - started)
        assert result.count(b"X-G:") == count - 1 and b"X-F:" not in result
        timings.append(best)
    assert timings[2] < 1.0, timings
    assert timings[2] < 30 * timings[1] + 0.01, timings


def test_apply_and_subject_of_are_linear_in_folded_lines():
    # Issue 16 row 1's shape: one field with a great many continuation lines (each line
    # used to be appended to the field's bytes, copying them every time).
    verdict = Verdict("accept", subject="new", remove_headers=[("X-Spam-Status", 0)])

    def folded(lines: int) -> bytes:
        return (b"X-Spam-Status: x\r\n" + b" y\r\n" * lines + b"Subject: old\r\n"
                + b" more\r\n" * lines + b"\r\nbody\r\n")
    assert apply_verdict(folded(2), verdict) == b"Subject: new\r\n\r\nbody\r\n"
    assert subject_of(folded(2)) == "old more more"
    assert_linear(lambda message: apply_verdict(message, verdict), folded, 10_000,
                  label="apply_verdict, folded lines")
    # subject_of reads at most 64 KiB: the same time at every size.
    assert_linear(subject_of, folded, 10_000, label="subject_of, folded lines")
