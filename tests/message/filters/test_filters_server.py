"""The filters on the real server (issue 20 items 1-3): rspamd and chasquid's hooks after
DATA, before queueing, with the real rspamd, the real spamd behind chasquid's stock
post-data hook (unchanged), and hooks and rspamds that misbehave.

The server is the in-process one of tests/support/relay.py on loopback ports: real SMTP,
real TLS, the test DNS server, aiosmtpd sinks for gmail.test and remote.test.
"""

from __future__ import annotations

import logging
import re
import shutil

import dkim
import pytest
import yaml

from bench.ports import free_port
from mailrelay.message.headers import get_all, parse_headers
from tests.message.filters.test_hooks import STOCK_HOOK, tool_path, write_hook
from tests.message.filters.test_rspamd import FakeRspamd, answer
from tests.support.client import RawSMTP
from tests.support.dkim_dns import dnsfunc_for, publish_new_key
from tests.support.spam_daemons import GTUBE, GTUBE_REWRITE_SUBJECT
from tests.support.transaction import data_rejects, no_tracebacks, port_25, submit

CLEAN = (b"From: Alice <alice@sender.test>\r\nTo: anything@example.com\r\n"
         b"X-Spam-Status: No, forged by the sender\r\nSubject: Lunch on Thursday\r\n"
         b"Message-ID: <1@sender.test>\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\n\r\n"
         b"Shall we meet at noon?\r\n")
SPAM = CLEAN.replace(b"Shall we meet at noon?", GTUBE.encode())
OWN = (b"From: Me <me@example.com>\r\nTo: friend@remote.test\r\nSubject: Lunch\r\n"
       b"Message-ID: <2@example.com>\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\n\r\n"
       b"Shall we meet at noon?\r\n")


@pytest.fixture
def world(env):
    """example.com: the user me (a local Maildir) and a catch-all to me@gmail.test; a DKIM
    key in DNS; sinks for gmail.test and remote.test. Not started: each test sets its
    filters first (``start``)."""
    env.gmail = env.add_sink("127.0.0.7", hostname="mx.gmail.test")
    env.remote = env.add_sink("127.0.0.2", hostname="mx.remote.test")
    env.add_mx("gmail.test", (10, "mx.gmail.test", "127.0.0.7"))
    env.add_mx("remote.test", (10, "mx.remote.test", "127.0.0.2"))
    return env


async def start(env, caplog, aliases: str = "*: me@gmail.test\n", **filters):
    env.write_config(filters=filters, limits={"auth_failure_delay": "0s"})
    env.add_user()
    domain_dir = env.config_dir / "domains" / "example.com"
    (domain_dir / "aliases").write_text(aliases)
    if not list(domain_dir.glob("dkim:*.pem")):
        publish_new_key(env.dns, domain_dir, "example.com", "rsa1", "rsa2048")
    await env.start()
    caplog.set_level(logging.DEBUG, "mailrelay.filters")
    caplog.set_level(logging.INFO, "mailrelay.mail")
    caplog.clear()  # what start logged (the hooks found) is not a message's


def filter_lines(caplog, level: int = logging.INFO) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "mailrelay.filters" and r.levelno >= level]


def runs(env, name: str, action: str) -> float:
    value = env.server.events.registry.sample(
        "mailrelay_filter_runs_total", {"filter": name, "action": action})
    return value or 0.0


def errors(env, name: str, error: str) -> float:
    value = env.server.events.registry.sample(
        "mailrelay_filter_errors_total", {"filter": name, "error": error})
    return value or 0.0


def header_of(message: bytes) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, value in parse_headers(message):
        found.setdefault(name, []).append(value)
    return found


def as_queued(stored: bytes) -> bytes:
    """A Maildir message without the Return-Path: and Delivered-To: its delivery added."""
    return re.sub(rb"\A(?:Return-Path: [^\r\n]*\r\n)?(?:Delivered-To: [^\r\n]*\r\n)?", b"",
                  stored)


async def nothing_queued(env) -> None:
    assert not env.server.queue.items, list(env.server.queue.items)
    assert not list((env.data_dir / "queue").glob("*.msg"))


# --- rspamd, the real one --------------------------------------------------------------------


