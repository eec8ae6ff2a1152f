"""chasquid's users file, read so that passwords migrate unchanged.

chasquid keeps ``domains/<domain>/users`` in protobuf text format::

    users: {
      key: "me"
      value: {
        scrypt: { logN: 14 r: 8 p: 1 keyLen: 32 salt: "\\x8f…" encrypted: "…" }
      }
    }
    users: { key: "shop" value: { denied: {} } }
    users: { key: "test" value: { plain: { password: "secret" } } }

Salt and key are raw bytes written as text-format strings: current chasquid (Go's
prototext) writes valid UTF-8 as it is and other bytes as ``\\xHH``; older versions
(golang/protobuf's text marshaler, with ``<`` ``>`` around messages) wrote every
non-printable byte as octal ``\\NNN``. Both read the same here.

This module holds a small parser for the text format (also used for ``chasquid.conf``)
and the reading of users files; :mod:`mailrelay.policy.users` turns their entries into
ours.
"""

from __future__ import annotations

import base64
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

log = logging.getLogger("mailrelay.users")

SCRYPT = "scrypt"
PLAIN = "plain"
DENIED = "denied"

_SPACE = b" \t\n\r\v\f"
_IDENT = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(
    rb"-?(?:0[xX][0-9A-Fa-f]+|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[fF]?)"
)
_PUNCT = b"{}<>[]:,;"
_CLOSING = {b"{": b"}", b"<": b">"}
_SIMPLE_ESCAPES = {
    ord("a"): 0x07, ord("b"): 0x08, ord("f"): 0x0C, ord("n"): 0x0A, ord("r"): 0x0D,
    ord("t"): 0x09, ord("v"): 0x0B, ord("\\"): 0x5C, ord("'"): 0x27, ord('"'): 0x22,
    ord("?"): 0x3F,
}
_OCTAL = b"01234567"
_HEX = b"0123456789abcdefABCDEF"
# The start of a chasquid users file: "users: {", "users {" or the older "users <".
_CHASQUID_START = re.compile(rb"users[ \t\r\n]*(?::[ \t\r\n]*)?[{<]")


# --- the text format -------------------------------------------------------------------


def unescape(body: bytes) -> bytes:
    """The bytes a text-format string literal stands for (``body``: between the quotes).

    Escapes as protobuf's parsers read them: ``\\n`` and the other C escapes, octal
    ``\\N`` to ``\\NNN`` (at most 255), ``\\xH`` or ``\\xHH``, and ``\\uXXXX`` /
    ``\\UXXXXXXXX`` for a code point written as UTF-8. ValueError says what is wrong.
    """
    out = bytearray()
    i, end = 0, len(body)
    while i < end:
        byte = body[i]
        if byte != 0x5C:  # not a backslash
            j = body.find(b"\\", i)
            j = end if j < 0 else j
            out += body[i:j]
            i = j
            continue
        if i + 1 >= end:
            raise ValueError("string ends with a lone backslash")
        kind = body[i + 1]
        i += 2
        if kind in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[kind])
        elif kind in _OCTAL:
            digits = bytes([kind])
            while len(digits) < 3 and i < end and body[i] in _OCTAL:
                digits += body[i:i + 1]
                i += 1
            value = int(digits, 8)
            if value > 0xFF:
                raise ValueError(f"octal escape \\{digits.decode()} is above \\377")
            out.append(value)
        elif kind in b"xX":
            digits = b""
            while len(digits) < 2 and i < end and body[i] in _HEX:
                digits += body[i:i + 1]
                i += 1
            if not digits:
                raise ValueError("\\x without hex digits")
            out.append(int(digits, 16))
        elif kind in b"uU":
            i, code = _code_point(body, i, 4 if kind == ord("u") else 8)
            out += chr(code).encode("utf-8", "surrogatepass")
        else:
            raise ValueError(f"unknown escape \\{chr(kind)}")
    return bytes(out)


