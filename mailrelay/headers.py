"""Reading the header section of a message without rewriting it."""

from __future__ import annotations

import email.utils
import re

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_FIELD_NAME = re.compile(rb"[!-9;-~]+")  # RFC 5322 2.2: printable ASCII except ":"


def header_section(data: bytes) -> bytes:
    """The header section without the separating blank line (LF-tolerant)."""
    match = _HEADER_END.search(data)
    if match:
        return data[: match.start()]
    return b"" if data.startswith((b"\r\n", b"\n")) else data


def parse_headers(data: bytes) -> list[tuple[str, str]]:
    """(name, unfolded value) pairs in order; names as written, values decoded leniently."""
    fields: list[tuple[str, str]] = []
    for line in re.split(rb"\r?\n", header_section(data)):
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + " " + line.strip().decode("utf-8", "replace"))
            continue
        name, colon, value = line.partition(b":")
        if colon and _FIELD_NAME.fullmatch(name):
            fields.append((name.decode("ascii"), value.strip().decode("utf-8", "replace")))
    return fields


def get_all(fields: list[tuple[str, str]], name: str) -> list[str]:
    lowered = name.lower()
    return [value for key, value in fields if key.lower() == lowered]


def addresses(values: list[str]) -> list[str]:
    """The addresses in address header values (From:, To:, …); empty ones dropped."""
    return [addr for _, addr in email.utils.getaddresses(values) if "@" in addr]
