"""Aliases and forwarding end to end: catch-all to Gmail with SRS, bounces coming back
through the SRS address, pipes, and RCPT checks against the aliases."""

from __future__ import annotations

import re
import sys

import dkim
import pytest

from mailrelay.message.dkim.keys import load_key
from mailrelay.message.dkim.signer import sign
from mailrelay.message.headers import get_all, parse_headers
from tests.support.client import RawSMTP
from tests.support.dkim_dns import dnsfunc_for, publish_new_key
from tests.support.process import start_server
from tests.support.sink import SinkBehaviour

ALICE_MESSAGE = (
    b"From: Alice <alice@sender.test>\r\n"
    b"To: anything@example.com\r\n"
    b"Subject: hello from alice\r\n"
    b"Message-ID: <a1@sender.test>\r\n"
    b"Date: Sun, 22 Nov 2026 10:00:00 +0000\r\n"
    b"\r\n"
    b"Hi there.\r\n"
)


def write_aliases(env, text: str, domain: str = "example.com") -> None:
    directory = env.config_dir / "domains" / domain
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "aliases").write_text(text)


@pytest.fixture
async def forwarding(env, tmp_path):
    """example.com forwards everything to me@gmail.test; sender.test is alice's domain."""
    write_aliases(env, "*: me@gmail.test\n")
    domain_dir = env.config_dir / "domains" / "example.com"
    publish_new_key(env.dns, domain_dir, "example.com", "rsa1", "rsa2048")
    alice_key_path = publish_new_key(env.dns, tmp_path / "sender-keys", "sender.test", "s1",
                                     "rsa2048")
    env.alice_key = load_key(alice_key_path, "sender.test", "s1")
    env.add_mx("gmail.test", (10, "mx.gmail.test", "127.0.0.7"))
    env.add_mx("sender.test", (10, "mx.sender.test", "127.0.0.8"))
    env.dns.add("sender.test", "TXT", "v=spf1 ip4:127.0.0.1 -all")
    env.dns.add("_dmarc.sender.test", "TXT", "v=DMARC1; p=reject")
    env.dns.add("soft.test", "TXT", "v=spf1 ip4:192.0.2.1 ~all")
    env.dns.add("strict.test", "TXT", "v=spf1 ip4:192.0.2.1 ?all")
    env.dns.add("_dmarc.strict.test", "TXT", "v=DMARC1; p=reject")
    env.gmail = env.add_sink("127.0.0.7", hostname="mx.gmail.test")
    env.sender_mx = env.add_sink("127.0.0.8", hostname="mx.sender.test")
    await env.start()
    return env


async def send_port_25(env, sender: str, recipients: list[str], data: bytes) -> int:
    client = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
    await client.cmd("EHLO mx.sender.test")
    code = await client.send_message(sender, recipients, data)
    await client.cmd("QUIT")
    await client.close()
    return code


async def test_catch_all_forward_uses_srs_and_keeps_the_original_signature(forwarding):
    env = forwarding
    signed = sign(ALICE_MESSAGE, [env.alice_key]) + ALICE_MESSAGE
    assert await send_port_25(env, "alice@sender.test", ["anything@example.com"], signed) == 250
    [received] = await env.gmail.until(1)
    assert received.recipients == ["me@gmail.test"]
    assert re.fullmatch(r"SRS0=[^=]{4}=[A-Z2-7]{2}=sender\.test=alice@example\.com",
                        received.sender), received.sender
    dnsfunc = dnsfunc_for(env.dns)
    fields = parse_headers(received.data)
    signatures = get_all(fields, "DKIM-Signature")
    domains = sorted(re.search(r"d=([\w.]+)", s).group(1) for s in signatures)
    assert domains == ["example.com", "sender.test"]
    for index in range(len(signatures)):
        assert dkim.DKIM(received.data).verify(idx=index, dnsfunc=dnsfunc), index
    # Our Authentication-Results records what we saw; the ARC set carries it onwards.
    [results] = get_all(fields, "Authentication-Results")
    assert results.startswith("mail.example.com;")
    assert "spf=pass" in results and "dkim=pass header.d=sender.test" in results
    cv, _, reason = dkim.arc_verify(received.data, dnsfunc=dnsfunc)
    assert cv == dkim.CV_Pass, reason
    assert "dkim=pass" in get_all(fields, "ARC-Authentication-Results")[0]
    await env.wait_queue_empty()


