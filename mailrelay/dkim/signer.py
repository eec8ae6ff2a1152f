"""A fast DKIM signer: relaxed/relaxed canonicalisation in Python, RSA-SHA256 and
Ed25519-SHA256 (RFC 8463) through ``cryptography`` (OpenSSL).

dkimpy does the RSA arithmetic in pure Python (about 120 signatures/s); OpenSSL does
thousands. The output is an ordinary DKIM-Signature field (c=relaxed/relaxed); the tests
have dkimpy and OpenDKIM verify it.

We sign the message as it travels: CRLF, a bare LF and a bare CR all end a line (our
SMTP input and aiosmtplib's output turn the bare ones into CRLF), and a message whose
last line has no line break is signed as if it had one.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

RSA_SHA256 = "rsa-sha256"
ED25519_SHA256 = "ed25519-sha256"


@dataclass(frozen=True)
class DKIMKey:
    domain: str
    selector: str
    algorithm: str  # RSA_SHA256 | ED25519_SHA256
    private_key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    path: Path | None = None
    # The folded start of its DKIM-Signature field, computed once.
    _header_start: tuple[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        expected = {RSA_SHA256: rsa.RSAPrivateKey, ED25519_SHA256: ed25519.Ed25519PrivateKey}
        kind = expected.get(self.algorithm)
        if kind is None:
            raise ValueError(f"unknown DKIM algorithm {self.algorithm!r}")
        if not isinstance(self.private_key, kind):
            raise ValueError(f"a {self.algorithm} key must be a {kind.__name__}")
        if not (self.domain + self.selector).isascii():
            raise ValueError("DKIM domain and selector must be ASCII (IDNA A-labels)")
        object.__setattr__(self, "_header_start",
                           _header_start(self.domain, self.selector, self.algorithm))

    @classmethod
    def from_private_key(cls, domain: str, selector: str,
                         private_key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey,
                         path: Path | None = None) -> DKIMKey:
        algorithm = RSA_SHA256 if isinstance(private_key, rsa.RSAPrivateKey) else ED25519_SHA256
        return cls(domain, selector, algorithm, private_key, path)


# The fields that carry meaning for the reader; Received, Return-Path and the like change
# in transit and are left out (RFC 6376 5.4.1).
SIGNED_HEADERS = (
    "from", "reply-to", "subject", "date", "to", "cc", "message-id", "in-reply-to",
    "references", "mime-version", "content-type", "content-transfer-encoding",
)
# Listed once more than they occur, so nobody can add one after signing (RFC 6376 8.15).
OVERSIGNED = ("from", "subject", "date", "to", "cc", "message-id")

_OVERSIGNED_B = tuple(name.encode() for name in OVERSIGNED)
_OVERSIGNED_SET = frozenset(_OVERSIGNED_B)
_SIGNED_SET = frozenset(name.encode() for name in SIGNED_HEADERS)
# A field: name, optional WSP, colon, value with its continuation lines.
_FIELD = re.compile(rb"^([^:\s]+)[ \t]*:(.*(?:\n[ \t].*)*)", re.MULTILINE)
_WSP_RUN = re.compile(rb"[ \t]+")
_NOT_CR_LF = bytes(b for b in range(256) if b not in b"\r\n")
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")  # RFC 5322 ftext: h= must stay ASCII
_WIDTH = 78  # fold the signature field's lines at this many characters
_PKCS1 = padding.PKCS1v15()
_SHA256 = hashes.SHA256()


def sign(message: bytes, keys: Sequence[DKIMKey], *, timestamp: int | None = None) -> bytes:
    """DKIM-Signature fields for ``message``, one per key, each folded and CRLF-terminated,
    to be put in front of the message."""
    if not keys:
        return b""
    header_block, body = _split(_crlf(message))
    body_hash = base64.b64encode(_body_hash(body)).decode("ascii")
    names, canonical_headers = _signed_headers(header_block)
    when = int(time.time()) if timestamp is None else int(timestamp)
    return b"".join(_sign_one(key, when, names, body_hash, canonical_headers) for key in keys)


def _crlf(message: bytes) -> bytes:
    """The message with every line ending as CRLF, as it goes on the wire: our SMTP
    input and aiosmtplib's output both turn a bare LF or bare CR into CRLF."""
    # Fast check (SMTP input is already clean): one CR and one LF per CRLF, no others.
    if len(message.translate(None, _NOT_CR_LF)) == 2 * message.count(b"\r\n"):
        return message
    return message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def _split(message: bytes) -> tuple[bytes, bytes]:
    """Header section and body (without the empty line between them)."""
    if message.startswith(b"\r\n"):
        return b"", message[2:]
    end = message.find(b"\r\n\r\n")
    if end < 0:
        return message, b""
    return message[:end], message[end + 4:]


def _relaxed_body(body: bytes) -> bytes:
    """RFC 6376 3.4.4 on a CRLF body, except the CRLF that ends the last line.

    Whole-buffer replace() calls run in C: much faster than a regex or a loop per line,
    and each is skipped when a quick scan finds nothing to do (base64 has no spaces).
    """
    if b"\t" in body:
        body = body.replace(b"\t", b" ")
    if b" " in body:
        while b"  " in body:
            body = body.replace(b"  ", b" ")
        if b" \r\n" in body:
            body = body.replace(b" \r\n", b"\r\n")
        if body.endswith(b" "):
            body = body[:-1]  # the last line, whose line break SMTP will add
    # Empty lines at the end do not count; no bare CR or LF is left to be eaten here.
    return body.rstrip(b"\r\n")


