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


def documented_settings() -> set[str]:
    """The settings README's "All settings" table names (`a.b` / `c`: a.b and a.c)."""
    text = readme()
    table = text[text.index("All settings, with their defaults:"):]
    table = table[:table.index("\n\n", table.index("| setting |"))]
    names: set[str] = set()
    for row in table.splitlines():
        cell = row.split("|")[1] if row.startswith("| `") else ""
        words = re.findall(r"`([^`]+)`", cell)
        if not words:
            continue
        prefix = words[0].rpartition(".")[0]
        names.add(words[0])
        names.update(w if "." in w or not prefix else f"{prefix}.{w}" for w in words[1:])
    return names


def setting_names() -> list[str]:
    """Every setting of mailrelay.yaml, from config.py's dataclasses (as print-config
    walks them), nested sections included."""
    import dataclasses
    import types
    import typing

    from mailrelay import config as config_mod

    def walk(cls: type, prefix: str) -> list[str]:
        found = []
        hints = typing.get_type_hints(cls, vars(config_mod))
        for item in dataclasses.fields(cls):
            kind = hints[item.name]
            if isinstance(kind, types.UnionType):  # e.g. RelaySettings | None
                kind = next((k for k in kind.__args__ if dataclasses.is_dataclass(k)), kind)
            dotted = f"{prefix}{item.name}"
            found.append(dotted)
            if dataclasses.is_dataclass(kind):
                found += walk(kind, f"{dotted}.")
        return found

    skip = {"config_dir", "domains", "warnings"}
    return [name for name in walk(config_mod.Config, "") if name.split(".")[0] not in skip]


def test_every_setting_is_in_the_settings_table():
    """delivery.mta_sts_port and aliases.max_depth were missing from it."""
    documented = documented_settings()
    missing = [name for name in setting_names()
               if not any(name == d or name.startswith(f"{d}.") for d in documented)
               and not any(d.startswith(f"{name}.") for d in documented)]
    assert missing == []


def test_the_install_commands_copy_only_what_a_server_needs(tmp_path):
    """`cp -r config /etc/mailrelay` also copied config/var (the queue, mail, self-signed
    key and srs.secret of "Try it") and config/fail2ban. README's commands, run as
    written (the clone and setup left out, /etc/mailrelay under tmp_path), after a
    "Try it" run left config/var behind."""
    import shutil
    import subprocess

    block = block_after("## Install on your server", "```sh")
    lines = [line for line in block.splitlines()
             if line and not line.startswith(("git clone", "scripts/setup"))]
    clone = tmp_path / "clone"
    shutil.copytree(REPO / "config", clone / "config", ignore=shutil.ignore_patterns("var"))
    for leftover in ("queue/x.msg", "mail/example.com/me/new/1", "selfsigned/key.pem",
                     "srs.secret"):
        (clone / "config" / "var" / leftover).parent.mkdir(parents=True, exist_ok=True)
        (clone / "config" / "var" / leftover).write_text("from Try it\n")
    etc = tmp_path / "etc" / "mailrelay"
    script = "\n".join(lines).replace("/etc/mailrelay", str(etc)).replace("YOUR-DOMAIN",
                                                                          "example.org")
    result = subprocess.run(["bash", "-e", "-c", script], cwd=clone, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    found = sorted(str(p.relative_to(etc)) for p in etc.rglob("*") if p.is_file())
    assert found == ["domains/example.org/aliases", "mailrelay.yaml"]
    assert (etc / "mailrelay.yaml").stat().st_mode & 0o777 == 0o640
