"""Ports for servers started by number: outside the ephemeral range, distinct, free."""

from __future__ import annotations

import socket

from bench import ports
from bench.ports import _ephemeral_range, free_port


def test_ports_are_free_distinct_and_never_ephemeral():
    low, high = _ephemeral_range()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert not any(low <= port <= high for port in ports)
    for port in ports[:5]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))  # free indeed


def test_a_port_something_listens_on_is_skipped(monkeypatch):
    low, _ = _ephemeral_range()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        spare = next(port for port in range(low - 1, 10000, -1) if port not in
                     ports._handed_out and _bindable(port))
        offered = iter([busy, spare])  # the busy one first
        monkeypatch.setattr(ports.random, "choice", lambda candidates: next(offered))
        assert free_port() == spare


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
