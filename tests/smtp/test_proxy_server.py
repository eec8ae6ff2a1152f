"""The PROXY protocol on the real server (issue 20, item 5), behind a real haproxy: the
client named in the header is the client for limits, SPF, the mail log and Received;
untrusted senders of headers are refused; bad headers cost one log line and a close."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time

from tests.support.client import RawSMTP
from tests.support.haproxy import haproxy, needs_haproxy
from tests.support.relay import HOSTNAME, PASSWORD, USER

MESSAGE = b"From: <a@spf.test>\r\nSubject: through haproxy\r\n\r\nhello\r\n"


async def connect_from(source: str, port: int, tls: ssl.SSLContext | None = None,
                       greeting: bool = True) -> RawSMTP:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, local_addr=(source, 0), ssl=tls,
        server_hostname=HOSTNAME if tls else None)
    client = RawSMTP(reader, writer)
    if greeting:
        code, lines = await client.reply()
        assert code == 220, (code, lines)
    return client


async def closed_without_a_word(reader: asyncio.StreamReader) -> bool:
    """The server closed the connection having sent nothing (a reset counts: it closes
    with the client's unread bytes in its buffer)."""
    try:
        return await asyncio.wait_for(reader.read(), 10) == b""
    except ConnectionResetError:
        return True


def mail_log(caplog, event: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "mailrelay.mail" and r.getMessage().startswith(f"{event} ")]


@needs_haproxy
async def test_port_25_behind_haproxy_sees_the_original_client(env, tmp_path, caplog):
    """send-proxy-v2 (and v1) in front of port 25: SPF is checked for the client's
    address (127.0.0.5 may send for spf.test, the proxy 127.0.0.1 may not), and the mail
    log and Received name 127.0.0.5."""
    env.write_config(proxy_protocol={"smtp": ["127.0.0.1"]})
    env.add_user()
    env.dns.add("spf.test", "TXT", "v=spf1 ip4:127.0.0.5 -all")
    await env.start()
    caplog.set_level(logging.INFO)
    async with haproxy(tmp_path / "haproxy", {
            "v2": (env.ports["smtp"], "send-proxy-v2"),
            "v1": (env.ports["smtp"], "send-proxy")}) as front:
        for name in ("v2", "v1"):
            client = await connect_from("127.0.0.5", front[name])
            assert (await client.cmd("EHLO client.test"))[0] == 250
            code = await client.send_message("a@spf.test", [USER], MESSAGE)
            assert code == 250, code
            assert (await client.cmd("QUIT"))[0] == 221
            await client.close()
        # The same sender straight from 127.0.0.1 (the proxy's own address) fails SPF:
        # the proxy is not taken for the client, and the header is not optional.
        direct = await connect_from("127.0.0.1", env.ports["smtp"], greeting=False)
        direct.writer.write(b"PROXY TCP4 127.0.0.1 127.0.0.1 40000 25\r\n")
        assert (await direct.reply())[0] == 220
        assert (await direct.cmd("EHLO client.test"))[0] == 250
        assert await direct.send_message("a@spf.test", [USER], MESSAGE) == 550
        await direct.close()
    stored = await env.wait_mailbox(2)
    for message in stored:
        assert b"Received: from client.test ([127.0.0.5])" in message
        assert b"spf=pass" in message
    queued = mail_log(caplog, "queued")
    assert len(queued) == 2 and all(" ip=127.0.0.5 " in line for line in queued), queued
    assert all(" spf=pass " in line for line in queued)
    connects = mail_log(caplog, "connect")
    assert sum(" ip=127.0.0.5 " in line for line in connects) == 2, connects


@needs_haproxy
async def test_port_465_behind_haproxy_header_before_tls(env, tmp_path, caplog):
    """haproxy in mode tcp passes TLS through: the header comes before the ClientHello,
    and the submission's Received and mail log name the client."""
    env.write_config(proxy_protocol={"submission_tls": ["127.0.0.1"]})
    env.add_user()
    env.add_mx("remote.test", (10, "mx1.remote.test", "127.0.0.2"))
    env.sink = env.add_sink("127.0.0.2")
    await env.start()
    caplog.set_level(logging.INFO)
    async with haproxy(tmp_path / "haproxy", {
            "tls": (env.ports["submission_tls"], "send-proxy-v2")}) as front:
        client = await connect_from("127.0.0.6", front["tls"], tls=env.client_tls())
        assert (await client.cmd("EHLO client.test"))[0] == 250
        assert (await client.auth_plain(USER, PASSWORD))[0] == 235
        assert await client.send_message(USER, ["friend@remote.test"],
                                         b"Subject: via haproxy\r\n\r\nhi\r\n") == 250
        await client.close()
        # Straight to 465 without a header: the TLS handshake never starts.
        reader, writer = await asyncio.open_connection("127.0.0.1",
                                                       env.ports["submission_tls"])
        writer.write(b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03" + b"\x00" * 40)
        assert await closed_without_a_word(reader)
        writer.close()
    [received] = await env.sink.until(1)
    assert b"Received: from client.test ([127.0.0.6])" in received.data
    tls = mail_log(caplog, "tls")
    assert tls and all(" ip=127.0.0.6 " in line for line in tls), tls
    assert all(" ip=127.0.0.6 " in line for line in mail_log(caplog, "auth-ok"))


@needs_haproxy
async def test_a_proxy_outside_the_trusted_networks_is_refused(env, tmp_path, caplog):
    env.write_config(proxy_protocol={"smtp": ["192.0.2.0/24"]})
    env.add_user()
    await env.start()
    caplog.set_level(logging.INFO)
    async with haproxy(tmp_path / "haproxy", {
            "v2": (env.ports["smtp"], "send-proxy-v2")}) as front:
        client = await connect_from("127.0.0.5", front["v2"], greeting=False)
        code, lines = await client.reply()
        assert code == 554 and lines[0].startswith("5.7.1"), (code, lines)
        assert await client.at_eof()
    [reject] = mail_log(caplog, "reject")
    assert " ip=127.0.0.1 " in reject and "cmd=CONNECT" in reject
    assert not mail_log(caplog, "connect")


async def test_limits_count_the_client_of_the_header(env, caplog):
    """Row 8 and item 5: per-client limits apply to the address in the header; an IPv6
    client counts as its /64, for connections and for failed logins."""
    env.write_config(proxy_protocol={"smtp": ["127.0.0.1"], "submission": ["127.0.0.1"]},
                     limits={"max_connections_per_ip": 2, "auth_failure_delay": "0s",
                             "auth_failures_per_ip": 2, "auth_block_time": "1m"})
    env.add_user()
    await env.start()

    async def proxied(source: str, port: str = "smtp", greeting: bool = True) -> RawSMTP:
        client = await connect_from("127.0.0.1", env.ports[port], greeting=False)
        family = "TCP6" if ":" in source else "TCP4"
        destination = "::1" if family == "TCP6" else "127.0.0.1"
        client.writer.write(f"PROXY {family} {source} {destination} 40000 25\r\n".encode())
        if greeting:
            code, lines = await client.reply()
            assert code == 220, (source, code, lines)
        return client

    held = [await proxied("2001:db8:1:2::1"), await proxied("2001:db8:1:2::2")]
    third = await proxied("2001:db8:1:2:ffff::3", greeting=False)
    code, lines = await third.reply()
    assert code == 421 and lines[0].startswith("4.7.0"), (code, lines)
    held.append(await proxied("2001:db8:1:3::1"))  # another /64
    held.append(await proxied("192.0.2.7"))
    held.append(await proxied("::ffff:192.0.2.7"))  # the same IPv4 client
    fourth = await proxied("192.0.2.7", greeting=False)
    assert (await fourth.reply())[0] == 421
    assert env.server.listeners.limits.per_ip == {
        "2001:db8:1:2::/64": 2, "2001:db8:1:3::/64": 1, "192.0.2.7": 2}
    for client in held:
        await client.close()

    # Failed logins: two guesses from one address of a /64 block the whole /64.
    async def guesser(source: str) -> RawSMTP:
        client = await proxied(source, "submission")
        await client.cmd("EHLO client.test")
        await client.starttls(env.client_tls(), HOSTNAME)
        await client.cmd("EHLO client.test")
        return client

    attacker = await guesser("2001:db8:9:9::1")
    assert (await attacker.auth_plain(USER, "guess 1"))[0] == 535
    assert (await attacker.auth_plain(USER, "guess 2"))[0] == 535
    neighbour = await guesser("2001:db8:9:9:abcd::77")
    code, lines = await neighbour.auth_plain(USER, PASSWORD)
    assert code == 454 and lines[0].startswith("4.7.0"), (code, lines)
    elsewhere = await guesser("2001:db8:9:a::1")
    assert (await elsewhere.auth_plain(USER, PASSWORD))[0] == 235
    [block] = env.server.listeners.backend.throttle.blocks()
    assert block.key == "2001:db8:9:9::/64"
    for client in (attacker, neighbour, elsewhere):
        await client.close()


async def test_bad_headers_cost_one_log_line_and_a_close(env, caplog):
    env.write_config(proxy_protocol={"smtp": ["127.0.0.1"], "timeout": "0.5s"})
    env.add_user()
    await env.start()
    caplog.set_level(logging.INFO)
    port = env.ports["smtp"]

    async def closed_after(data: bytes, pause: float = 0.0) -> float:
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)
        if pause:
            await asyncio.sleep(pause)
        # No greeting: nothing is said before a valid header.
        assert await closed_without_a_word(reader)
        writer.close()
        return time.monotonic() - started

    await closed_after(b"EHLO client.test\r\n")  # no header at all
    await closed_after(b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n")  # malformed
    await closed_after(b"PROXY TCP4 " + b"1" * 200 + b"\r\n")  # too long
    await closed_after(b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff")  # v2, oversized
    slow = await closed_after(b"PROXY TCP4 192.0.2")  # truncated, then silence
    assert 0.4 < slow < 3
    lines = [r.getMessage() for r in caplog.records if "PROXY header" in r.getMessage()]
    # One line per bad header, at most one per second (floods are summed up).
    assert 1 <= len(lines) <= 5, lines
    assert all(" from 127.0.0.1 " in line for line in lines)
    assert not [r for r in caplog.records if r.exc_info]
    # A good one still works.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"PROXY TCP4 192.0.2.9 127.0.0.1 5555 25\r\nEHLO client.test\r\n")
    client = RawSMTP(reader, writer)
    assert (await client.reply())[0] == 220
    assert (await client.reply())[0] == 250
    await client.close()
