"""Slowing down and then refusing password guessing, per client; the client key that
connection limits and the login throttle count under."""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ..address import parse_ip

# Clients the throttle remembers at most (about 300 bytes each, 15 MB in all): see
# AuthThrottle.
MAX_TRACKED = 50_000


def peer_address(ip: str) -> str:
    """The client's address as we name it (``parse_ip``: ``::ffff:192.0.2.1`` is
    ``192.0.2.1``); anything that is no IP address as it is."""
    address = parse_ip(ip)
    return ip if address is None else str(address)


def client_key(ip: str) -> str:
    """What limits count a client under: its IPv4 address, or the /64 of its IPv6
    address (one customer's allocation: an attacker has 2^64 addresses in it)."""
    address = parse_ip(ip)
    if address is None:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class _Entry:
    __slots__ = ("blocked_until", "count", "first")

    def __init__(self, now: float):
        self.first = now  # the first failure of the current window
        self.count = 0
        self.blocked_until = 0.0


@dataclass(frozen=True)
class Block:
    key: str  # an IPv4 address or an IPv6 /64
    remaining: float  # seconds until it ends
    failures: int


class AuthThrottle:
    """Each failed login from a client adds a growing delay; ``max_failures`` within
    ``block_time`` (counted from the first of them) block the client for ``block_time``.

    Blocking is per client (an IPv4 address, an IPv6 /64), never per user: an attacker
    elsewhere cannot lock the owner out. Every operation is O(1). At most
    ``max_tracked`` clients are remembered, the least recently failed forgotten first:
    entries whose window and block have passed go at once, so a live block is only
    forgotten early when more than ``max_tracked`` clients failed within ``block_time``
    (a distributed attack; each of them is then still slowed down, and fail2ban sees
    every failure in the mail log).
    """

    def __init__(
        self, max_failures: int, block_time: float, delay_step: float = 1.0,
        max_delay: float = 5.0, clock: Callable[[], float] = time.monotonic,
        max_tracked: int = MAX_TRACKED,
    ):
        self.max_failures = max_failures
        self.block_time = block_time
        self.delay_step = delay_step
        self.max_delay = max_delay
        self.clock = clock
        self.max_tracked = max_tracked
        # Least recently failed first.
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def blocked(self, ip: str) -> float:
        """Seconds until the client's block ends; 0.0 when it is not blocked."""
        entry = self._entries.get(client_key(ip))
        if entry is None:
            return 0.0
        return max(0.0, entry.blocked_until - self.clock())

    def failure(self, ip: str) -> float:
        """Record a failure; returns how long to wait before answering."""
        now = self.clock()
        key = client_key(ip)
        entry = self._entries.get(key)
        if entry is None:
            self._forget_stale(now)
            if len(self._entries) >= self.max_tracked:
                self._entries.popitem(last=False)
            entry = self._entries[key] = _Entry(now)
        else:
            self._entries.move_to_end(key)
            if now - entry.first >= self.block_time:
                entry.first, entry.count = now, 0  # a new window
        entry.count += 1
        if entry.count >= self.max_failures and entry.blocked_until <= now:
            entry.blocked_until = now + self.block_time
        return min(self.delay_step * entry.count, self.max_delay)

    def success(self, ip: str) -> None:
        key = client_key(ip)
        entry = self._entries.get(key)
        if entry is not None and entry.blocked_until <= self.clock():
            del self._entries[key]

    def blocks(self) -> list[Block]:
        """The clients blocked now, the longest remaining first."""
        now = self.clock()
        found = [Block(key, entry.blocked_until - now, entry.count)
                 for key, entry in self._entries.items() if entry.blocked_until > now]
        return sorted(found, key=lambda block: (-block.remaining, block.key))

    def unblock(self, ip: str) -> str | None:
        """Lift the block of ``ip`` (an address; IPv6: its /64, also written as the
        /64) and forget its failures. The key it was blocked under, None if it was not."""
        key = ip if ip in self._entries else client_key(ip.split("/")[0])
        entry = self._entries.pop(key, None)
        if entry is None or entry.blocked_until <= self.clock():
            return None
        return key

    def _forget_stale(self, now: float) -> None:
        # O(1) amortised: only entries at the old end, whose window and block are over.
        for _ in range(2):
            if not self._entries:
                return
            key, entry = next(iter(self._entries.items()))
            if now - entry.first < self.block_time or entry.blocked_until > now:
                return
            del self._entries[key]
