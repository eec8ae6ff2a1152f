"""``metrics.listen``: a port alone means loopback; an error says what is missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mailrelay.config import load_config
from mailrelay.errors import ConfigError
from tests.ops.test_metrics import scrape
from tests.support.relay import free_port


def config_with(tmp_path: Path, value: str) -> Path:
    (tmp_path / "mailrelay.yaml").write_text(
        f"hostname: mail.example.com\nmetrics:\n  listen: {value}\n")
    return tmp_path


@pytest.mark.parametrize("value, expected", [
    ("42092", ("127.0.0.1", 42092)),
    ('":9125"', ("127.0.0.1", 9125)),
    ("127.0.0.1:9125", ("127.0.0.1", 9125)),
    ('"[::1]:9125"', ("::1", 9125)),
    ("null", None),
])
def test_accepted(tmp_path, value, expected):
    assert load_config(config_with(tmp_path, value)).metrics.listen == expected


@pytest.mark.parametrize("value, message", [
    ("127.0.0.1", "metrics.listen: '127.0.0.1' has no port: give host:port, e.g. "
                  "127.0.0.1:9125"),
    ("localhost", "'localhost' has no port"),
    ('"::1"', "'::1' has no port"),
    ("70000", "not a port number: 70000"),
    ("localhost:99999", "bad port in 'localhost:99999'"),
])
def test_refused_with_what_is_missing(tmp_path, value, message):
    with pytest.raises(ConfigError) as raised:
        load_config(config_with(tmp_path, value))
    assert "mailrelay.yaml:3: metrics.listen: " in str(raised.value)
    assert message in str(raised.value)
    assert "needs a port" not in str(raised.value)


def test_check_names_it_in_one_line(tmp_path):
    """What issue 18 saw: ``metrics.listen: 42092`` was "needs a port"; now it loads, and a
    host without a port is one line naming the file, line and what to write."""
    config_with(tmp_path, "127.0.0.1")
    result = subprocess.run([sys.executable, "-m", "mailrelay.cli.main", "check", "-c",
                             str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().endswith("mailrelay.yaml:3: metrics.listen: '127.0.0.1' has "
                                          "no port: give host:port, e.g. 127.0.0.1:9125")


async def test_a_port_alone_serves_metrics_on_loopback(env):
    port = free_port()
    env.write_config(metrics={"listen": port})
    env.add_user()
    server = await env.start()
    assert server.metrics is not None
    assert (await scrape(port)).value("mailrelay_queue_messages") == 0
