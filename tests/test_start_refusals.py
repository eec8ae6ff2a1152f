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
