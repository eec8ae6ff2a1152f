"""Outbound SMTPUTF8 (RFC 6531), through the real server to sinks on loopback: one that
advertises SMTPUTF8 and one that does not (issue 16, row 9)."""

from __future__ import annotations

import logging

from tests.support.relay import USER, delivery_lines

HEADERS = f"From: {USER}\r\nTo: someone\r\nSubject: t\r\nMessage-ID: <u.1@example.com>\r\n"


async def submit(env, recipients: list[str], data: bytes | None = None) -> None:
    await env.submit_utf8(recipients, data or (HEADERS + "\r\nhello\r\n").encode())


def mx(env, domain: str, ip: str, smtputf8: bool):
    env.add_mx(domain, (10, f"mx.{domain}", ip))
    return env.add_sink(ip, hostname=f"mx.{domain}", smtputf8=smtputf8)


async def test_utf8_address_goes_with_smtputf8_where_offered(env):
    sink = mx(env, "remote.test", "127.0.0.2", smtputf8=True)
    await env.start()
    await submit(env, ["pingüino@remote.test"])
    [got] = await sink.until(1)
    assert got.recipients == ["pingüino@remote.test"]
    assert "SMTPUTF8" in got.mail_options
    assert "BODY=8BITMIME" in got.mail_options  # as chasquid: whenever offered


async def test_utf8_address_fails_for_good_where_smtputf8_is_not_offered(env, caplog):
    caplog.set_level(logging.INFO)
    sink = mx(env, "remote.test", "127.0.0.2", smtputf8=False)
    await env.start()
    await submit(env, ["pingüino@remote.test", "plain@remote.test"])
    [got] = await sink.until(1)
    assert got.recipients == ["plain@remote.test"]  # the ASCII one still goes
    assert "SMTPUTF8" not in got.mail_options
    [dsn] = await env.wait_mailbox(1)
    assert b"Status: 5.6.7" in dsn
    assert "pingüino@remote.test".encode() in dsn
    assert b"does not support SMTPUTF8" in dsn
    [line] = [x for x in delivery_lines(caplog) if "pingüino" in x]
    assert "result=permanent final=yes" in line and 'reply="553 5.6.7 ' in line
    await env.wait_queue_empty()


async def test_idn_domain_with_ascii_local_part_goes_as_a_label(env):
    sink = mx(env, "xn--bcher-kva.test", "127.0.0.3", smtputf8=False)
    await env.start()
    await submit(env, ["reader@bücher.test"])
    [got] = await sink.until(1)
    assert got.recipients == ["reader@xn--bcher-kva.test"]
    assert "SMTPUTF8" not in got.mail_options


async def test_utf8_headers_ask_for_smtputf8_only_where_offered(env):
    data = (HEADERS.replace("Subject: t", "Subject: café") + "\r\nhello\r\n").encode()
    new = mx(env, "new.test", "127.0.0.2", smtputf8=True)
    old = mx(env, "old.test", "127.0.0.3", smtputf8=False)
    await env.start()
    await submit(env, ["a@new.test", "b@old.test"], data)
    [to_new] = await new.until(1)
    [to_old] = await old.until(1)
    assert "SMTPUTF8" in to_new.mail_options
    # Delivered as before rather than bounced: see remote.py's docstring.
    assert "SMTPUTF8" not in to_old.mail_options and "BODY=8BITMIME" in to_old.mail_options
    assert "Subject: café".encode() in to_old.data
