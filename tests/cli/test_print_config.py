"""``mailrelay print-config``, run as the real command: every setting with the value the
server uses, defaults marked, as YAML that loads to the same configuration; the relay's
password file is shown as its path, never read."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from mailrelay.cli.print_config import duration, size
from mailrelay.config import Config, load_config
from mailrelay.errors import ConfigError

EXAMPLE = Path(__file__).parents[2] / "config"
SECRET = "hunter2-relay-password"

BUSY = """\
hostname: mail.example.com
listen:
  smtp: ["127.0.0.1:2525", "[::1]:2525"]
data_dir: var
dns:
  nameservers: ["127.0.0.1:5353", "[::1]"]
  timeout: 1500ms
delivery:
  retry_intervals: [30s, 1h30m, 2d]
  local_mda: /usr/lib/dovecot/dovecot-lda -d {address}
  ip_families: [ipv4]
  source_ipv4: 192.0.2.7
  relay:
    host: smtp.mailgun.org
    tls: implicit
    username: postmaster@example.com
    password_file: relay.password
    domains: [gmail.com]
limits:
  max_message_size: 10kB
  min_free_space: 1GiB
  auth_failure_delay: 0s
senders:
  allow:
    me@example.com: ["*@example.org"]
aliases:
  drop_characters: ""
metrics:
  listen: 9125
proxy_protocol:
  smtp: [127.0.0.1/32, "::1"]
filters:
  rspamd:
    url: http://127.0.0.1:11333
users:
  min_password_length: 12
