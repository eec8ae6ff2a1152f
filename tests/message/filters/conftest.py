"""The real spam filters, started once per test session (tests/support/spam_daemons.py)."""

from __future__ import annotations

import pytest

from tests.support.spam_daemons import Rspamd, Spamd, rspamd_unavailable, spamd_unavailable


@pytest.fixture(scope="session")
def spamd(tmp_path_factory):
    reason = spamd_unavailable()
    if reason:
        pytest.skip(reason)
    daemon = Spamd(tmp_path_factory.mktemp("spamd"))
    daemon.start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="session")
def rspamd(tmp_path_factory):
    reason = rspamd_unavailable()
    if reason:
        pytest.skip(reason)
    daemon = Rspamd(tmp_path_factory.mktemp("rspamd"))
    daemon.start()
    yield daemon
    daemon.stop()