def _code_point(body: bytes, i: int, width: int) -> tuple[int, int]:
    """(new index, code point) of the hex digits of a ``\\u``/``\\U`` escape at ``i``."""
    digits = body[i:i + width]
    if len(digits) != width or any(d not in _HEX for d in digits):
        raise ValueError(f"\\{'u' if width == 4 else 'U'} needs {width} hex digits")
    code = int(digits, 16)
    i += width
    if 0xD800 <= code < 0xDC00:
        # A UTF-16 high surrogate must be followed by its low half (\uD83D\uDE00).
        low = body[i:i + 6]
        if len(low) == 6 and low[:2] == b"\\u" and all(d in _HEX for d in low[2:]):
            second = int(low[2:], 16)
            if 0xDC00 <= second < 0xE000:
                return i + 6, 0x10000 + ((code - 0xD800) << 10) + (second - 0xDC00)
        raise ValueError("\\u surrogate without its other half")
    if 0xDC00 <= code < 0xE000 or code > 0x10FFFF:
        raise ValueError(f"\\u escape {code:#x} is not a character")
    return i, code


@dataclass(frozen=True)
class Scalar:
    """A scalar value: ``kind`` is "string" (value: bytes), "number" or "ident" (str)."""

    kind: str
    value: bytes | str


@dataclass
class Field:
    name: str
    value: Scalar | Message
    line: int


@dataclass
class Message:
    fields: list[Field] = field(default_factory=list)
    line: int = 1

    def names(self) -> list[str]:
        return [f.name for f in self.fields]


@dataclass(frozen=True)
class _Token:
    kind: str  # ident | number | string | punct | eof
    value: bytes
    line: int


class _Lexer:
    """Tokens of protobuf's text format, with their line numbers for errors."""

    def __init__(self, data: bytes, path: Path | None):
        self.data = data
        self.path = path
        self.pos = 0
        self.line = 1
        self._peeked: _Token | None = None

    def error(self, message: str, line: int | None = None) -> ConfigError:
        return ConfigError(message, self.path, line if line is not None else self.line)

    def peek(self) -> _Token:
        if self._peeked is None:
            self._peeked = self._read()
        return self._peeked

    def next(self) -> _Token:
        token = self.peek()
        self._peeked = None
        return token

    def _read(self) -> _Token:
        data = self.data
        while self.pos < len(data):
            byte = data[self.pos:self.pos + 1]
            if byte in _SPACE:
                self.line += byte == b"\n"
                self.pos += 1
            elif byte == b"#":
                newline = data.find(b"\n", self.pos)
                self.pos = len(data) if newline < 0 else newline
            else:
                break
        if self.pos >= len(data):
            return _Token("eof", b"", self.line)
        byte = data[self.pos:self.pos + 1]
        if byte in _PUNCT:
            self.pos += 1
            return _Token("punct", byte, self.line)
        if byte in (b'"', b"'"):
            return self._string(byte)
        for kind, pattern in (("number", _NUMBER), ("ident", _IDENT)):
            match = pattern.match(data, self.pos)
            if match:
                self.pos = match.end()
                return _Token(kind, match.group(), self.line)
        shown = byte.decode("utf-8", "replace")
        raise self.error(f"unexpected character {shown!r}")

    def _string(self, quote: bytes) -> _Token:
        data, start = self.data, self.pos + 1
        i = start
        while True:
            if i >= len(data) or data[i:i + 1] == b"\n":
                raise self.error("string not closed on this line")
            if data[i:i + 1] == b"\\":
                i += 2
                continue
            if data[i:i + 1] == quote:
                break
            i += 1
        self.pos = i + 1
        try:
            value = unescape(data[start:i])
        except ValueError as exc:
            raise self.error(f"bad string: {exc}") from None
        return _Token("string", value, self.line)


def parse_text(data: bytes, path: Path | None = None) -> Message:
    """Parse a protobuf text-format document into a tree of fields, in file order.

    Repeated fields simply appear several times (``[a, b]`` lists are flattened);
    adjacent string literals are joined. ConfigError names the file and line.
    """
    lexer = _Lexer(data, path)
    return _parse_message(lexer, None, 1)