def _body_hash(body: bytes) -> bytes:
    canonical = _relaxed_body(body)
    digest = hashlib.sha256(canonical)
    if canonical:  # a body that is not empty ends with CRLF; saves copying it
        digest.update(b"\r\n")
    return digest.digest()


def _signed_headers(header_block: bytes) -> tuple[tuple[bytes, ...], bytes]:
    """The h= names and the relaxed canonical form of the fields they select.

    h= lists each signed field as often as it occurs (in order of first appearance) and
    each OVERSIGNED one once more; repeated fields are taken from the last instance
    upwards (RFC 6376 5.4.2).
    """
    # bytes.split() also splits at VT and FF, which are not WSP; keep them then. (Every
    # CR is part of a CRLF by now: removing those is the unfolding.)
    plain = not (b"\x0b" in header_block or b"\x0c" in header_block)
    found: dict[bytes, list[bytes]] = {}  # name -> canonical lines, in message order
    for name, value in _FIELD.findall(header_block):  # one C-level pass over the fields
        name = name.lower()
        if name in _SIGNED_SET or (name.startswith(b"list-") and _FIELD_NAME.fullmatch(name)):
            # Unfold, compress WSP runs, strip: all in C with split() and join().
            value = b" ".join(value.split()) if plain else _relaxed_value(value)
            lines = found.get(name)
            if lines is None:
                found[name] = [name + b":" + value + b"\r\n"]
            else:
                lines.append(name + b":" + value + b"\r\n")
    names: list[bytes] = []
    canonical: list[bytes] = []
    for name, lines in found.items():  # h= in order of first appearance
        names += [name] * (len(lines) + (name in _OVERSIGNED_SET))
        canonical += reversed(lines)
    names += [name for name in _OVERSIGNED_B if name not in found]
    return tuple(names), b"".join(canonical)


def _relaxed_value(value: bytes) -> bytes:
    """RFC 6376 3.4.2 for a field value that still has its CRLFs (folding, and the one
    that ends the field, except for the last field) and contains VT or FF."""
    value = value.replace(b"\r\n", b"").removesuffix(b"\r")
    return _WSP_RUN.sub(b" ", value).strip(b" \t")


def _sign_one(key: DKIMKey, when: int, names: tuple[bytes, ...], body_hash: str,
              canonical_headers: bytes) -> bytes:
    # Layout: the key's tags, the h= tag, "t= bh=" on one line, b= last. The first two
    # are folded once and cached.
    start, start_canonical = key._header_start
    h_tag, h_canonical = _h_tag(names)
    stamp = f" t={when}; bh={body_hash};"
    # What is signed: the canonical fields, then this field with b= empty and no CRLF.
    value = f"{start_canonical} {h_canonical}{stamp} b="
    data = canonical_headers + b"dkim-signature:" + value.encode("ascii")
    if key.algorithm == RSA_SHA256:
        signature = key.private_key.sign(data, _PKCS1, _SHA256)  # type: ignore[call-arg]
    else:
        signature = key.private_key.sign(hashlib.sha256(data).digest())  # type: ignore[call-arg]
    b64 = base64.b64encode(signature).decode("ascii")
    first = _WIDTH - 3  # after " b="
    lines = [start, h_tag, stamp, " b=" + b64[:first]]
    lines += [" " + b64[i:i + _WIDTH - 1] for i in range(first, len(b64), _WIDTH - 1)]
    lines.append("")
    return "\r\n".join(lines).encode("ascii")


def _header_start(domain: str, selector: str, algorithm: str) -> tuple[str, str]:
    """The folded first line(s) of a key's DKIM-Signature field, and their canonical form."""
    tokens = [f"v=1; a={algorithm}; c=relaxed/relaxed;", f"d={domain};", f"s={selector};"]
    text = _fold("DKIM-Signature:", [" " + token for token in tokens])
    return text, " ".join(text[len("DKIM-Signature:"):].split())


_H_CACHE: dict[tuple[bytes, ...], tuple[str, str]] = {}


def _h_tag(names: tuple[bytes, ...]) -> tuple[str, str]:
    """The folded h= tag (continuation lines) and its canonical form; the same fields come
    again and again, so the folding is cached."""
    cached = _H_CACHE.get(names)
    if cached is None:
        last = len(names) - 1
        tokens = [("h=" if i == 0 else "") + name.decode("ascii") + (";" if i == last else ":")
                  for i, name in enumerate(names)]
        text = _fold("", tokens)
        cached = text, " ".join(text.split())
        if len(_H_CACHE) >= 1024:
            _H_CACHE.clear()
        _H_CACHE[names] = cached
    return cached


def _fold(start: str, tokens: list[str]) -> str:
    """Join ``tokens`` after ``start``, breaking the line (CRLF + space) before a token
    that would pass _WIDTH; every line after ``start`` begins with a space."""
    parts = [start]
    column = len(start)
    for token in tokens:
        if column == 0 or column + len(token) > _WIDTH:
            token = " " + token.lstrip(" ")
            if column:
                parts.append("\r\n")
            column = 0
        parts.append(token)
        column += len(token)
    return "".join(parts)
