"""intake.sender_verified: whether a DSN may return content to the envelope sender."""

from __future__ import annotations

import pytest

from mailrelay.intake import sender_verified
from mailrelay.policy.authres import AuthResults


def results(spf: str, dmarc: str, from_domain: str | None) -> AuthResults:
    return AuthResults(spf=spf, spf_domain="", dkim=[], dmarc=dmarc, dmarc_policy=None,
                       from_domain=from_domain, header=b"")


@pytest.mark.parametrize(("sender", "checks", "verified"), [
    ("alice@sender.test", results("pass", "none", None), True),
    # DMARC passed for the From: domain, which is the sender's organisation.
    ("bounces@mail.sender.test", results("none", "pass", "sender.test"), True),
    ("alice@sender.test", results("softfail", "pass", "news.sender.test"), True),
    # DMARC passed for the forger's own From: domain: MAIL FROM is someone else's.
    ("victim@victim.test", results("none", "pass", "spam.test"), False),
    ("victim@victim.test", results("none", "none", "victim.test"), False),
    ("victim@victim.test", results("softfail", "fail", "victim.test"), False),
    ("victim@victim.test", results("neutral", "none", None), False),
    ("", results("pass", "pass", "sender.test"), False),  # a bounce: nobody to tell
    ("alice@sender.test", None, False),
])
def test_sender_verified(sender, checks, verified):
    assert sender_verified(sender, checks) is verified
