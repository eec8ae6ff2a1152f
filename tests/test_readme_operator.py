"""README.md as an operator follows it: what it shows must be what mailrelay does
(the findings of an outside operator who followed it step by step on a fresh machine)."""

from __future__ import annotations

import re
from pathlib import Path

from mailrelay.policy.aliases import CATCH_ALL, parse_text

REPO = Path(__file__).resolve().parents[1]


def readme() -> str:
    return (REPO / "README.md").read_text()


def block_after(marker: str, fence: str = "```") -> str:
    """The first fenced block after ``marker`` in README."""
    text = readme()
    start = text.index(marker)
    match = re.compile(re.escape(fence) + r"[a-z]*\n(.*?)```", re.S).search(text, start)
    assert match, f"no block after {marker!r}"
    return match.group(1)


def test_the_aliases_example_loads_as_written():
    """Its catch-all line had a trailing comment, which mailrelay (like chasquid, which
    takes it as part of the address) refuses: a copied example left the domain without
    aliases."""
    example = block_after("Each domain may have an aliases file")
    table, errors = parse_text(example, "example.com")
    assert errors == []
    assert CATCH_ALL in table and {"sales", "team", "archive"} <= set(table)


def test_a_trailing_comment_is_refused_with_file_and_line():
    _, errors = parse_text("sales: me\n*: me@gmail.com   # catch-all\n", "example.com",
                           Path("/etc/mailrelay/domains/example.com/aliases"))
    [error] = errors
    assert str(error).startswith("/etc/mailrelay/domains/example.com/aliases:2: ")
    assert "comments must be on their own line" in str(error)


def test_every_reloadcmd_is_try_reload_or_restart():
    """The unit's comment said `systemctl reload`, README `try-reload-or-restart`: the
    first --install-cert runs before the server ever started, and reloading a stopped
    unit fails (acme.sh then reports the installation as failed)."""
    sources = {"README.md": readme(),
               "systemd/mailrelay.service": (REPO / "systemd/mailrelay.service").read_text()}
    found = 0
    for name, text in sources.items():
        for command in re.findall(r"--reloadcmd[ \\\n#]*[\"']([^\"']+)[\"']", text):
            found += 1
            assert "systemctl try-reload-or-restart mailrelay" in command, (name, command)
            assert "systemctl reload" not in command, (name, command)
    assert found >= 2
