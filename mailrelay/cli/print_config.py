"""``mailrelay print-config``: the configuration the server uses, every default filled in.

The settings are walked from the loaded ``Config`` itself, so a setting added to
``config.py`` shows up here without a change. Values are written back in the syntax
``mailrelay.yaml`` takes (``50MiB``, ``5m``, ``host:port``), so the output loads again
to the same configuration. Secrets are never read: ``delivery.relay.password_file`` is
shown as its path.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
from pathlib import Path
from typing import Any

import yaml

from ..config import CONFIG_FILE, Config, format_hostport, load_config, setting_line

# Fields of Config that are not settings of mailrelay.yaml (shown as comments instead).
_NOT_SETTINGS = ("config_dir", "domains", "warnings")
# Whole numbers that are sizes (the other ints count things); every float is a duration.
SIZES = frozenset({"limits.max_message_size", "limits.min_free_space",
                   "limits.max_header_size", "limits.max_data_in_flight"})
# Settings that name a file holding a secret: the path is shown, the file never opened.
SECRET_FILES = frozenset({"delivery.relay.password_file"})
# Lists of host:port (tuples in Config).
_HOSTPORT_LISTS = frozenset({"listen.smtp", "listen.submission", "listen.submission_tls",
                             "dns.nameservers"})

_SIZE_UNITS = (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))
_DURATION_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def register(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.description = (
        "Load mailrelay.yaml as the server does and print every setting with the value the server "
        "uses, defaults included (marked), as YAML that loads to the same configuration. Paths are"
        " absolute; secrets are never read (a password file is shown as its path).")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(render(load_config(args.config)), end="")
    return 0


def render(config: Config) -> str:
    """The effective configuration as commented YAML."""
    domains = ", ".join(config.domains) or "none"
    lines = [
        f"# The effective configuration of {config.config_dir} (`mailrelay print-config`):",
        "# every setting with the value the server uses; \"# default\" marks those that",
        f"# {CONFIG_FILE} does not set. Paths are absolute; secrets are never shown.",
        f"# Local domains (directories under {config.domains_dir}/): {domains}",
    ]
    lines += [f"# warning: {warning}" for warning in config.warnings]
    lines.append("")
    derived = _derived_defaults(config)
    for item in dataclasses.fields(config):
        if item.name in _NOT_SETTINGS:
            continue
        lines += _setting(config.config_dir, item.name, getattr(config, item.name), 0,
                          derived)
        if dataclasses.is_dataclass(getattr(config, item.name)):
            lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def _derived_defaults(config: Config) -> dict[str, str]:
    """Settings whose default (null) stands for a value worked out from others: what
    the server uses, for the comment (the setting itself stays null, so the output
    still loads to the same configuration)."""
    return {"limits.max_data_in_flight":
            f"2 × max_message_size = {size(config.limits.data_in_flight)}"}


def _setting(config_dir: Path, dotted: str, value: Any, depth: int,
             derived: dict[str, str]) -> list[str]:
    indent = "  " * depth
    key = dotted.rpartition(".")[2]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        lines = [f"{indent}{key}:{_default_mark(config_dir, dotted)}"]
        for item in dataclasses.fields(value):
            lines += _setting(config_dir, f"{dotted}.{item.name}", getattr(value, item.name),
                              depth + 1, derived)
        return lines
    comment = _default_mark(config_dir, dotted)
    if value is None and dotted in derived:
        comment = f"{comment}: {derived[dotted]}" if comment else f"  # {derived[dotted]}"
    if dotted in SECRET_FILES and value is not None:
        comment += "  # the secret is in this file; its content is never shown"
    return [f"{indent}{key}: {_yaml(_plain(dotted, value))}{comment}"]


def _default_mark(config_dir: Path, dotted: str) -> str:
    return "" if setting_line(config_dir, dotted) is not None else "  # default"


def _plain(dotted: str, value: Any) -> Any:
    """``value`` as mailrelay.yaml writes it."""
    if value is None or isinstance(value, bool | str):
        return value
    if dotted in _HOSTPORT_LISTS:
        return [format_hostport(host, port) for host, port in value]
    if dotted == "metrics.listen":
        return format_hostport(*value)
    if isinstance(value, int):
        return size(value) if dotted in SIZES else value
    if isinstance(value, float):
        return duration(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(f"{dotted}.*", v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(dotted, v) for v in value]
    return str(value)


def _yaml(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=1 << 20)
    return text.removesuffix("\n...\n").strip()


def size(value: int) -> str | int:
    """Bytes in the largest binary unit that holds them exactly (``50MiB``)."""
    for unit, factor in _SIZE_UNITS:
        if value and value % factor == 0:
            return f"{value // factor}{unit}"
    return value


def duration(seconds: float) -> str | float:
    """Seconds in the largest unit that holds them exactly (``5m``, ``5d``, ``500ms``)."""
    if seconds == 0:
        return "0s"
    for unit, factor in _DURATION_UNITS:
        if seconds % factor == 0:
            return f"{int(seconds // factor)}{unit}"
    milliseconds = seconds * 1000
    if milliseconds == int(milliseconds):
        return f"{int(milliseconds)}ms"
    return seconds