async def test_rspamd_refuses_gtube_at_data_and_forwards_clean_mail_marked(rspamd, world,
                                                                          caplog):
    env = world
    await start(env, caplog, rspamd={"url": rspamd.url})

    code, text = await port_25(env, SPAM, rcpt="anything@example.com")
    assert (code, text[:5]) == (550, "5.7.1"), text
    await nothing_queued(env)
    [reject] = data_rejects(caplog)
    assert 'reply="550 5.7.1' in reject

    assert (await port_25(env, CLEAN, rcpt="anything@example.com"))[0] == 250
    [forwarded] = await env.gmail.until(1)
    fields = header_of(forwarded.data)
    assert fields["X-Spam-Action"] == ["no action"]
    assert re.fullmatch(r"\d+\.\d\d/15\.00", fields["X-Spam-Score"][0])
    assert fields["X-Spam-Status"][0].startswith("No, score=")  # the sender's went
    assert (runs(env, "rspamd", "reject"), runs(env, "rspamd", "accept")) == (1, 1)
    # Our users' mail is not rspamd's business by default.
    assert (await submit(env, OWN.replace(b"noon?", GTUBE.encode())))[0] == 250
    [sent] = await env.remote.until(1)
    assert b"X-Spam-Action" not in sent.data
    no_tracebacks(caplog)
    await env.wait_queue_empty()
    assert len(env.gmail.messages) == 1


async def test_rspamd_checks_submissions_when_asked_before_they_are_signed(rspamd, world,
                                                                          caplog):
    env = world
    await start(env, caplog, rspamd={"url": rspamd.url, "submission": True})
    code, text = await submit(env, OWN.replace(b"noon?", GTUBE.encode()))
    assert (code, text[:5]) == (550, "5.7.1"), text
    await nothing_queued(env)
    # "rewrite subject": the Subject changes before DKIM signs it, so the signature holds.
    assert (await submit(env, OWN.replace(b"noon?", GTUBE_REWRITE_SUBJECT.encode())))[0] == 250
    [sent] = await env.remote.until(1)
    [subject] = get_all(parse_headers(sent.data), "Subject")
    assert subject != "Lunch" and "Lunch" in subject, subject
    assert b"DKIM-Signature" in sent.data
    assert dkim.DKIM(sent.data).verify(dnsfunc=dnsfunc_for(env.dns))


@pytest.mark.parametrize(("on_error", "code"), [("accept", 250), ("tempfail", 451)])
async def test_rspamd_down_fails_open_or_closed_with_one_line(world, caplog, on_error, code):
    env = world
    await start(env, caplog, rspamd={"url": f"http://127.0.0.1:{free_port()}",
                                     "on_error": on_error})
    reply, text = await port_25(env, CLEAN, rcpt="me@example.com")
    assert reply == code, text
    [line] = filter_lines(caplog)
    assert line.levelno == logging.WARNING and "cannot connect" in line.getMessage()
    assert errors(env, "rspamd", "connect") == 1
    if code == 250:
        [stored] = await env.wait_mailbox(1)
        assert b"Shall we meet" in stored  # accepted unchecked: nothing lost
    else:
        assert text.startswith("4.7.1")
        await nothing_queued(env)
    no_tracebacks(caplog)


@pytest.mark.parametrize(("body", "on_error", "code"), [
    (b"<html>not rspamd</html>", "accept", 250),
    (b'{"action": "explode", "score": 1}', "tempfail", 451),
])
async def test_rspamd_answering_garbage(world, caplog, body, on_error, code):
    env = world
    async with FakeRspamd(answer(body)) as fake:
        await start(env, caplog, rspamd={"url": fake.url, "on_error": on_error})
        assert (await port_25(env, CLEAN, rcpt="me@example.com"))[0] == code
        assert len(fake.requests) == 1
    [line] = filter_lines(caplog)
    assert line.levelno == logging.WARNING
    no_tracebacks(caplog)


# --- chasquid's stock post-data hook with spamc and a real spamd ----------------------------


async def test_stock_hook_with_spamd_refuses_gtube_and_marks_clean_mail(spamd, world, caplog,
                                                                       tmp_path, monkeypatch):
    env = world
    (env.config_dir / "hooks").mkdir(parents=True, exist_ok=True)
    shutil.copy2(STOCK_HOOK, env.config_dir / "hooks" / "post-data")  # unchanged
    bin_dir = tmp_path / "bin"
    monkeypatch.setenv("PATH", tool_path(bin_dir, "mktemp", "cat", "rm"))
    spamd.spamc_wrapper(bin_dir)
    await start(env, caplog)

    code, text = await port_25(env, SPAM, rcpt="me@example.com")
    assert (code, text) == (554, "5.7.1 spam detected")
    await nothing_queued(env)
    # Submissions go through the hook too, as in chasquid.
    code, text = await submit(env, OWN.replace(b"noon?", GTUBE.encode()))
    assert (code, text) == (554, "5.7.1 spam detected")
    await nothing_queued(env)
    assert len(data_rejects(caplog)) == 2

    assert (await port_25(env, CLEAN, rcpt="me@example.com"))[0] == 250
    [stored] = await env.wait_mailbox(1)
    assert as_queued(stored).startswith(b"X-Spam-Score: 0.0/5.0\r\nReceived: from ")  # on top
    assert (runs(env, "post-data", "reject"), runs(env, "post-data", "accept")) == (2, 1)
    no_tracebacks(caplog)