async def test_bounce_to_the_srs_address_reaches_the_original_sender(forwarding):
    env = forwarding
    assert await send_port_25(env, "alice@sender.test", ["x@example.com"], ALICE_MESSAGE) == 250
    [forwarded] = await env.gmail.until(1)
    bounce = b"From: MAILER-DAEMON@gmail.test\r\nSubject: Delivery failure\r\n\r\nnope\r\n"
    # Gmail, as a client of our port 25, bounces to the envelope sender it saw.
    assert await send_port_25(env, "", [forwarded.sender], bounce) == 250
    [returned] = await env.sender_mx.until(1)
    assert returned.recipients == ["alice@sender.test"]
    assert returned.sender == "<>"  # aiosmtpd's spelling of the null sender


async def test_tampered_srs_address_is_refused(forwarding):
    env = forwarding
    assert await send_port_25(env, "alice@sender.test", ["x@example.com"], ALICE_MESSAGE) == 250
    [forwarded] = await env.gmail.until(1)
    local = forwarded.sender.split("@")[0]
    parts = local.split("=")
    parts[1] = "AAAA" if parts[1] != "AAAA" else "BBBB"
    forged = "=".join(parts) + "@example.com"
    client = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
    await client.cmd("EHLO mx.gmail.test")
    await client.cmd("MAIL FROM:<>")
    code, lines = await client.cmd(f"RCPT TO:<{forged}>")
    assert code == 550 and lines[0].startswith("5.1.1")


async def test_real_user_with_suffix_beats_the_catch_all(forwarding):
    env = forwarding
    assert await send_port_25(env, "alice@sender.test", ["me+tag@example.com"],
                              ALICE_MESSAGE) == 250
    [stored] = await env.wait_mailbox(1)
    assert b"Hi there." in stored
    assert env.gmail.messages == []


