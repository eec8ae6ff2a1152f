"""What stops `serve` at start also stops it the same way in `check` (and not later, at
the first delivery)."""

from __future__ import annotations

import pytest

from mailrelay.errors import ConfigError
from tests.cli.test_check import check, findings


async def test_an_unusable_mta_sts_cache_stops_the_start_and_check_says_so(env):
    env.data_dir.mkdir(parents=True, exist_ok=True)
    (env.data_dir / "mta-sts").write_text("not a directory\n")
    with pytest.raises(ConfigError) as info:
        await env.start()
    assert "MTA-STS" in str(info.value) and "mta-sts" in str(info.value)
    errors, _ = findings(check(env.config_dir))
    assert any("mta-sts" in e and "not a directory" in e for e in errors), errors


async def test_a_second_server_on_a_data_dir_is_refused_before_it_touches_the_queue(env):
    """The claim is a lock on data_dir/mailrelay.lock, not the control socket: with the
    socket gone (or never made: a data_dir path too long for a unix socket), a second
    server is still refused, and leaves the queue alone."""
    from mailrelay.config import load_config
    from mailrelay.server import Server

    await env.start()
    (env.data_dir / "control.sock").unlink()
    queue_before = sorted(p.name for p in (env.data_dir / "queue").iterdir())
    second = Server(load_config(env.config_dir))
    with pytest.raises(ConfigError, match="another mailrelay is running"):
        await second.start()
    assert sorted(p.name for p in (env.data_dir / "queue").iterdir()) == queue_before
    await env.stop()
    third = Server(load_config(env.config_dir))  # the lock went with the first's stop
    await third.start()
    await third.stop(grace=1)