def _parse_message(lexer: _Lexer, closing: bytes | None, line: int) -> Message:
    message = Message(line=line)
    while True:
        token = lexer.next()
        if token.kind == "eof":
            if closing is not None:
                # Point at the opening: the end of the file says nothing useful.
                raise lexer.error(f"missing {closing.decode()!r}: the message opened here "
                                  "is never closed", line)
            return message
        if token.kind == "punct" and token.value == closing:
            return message
        if token.kind != "ident":
            raise lexer.error(f"expected a field name, not {_show(token)}", token.line)
        name = token.value.decode("ascii")
        has_colon = lexer.peek().kind == "punct" and lexer.peek().value == b":"
        if has_colon:
            lexer.next()
        after = lexer.peek()
        if after.kind == "punct" and after.value == b"[" and has_colon:
            lexer.next()
            _parse_list(lexer, message, name)
        elif after.kind == "punct" and after.value in _CLOSING:
            lexer.next()
            value = _parse_message(lexer, _CLOSING[after.value], after.line)
            message.fields.append(Field(name, value, token.line))
        elif has_colon:
            message.fields.append(Field(name, _parse_scalar(lexer), token.line))
        else:
            raise lexer.error(f"expected ':' after {name}", token.line)
        separator = lexer.peek()
        if separator.kind == "punct" and separator.value in (b",", b";"):
            lexer.next()


def _parse_list(lexer: _Lexer, message: Message, name: str) -> None:
    if lexer.peek().kind == "punct" and lexer.peek().value == b"]":
        lexer.next()
        return
    while True:
        token = lexer.peek()
        if token.kind == "punct" and token.value in _CLOSING:
            lexer.next()
            value: Scalar | Message = _parse_message(lexer, _CLOSING[token.value], token.line)
        else:
            value = _parse_scalar(lexer)
        message.fields.append(Field(name, value, token.line))
        end = lexer.next()
        if end.kind == "punct" and end.value == b"]":
            return
        if not (end.kind == "punct" and end.value == b","):
            raise lexer.error(f"expected ',' or ']' in the list of {name}", end.line)


def _parse_scalar(lexer: _Lexer) -> Scalar:
    token = lexer.next()
    if token.kind == "string":
        value = token.value
        while lexer.peek().kind == "string":  # "abc" "def" is one string
            value += lexer.next().value
        return Scalar("string", value)
    if token.kind in ("number", "ident"):
        return Scalar(token.kind, token.value.decode("ascii"))
    raise lexer.error(f"expected a value, not {_show(token)}", token.line)


def _show(token: _Token) -> str:
    if token.kind == "eof":
        return "the end of the file"
    if token.kind == "string":
        return "a string"
    return repr(token.value.decode("utf-8", "replace"))


# --- typed access to fields ------------------------------------------------------------


def as_bytes(item: Field, path: Path | None) -> bytes:
    if not isinstance(item.value, Scalar) or item.value.kind != "string":
        raise ConfigError(f"{item.name} must be a quoted string", path, item.line)
    assert isinstance(item.value.value, bytes)
    return item.value.value


def as_text(item: Field, path: Path | None) -> str:
    try:
        return as_bytes(item, path).decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{item.name} is not valid UTF-8", path, item.line) from None


def as_int(item: Field, path: Path | None) -> int:
    value = item.value
    if isinstance(value, Scalar) and value.kind == "number":
        assert isinstance(value.value, str)
        text = value.value
        negative = text.startswith("-")
        digits = text.removeprefix("-")
        try:
            if digits[:2] in ("0x", "0X"):
                number = int(digits[2:], 16)
            elif len(digits) > 1 and digits.startswith("0"):
                number = int(digits, 8)  # C-style octal, as protobuf reads it
            else:
                number = int(digits)
        except ValueError:
            pass
        else:
            return -number if negative else number
    raise ConfigError(f"{item.name} must be a whole number", path, item.line)


def as_bool(item: Field, path: Path | None) -> bool:
    value = item.value
    if isinstance(value, Scalar) and value.kind in ("ident", "number"):
        if value.value in ("true", "True", "t", "1"):
            return True
        if value.value in ("false", "False", "f", "0"):
            return False
    raise ConfigError(f"{item.name} must be true or false", path, item.line)


def single(message: Message, name: str, path: Path | None) -> Field | None:
    """The one field called ``name``, None if absent; a second one is an error."""
    found = [f for f in message.fields if f.name == name]
    if len(found) > 1:
        raise ConfigError(f"{name} given twice (first on line {found[0].line})",
                          path, found[1].line)
    return found[0] if found else None


