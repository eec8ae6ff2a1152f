"""Loopback ports for the servers that the benches and tests start and bind by number."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return low, high


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, outside the kernel's ephemeral range.

    The caller binds the number later. A port from bind(0) is an ephemeral one, which any
    outgoing connection made meanwhile may take as its local port; the server then
    cannot listen on it (seen in CI: "cannot listen on 127.0.0.1:41517: Address already
    in use"). Ports below (or above) the ephemeral range are never given out that way.
    """
    low, high = _ephemeral_range()
    candidates = range(10000, low) if low > 11000 else range(high + 1, 65536)
    # Under pytest-xdist each worker process takes its own residue class of the range, so
    # two workers never hand out the same number (_handed_out is one process's).
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker.startswith("gw") and worker[2:].isdigit() and workers > 1:
        start = candidates.start + (int(worker[2:]) - candidates.start) % workers
        candidates = range(start, candidates.stop, workers)
    for _ in range(200):
        port = random.choice(candidates)
        if port in _handed_out:  # given to another server of this run already
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))  # a crowded machine: an ephemeral port after all
        return probe.getsockname()[1]
