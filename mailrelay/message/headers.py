"""Reading the header section of a message without rewriting it."""

from __future__ import annotations

import email.utils
import re

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_FIELD_NAME = re.compile(rb"[!-9;-~]+")  # RFC 5322 2.2: printable ASCII except ":"
# The usual shapes of an address header value, "local@domain" and "Display Name
# <local@domain>", with dot-atom text only and no quotes, comments, groups or lists:
# what email.utils.getaddresses returns for them is the address between the brackets, or
# the value itself (see tests/test_headers.py).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"
_SIMPLE_ADDRESS = re.compile(
    rf"[ \t]*(?:[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~. \t-]*<({_DOT_ATOM}@{_DOT_ATOM})>"
    rf"|({_DOT_ATOM}@{_DOT_ATOM}))[ \t]*")


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
    # email.utils.getaddresses takes 15-40 µs even for one plain address; the plain
    # shapes are read with one regex match each, and everything else goes to it.
    simple = []
    for value in values:
        match = _SIMPLE_ADDRESS.fullmatch(value)
        if match is None:
            return [addr for _, addr in email.utils.getaddresses(values) if "@" in addr]
        simple.append(match[1] or match[2])
    return simple