# --- users files ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ChasquidUser:
    """One entry of a chasquid users file."""

    name: str
    scheme: str  # SCRYPT, PLAIN, DENIED, another scheme's name, or "" for none
    line: int
    log_n: int = 0
    r: int = 0
    p: int = 0
    key_len: int = 0
    salt: bytes = b""
    key: bytes = b""

    def phc(self) -> str:
        """The scrypt hash as mailrelay writes it (``$scrypt$ln=..,r=..,p=..$salt$key``).

        The key length is the length of the key, so it needs no field of its own;
        ValueError when the entry could not log in to chasquid either.
        """
        if self.scheme != SCRYPT:
            raise ValueError(f"not a scrypt hash ({self.scheme or 'no scheme'})")
        if self.key_len != len(self.key):
            raise ValueError(f"keyLen {self.key_len} but the key has {len(self.key)} bytes")
        return (f"$scrypt$ln={self.log_n},r={self.r},p={self.p}"
                f"${_b64(self.salt)}${_b64(self.key)}")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def is_chasquid_users(data: bytes) -> bool:
    """Whether a users file is chasquid's: its first content (after blank lines and
    comments) is ``users: {``, ``users {`` or ``users <``."""
    pos = 0
    while pos < len(data):
        if data[pos:pos + 1] in _SPACE:
            pos += 1
        elif data[pos:pos + 1] == b"#":
            newline = data.find(b"\n", pos)
            pos = len(data) if newline < 0 else newline
        else:
            return _CHASQUID_START.match(data, pos) is not None
    return False


def parse_users(data: bytes, path: Path | None = None) -> list[ChasquidUser]:
    """Every entry of a chasquid users file, in file order (chasquid lets a later entry
    for the same name win). ConfigError names the file and line of a mistake."""
    root = parse_text(data, path)
    users = []
    for item in root.fields:
        if item.name != "users":
            raise ConfigError(f"unknown field {item.name} (a chasquid users file has only "
                              "'users' entries)", path, item.line)
        if not isinstance(item.value, Message):
            raise ConfigError("users must be { key: ... value: ... }", path, item.line)
        users.append(_parse_user(item.value, item.line, path))
    return users


def _parse_user(entry: Message, line: int, path: Path | None) -> ChasquidUser:
    for item in entry.fields:
        if item.name not in ("key", "value"):
            raise ConfigError(f"unknown field {item.name} in a users entry", path, item.line)
    key = single(entry, "key", path)
    if key is None:
        raise ConfigError("users entry without a key (the user name)", path, line)
    name = as_text(key, path)
    if not name:
        raise ConfigError("users entry with an empty name", path, key.line)
    value = single(entry, "value", path)
    if value is None:
        return ChasquidUser(name, "", line)  # no password at all: chasquid denies it
    if not isinstance(value.value, Message):
        raise ConfigError("value must be { scrypt: ... }, { denied: {} } or "
                          "{ plain: ... }", path, value.line)
    schemes = value.value.fields
    if len(schemes) > 1:
        raise ConfigError(f"user {name} has more than one password scheme", path,
                          schemes[1].line)
    if not schemes:
        return ChasquidUser(name, "", line)
    scheme = schemes[0]
    if not isinstance(scheme.value, Message):
        raise ConfigError(f"user {name}: {scheme.name} must be {{ ... }}", path, scheme.line)
    if scheme.name == SCRYPT:
        return _parse_scrypt(name, scheme.value, line, path)
    return ChasquidUser(name, scheme.name, line)


def _parse_scrypt(name: str, params: Message, line: int, path: Path | None) -> ChasquidUser:
    values: dict[str, int | bytes] = {}
    for item in params.fields:
        if item.name in ("logN", "r", "p", "keyLen"):
            reader = as_int
        elif item.name in ("salt", "encrypted"):
            reader = as_bytes
        else:
            raise ConfigError(f"user {name}: unknown scrypt field {item.name}", path, item.line)
        if item.name in values:
            raise ConfigError(f"user {name}: {item.name} given twice", path, item.line)
        values[item.name] = reader(item, path)

    def number(key: str) -> int:
        value = values.get(key, 0)
        assert isinstance(value, int)
        return value

    def raw(key: str) -> bytes:
        value = values.get(key, b"")
        assert isinstance(value, bytes)
        return value

    return ChasquidUser(name, SCRYPT, line, log_n=number("logN"), r=number("r"),
                        p=number("p"), key_len=number("keyLen"), salt=raw("salt"),
                        key=raw("encrypted"))
