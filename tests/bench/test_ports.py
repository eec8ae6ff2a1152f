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


def test_each_xdist_worker_has_ports_of_its_own(monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "4")
    seen = {}
    for worker in range(4):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{worker}")
        seen[worker] = {free_port() for _ in range(20)}
    residues = {worker: {port % 4 for port in found} for worker, found in seen.items()}
    assert all(len(found) == 1 for found in residues.values())  # one class per worker
    assert len(set().union(*residues.values())) == 4  # and no class shared
