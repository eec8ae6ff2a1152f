"""The server's log line format: the time stamp fail2ban reads, formatted once a second."""

from __future__ import annotations

import logging

import pytest

from mailrelay.cli.serve import SecondCachingFormatter

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def record_at(when: float) -> logging.LogRecord:
    record = logging.LogRecord("mailrelay.mail", logging.INFO, None, 0, "queued id=1", (), None)
    record.created = when
    record.msecs = int((when - int(when)) * 1000) + 0.0
    return record


@pytest.mark.parametrize("times", [
    [1_795_000_000.001, 1_795_000_000.999, 1_795_000_001.5, 1_795_000_001.0005],
    [1.25, 86_400.0, 1.75],  # and back to an earlier second
])
def test_lines_are_what_the_standard_formatter_writes(times):
    ours, standard = SecondCachingFormatter(FORMAT), logging.Formatter(FORMAT)
    for when in times:
        assert ours.format(record_at(when)) == standard.format(record_at(when))


def test_an_explicit_date_format_is_still_honoured():
    ours = SecondCachingFormatter("%(asctime)s %(message)s", datefmt="%H:%M")
    standard = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M")
    assert ours.format(record_at(3600.5)) == standard.format(record_at(3600.5))
