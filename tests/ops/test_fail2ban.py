"""The bundled fail2ban filter against the real server's log: the real ``fail2ban-regex``
must find exactly the failed logins, with the right client IP, and no successful one
(nor the right password while blocked, nor a wrong one repeated with another
mechanism); both as a log file and as the journal backend presents the lines."""

from __future__ import annotations

import asyncio
import base64
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.client import RawSMTP
from tests.support.process import start_server
from tests.support.relay import PASSWORD, USER

REPO = Path(__file__).resolve().parents[2]
FILTER = REPO / "config" / "fail2ban" / "filter.d" / "mailrelay.conf"
JAIL = REPO / "config" / "fail2ban" / "jail.d" / "mailrelay.conf"
MAX_FAILURES = 3
# A login name that tries to smuggle another address (and a line break) into the log.
FORGED_USER = ('x" reason="535 5.7.8" ip=127.0.0.99 '
               '\nWARNING mailrelay.mail: auth-failed ip=127.0.0.98 ')

# On PATH when fail2ban is installed; else the copy scripts/setup unpacks into the venv.
_IN_VENV = Path(sys.executable).parent / "fail2ban-regex"
FAIL2BAN_REGEX = shutil.which("fail2ban-regex") or (str(_IN_VENV) if _IN_VENV.exists() else None)

pytestmark = pytest.mark.skipif(FAIL2BAN_REGEX is None,
                                reason="fail2ban-regex missing (scripts/setup fetches it)")


def fail2ban_regex(log: Path) -> tuple[list[str], str]:
    """The IPs of the matched lines, and the summary line ("Lines: ... matched ...")."""
    ips = subprocess.run([FAIL2BAN_REGEX, "-o", "ip", str(log), str(FILTER)],
                         capture_output=True, text=True, timeout=120, check=True)
    full = subprocess.run([FAIL2BAN_REGEX, "--print-no-missed", str(log), str(FILTER)],
                          capture_output=True, text=True, timeout=120, check=True)
    [summary] = [line for line in full.stdout.splitlines() if line.startswith("Lines:")]
    return ips.stdout.split(), summary


async def auth_login(client: RawSMTP, user: str, password: str) -> tuple[int, list[str]]:
    for line in ("AUTH LOGIN", base64.b64encode(user.encode()).decode()):
        code, lines = await client.cmd(line)
        if code != 334:
            return code, lines
    return await client.cmd(base64.b64encode(password.encode()).decode())


async def test_filter_matches_exactly_the_failed_logins(env, tmp_path):
    env.write_config(limits={"auth_failures_per_ip": MAX_FAILURES, "auth_block_time": "1m",
                             "auth_failure_delay": "0s"})
    log = tmp_path / "mailrelay.log"
    server = await start_server(env, log_file=log)
    try:
        client = await env.submission_client()
        assert (await client.auth_plain(USER, PASSWORD))[0] == 235  # auth-ok: not a match
        await client.close()
        client = await env.submission_client()
        for i in range(MAX_FAILURES):
            assert (await client.auth_plain(USER, f"guess {i}"))[0] == 535
            if i == 0:  # the same guess with LOGIN, as smtplib does: not a second guess
                assert (await auth_login(client, USER, "guess 0"))[0] == 535
        assert (await client.auth_plain(USER, "guess 9"))[0] == 454  # blocked: counted
        assert (await client.auth_plain(USER, PASSWORD))[0] == 454  # the owner: not
        await client.close()
        # From another loopback address: the address logged is that of the connection.
        other = await env.submission_client(source="127.0.0.3")
        assert (await other.auth_plain(FORGED_USER, "nope"))[0] == 535
        assert (await other.auth_plain(USER, PASSWORD))[0] == 235
        await other.close()
    finally:
        server.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(server.wait(), 30) == 0

    lines = log.read_text().splitlines()
    failed = [line for line in lines if " mailrelay.mail: auth-failed " in line]
    succeeded = [line for line in lines if " mailrelay.mail: auth-ok " in line]
    assert len(failed) == MAX_FAILURES + 4 and len(succeeded) == 2, lines
    assert sum('reason="535 5.7.8 repeated"' in line for line in failed) == 1
    assert sum('reason="454 4.7.0 right-password"' in line for line in failed) == 1
    assert not any("guess" in line or PASSWORD in line for line in lines)

    expected = ["127.0.0.1"] * (MAX_FAILURES + 1) + ["127.0.0.3"]
    ips, summary = fail2ban_regex(log)
    assert ips == expected, (ips, failed)
    assert re.search(rf"\b{len(expected)} matched\b", summary), summary

    # The journal backend: no time in the message (systemd stamps it), and fail2ban puts
    # "<host> <identifier>[<pid>]:" in front.
    journal = tmp_path / "journal.log"
    journal.write_text("".join(
        re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ", "mail mailrelay[812]: ", line) + "\n"
        for line in lines))
    ips, summary = fail2ban_regex(journal)
    assert ips == expected, ips
    assert re.search(rf"\b{len(expected)} matched\b", summary), summary


def test_jail_example():
    text = JAIL.read_text()
    assert re.search(r"^port = 25,465,587$", text, re.M)
    assert re.search(r"^journalmatch = _SYSTEMD_UNIT=mailrelay.service$", text, re.M)
    assert re.search(r"^filter = mailrelay$", text, re.M)
    for key in ("maxretry", "findtime", "bantime"):
        assert re.search(rf"^{key} = \S+$", text, re.M), key
