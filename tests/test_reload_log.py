"""What a reload logs: each reload once, and "need a restart" only for a setting that
changed since the last time mailrelay.yaml was read (issue 18).

The server runs as its own process (``tests.test_operations.start``); ``aliases edit``
runs as the real command and signals it, as it does on a real server.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import yaml

from mailrelay.config import load_config
from mailrelay.server import changed_settings
from tests.support.relay import RelayEnv
from tests.test_operations import run  # noqa: F401  (the fixture)

# The watcher polls every 2 s: this long without a second reload means there is none.
WATCH_PERIOD = 2.5
CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "config")


def reload_lines(log: list[str], start: int) -> list[str]:
    return [line for line in log[start:] if "reload" in line]


def test_an_unchanged_config_loads_equal(env: RelayEnv) -> None:
    """No false difference (list against tuple, a path resolved another way, …)."""
    for directory in (env.config_dir, CONFIG_DIR):
        assert changed_settings(load_config(directory), load_config(directory)) == []


async def test_aliases_edit_loads_the_file_once(env: RelayEnv, run) -> None:  # noqa: F811
    """`aliases edit` has the running server load the file (through the control socket);
    the file watcher then does not reload it again."""
    server = await run()
    mark = len(server.log)
    editor = "sh -c 'echo \"sales: me\" >> \"$0\"'"
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "mailrelay.cli.main", "aliases", "edit",
                         "-c", str(env.config_dir), "example.com"],
        capture_output=True, text=True, timeout=30, env={**os.environ, "VISUAL": editor})
    assert result.returncode == 0, result.stderr
    assert "the running server took it" in result.stdout
    await asyncio.sleep(WATCH_PERIOD)  # the file watcher has seen the new aliases file too
    lines = reload_lines(server.log, mark)
    assert not [line for line in lines if "reload: done" in line], lines
    assert not [line for line in lines if "changed on disk" in line], lines
    assert not [line for line in lines if "need a restart" in line], lines


async def test_watcher_reload_reports_a_restart_setting_once(env: RelayEnv,
                                                             run) -> None:  # noqa: F811
    server = await run()

    async def watcher_reload() -> list[str]:
        mark = len(server.log)
        env.add_user("new@example.com", "a long enough password")  # the watcher's cue
        await server.wait_log("reload: done", start=mark)
        await asyncio.sleep(WATCH_PERIOD)
        return reload_lines(server.log, mark)

    # An unchanged mailrelay.yaml: a reload with nothing to report, logged once.
    lines = await watcher_reload()
    assert len([line for line in lines if "reload: done" in line]) == 1, lines
    assert not [line for line in lines if "need a restart" in line], lines

    path = env.config_dir / "mailrelay.yaml"
    settings = yaml.safe_load(path.read_text())
    settings["limits"]["max_recipients"] = 7
    path.write_text(yaml.safe_dump(settings))
    lines = await watcher_reload()
    (warning,) = [line for line in lines if "need a restart" in line]
    assert "limits.max_recipients" in warning
    # Said once: the next reload (the same file) does not repeat it.
    lines = await watcher_reload()
    assert not [line for line in lines if "need a restart" in line], lines
