"""The ``dns_server`` fixture: a fresh loopback DNS server per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.dns_server import TestDNSServer


@pytest.fixture
def dns_server() -> Iterator[TestDNSServer]:
    with TestDNSServer() as server:
        yield server
