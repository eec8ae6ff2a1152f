"""Reading the header section of a message without rewriting it.

Everything here runs in time linear in its input: a header section is what any client
on the internet sends us, and the SMTP server parses it for every message. The caps on
size and field count (``read_header``) and on address lists (``addresses``) turn what
no mail needs into a clear 5xx reply (``HeaderError``) instead of work.
"""

from __future__ import annotations

import email.utils
import re

# A field: its first line and its continuation lines (LF ends a line, CRLF too).
_FIELD_TEXT = re.compile(rb"[^\n]*+(?:\n[ \t][^\n]*+)*+")
# A line break with the white space around it: one space when unfolding (each line of a
# value stripped, joined by spaces).
_UNFOLD = re.compile(rb"[ \t\r]*\n[ \t]*")
_UNFOLD_SLICE = 64 * 1024
_WSP_RUN = re.compile(rb"[ \t]*+")
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
# What email.utils.getaddresses treats specially: the scan for nesting visits only these.
_ADDRESS_SPECIALS = re.compile(r'[()"\\,]')

# Addresses read from one field (From: has one, rarely a few), and the nesting of
# comments in it: getaddresses recurses once per level ("(((...)))" of a few hundred
# levels raised RecursionError) and costs 10-20 µs per address.
MAX_ADDRESSES = 100
MAX_COMMENT_DEPTH = 20

# Defaults of limits.max_header_size / max_header_fields / max_hops.
MAX_HEADER_SIZE = 1024 * 1024  # Exim's header_maxsize
MAX_HEADER_FIELDS = 1000
MAX_HOPS = 50  # Postfix's hopcount_limit


class HeaderError(ValueError):
    """A header section we do not take: ``reply`` is the SMTP answer to DATA."""

    def __init__(self, reply: str):
        super().__init__(reply)
        self.reply = reply


def header_end(data: bytes, limit: int | None = None) -> int | None:
    """Where the header section ends: the offset of the line break (CRLF or LF) that
    ends its last line, 0 when the message starts with the empty line; None when no
    empty line is found (in the first ``limit`` + 4 bytes, when given: the search
    stays bounded however large the message)."""
    if data.startswith((b"\r\n", b"\n")):
        return 0
    stop = len(data) if limit is None else min(len(data), limit + 4)
    found = [i for i in (data.find(b"\n\r\n", 0, stop), data.find(b"\n\n", 0, stop)) if i >= 0]
    if not found:
        return None
    end = min(found)
    return end - 1 if data[end - 1:end] == b"\r" else end


def header_section(data: bytes) -> bytes:
    """The header section without the separating blank line (LF-tolerant)."""
    end = header_end(data)
    return data if end is None else data[:end]


def split_message(data: bytes) -> tuple[bytes, bytes]:
    """(the header section with the line break that ends its last line, the rest: the
    empty line and the body), LF-tolerant. A message without an empty line is all
    header; one that starts with it has an empty header section."""
    end = header_end(data)
    if end is None:
        return data, b""
    stop = end if end == 0 else end + (2 if data[end:end + 2] == b"\r\n" else 1)
    return data[:stop], data[stop:]


_NOT_CR_LF = bytes(b for b in range(256) if b not in b"\r\n")


def to_crlf(data: bytes) -> bytes:
    """Every line ending as CRLF (RFC 5321 2.3.8: a bare LF or a bare CR is one too,
    as our SMTP input and aiosmtplib's output read them); the same object when it is
    so already."""
    # Fast check (SMTP input is already clean): one CR and one LF per CRLF, no others.
    # (Measured: faster than comparing the counts of CR, LF and CRLF.)
    if len(data.translate(None, _NOT_CR_LF)) == 2 * data.count(b"\r\n"):
        return data
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def parse_headers(data: bytes) -> list[tuple[str, str]]:
    """(name, unfolded value) pairs in order; names as written, values decoded leniently.

    ``Name : value`` (white space before the colon, RFC 5322 4.5's obsolete syntax) is the
    field ``Name``, as receivers read it. A line that is not a field is skipped.
    """
    return _parse(header_section(data))


def _parse(section: bytes) -> list[tuple[str, str]]:
    # One match per field (its first line and continuation lines), unfolded by C-level
    # regex calls: linear, and one object per field rather than one per line.
    fields = []
    for match in _FIELD_TEXT.finditer(section):
        name, colon, value = match.group().partition(b":")
        name = name.rstrip(b" \t")
        if colon and _FIELD_NAME.fullmatch(name):
            if b"\n" in value:
                value = _unfold(value)
            fields.append((name.decode("ascii"), value.strip().decode("utf-8", "replace")))
    return fields