async def test_alias_targets_local_remote_and_pipe(env, tmp_path):
    out = tmp_path / "piped"
    script = tmp_path / "save.py"
    script.write_text(f"import sys\nopen({str(out)!r}, 'wb').write(sys.stdin.buffer.read())\n")
    write_aliases(env, "team: me, me@gmail.test, archive\n"
                       f"archive: | {sys.executable} {script}\n"
                       "ghost: nobody\n")
    env.add_mx("gmail.test", (10, "mx.gmail.test", "127.0.0.7"))
    gmail = env.add_sink("127.0.0.7", hostname="mx.gmail.test")
    await env.start()
    client = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
    await client.cmd("EHLO mx.sender.test")
    await client.cmd("MAIL FROM:<alice@sender.test>")
    code, lines = await client.cmd("RCPT TO:<ghost@example.com>")
    assert code == 550 and lines[0].startswith("5.1.1"), "alias to unknown locals is refused"
    code, lines = await client.cmd("RCPT TO:<stranger@example.com>")
    assert code == 550 and lines[0].startswith("5.1.1")
    assert (await client.cmd("RCPT TO:<Te.Am@Example.com>"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354
    await client.send(ALICE_MESSAGE + b".")
    assert (await client.reply())[0] == 250
    [stored] = await env.wait_mailbox(1)
    assert b"Hi there." in stored
    [forwarded] = await gmail.until(1)
    assert forwarded.sender.startswith("SRS0=")
    await env.wait_queue_empty()
    assert b"Hi there." in out.read_bytes()


async def test_aliases_reload_keeps_last_good_table(env):
    write_aliases(env, "sales: me\n")
    await env.start()
    client = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
    await client.cmd("EHLO mx.sender.test")
    await client.cmd("MAIL FROM:<alice@sender.test>")
    assert (await client.cmd("RCPT TO:<sales@example.com>"))[0] == 250
    write_aliases(env, "sales me\n")  # broken: no colon
    assert env.server.reload() is False
    assert (await client.cmd("RCPT TO:<sales@example.com>"))[0] == 250
    write_aliases(env, "support: me\n")
    assert env.server.reload() is True
    assert (await client.cmd("RCPT TO:<support@example.com>"))[0] == 250
    assert (await client.cmd("RCPT TO:<sales@example.com>"))[0] == 550


async def test_aliases_edit_reaches_the_running_server(env, tmp_path):
    """`mailrelay aliases edit` with a scripted $EDITOR: the running server (its own
    process, reloaded through SIGHUP) routes by the new file within 2 seconds."""
    import asyncio
    import os
    import subprocess
    import time

    server = await start_server(env)
    try:
        editor = tmp_path / "editor.py"
        editor.write_text("import sys\nopen(sys.argv[1], 'a').write('sales: me\\n')\n")
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "mailrelay.cli.main", "aliases", "edit", "example.com",
             "-c", str(env.config_dir)],
            env={**os.environ, "EDITOR": f"{sys.executable} {editor}"},
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stderr
        edited = time.monotonic()
        while True:
            client = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
            await client.cmd("EHLO mx.sender.test")
            await client.cmd("MAIL FROM:<alice@sender.test>")
            code, _ = await client.cmd("RCPT TO:<sales@example.com>")
            await client.close()
            if code == 250 or time.monotonic() - edited > 2:
                break
            await asyncio.sleep(0.1)
        assert code == 250, "the new alias was not in use within 2 s"
    finally:
        server.terminate()
        await server.wait()


async def test_spf_fail_is_refused(forwarding):
    env = forwarding
    env.dns.remove("sender.test", "TXT")
    env.dns.add("sender.test", "TXT", "v=spf1 ip4:192.0.2.1 -all")  # 127.0.0.1 not allowed
    client = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
    await client.cmd("EHLO mx.sender.test")
    await client.cmd("MAIL FROM:<alice@sender.test>")
    await client.cmd("RCPT TO:<x@example.com>")
    await client.cmd("DATA")
    await client.send(ALICE_MESSAGE + b".")
    code, lines = await client.reply()
    assert code == 550 and lines[0].startswith("5.7.23")
    assert env.gmail.messages == [] and env.server.queue.items == {}


async def test_dmarc_reject_is_refused(forwarding):
    env = forwarding
    message = ALICE_MESSAGE.replace(b"alice@sender.test", b"bob@strict.test")
    code = await send_port_25(env, "bob@strict.test", ["x@example.com"], message)
    assert code == 550
    assert env.server.queue.items == {}


async def test_softfail_passes_and_is_recorded(forwarding):
    env = forwarding
    message = ALICE_MESSAGE.replace(b"alice@sender.test", b"carol@soft.test")
    assert await send_port_25(env, "carol@soft.test", ["me@example.com"], message) == 250
    [stored] = await env.wait_mailbox(1)
    [results] = get_all(parse_headers(stored), "Authentication-Results")
    assert "spf=softfail" in results


async def test_forged_authentication_results_are_removed(forwarding):
    env = forwarding
    forged = (b"Authentication-Results: mail.example.com; dkim=pass header.d=paypal.test\r\n"
              b"Authentication-Results: other.test; spf=pass\r\n" + ALICE_MESSAGE)
    assert await send_port_25(env, "alice@sender.test", ["me@example.com"], forged) == 250
    [stored] = await env.wait_mailbox(1)
    results = get_all(parse_headers(stored), "Authentication-Results")
    assert len(results) == 2
    assert not any("paypal.test" in r for r in results)
    assert any(r.startswith("other.test;") for r in results)


async def test_local_mda_command_instead_of_maildir(env, tmp_path):
    out = tmp_path / "mda"
    out.mkdir()
    script = tmp_path / "mda.py"
    script.write_text("import sys\n"
                      f"target = {str(out)!r} + '/' + sys.argv[1]\n"
                      "open(target, 'ab').write(sys.stdin.buffer.read())\n")
    env.write_config(delivery={"smtp_port": env.sink_port,
                               "local_mda": f"{sys.executable} {script} {{address}}"},
                     limits={"auth_failure_delay": "0s"})
    env.add_user()
    await env.start()
    assert await send_port_25(env, "alice@sender.test", ["Me@example.com"], ALICE_MESSAGE) == 250
    await env.wait_queue_empty()
    assert b"Hi there." in (out / "me@example.com").read_bytes()
    assert env.mailbox() == [], "the built-in Maildir is not used"


async def test_our_bounce_of_a_forward_reaches_the_original_sender(forwarding):
    """Gmail refuses the forward at RCPT: our DSN goes to the SRS sender, i.e. to alice."""
    env = forwarding
    env.gmail.behaviour = SinkBehaviour(rcpt=lambda addr: "550 5.1.1 no such user")
    assert await send_port_25(env, "alice@sender.test", ["x@example.com"], ALICE_MESSAGE) == 250
    [dsn] = await env.sender_mx.until(1)
    assert dsn.recipients == ["alice@sender.test"]
    assert dsn.sender == "<>"
    assert b"multipart/report" in dsn.data and b"me@gmail.test" in dsn.data
    await env.wait_queue_empty()
