"""SMTP protocol behaviour of the real server on loopback: extensions, limits, errors."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.client import RawSMTP
from tests.support.relay import HOSTNAME, PASSWORD, USER


async def mx_client(relay) -> RawSMTP:
    client = await RawSMTP.connect("127.0.0.1", relay.ports["smtp"])
    code, _ = await client.cmd("EHLO client.test")
    assert code == 250
    return client


async def test_ehlo_advertises_extensions(relay):
    client = await RawSMTP.connect("127.0.0.1", relay.ports["smtp"])
    code, lines = await client.cmd("EHLO client.test")
    assert code == 250
    assert lines[0] == HOSTNAME
    for extension in ("PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "STARTTLS",
                      "DSN"):
        assert extension in lines
    assert f"SIZE {relay.server.config.limits.max_message_size}" in lines
    await client.close()


async def test_pipelined_transaction(relay):
    client = await mx_client(relay)
    await client.send(
        b"MAIL FROM:<a@elsewhere.test>\r\nRCPT TO:<me@example.com>\r\n"
        b"RCPT TO:<nobody@example.com>\r\nDATA\r\n")
    assert (await client.reply())[0] == 250
    assert (await client.reply())[0] == 250
    assert (await client.reply())[0] == 550
    assert (await client.reply())[0] == 354
    await client.send(b"Subject: pipelined\r\n\r\nbody\r\n.\r\nNOOP\r\nQUIT\r\n")
    assert (await client.reply())[0] == 250
    assert (await client.reply())[0] == 250
    assert (await client.reply())[0] == 221
    [stored] = await relay.wait_mailbox(1)
    assert b"Subject: pipelined" in stored


async def test_size_declared_too_big(relay):
    client = await mx_client(relay)
    limit = relay.server.config.limits.max_message_size
    code, lines = await client.cmd(f"MAIL FROM:<a@elsewhere.test> SIZE={limit + 1}")
    assert code == 552 and lines[0].startswith("5.3.4")
    code, _ = await client.cmd("MAIL FROM:<a@elsewhere.test> SIZE=1000")
    assert code == 250


async def test_message_over_size_is_refused_after_data(env):
    env.write_config(limits={"max_message_size": "10KiB", "auth_failure_delay": "0s"})
    env.add_user()
    await env.start()
    client = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
    await client.cmd("EHLO client.test")
    await client.cmd("MAIL FROM:<a@elsewhere.test>")
    await client.cmd(f"RCPT TO:<{USER}>")
    assert (await client.cmd("DATA"))[0] == 354
    await client.send(b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 20)
    code, lines = await client.cmd(".")
    assert code == 552 and lines[0].startswith("5.3.4")
    assert (await client.cmd("NOOP"))[0] == 250, "session goes on after an oversized message"
    assert env.server.queue.items == {}
    assert env.mailbox() == []


async def test_command_order_errors(relay):
    client = await RawSMTP.connect("127.0.0.1", relay.ports["smtp"])
    code, lines = await client.cmd("MAIL FROM:<a@elsewhere.test>")
    assert code == 503 and lines[0].startswith("5.5.1")
    await client.cmd("EHLO client.test")
    code, lines = await client.cmd("RCPT TO:<me@example.com>")
    assert code == 503 and lines[0].startswith("5.5.1")
    code, lines = await client.cmd("DATA")
    assert code == 503 and lines[0].startswith("5.5.1")
    await client.cmd("MAIL FROM:<a@elsewhere.test>")
    code, lines = await client.cmd("MAIL FROM:<a@elsewhere.test>")
    assert code == 503
    code, lines = await client.cmd("FOO bar")
    assert code == 500 and lines[0].startswith("5.5.1")


async def test_long_command_line_keeps_session_usable(relay):
    client = await mx_client(relay)
    code, lines = await client.cmd("NOOP " + "x" * 5000)
    assert code == 500 and lines[0].startswith("5.5.2")
    assert (await client.cmd("NOOP"))[0] == 250


async def test_too_many_recipients(env):
    env.write_config(limits={"max_recipients": 2, "auth_failure_delay": "0s"})
    env.add_user()
    env.add_user("you@example.com")
    env.add_user("them@example.com")
    await env.start()
    client = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
    await client.cmd("EHLO client.test")
    await client.cmd("MAIL FROM:<a@elsewhere.test>")
    assert (await client.cmd("RCPT TO:<me@example.com>"))[0] == 250
    assert (await client.cmd("RCPT TO:<you@example.com>"))[0] == 250
    code, lines = await client.cmd("RCPT TO:<them@example.com>")
    assert code == 452 and lines[0].startswith("4.5.3")


async def test_http_request_gets_no_reply(relay):
    """ALPACA: a browser or proxy talking to us is cut off without an echo."""
    client = await RawSMTP.connect("127.0.0.1", relay.ports["smtp"])
    await client.send("GET / HTTP/1.1")
    assert await client.at_eof()


async def test_starttls_with_pipelined_plaintext_is_refused(relay):
    client = await mx_client(relay)
    await client.send(b"STARTTLS\r\nMAIL FROM:<injected@elsewhere.test>\r\n")
    code, _lines = await client.reply()
    assert code == 554
    assert await client.at_eof()


async def test_non_ascii_address_needs_smtputf8(relay):
    client = await mx_client(relay)
    code, lines = await client.cmd("MAIL FROM:<jörg@elsewhere.test>")
    assert code == 553 and lines[0].startswith("5.6.7")
    code, _ = await client.cmd("MAIL FROM:<jörg@elsewhere.test> SMTPUTF8")
    assert code == 250


async def test_bad_base64_in_auth(relay):
    client = await RawSMTP.connect("127.0.0.1", relay.ports["submission"])
    await client.cmd("EHLO client.test")
    await client.starttls(relay.client_tls(), HOSTNAME)
    await client.cmd("EHLO client.test")
    code, lines = await client.cmd("AUTH PLAIN %%%not-base64%%%")
    assert code == 501 and lines[0].startswith("5.5.2")
    code, lines = await client.cmd("AUTH LOGIN")
    assert code == 334
    code, lines = await client.cmd("!!!")
    assert code == 501 and lines[0].startswith("5.5.2")
    code, _ = await client.auth_plain(USER, PASSWORD)
    assert code == 235
    await client.close()


async def test_auth_login_dialogue(relay):
    import base64

    client = await RawSMTP.connect("127.0.0.1", relay.ports["submission_tls"],
                                   tls=relay.client_tls(), server_hostname=HOSTNAME)
    await client.cmd("EHLO client.test")
    code, lines = await client.cmd("AUTH LOGIN")
    assert code == 334 and base64.b64decode(lines[0]) == b"Username:"
    code, lines = await client.cmd(base64.b64encode(USER.encode()).decode())
    assert code == 334 and base64.b64decode(lines[0]) == b"Password:"
    code, _ = await client.cmd(base64.b64encode(PASSWORD.encode()).decode())
    assert code == 235


async def test_idle_client_is_dropped(env):
    env.write_config(limits={"command_timeout": "1s", "auth_failure_delay": "0s"})
    env.add_user()
    await env.start()
    client = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
    code, lines = await client.reply(timeout=5)
    assert code == 421 and lines[0].startswith("4.4.2")
    assert await client.at_eof()


async def test_the_timeout_counts_from_the_last_command_in_and_out_of_a_transaction(env):
    env.write_config(limits={"command_timeout": "1s", "auth_failure_delay": "0s"})
    env.add_user()
    await env.start()
    client = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
    await client.cmd("EHLO client.test")
    loop = asyncio.get_running_loop()
    started = loop.time()
    # A client that keeps talking stays, well past one timeout period...
    for _ in range(5):
        await asyncio.sleep(0.6)
        assert (await client.cmd("NOOP"))[0] == 250
    assert (await client.cmd("MAIL FROM:<a@elsewhere.test>"))[0] == 250
    assert loop.time() - started > 3
    # ...and goes once it is silent for one, inside a transaction too.
    silent = loop.time()
    code, lines = await client.reply(timeout=5)
    assert code == 421 and lines[0].startswith("4.4.2")
    assert 0.9 < loop.time() - silent < 2.5
    assert await client.at_eof()


async def test_too_many_errors_close_the_session(relay):
    client = await mx_client(relay)
    for _ in range(relay.server.config.limits.max_errors):
        code, _ = await client.cmd("BOGUS")
    code, _lines = await client.reply()
    assert code == 421
    assert await client.at_eof()


async def test_smuggled_end_of_data_stays_in_the_message(relay):
    client = await mx_client(relay)
    await client.cmd("MAIL FROM:<a@elsewhere.test>")
    await client.cmd(f"RCPT TO:<{USER}>")
    await client.cmd("DATA")
    await client.send(b"Subject: smuggle\r\n\r\nhello\n.\nMAIL FROM:<evil@elsewhere.test>\r\n"
                      b"RCPT TO:<me@example.com>\r\nDATA\r\nSubject: injected\r\n\r\n.\r\n")
    code, _ = await client.reply()
    assert code == 250
    assert (await client.cmd("QUIT"))[0] == 221
    [stored] = await relay.wait_mailbox(1)
    assert b"Subject: injected" in stored, "the smuggled part is body text of one message"
    await asyncio.sleep(0.2)
    assert len(relay.mailbox()) == 1


@pytest.mark.parametrize("port", ["smtp", "submission"])
async def test_connection_limit_per_ip(env, port):
    env.write_config(limits={"max_connections_per_ip": 2, "auth_failure_delay": "0s"})
    env.add_user()
    await env.start()
    first = await RawSMTP.connect("127.0.0.1", env.ports[port])
    second = await RawSMTP.connect("127.0.0.1", env.ports[port])
    third = await RawSMTP.connect("127.0.0.1", env.ports[port], greeting=False)
    code, lines = await third.reply()
    assert code == 421 and lines[0].startswith("4.7.0")
    await first.cmd("QUIT")
    await first.close()
    # The slot is free once the server has closed its side (no fixed sleep: a loaded
    # machine may take longer than any guess).
    for _ in range(100):
        fourth = await RawSMTP.connect("127.0.0.1", env.ports[port], greeting=False)
        code, _ = await fourth.reply()
        if code == 220:
            break
        await fourth.close()
        await asyncio.sleep(0.05)
    assert (await fourth.cmd("NOOP"))[0] == 250
    await second.close()


@pytest.mark.parametrize("sequence", [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\r.\r\n"])
async def test_smuggling_sequences_never_end_the_message(relay, sequence):
    client = await mx_client(relay)
    await client.cmd("MAIL FROM:<a@elsewhere.test>")
    await client.cmd(f"RCPT TO:<{USER}>")
    await client.cmd("DATA")
    await client.send(b"Subject: smuggle\r\n\r\nfirst" + sequence +
                      b"MAIL FROM:<evil@elsewhere.test>\r\nRCPT TO:<me@example.com>\r\nDATA\r\n"
                      b"Subject: injected\r\n\r\nsecond\r\n.\r\n")
    code, _ = await client.reply()
    assert code == 250
    assert (await client.cmd("NOOP"))[0] == 250, "no stray replies from an injected session"
    await client.cmd("QUIT")
    await client.close()
    [stored] = await relay.wait_mailbox(1)
    assert b"first" in stored and b"Subject: injected" in stored
    await asyncio.sleep(0.2)
    assert len(relay.mailbox()) == 1


async def test_nul_bytes_in_commands_are_refused(relay):
    client = await mx_client(relay)
    code, lines = await client.cmd(b"MAIL FROM:<a\x00b@elsewhere.test>")
    assert code == 500 and lines[0].startswith("5.5.2")
    assert (await client.cmd("MAIL FROM:<a@elsewhere.test>"))[0] == 250
    await client.close()
