"""delivery.source_ipv4/source_ipv6 and delivery.ip_families, through the real server:
the sink on loopback reports the address the connection came from."""

from __future__ import annotations

import logging
import socket

import pytest

from tests.support.relay import USER, delivery_lines, wait_for

MESSAGE = (f"From: {USER}\r\nTo: friend@remote.test\r\nSubject: source\r\n"
           "Message-ID: <src.1@example.com>\r\n\r\nhello\r\n").encode()


def have_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not have_ipv6_loopback(),
                                reason="this machine has no IPv6 loopback (::1)")


async def test_source_ipv4_is_the_address_the_mx_sees(env):
    env.write_config(delivery={"source_ipv4": "127.0.0.3"})
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    sink = env.add_sink("127.0.0.2", hostname="mx1.remote.test")
    await env.start()
    await env.submit(["friend@remote.test"], MESSAGE)
    [got] = await sink.until(1)
    assert got.peer == "127.0.0.3"


async def test_without_a_source_the_kernel_chooses(env):
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    sink = env.add_sink("127.0.0.2", hostname="mx1.remote.test")
    await env.start()
    await env.submit(["friend@remote.test"], MESSAGE)
    [got] = await sink.until(1)
    assert got.peer == "127.0.0.1"  # Linux answers loopback from 127.0.0.1


@needs_ipv6
async def test_source_ipv6_and_ipv4_each_for_their_family(env):
    env.write_config(delivery={"source_ipv4": "127.0.0.4", "source_ipv6": "::1"})
    env.add_mx("six.test", (10, "mx.six.test", "::1"))
    env.add_mx("four.test", (10, "mx.four.test", "127.0.0.2"))
    six = env.add_sink("::1", hostname="mx.six.test")
    four = env.add_sink("127.0.0.2", hostname="mx.four.test")
    await env.start()
    await env.submit(["a@six.test", "b@four.test"], MESSAGE)
    [over6] = await six.until(1)
    [over4] = await four.until(1)
    assert over6.peer == "::1" and over4.peer == "127.0.0.4"


@needs_ipv6
async def test_ip_families_ipv4_skips_the_ipv6_address(env):
    """IPv6 is tried first, unless ip_families leaves it out (its PTR is not set yet)."""
    env.write_config(delivery={"ip_families": ["ipv4"]})
    env.dns.add("remote.test", "MX", (10, "mx1.remote.test"))
    env.dns.add("mx1.remote.test", "AAAA", "::1")
    env.dns.add("mx1.remote.test", "A", "127.0.0.2")
    six = env.add_sink("::1", hostname="mx1.remote.test")
    four = env.add_sink("127.0.0.2", hostname="mx1.remote.test")
    await env.start()
    await env.submit(["friend@remote.test"], MESSAGE)
    [got] = await four.until(1)
    assert got.peer == "127.0.0.1"
    assert six.connections == 0


async def test_ip_families_with_no_address_of_that_family_waits(env, caplog):
    caplog.set_level(logging.INFO)
    env.write_config(delivery={"ip_families": ["ipv6"]})
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    sink = env.add_sink("127.0.0.2", hostname="mx1.remote.test")
    await env.start()
    await env.submit(["friend@remote.test"], MESSAGE)
    await wait_for(lambda: delivery_lines(caplog), what="an attempt")
    [line] = delivery_lines(caplog)
    assert "result=temporary" in line and 'reply="451 4.4.4 remote.test: no MX host has an ' \
        "IPv6 address (delivery.ip_families)" in line
    assert sink.connections == 0


def test_source_addresses_are_checked(env):
    from mailrelay.config import load_config
    from mailrelay.errors import ConfigError

    env.write_config(delivery={"source_ipv4": "::1"})
    with pytest.raises(ConfigError, match=r"delivery\.source_ipv4: ::1 is not an IPv4 address"):
        load_config(env.config_dir)
    env.write_config(delivery={"ip_families": []})
    with pytest.raises(ConfigError, match="must name ipv4, ipv6 or both"):
        load_config(env.config_dir)
    env.write_config(delivery={"ip_families": ["ipv5"]})
    with pytest.raises(ConfigError, match="expected one of ipv4, ipv6"):
        load_config(env.config_dir)