workers: auto
"""


def print_config(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailrelay.cli.main", "print-config", "-c",
                           str(directory)], capture_output=True, text=True, timeout=60)


def settings(config: Config) -> dict[str, object]:
    return {item.name: getattr(config, item.name) for item in dataclasses.fields(config)
            if item.name not in ("config_dir", "domains", "warnings")}


def reload_printed(text: str, where: Path) -> Config:
    """The printed YAML as the mailrelay.yaml of another directory (paths are absolute)."""
    where.mkdir()
    (where / "mailrelay.yaml").write_text(text)
    return load_config(where)


@pytest.fixture
def busy(tmp_path: Path) -> Path:
    directory = tmp_path / "busy"
    (directory / "domains" / "example.com").mkdir(parents=True)
    (directory / "mailrelay.yaml").write_text(BUSY)
    (directory / "relay.password").write_text(SECRET + "\n")
    (directory / "relay.password").chmod(0o600)
    return directory


def test_example_config_round_trips_with_defaults_marked(tmp_path):
    example = tmp_path / "example"
    shutil.copytree(EXAMPLE, example, ignore=shutil.ignore_patterns("var"))
    result = print_config(example)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"# Local domains (directories under {example / 'domains'}/): example.com" in out
    assert "# warning: " not in out
    lines = out.splitlines()
    assert "  max_recipients: 100" in lines  # set in the file: no mark
    assert "  max_queue_items: 100000  # default" in lines  # not in the file
    assert "  connect_timeout: 30s  # default" in lines
    assert f"data_dir: {example / 'var'}" in lines  # absolute
    # Every setting is there, each on its own line.
    original = load_config(example)
    for name, value in settings(original).items():
        assert any(line.startswith(f"{name}:") for line in lines), name
        if dataclasses.is_dataclass(value):
            for item in dataclasses.fields(value):
                assert any(line.startswith(f"  {item.name}:") for line in lines), item.name
    assert settings(reload_printed(out, tmp_path / "again")) == settings(original)


def test_busy_config_round_trips_and_the_password_is_never_shown(busy, tmp_path):
    result = print_config(busy)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert SECRET not in out
    # What the server would log at start: a comment here (and not a setting).
    assert f"# warning: {busy / 'mailrelay.yaml'}:37: workers: no longer used" in out
    assert (f"    password_file: {busy / 'relay.password'}  # the secret is in this file; "
            "its content is never shown") in out.splitlines()
    lines = out.splitlines()
    assert "  max_message_size: 10000" in lines  # 10kB is no whole number of KiB
    assert "  min_free_space: 1GiB  # default" not in lines
    assert "  min_free_space: 1GiB" in lines
    assert "  retry_intervals: [30s, 90m, 2d]" in lines
    assert "  timeout: 1500ms" in lines
    assert "  nameservers: ['127.0.0.1:5353', '[::1]:53']" in lines
    assert "  listen: 127.0.0.1:9125" in lines
    assert "  smtp: [127.0.0.1/32, '::1/128']" in lines
    original = load_config(busy)
    again = reload_printed(out, tmp_path / "again")
    assert settings(again) == settings(original)
    assert again.delivery.relay is not None and again.users.min_password_length == 12


def test_a_config_that_does_not_load_is_one_line(tmp_path):
    (tmp_path / "mailrelay.yaml").write_text("hostname: mail.example.com\nlimits:\n  nope: 1\n")
    result = print_config(tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "mailrelay.yaml:3: unknown setting limits.nope" in result.stderr


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (1, "1s"), (90, "90s"), (300, "5m"),
                                           (5400, "90m"), (7200, "2h"), (21 * 86400, "21d"),
                                           (0.25, "250ms"), (0.0001, 0.0001)])
def test_duration(seconds, text):
    assert duration(float(seconds)) == text


@pytest.mark.parametrize("count, text", [(0, 0), (1000, 1000), (1024, "1KiB"),
                                         (50 * 1024**2, "50MiB"), (3 * 1024**3, "3GiB")])
def test_size(count, text):
    assert size(count) == text


def size_settings() -> list[tuple[str, str]]:
    """(section, key) of every whole-number setting of the top-level sections that
    mailrelay.yaml takes as a size: those that load with the value "3GiB"."""
    found = []
    defaults = load_config_text(None)
    for section in dataclasses.fields(defaults):
        value = getattr(defaults, section.name)
        if not dataclasses.is_dataclass(value):
            continue
        for item in dataclasses.fields(value):
            if item.type not in ("int", "int | None"):
                continue
            try:
                load_config_text(f"{section.name}:\n  {item.name}: 3GiB\n")
            except ConfigError:
                continue
            found.append((section.name, item.name))
    return found


def load_config_text(extra: str | None) -> Config:
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "mailrelay.yaml").write_text(
            "hostname: mail.example.com\ndata_dir: var\n" + (extra or ""))
        return load_config(directory)


def test_every_size_is_printed_as_a_size(tmp_path):
    """max_header_size came out as 1048576 and max_data_in_flight as a bare null."""
    sizes = size_settings()
    assert ("limits", "max_header_size") in sizes and ("limits", "max_message_size") in sizes
    (tmp_path / "mailrelay.yaml").write_text("hostname: mail.example.com\ndata_dir: var\n")
    lines = print_config(tmp_path).stdout.splitlines()
    for section, key in sizes:
        default = getattr(getattr(load_config(tmp_path), section), key)
        if default is not None:
            assert f"  {key}: {size(default)}  # default" in lines, key
    assert "  max_header_size: 1MiB  # default" in lines
    # null means "twice max_message_size": the comment says what that comes to.
    assert "  max_data_in_flight: null  # default: 2 × max_message_size = 100MiB" in lines

    body = "limits:\n" + "".join(f"  {key}: 3GiB\n" for section, key in sizes
                                 if section == "limits" and key != "max_message_size")
    body += "  max_message_size: 2GiB\n"
    (tmp_path / "mailrelay.yaml").write_text(
        f"hostname: mail.example.com\ndata_dir: var\n{body}")
    out = print_config(tmp_path)
    assert out.returncode == 0, out.stderr
    for section, key in sizes:
        if section == "limits" and key != "max_message_size":
            assert f"  {key}: 3GiB" in out.stdout.splitlines(), key
    assert settings(reload_printed(out.stdout, tmp_path / "again")) == \
        settings(load_config(tmp_path))
