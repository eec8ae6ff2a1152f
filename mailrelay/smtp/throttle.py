"""Slowing down and then refusing password guessing, per client IP."""

from __future__ import annotations

import time
from collections.abc import Callable


class AuthThrottle:
    """Each failed login from an IP adds a growing delay; too many in a window block the IP.

    Blocking is per IP, never per user: an attacker elsewhere cannot lock the owner out.
    """

    def __init__(
        self, max_failures: int, block_time: float, delay_step: float = 1.0,
        max_delay: float = 5.0, clock: Callable[[], float] = time.monotonic,
    ):
        self.max_failures = max_failures
        self.block_time = block_time
        self.delay_step = delay_step
        self.max_delay = max_delay
        self.clock = clock
        self._failures: dict[str, list[float]] = {}
        self._blocked_until: dict[str, float] = {}

    def blocked(self, ip: str) -> bool:
        until = self._blocked_until.get(ip)
        if until is None:
            return False
        if self.clock() >= until:
            del self._blocked_until[ip]
            self._failures.pop(ip, None)
            return False
        return True

    def failure(self, ip: str) -> float:
        """Record a failure; returns how long to wait before answering."""
        now = self.clock()
        recent = [t for t in self._failures.get(ip, []) if now - t < self.block_time]
        recent.append(now)
        self._failures[ip] = recent
        if len(recent) >= self.max_failures:
            self._blocked_until[ip] = now + self.block_time
        self._prune(now)
        return min(self.delay_step * len(recent), self.max_delay)

    def success(self, ip: str) -> None:
        self._failures.pop(ip, None)

    def _prune(self, now: float) -> None:
        # Bound memory under a distributed attack: forget stale entries.
        if len(self._failures) + len(self._blocked_until) > 10000:
            for ip in [ip for ip, ts in self._failures.items() if now - ts[-1] >= self.block_time]:
                del self._failures[ip]
            for ip in [ip for ip, until in self._blocked_until.items() if now >= until]:
                del self._blocked_until[ip]
