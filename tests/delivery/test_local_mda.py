"""delivery.local_mda on the real server: the address forms its placeholders give (an IDN
domain as chasquid's %to% gives it), templates refused at load, and a delivery that raises
counting as an attempt, so the message gives up and bounces."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from mailrelay.config import load_config
from mailrelay.delivery.manager import mda_command
from mailrelay.errors import ConfigError
from mailrelay.server import Server
from tests.delivery.test_delivery_flow import parse_dsn
from tests.support.client import RawSMTP
from tests.support.relay import delivery_lines, wait_for

IDN_DOMAIN = "ñoños.test"
IDN_ASCII = "xn--oos-6mab.test"
IDN_USER = "ñangapirí"
MESSAGE = b"From: alice@sender.test\r\nSubject: mda\r\n\r\nHola.\r\n"


def mda_script(tmp_path) -> tuple[str, object]:
    """A local MDA that writes its arguments (JSON) and its stdin to files."""
    out = tmp_path / "mda-out"
    out.mkdir()
    script = tmp_path / "mda.py"
    script.write_text(
        "import json, os, sys\n"
        f"out = {str(out)!r}\n"
        "n = len(os.listdir(out))\n"
        "open(f'{out}/{n}.json', 'w').write(json.dumps(sys.argv[1:]))\n"
        "open(f'{out}/{n}.msg', 'wb').write(sys.stdin.buffer.read())\n")
    return f"{sys.executable} {script}", out


async def send_utf8(env, sender: str, recipient: str, data: bytes) -> int:
    client = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
    await client.cmd("EHLO mx.sender.test")
    code, _ = await client.cmd(f"MAIL FROM:<{sender}> SMTPUTF8")
    assert code == 250
    code, _ = await client.cmd(f"RCPT TO:<{recipient}>")
    if code == 250:
        assert (await client.cmd("DATA"))[0] == 354
        client.writer.write(data + b".\r\n")
        code, _ = await client.reply()
    await client.cmd("QUIT")
    await client.close()
    return code


async def test_mda_gets_the_idn_address_as_chasquid_gives_it(env, tmp_path):
    """{address} and {domain} in U-labels, as chasquid's %to% and %to_domain%; the ASCII
    forms as {address_ascii} and {domain_ascii}."""
    command, out = mda_script(tmp_path)
    env.write_config(delivery={
        "local_mda": f"{command} {{address}} {{domain}} {{user}} {{address_ascii}} "
                     "{domain_ascii}"})
    env.add_user(f"{IDN_USER}@{IDN_ASCII}", "pw-idn-user")
    await env.start()
    assert await send_utf8(env, "alice@sender.test", f"{IDN_USER}@{IDN_DOMAIN}", MESSAGE) == 250
    await wait_for(lambda: (out / "0.json").exists(), what="the MDA run")
    await env.wait_queue_empty()
    assert json.loads((out / "0.json").read_text()) == [
        f"{IDN_USER}@{IDN_DOMAIN}", IDN_DOMAIN, IDN_USER, f"{IDN_USER}@{IDN_ASCII}", IDN_ASCII]
    assert b"Hola." in (out / "0.msg").read_bytes()


def test_imported_chasquid_arguments_get_what_chasquid_gave():
    """import-chasquid maps %to% to {address} and %to_domain% to {domain}: for an IDN
    mailbox they are the U-label forms chasquid's MDA got, directly or through /bin/sh."""
    from mailrelay.migrate.chasquid import mda_template

    mailbox = f"{IDN_USER}@{IDN_ASCII}"
    direct = mda_template("/usr/bin/mda", ["-d", "%to%", "--domain=%to_domain%"])
    assert mda_command(direct, mailbox) == \
        f"/usr/bin/mda -d '{IDN_USER}@{IDN_DOMAIN}' --domain='{IDN_DOMAIN}'"
    through_sh = mda_template("/usr/bin/mda", ["-f", "%from%", "-d", "%to%"])
    assert mda_command(through_sh, mailbox).endswith(
        f" mda '{IDN_USER}' '{IDN_DOMAIN}' '{IDN_USER}@{IDN_DOMAIN}'")


@pytest.mark.parametrize(("template", "reason"), [
    ("/bin/cat {nope}", "unknown placeholder {nope}"),
    ("/bin/cat {0}", "positional placeholders"),
    ("/bin/cat {address!r}", "takes no format"),
    ("/bin/cat {address", "expected '}'"),
])
async def test_a_bad_template_is_refused_at_load(env, template, reason):
    """serve refuses it at start (as check does: both load the configuration the same
    way), instead of failing every local delivery."""
    env.write_config(delivery={"local_mda": template})
    with pytest.raises(ConfigError) as caught:
        Server(load_config(env.config_dir))
    error = str(caught.value)
    assert error.startswith(f"{env.config_dir / 'mailrelay.yaml'}:"), error
    assert "delivery.local_mda" in error and reason in error


async def test_a_delivery_that_raises_counts_as_an_attempt_and_bounces(env, caplog):
    """An exception in delivery (here: a template that the load check would refuse, put in
    place behind its back; it stands for any bug) is an attempt like any other: the message
    is retried on the schedule, then given up, and the sender gets a DSN. It used not to
    count, and was retried every minute for ever."""
    caplog.set_level(logging.INFO, logger="mailrelay.mail")
    env.write_config(delivery={"retry_intervals": ["200ms"], "give_up_after": "1s"})
    env.add_mx("sender.test", (10, "mx.sender.test", "127.0.0.8"))
    sender_mx = env.add_sink("127.0.0.8", hostname="mx.sender.test")
    server = await env.start()
    server.delivery.local_mda = "/bin/cat {nope}"
    client = await RawSMTP.connect("127.0.0.1", env.ports["smtp"])
    await client.cmd("EHLO mx.sender.test")
    assert await client.send_message("alice@sender.test", ["me@example.com"], MESSAGE) == 250
    await client.close()
    [dsn] = await sender_mx.until(1, timeout=15)
    assert dsn.sender == "<>" and dsn.recipients == ["alice@sender.test"]
    _, blocks = parse_dsn(dsn.data)
    assert blocks[1]["Action"] == "failed" and blocks[1]["Status"] == "4.4.7"
    assert "internal error in delivery (KeyError)" in blocks[1]["Diagnostic-Code"]
    await env.wait_queue_empty()
    lines = [line for line in delivery_lines(caplog) if "to=<me@example.com>" in line]
    assert len(lines) >= 2 and all("result=temporary" in line for line in lines)
    assert "final=no" in lines[0] and "final=yes" in lines[-1]
    assert [f"attempt={n}" in line for n, line in enumerate(lines, 1)] == [True] * len(lines)