# --- hooks that misbehave ---------------------------------------------------------------------


@pytest.mark.parametrize(("script", "error"), [
    ("#!/bin/sh\nsleep 30\n", "timeout"),
    ("#!/bin/sh\nhead -c 5000000 /dev/zero | tr '\\0' x\n", "output-too-large"),
    ("#!/bin/sh\necho 'X-A: 1'\nkill -9 $$\n", "signal"),
])
async def test_a_bad_hook_gets_451_and_one_line_and_nothing_is_queued(world, caplog, script,
                                                                      error):
    env = world
    write_hook(env.config_dir / "hooks" / "post-data", script)
    await start(env, caplog, hook_timeout="1s")
    code, text = await port_25(env, CLEAN, rcpt="me@example.com")
    assert (code, text[:5]) == (451, "4.3.0"), text
    await nothing_queued(env)
    [line] = filter_lines(caplog)
    assert line.levelno == logging.WARNING and "\n" not in line.getMessage()
    assert len(data_rejects(caplog)) == 1
    assert errors(env, "post-data", error) == 1
    no_tracebacks(caplog)
    # The session goes on: the client may try again, and other mail flows.
    assert (await submit(env, OWN))[0] == 451


async def test_a_hook_that_is_not_executable_is_no_hook(world, caplog):
    env = world
    write_hook(env.config_dir / "hooks" / "post-data", "#!/bin/sh\nexit 20\n", mode=0o644)
    env.write_config()
    caplog.set_level(logging.WARNING, "mailrelay.filters")
    await start(env, caplog)
    assert (await port_25(env, CLEAN, rcpt="me@example.com"))[0] == 250
    await env.wait_mailbox(1)
    assert filter_lines(caplog) == []  # reported once, at start, not per message


async def test_the_hook_sees_chasquids_environment_on_the_server(world, caplog, tmp_path):
    env = world
    dump = tmp_path / "dump"
    write_hook(env.config_dir / "hooks" / "post-data",
               f"#!/bin/sh\nenv > {dump}.$$.env\ncat > {dump}.$$.in\necho 'X-Seen: yes'\n")
    env.dns.add("sender.test", "TXT", "v=spf1 ip4:127.0.0.1 -all")
    await start(env, caplog)
    assert (await port_25(env, CLEAN, rcpt="me@example.com"))[0] == 250
    assert (await submit(env, OWN))[0] == 250
    dumps = sorted(tmp_path.glob("dump.*.env"), key=lambda p: p.stat().st_mtime_ns)
    inbound, own = ({line.split("=", 1)[0]: line.split("=", 1)[1]
                     for line in p.read_text().splitlines() if "=" in line} for p in dumps)
    assert (inbound["AUTH_AS"], inbound["SPF_PASS"], inbound["FROM_LOCAL_DOMAIN"],
            inbound["ON_TLS"]) == ("", "1", "0", "0")
    assert (inbound["MAIL_FROM"], inbound["RCPT_TO"]) == ("alice@sender.test", "me@example.com")
    assert re.fullmatch(r"127\.0\.0\.1:\d+", inbound["REMOTE_ADDR"])
    assert (own["AUTH_AS"], own["SPF_PASS"], own["FROM_LOCAL_DOMAIN"], own["ON_TLS"]) == (
        "me@example.com", "0", "1", "1")
    assert inbound["PWD"] == str(env.config_dir)
    # stdin: the message as it will be queued, our Received: and results on top.
    stdin = sorted(tmp_path.glob("dump.*.in"), key=lambda p: p.stat().st_mtime_ns)
    assert stdin[0].read_bytes().startswith(b"Received: from mx.sender.test")
    assert b"Authentication-Results: mail.example.com;" in stdin[0].read_bytes()
    assert stdin[0].read_bytes().endswith(CLEAN)
    [stored] = await env.wait_mailbox(1)
    assert as_queued(stored).startswith(b"X-Seen: yes\r\nReceived: ")
    [sent] = await env.remote.until(1)
    # Our own mail: the hook's field above everything, the signature still good.
    assert sent.data.startswith(b"X-Seen: yes\r\nReceived: ")
    assert dkim.DKIM(sent.data).verify(dnsfunc=dnsfunc_for(env.dns))


