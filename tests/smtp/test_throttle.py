"""mailrelay.smtp.throttle: the client key (IPv4, IPv6 /64, IPv4-mapped) and the login
throttle's bounds: O(1) per failure, a capped table (issue 16, rows 8 and 16)."""

from __future__ import annotations

import time

import pytest

from mailrelay.smtp.throttle import AuthThrottle, client_key, peer_address


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("ip, key", [
    ("192.0.2.7", "192.0.2.7"),
    ("::ffff:192.0.2.7", "192.0.2.7"),  # a dual-stack socket's IPv4 client
    ("2001:db8:1:2::7", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
    ("2001:DB8:1:3::1", "2001:db8:1:3::/64"),
    ("fe80::1%eth0", "fe80::/64"),
    ("::1", "::/64"),
    ("not an address", "not an address"),
])
def test_client_key(ip, key):
    assert client_key(ip) == key


def test_peer_address():
    assert peer_address("::ffff:127.0.0.9") == "127.0.0.9"
    assert peer_address("2001:DB8::7") == "2001:db8::7"
    assert peer_address("127.0.0.1") == "127.0.0.1"
    assert peer_address("?") == "?"


def test_failures_block_after_the_limit_then_expire():
    clock = Clock()
    throttle = AuthThrottle(3, 600, delay_step=1.0, max_delay=5.0, clock=clock)
    assert [throttle.failure("192.0.2.1") for _ in range(2)] == [1.0, 2.0]
    assert not throttle.blocked("192.0.2.1")
    assert throttle.failure("192.0.2.1") == 3.0
    assert throttle.blocked("192.0.2.1") == 600
    clock.now += 599
    assert throttle.blocked("192.0.2.1") == pytest.approx(1)
    throttle.success("192.0.2.1")  # the right password while blocked lifts nothing
    assert throttle.blocked("192.0.2.1")
    clock.now += 1
    assert not throttle.blocked("192.0.2.1")
    # A new window: one failure is one failure again.
    assert throttle.failure("192.0.2.1") == 1.0


def test_a_slow_guesser_starts_a_new_window():
    clock = Clock()
    throttle = AuthThrottle(3, 600, clock=clock)
    for _ in range(5):
        throttle.failure("192.0.2.1")
        clock.now += 301  # two failures per window at most
    assert not throttle.blocked("192.0.2.1")


def test_an_ipv6_64_is_one_client():
    clock = Clock()
    throttle = AuthThrottle(3, 600, clock=clock)
    for host in ("::1", "::2", "::ffff:1"):
        throttle.failure(f"2001:db8:1:2{host}")
    assert throttle.blocked("2001:db8:1:2::9999")
    assert not throttle.blocked("2001:db8:1:3::1")
    [block] = throttle.blocks()
    assert (block.key, block.failures) == ("2001:db8:1:2::/64", 3)
    assert throttle.unblock("2001:db8:1:2::abc") == "2001:db8:1:2::/64"
    assert not throttle.blocked("2001:db8:1:2::1")
    assert throttle.unblock("2001:db8:1:2::abc") is None


def test_blocks_and_unblock():
    clock = Clock()
    throttle = AuthThrottle(2, 600, clock=clock)
    for ip in ("192.0.2.1", "192.0.2.1", "192.0.2.2"):
        throttle.failure(ip)
    clock.now += 100
    for ip in ("192.0.2.3", "192.0.2.3"):
        throttle.failure(ip)
    assert [(b.key, b.remaining) for b in throttle.blocks()] == [
        ("192.0.2.3", 600), ("192.0.2.1", 500)]
    assert throttle.unblock("192.0.2.2") is None  # failed once: not blocked
    assert throttle.unblock("::ffff:192.0.2.1") == "192.0.2.1"
    assert [b.key for b in throttle.blocks()] == ["192.0.2.3"]


def test_the_table_is_capped_and_forgets_the_least_recently_failed():
    clock = Clock()
    throttle = AuthThrottle(2, 600, clock=clock, max_tracked=100)
    throttle.failure("192.0.2.1")
    throttle.failure("192.0.2.1")  # blocked
    for n in range(99):
        throttle.failure(f"10.0.{n // 256}.{n % 256}")
    assert len(throttle) == 100
    throttle.failure("192.0.2.1")  # fails again: now the most recent
    throttle.failure("10.1.0.0")  # a new client at the cap: the oldest goes
    assert len(throttle) == 100
    assert throttle.blocked("192.0.2.1")
    # Entries whose window and block are over go first, without waiting for the cap.
    clock.now += 601
    for n in range(10):
        throttle.failure(f"10.2.0.{n}")
    assert len(throttle) < 100


@pytest.mark.parametrize("tracked", [1_000, 10_000, 100_000])
def test_each_failure_is_constant_time(tracked):
    """At 1x, 10x and 100x as many clients, a failure costs the same (it used to scan
    every entry: 4.6 ms per failure at 80,000 IPs)."""
    clock = Clock()
    throttle = AuthThrottle(5, 600, clock=clock, max_tracked=tracked)
    for n in range(tracked):
        throttle.failure(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}")
    assert len(throttle) == tracked
    started = time.thread_time()  # CPU time: other processes do not add to it
    for n in range(10_000):  # new clients at the cap: each evicts one
        throttle.failure(f"11.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}")
    per_failure = (time.thread_time() - started) / 10_000
    assert len(throttle) == tracked
    assert per_failure < 50e-6, f"{per_failure * 1e6:.1f} µs per failure at {tracked} clients"
