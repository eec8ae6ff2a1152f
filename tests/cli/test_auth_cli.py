"""``mailrelay auth blocks`` and ``mailrelay auth unblock`` against a real server process
(issue 18, the lockout row), through the control socket."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys

from tests.support.process import start_server
from tests.support.relay import PASSWORD, USER

MAX_FAILURES = 3


def mailrelay_auth(env, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailrelay.cli.main", "auth", *argv, "-c", str(env.config_dir)],
        capture_output=True, text=True, timeout=60)


async def cli(env, *argv: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(mailrelay_auth, env, *argv)


async def test_blocks_are_listed_and_lifted(env, tmp_path):
    env.write_config(limits={"auth_failures_per_ip": MAX_FAILURES, "auth_block_time": "10m",
                             "auth_failure_delay": "0s"})
    env.add_user()
    server = await start_server(env, log_file=tmp_path / "server.log")
    try:
        result = await cli(env, "blocks")
        assert result.returncode == 0 and result.stdout == "no client is blocked\n"

        for source in ("127.0.0.1", "127.0.0.4"):
            client = await env.submission_client(source=source)
            for guess in range(MAX_FAILURES):
                assert (await client.auth_plain(USER, f"guess {guess}"))[0] == 535
            code, lines = await client.auth_plain(USER, PASSWORD)
            assert code == 454 and lines[0].startswith("4.7.0"), (code, lines)
            assert lines[0].endswith("try again in 10 minutes"), lines
            await client.close()

        result = await cli(env, "blocks")
        assert result.returncode == 0, result.stderr
        rows = result.stdout.splitlines()
        assert rows[-1] == "2 clients blocked"
        for address in ("127.0.0.1", "127.0.0.4"):
            [row] = [r for r in rows if r.split()[0] == address]
            assert re.fullmatch(rf"{re.escape(address)} +(9m5\d|10m00)s left  3 failed logins",
                                row), row

        result = await cli(env, "blocks", "--json")
        blocks = json.loads(result.stdout)["blocks"]
        assert {b["client"] for b in blocks} == {"127.0.0.1", "127.0.0.4"}
        assert all(590 < b["remaining"] <= 600 and b["failures"] == 3 for b in blocks)

        result = await cli(env, "unblock", "127.0.0.1")
        assert (result.returncode, result.stdout) == (0, "127.0.0.1: block lifted\n")
        client = await env.submission_client()
        assert (await client.auth_plain(USER, PASSWORD))[0] == 235
        await client.close()
        still = await env.submission_client(source="127.0.0.4")
        assert (await still.auth_plain(USER, PASSWORD))[0] == 454
        await still.close()

        result = await cli(env, "unblock", "127.0.0.1", "--json")
        assert json.loads(result.stdout) == {"unblocked": None}
        result = await cli(env, "unblock", "127.0.0.9")
        assert (result.returncode, result.stdout) == (0, "127.0.0.9 is not blocked\n")
        result = await cli(env, "unblock", "not-an-ip")
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr == "mailrelay: 'not-an-ip' is not an IP address\n"
    finally:
        server.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(server.wait(), 30) == 0
    log = (tmp_path / "server.log").read_text()
    assert "control: login block of 127.0.0.1 lifted" in log

    result = await cli(env, "blocks")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("mailrelay: the server is not running")
    assert result.stderr.count("\n") == 1