def _unfold(value: bytes) -> bytes:
    """_UNFOLD.sub(b" ", value), in slices of about _UNFOLD_SLICE bytes: re.sub keeps a
    list entry per line, so a value of a million lines cost 45 times its size at once.
    A slice ends after a line break and the white space that follows it, so no match of
    _UNFOLD spans two slices."""
    if len(value) <= _UNFOLD_SLICE:
        return _UNFOLD.sub(b" ", value)
    pieces = []
    start = 0
    while start < len(value):
        cut = value.find(b"\n", start + _UNFOLD_SLICE)
        cut = len(value) if cut < 0 else _WSP_RUN.match(value, cut + 1).end()  # type: ignore[union-attr]
        pieces.append(_UNFOLD.sub(b" ", value[start:cut]))
        start = cut
    return b"".join(pieces)


def read_header(data: bytes, max_size: int = MAX_HEADER_SIZE,
                max_fields: int = MAX_HEADER_FIELDS) -> list[tuple[str, str]]:
    """parse_headers within limits: HeaderError (552 5.6.0) for a header section larger
    than ``max_size`` bytes or with more than ``max_fields`` fields."""
    end = header_end(data, max_size)
    size = len(data) if end is None else end
    if size > max_size:
        raise HeaderError(f"552 5.6.0 Message header too large (the limit is {max_size} "
                          "bytes)")
    fields = _parse(data[:size])
    if len(fields) > max_fields:
        raise HeaderError(f"552 5.6.0 Too many header fields (the limit is {max_fields})")
    return fields


def get_all(fields: list[tuple[str, str]], name: str) -> list[str]:
    lowered = name.lower()
    return [value for key, value in fields if key.lower() == lowered]


def count(fields: list[tuple[str, str]], name: str) -> int:
    lowered = name.lower()
    return sum(1 for key, _ in fields if key.lower() == lowered)


def addresses(values: list[str], name: str = "an address field") -> list[str]:
    """The addresses in address header values (From:, To:, …); empty ones dropped, and
    ones without "@" too (see ``mailboxes``).

    HeaderError (554 5.6.0) for more than MAX_ADDRESSES addresses or comments nested
    deeper than MAX_COMMENT_DEPTH; ``name`` names the field in that reply.
    """
    return [address for address in mailboxes(values, name) if "@" in address]


def mailboxes(values: list[str], name: str = "an address field") -> list[str]:
    """Like ``addresses``, but what a value names without "@" stays in (``From: me``):
    whoever checks who may send must see it."""
    # email.utils.getaddresses takes 15-40 µs even for one plain address; the plain
    # shapes are read with one regex match each, and everything else goes to it.
    simple = []
    for value in values:
        match = _SIMPLE_ADDRESS.fullmatch(value)
        if match is None:
            break
        simple.append(match[1] or match[2])
    else:
        return simple
    _check_address_values(values, name)
    try:
        return [addr for _, addr in email.utils.getaddresses(values) if addr]
    except RecursionError:  # the checks above make this unreachable; never a traceback
        raise HeaderError(f"554 5.6.0 Cannot read {name}") from None


def _check_address_values(values: list[str], name: str) -> None:
    commas = sum(value.count(",") for value in values)
    many = commas + len(values) > MAX_ADDRESSES
    deep = any(value.count("(") > MAX_COMMENT_DEPTH for value in values)
    if not (many or deep):
        return  # the cheap counts already bound what getaddresses will see
    addresses, deepest = len(values), 0
    for value in values:
        value_commas, value_depth = _scan_address_value(value)
        addresses += value_commas
        deepest = max(deepest, value_depth)
    if addresses > MAX_ADDRESSES:
        raise HeaderError(f"554 5.6.0 Too many addresses in {name} (the limit is "
                          f"{MAX_ADDRESSES})")
    if deepest > MAX_COMMENT_DEPTH:
        raise HeaderError(f"554 5.6.0 Comments nested too deeply in {name}")


def _scan_address_value(value: str) -> tuple[int, int]:
    """One pass over an address value: its commas outside quoted strings and comments
    (an upper bound, less one, of the addresses getaddresses finds in it: an unclosed
    quote or comment runs to the end of the value, as getaddresses reads it) and the
    deepest nesting of its comments (quoted-pairs taken into account)."""
    commas, depth, deepest, quoted, escaped = 0, 0, 0, False, -1
    for match in _ADDRESS_SPECIALS.finditer(value):
        char = match.group()
        if match.start() == escaped:
            continue
        if char == "\\" and (quoted or depth):
            escaped = match.end()
        elif quoted:
            quoted = char != '"'
        elif char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")" and depth:
            depth -= 1
        elif char == '"' and not depth:
            quoted = True
        elif char == "," and not depth:
            commas += 1
    return commas, deepest
