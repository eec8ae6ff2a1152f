"""Parsing SMTP command lines, paths and parameters (RFC 5321, 3461, 6531)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

# RFC 5321 4.1.2 atext, plus UTF-8 (RFC 6531) checked separately.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
_DOMAIN = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                     r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_ESMTP_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_XTEXT_HEX = re.compile(r"\+([0-9A-F]{2})")

MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256


class SyntaxErrorReply(ValueError):
    """A syntax problem; ``reply`` is the SMTP reply to send."""

    def __init__(self, reply: str):
        super().__init__(reply)
        self.reply = reply


@dataclass
class Path:
    address: str  # "" for the null path <>
    params: dict[str, str | None] = field(default_factory=dict)

    @property
    def is_null(self) -> bool:
        return self.address == ""


def split_command(line: str) -> tuple[str, str]:
    """``"MAIL FROM:<a@b>"`` -> ``("MAIL", "FROM:<a@b>")``; verb upper-cased."""
    verb, _, arg = line.partition(" ")
    return verb.upper(), arg.strip()


def _has_non_ascii(text: str) -> bool:
    return not text.isascii()


def _valid_utf8_text(text: str) -> bool:
    # Surrogate escapes mean the client sent bytes that are not UTF-8.
    return not any("\udc80" <= ch <= "\udcff" for ch in text) and all(
        ch >= " " and ch != "\x7f" for ch in text
    )


def _valid_address_literal(domain: str) -> bool:
    """``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` (RFC 5321 4.1.3)."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return False
    inner = domain[1:-1]
    try:
        if inner[:5].upper() == "IPV6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        return False
    return True


def parse_mailbox(text: str, utf8: bool) -> str:
    """Validate ``local@domain`` and return it; raise SyntaxErrorReply when malformed."""
    if len(text) > MAX_PATH:
        raise SyntaxErrorReply("501 5.1.3 Address too long")
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain:
        raise SyntaxErrorReply("501 5.1.3 Bad address syntax")
    if _has_non_ascii(text):
        if not utf8:
            raise SyntaxErrorReply(
                "553 5.6.7 Non-ASCII address not permitted without SMTPUTF8")
        if not _valid_utf8_text(text):
            raise SyntaxErrorReply("501 5.1.3 Bad address syntax")
        ascii_local = "".join("a" if ord(c) > 127 else c for c in local)
        try:
            ascii_domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            raise SyntaxErrorReply("501 5.1.2 Bad domain name") from None
    else:
        ascii_local, ascii_domain = local, domain
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise SyntaxErrorReply("501 5.1.3 Local part too long")
    if not (_DOT_STRING.fullmatch(ascii_local) or _QUOTED.fullmatch(ascii_local)):
        raise SyntaxErrorReply("501 5.1.3 Bad address syntax")
    if len(ascii_domain) > MAX_DOMAIN or not (
        _DOMAIN.fullmatch(ascii_domain) or _valid_address_literal(ascii_domain)
    ):
        raise SyntaxErrorReply("501 5.1.2 Bad domain name")
    return text


def parse_path(arg: str, keyword: str, utf8_allowed: bool, null_allowed: bool) -> Path:
    """Parse ``FROM:<addr> PARAMS`` / ``TO:<addr> PARAMS``.

    Source routes (``<@a,@b:user@dom>``) are accepted and ignored, as RFC 5321 C says.
    ``utf8_allowed`` is whether SMTPUTF8 was given on MAIL.
    """
    if not arg[: len(keyword)].upper() == keyword:
        raise SyntaxErrorReply(f"501 5.5.4 Syntax: {keyword}<address>")
    rest = arg[len(keyword):].lstrip()
    if rest.startswith("<"):
        end = rest.find(">")
        if end < 0:
            raise SyntaxErrorReply("501 5.5.4 Missing '>' in address")
        inner, tail = rest[1:end], rest[end + 1:]
        if tail and not tail.startswith(" "):
            raise SyntaxErrorReply("501 5.5.4 Garbage after address")
    else:
        # Lenient: a bare address without angle brackets, as many servers accept;
        # but the null path must be written <>.
        inner, _, tail = rest.partition(" ")
        tail = " " + tail if tail else ""
        if not inner:
            raise SyntaxErrorReply(f"501 5.5.4 Syntax: {keyword}<address>")
    if inner.startswith("@"):
        _route, colon, inner = inner.partition(":")
        if not colon or not inner:
            raise SyntaxErrorReply("501 5.1.3 Bad source route")
    params = parse_params(tail)
    # SMTPUTF8 on MAIL itself allows a UTF-8 reverse-path (RFC 6531 3.4).
    utf8 = utf8_allowed or (keyword == "FROM:" and "SMTPUTF8" in params)
    if inner == "":
        if not null_allowed:
            raise SyntaxErrorReply("501 5.1.3 Null address not allowed here")
        address = ""
    else:
        address = parse_mailbox(inner, utf8)
    return Path(address, params)


def parse_params(text: str) -> dict[str, str | None]:
    """ESMTP parameters ``KEY[=VALUE]``, keys upper-cased; duplicates are a syntax error."""
    params: dict[str, str | None] = {}
    for word in text.split():
        key, eq, value = word.partition("=")
        # RFC 5321 4.1.2 esmtp-value: printable ASCII except "=".
        bad_value = eq and (not value or not all(33 <= ord(c) <= 126 and c != "=" for c in value))
        if not _ESMTP_KEYWORD.fullmatch(key) or bad_value:
            raise SyntaxErrorReply(f"501 5.5.4 Bad parameter {key[:20]!r}")
        key = key.upper()
        if key in params:
            raise SyntaxErrorReply(f"501 5.5.4 Duplicate parameter {key}")
        params[key] = value if eq else None
    return params


def decode_xtext(value: str) -> str:
    """RFC 3461 xtext (used by ENVID and ORCPT)."""
    if any(ord(c) < 33 or ord(c) > 126 or c == "=" for c in value) or (
        value.count("+") != len(_XTEXT_HEX.findall(value))
    ):
        raise SyntaxErrorReply("501 5.5.4 Bad xtext value")
    return _XTEXT_HEX.sub(lambda m: chr(int(m.group(1), 16)), value)
