"""README's first swaks example, exactly as written, against the bundled example
configuration served by the real ``mailrelay serve`` (issue 18: on Debian 12's swaks the
old ``--tls-verify=0`` stopped it with "Data left in option list")."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.relay import free_port

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config"

pytestmark = pytest.mark.skipif(shutil.which("swaks") is None,
                                reason="swaks not installed (scripts/setup installs it)")


def readme_swaks_command() -> str:
    """The first ```sh block of README that runs swaks."""
    blocks = re.findall(r"```sh\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    command = next(block for block in blocks if block.lstrip().startswith("swaks "))
    return command.strip()


async def test_readme_swaks_example_sends(tmp_path):
    command = readme_swaks_command()
    assert "--tls-verify=0" not in command
    config = tmp_path / "config"
    shutil.copytree(EXAMPLE, config, ignore=shutil.ignore_patterns("var"))
    settings = yaml.safe_load((config / "mailrelay.yaml").read_text())
    ports = {name: free_port() for name in settings["listen"]}
    settings["listen"] = {name: [f"127.0.0.1:{port}"] for name, port in ports.items()}
    settings["metrics"]["listen"] = f"127.0.0.1:{free_port()}"
    (config / "mailrelay.yaml").write_text(yaml.safe_dump(settings))
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mailrelay.cli.main", "serve", "-c", str(config),
        stderr=asyncio.subprocess.PIPE)
    try:
        log = b""
        while b"mailrelay ready" not in log:
            line = await asyncio.wait_for(server.stderr.readline(), 30)
            assert line, f"server exited: {log.decode()}"
            log += line
        # README's command with the example's ports moved to this test's.
        for name, port in (("submission", 2587), ("submission_tls", 2465)):
            command = command.replace(f"127.0.0.1:{port}", f"127.0.0.1:{ports[name]}")
        for variant in (command, command.replace("--tls ", "--tlsc ").replace(
                f":{ports['submission']}", f":{ports['submission_tls']}")):
            swaks = await asyncio.create_subprocess_exec(
                "sh", "-c", variant, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT)
            out, _ = await asyncio.wait_for(swaks.communicate(), 60)
            text = out.decode(errors="replace")
            assert swaks.returncode == 0, text
            assert "Data left in option list" not in text
            assert re.search(r"^<~  235 2\.7\.0 ", text, re.M), text  # AUTH over TLS
            assert re.search(r"^<~  250 2\.0\.0 Ok: queued as \S+", text, re.M), text
        new = config / "var" / "mail" / "example.com" / "me" / "new"
        for _ in range(100):
            if new.is_dir() and len(list(new.iterdir())) == 2:
                break
            await asyncio.sleep(0.1)
        assert len(list(new.iterdir())) == 2
    finally:
        server.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(server.wait(), 30) == 0