async def test_hooks_and_rspamd_settings_are_rebuilt_on_reload(world, caplog):
    env = world
    await start(env, caplog)
    assert (await port_25(env, CLEAN, rcpt="me@example.com"))[0] == 250
    write_hook(env.config_dir / "hooks" / "post-data", "#!/bin/sh\necho 'X-Hooked: yes'\n")
    settings = yaml.safe_load((env.config_dir / "mailrelay.yaml").read_text())
    settings["filters"] = {"rspamd": {"url": f"http://127.0.0.1:{free_port()}"}}
    (env.config_dir / "mailrelay.yaml").write_text(yaml.safe_dump(settings))
    caplog.set_level(logging.WARNING, "mailrelay")
    assert env.server.reload()
    assert not [r for r in caplog.records if "need a restart" in r.getMessage()]
    assert (await port_25(env, CLEAN, rcpt="me@example.com"))[0] == 250  # rspamd: fails open
    first, second = await env.wait_mailbox(2)
    assert b"X-Hooked" not in first and as_queued(second).startswith(b"X-Hooked: yes\r\n")
    assert errors(env, "rspamd", "connect") == 1


# --- alias-resolve ----------------------------------------------------------------------------

ALIAS_HOOK = """#!/bin/sh
case "$1" in
  dyn@example.com) echo "me, friend@remote.test" ;;
  piped@example.com) echo "| tee {out}" ;;
  broken@example.com) exit 1 ;;
esac
"""


async def test_alias_resolve_hook_answers_for_addresses_the_aliases_do_not_know(world, caplog,
                                                                             tmp_path):
    env = world
    out = tmp_path / "piped"
    write_hook(env.config_dir / "hooks" / "alias-resolve", ALIAS_HOOK.format(out=out))
    await start(env, caplog, aliases="postmaster: me\n")
    client = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
    await client.cmd("EHLO mx.sender.test")
    assert (await client.cmd("MAIL FROM:<alice@sender.test>"))[0] == 250
    assert (await client.cmd("RCPT TO:<dyn@example.com>"))[0] == 250
    assert (await client.cmd("RCPT TO:<piped@example.com>"))[0] == 250
    code, text = await client.cmd("RCPT TO:<nobody@example.com>")
    assert (code, text[0][:5]) == (550, "5.1.1")
    code, text = await client.cmd("RCPT TO:<broken@example.com>")
    assert (code, text[0][:5]) == (451, "4.3.0")
    assert (await client.cmd("DATA"))[0] == 354
    client.writer.write(CLEAN + b".\r\n")
    assert (await client.reply())[0] == 250
    await client.close()
    # The hook's targets: the user me (a local mailbox), a remote address (forwarded,
    # with SRS), a pipe.
    [stored] = await env.wait_mailbox(1)
    assert b"Shall we meet" in stored
    [forwarded] = await env.remote.until(1)
    assert forwarded.recipients == ["friend@remote.test"]
    assert forwarded.sender.startswith("SRS0=")
    await env.wait_queue_empty()
    assert b"Shall we meet" in out.read_bytes()
    assert (runs(env, "alias-resolve", "accept"), runs(env, "alias-resolve", "reject"),
            runs(env, "alias-resolve", "tempfail")) == (2, 1, 1)
    no_tracebacks(caplog)


async def test_alias_resolve_hook_is_asked_without_suffix_and_drop_characters(world, caplog,
                                                                            tmp_path):
    """As chasquid: the address as written first, then its lookup form (chasquid's
    t-04 alias-resolve with "vi.cu.ña+abc@")."""
    env = world
    asked = tmp_path / "asked"
    write_hook(env.config_dir / "hooks" / "alias-resolve",
               f'#!/bin/sh\necho "$1" >> {asked}\n'
               '[ "$1" = "dyn@example.com" ] && echo "me"\nexit 0\n')
    await start(env, caplog, aliases="postmaster: me\n")
    assert (await port_25(env, CLEAN, rcpt="d.y.n+abc@example.com"))[0] == 250
    await env.wait_mailbox(1)
    assert asked.read_text().split() == ["d.y.n+abc@example.com", "dyn@example.com"]
    no_tracebacks(caplog)


async def test_alias_resolve_hook_is_not_asked_where_a_catch_all_answers(world, caplog,
                                                                        tmp_path):
    env = world
    asked = tmp_path / "asked"
    write_hook(env.config_dir / "hooks" / "alias-resolve", f"#!/bin/sh\necho $1 >> {asked}\n")
    await start(env, caplog)  # "*: me@gmail.test"
    assert (await port_25(env, CLEAN, rcpt="anything@example.com"))[0] == 250
    await env.gmail.until(1)
    assert not asked.exists()
