"""The mail log (README, "Mail log"): one line per event on ``mailrelay.mail``, in the
documented fixed format, from a real server handling real sessions."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys

import pytest

from mailrelay.cli.serve import _stderr_is_journal
from mailrelay.ops.events import format_line
from tests.support.client import RawSMTP
from tests.support.relay import HOSTNAME, PASSWORD, USER, wait_for
from tests.support.sink import SinkBehaviour

FIELD = re.compile(r'([a-z_]+)=("(?:[^"\\]|\\.)*"|[^\s"]+)(?: |$)')
MESSAGE = b"From: me@example.com\r\nSubject: logged\r\n\r\nhello\r\n"


def parse(line: str) -> tuple[str, list[str], dict[str, str]]:
    """(event, keys in order, values with the quotes taken off); every byte accounted for."""
    event, _, rest = line.partition(" ")
    pairs = FIELD.findall(rest)
    assert "".join(f"{k}={v} " for k, v in pairs).rstrip() == rest, line
    values = {k: (v[1:-1].replace('\\"', '"').replace("\\\\", "\\") if v.startswith('"')
                  else v) for k, v in pairs}
    return event, [k for k, _ in pairs], values


def mail_log(caplog) -> list[tuple[str, list[str], dict[str, str]]]:
    return [parse(r.getMessage()) for r in caplog.records if r.name == "mailrelay.mail"]


def test_values_are_quoted_and_escaped():
    line = format_line("auth-failed", [("ip", "127.0.0.1"), ("user", 'a "b"\\\n'),
                                       ("size", 12), ("skipped", None), ("to", "<a b@c>")])
    assert line == r'auth-failed ip=127.0.0.1 user="a \"b\"\\\x0a" size=12 to="<a b@c>"'
    assert "\n" not in format_line("x", [("reply", "x" * 1000 + "\n")])
    assert len(format_line("x", [("reply", "x" * 1000)])) < 400


async def test_sessions_and_deliveries_are_logged(relay, caplog):
    caplog.set_level(logging.INFO, logger="mailrelay.mail")
    env = relay

    # Port 25: refused RCPTs and DATA, each with its reply.
    reader, writer = await asyncio.open_connection("127.0.0.1", env.ports["smtp"])
    client = RawSMTP(reader, writer)
    assert (await client.reply())[0] == 220
    assert (await client.cmd("EHLO client.test"))[0] == 250
    assert (await client.cmd("MAIL FROM:<alice@remote.test>"))[0] == 250
    assert (await client.cmd("RCPT TO:<nobody@example.com>"))[0] == 550
    assert (await client.cmd("RCPT TO:<bob@elsewhere.test>"))[0] == 554
    assert (await client.cmd("DATA"))[0] == 554
    assert (await client.cmd("QUIT"))[0] == 221
    await client.close()

    # Submission: delivered to the sink.
    await env.submit(["friend@remote.test"], MESSAGE)
    await env.sink.until(1)
    await env.wait_queue_empty()

    lines = mail_log(caplog)
    events = [event for event, _, _ in lines]
    for _, keys, values in lines:
        if "ip" in values:
            assert keys[0] in ("ip", "id") and values["ip"].startswith("127.0.0."), keys

    rejects = [(keys, values) for event, keys, values in lines if event == "reject"]
    assert [v["cmd"] for _, v in rejects] == ["RCPT", "RCPT", "DATA"]
    keys, first = rejects[0]
    assert keys == ["ip", "port", "cmd", "from", "to", "reply", "session"]
    assert first["port"] == "smtp" and first["from"] == "<alice@remote.test>"
    assert first["to"] == "<nobody@example.com>" and first["reply"].startswith("550 5.1.1")
    assert rejects[1][1]["reply"].startswith("554 5.7.1")
    assert rejects[2][1]["reply"] == "554 5.5.1 No valid recipients"

    [(keys, queued)] = [(k, v) for e, k, v in lines if e == "queued"]
    assert keys == ["id", "ip", "port", "user", "from", "to", "size", "session"]
    assert queued["user"] == USER and queued["to"] == "<friend@remote.test>"
    assert queued["port"] == "submission" and int(queued["size"]) > len(MESSAGE)

    [(keys, delivery)] = [(k, v) for e, k, v in lines if e == "delivery"]
    assert keys == ["id", "to", "result", "final", "host", "via", "tls", "attempt", "reply"]
    assert delivery["id"] == queued["id"] and delivery["result"] == "sent"
    assert delivery["host"] == "mx1.remote.test" and delivery["final"] == "yes"
    assert delivery["via"] == "mx"
    assert delivery["tls"] in ("verified", "unverified") and delivery["attempt"] == "1"

    session = queued["session"]
    in_session = [e for e, _, v in lines if v.get("session") == session]
    assert in_session == ["connect", "tls", "auth-ok", "queued", "disconnect"]
    assert events.count("connect") == events.count("disconnect") == 2


async def test_inbound_mail_is_logged_with_its_check_results(relay, caplog):
    caplog.set_level(logging.INFO, logger="mailrelay.mail")
    relay.dns.add("remote.test", "TXT", "v=spf1 ip4:127.0.0.1 -all")
    client = await RawSMTP.connect("127.0.0.1", relay.ports["smtp"])
    await client.cmd("EHLO mx.remote.test")
    message = b"From: alice@remote.test\r\nSubject: in\r\n\r\nHi.\r\n"
    assert await client.send_message("alice@remote.test", [USER], message) == 250
    await client.close()
    await relay.wait_mailbox(1)
    [(keys, queued)] = [(k, v) for e, k, v in mail_log(caplog) if e == "queued"]
    assert keys == ["id", "ip", "port", "from", "to", "size", "session", "spf", "dkim", "dmarc"]
    assert (queued["spf"], queued["dkim"], queued["dmarc"]) == ("pass", "none", "none")


async def test_bounce_is_logged_with_its_dsn(relay, caplog):
    caplog.set_level(logging.INFO, logger="mailrelay.mail")
    relay.dns.add("nullmx.test", "MX", (0, "."))
    await relay.submit(["friend@nullmx.test"], MESSAGE)
    await relay.wait_mailbox(1)
    lines = mail_log(caplog)
    [queued] = [v for e, _, v in lines if e == "queued"]
    [failed] = [v for e, _, v in lines if e == "delivery" and v["result"] == "permanent"]
    assert failed["id"] == queued["id"] and failed["host"] == "-" and failed["tls"] == "-"
    assert failed["reply"].startswith("556 5.1.10")
    [(keys, dsn)] = [(k, v) for e, k, v in lines if e == "dsn"]
    assert keys == ["id", "for", "to", "kind", "rcpts"]
    assert dsn["for"] == queued["id"] and dsn["to"] == f"<{USER}>"
    assert dsn["kind"] == "failed" and dsn["rcpts"] == "<friend@nullmx.test>"
    [local] = [v for e, _, v in lines if e == "delivery" and v["id"] == dsn["id"]]
    assert local["result"] == "sent" and local["host"] == "-" and local["via"] == "local"


@pytest.mark.parametrize("sender", ["someone@else.test", ""])
async def test_refused_sender_names_the_user(relay, caplog, sender):
    caplog.set_level(logging.INFO, logger="mailrelay.mail")
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.ports["submission"])
    client = RawSMTP(reader, writer)
    assert (await client.reply())[0] == 220
    assert (await client.cmd("EHLO client.test"))[0] == 250
    await client.starttls(relay.client_tls(), HOSTNAME)
    assert (await client.cmd("EHLO client.test"))[0] == 250
    assert (await client.auth_plain(USER, PASSWORD))[0] == 235
    assert (await client.cmd(f"MAIL FROM:<{sender}>"))[0] == 550
    await client.close()
    [(keys, reject)] = [(k, v) for e, k, v in mail_log(caplog) if e == "reject"]
    assert keys == ["ip", "port", "cmd", "user", "from", "reply", "session"]
    assert reject["user"] == USER and reject["from"] == f"<{sender}>"
    assert reject["reply"].startswith("550 5.7.1")


def test_time_is_left_out_only_under_journald(tmp_path, monkeypatch):
    """systemd's JOURNAL_STREAM names stderr's device:inode when stderr is the journal."""
    with open(tmp_path / "stderr", "w") as stderr:
        monkeypatch.setattr(sys, "stderr", stderr)
        st = os.fstat(stderr.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert _stderr_is_journal()
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")  # inherited
        assert not _stderr_is_journal()
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not _stderr_is_journal()


async def test_forwarded_mail_keeps_its_original_recipient(env, caplog):
    """The catch-all sends random@example.com's mail to me@gmail.test: the queued and
    delivery lines, `queue show` and `queue remove`'s line (on mailrelay.mail too) all
    name random@example.com as orig_to, for grep and fail2ban."""
    caplog.set_level(logging.INFO, logger="mailrelay.mail")
    (env.config_dir / "domains" / "example.com" / "aliases").write_text(
        "postmaster: me\n*: me@gmail.test\n")
    env.add_mx("gmail.test", (10, "mx.gmail.test", "127.0.0.7"))
    gmail = env.add_sink("127.0.0.7", hostname="mx.gmail.test")
    gmail.behaviour = SinkBehaviour(rcpt=lambda address: "451 4.2.1 try later")
    env.write_config(delivery={"retry_intervals": ["1h"]})
    await env.start()
    client = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
    await client.cmd("EHLO mx.remote.test")
    message = b"From: alice@remote.test\r\nSubject: to a catch-all\r\n\r\nHi.\r\n"
    assert await client.send_message("alice@remote.test", ["Random@example.com"], message) \
        == 250
    await client.close()
    [item] = env.server.queue.items.values()
    await wait_for(lambda: item.attempts == 1, what="the first attempt")

    [(keys, queued)] = [(k, v) for e, k, v in mail_log(caplog) if e == "queued"]
    assert keys == ["id", "ip", "port", "from", "to", "orig_to", "size", "session",
                    "spf", "dkim", "dmarc"]
    assert queued["to"] == "<me@gmail.test>" and queued["orig_to"] == "<Random@example.com>"
    [(keys, delivery)] = [(k, v) for e, k, v in mail_log(caplog) if e == "delivery"]
    assert keys == ["id", "to", "orig_to", "result", "final", "host", "via", "tls",
                    "attempt", "reply"]
    assert delivery["orig_to"] == "<Random@example.com>" and delivery["final"] == "no"

    shown = await asyncio.to_thread(queue_cli, env, "show", item.id)
    assert "pending  me@gmail.test (for Random@example.com)  451 4.2.1 try later" in shown
    removed = await asyncio.to_thread(queue_cli, env, "remove", item.id)
    assert removed == f"removed {item.id}\n"
    [(keys, line)] = [(k, v) for e, k, v in mail_log(caplog) if e == "removed"]
    assert keys == ["id", "from", "to", "orig_to"]
    assert line["id"] == item.id and line["from"] == f"<{item.sender}>"  # the SRS sender
    assert (line["to"], line["orig_to"]) == ("<me@gmail.test>", "<Random@example.com>")


def queue_cli(env, *argv: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "mailrelay.cli.main", "queue", *argv, "-c", str(env.config_dir)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout
