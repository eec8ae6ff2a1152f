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

import binascii
import hashlib
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from ..headers import split_message, to_crlf

RSA_SHA256 = "rsa-sha256"
ED25519_SHA256 = "ed25519-sha256"


@dataclass(frozen=True)
class DKIMKey:
    domain: str
    selector: str
    algorithm: str  # RSA_SHA256 | ED25519_SHA256
    private_key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    path: Path | None = None
    # The folded start of its DKIM-Signature field with its CRLF, and what that start
    # contributes to the signed data; computed once.
    _header_start: tuple[bytes, bytes] = field(init=False, repr=False, compare=False)

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
_SIGNED_B = tuple(name.encode() for name in SIGNED_HEADERS)
# A field we sign, at the start of a line (the text searched starts with a LF): its name
# (any case; RFC 5322 ftext after "list-", as h= must stay ASCII), optional WSP, colon,
# then, past the value's leading WSP and folding, the rest of the value with its
# continuation lines and the CR before the next LF (possessive: no backtracking state
# kept per continuation line, which made a field of a million lines superlinear).
_SIGNED_FIELD = re.compile(
    rb"\n((?i:" + b"|".join(map(re.escape, _SIGNED_B)) + rb"|list-[\x21-\x39\x3b-\x7e]*))"
    rb"[ \t]*:[ \t]*(?:\r\n[ \t]+)*(.*+(?:\n[ \t].*+)*+)")
_WIDTH = 78  # fold the signature field's lines at this many characters
_PKCS1 = padding.PKCS1v15()
_SHA256 = hashes.SHA256()


def sign(message: bytes, keys: Sequence[DKIMKey], *, timestamp: int | None = None) -> bytes:
    """DKIM-Signature fields for ``message``, one per key, each folded and CRLF-terminated,
    to be put in front of the message."""
    if not keys:
        return b""
    header_block, body = _split(to_crlf(message))
    body_hash = binascii.b2a_base64(_body_hash(body), newline=False)
    layout, canonical_headers = _header_fields(header_block)
    when = int(time.time()) if timestamp is None else int(timestamp)
    return b"".join([_sign_one(key, when, layout, body_hash, canonical_headers)
                     for key in keys])


def _split(message: bytes) -> tuple[bytes, bytes]:
    """Header section and body of a CRLF message (without the empty line between them)."""
    head, rest = split_message(message)
    if not rest:
        return message, b""
    return head[:-2], rest[2:]


def _relaxed_body(body: bytes) -> bytes:
    """RFC 6376 3.4.4 on a CRLF body, except the CRLF that ends the last line.

    Whole-buffer replace() calls run in C: much faster than a regex or a loop per line,
    and each is skipped when a quick scan finds nothing to do (base64 has no spaces).
    """
    tab = body.rfind(b"\t")
    end = max(body.rfind(b" "), tab) + 1
    if end:
        # Nothing changes after the last SP or HTAB: a big part there (a big message
        # usually ends in base64) is left out of the replace() calls, and not copied.
        rest = memoryview(body)[end:] if len(body) - end > 1024 else b""
        head = body[:end] if rest else body
        if tab >= 0:
            head = head.replace(b"\t", b" ")
        while b"  " in head:
            head = head.replace(b"  ", b" ")
        if b" \r\n" in head:
            head = head.replace(b" \r\n", b"\r\n")
        if head.endswith(b" ") and (not rest or body.startswith(b"\r\n", end)):
            head = head[:-1]  # ends the last line, whose line break SMTP will add
        body = head + rest
    # Empty lines at the end do not count; no bare CR or LF is left to be eaten here.
    return body.rstrip(b"\r\n")


def _body_hash(body: bytes) -> bytes:
    canonical = _relaxed_body(body)
    digest = hashlib.sha256(canonical)
    if canonical:  # a body that is not empty ends with CRLF; saves copying it
        digest.update(b"\r\n")
    return digest.digest()


@dataclass(frozen=True, slots=True)
class _Layout:
    """All that the names of a header's signed fields (in order) decide."""

    names: tuple[bytes, ...]  # h=
    # The canonical fields without their values: "name:" pieces, each followed by a
    # slot (b"") for its value, which brings the CR of its line's CRLF.
    template: tuple[bytes, ...]
    # Puts the values from message order into signing order; None if that is the same.
    reorder: Callable[[tuple[bytes, ...]], tuple[bytes, ...]] | None
    h_tag: bytes  # the folded h= tag, CRLF-terminated
    h_canonical: bytes  # and its canonical form


def _header_fields(header_block: bytes) -> tuple[_Layout, bytes]:
    """The layout of the signed fields (h= and the field's shape) and the relaxed
    canonical form of the fields h= selects (RFC 6376 3.4.2, 5.4.2): each signed field as
    often as it occurs, each OVERSIGNED one once more, repeated fields from the last
    instance upwards."""
    # One C-level pass finds the signed fields; the trailing CRLF makes every value end
    # with the CR of a CRLF, like all but the last field's do already.
    fields = _SIGNED_FIELD.findall(b"\n" + header_block + b"\r\n")
    if not fields:
        return _layout(()), b""
    raw_names, values = zip(*fields, strict=False)
    layout = _layout(raw_names)
    if layout.reorder is not None:
        values = layout.reorder(values)
    parts = list(layout.template)
    parts[1::2] = values
    # "name:value\r\n" for each field; the values' folding and whitespace are made
    # relaxed (RFC 6376 3.4.2) for all of them at once, with C-level replace() calls:
    # unfold, WSP runs to one SP, no WSP at the end (the leading WSP is not captured).
    # VT and FF are not WSP and stay.
    canonical = b"".join(parts)
    if b"\t" in canonical:
        canonical = canonical.replace(b"\t", b" ")
    if b"\r\n " in canonical:
        canonical = canonical.replace(b"\r\n ", b" ")
    while b"  " in canonical:
        canonical = canonical.replace(b"  ", b" ")
    if b" \r\n" in canonical:
        canonical = canonical.replace(b" \r\n", b"\r\n")
    return layout, canonical


def _layout(raw_names: tuple[bytes, ...]) -> _Layout:
    """The layout for the signed fields with these names (as written), in message order."""
    found: dict[bytes, list[int]] = {}  # name -> its fields' indexes, in message order
    for i, name in enumerate(raw_names):
        found.setdefault(name.lower(), []).append(i)
    names: list[bytes] = []
    order: list[int] = []
    for name, indexes in found.items():  # h= in order of first appearance
        names += [name] * (len(indexes) + (name in _OVERSIGNED_SET))
        order += reversed(indexes)  # bottom-up
    names += [name for name in _OVERSIGNED_B if name not in found]
    template: list[bytes] = []
    for i in order:
        template += [(b"\n" if template else b"") + raw_names[i].lower() + b":", b""]
    template.append(b"\n")
    reorder = itemgetter(*order) if order != sorted(order) else None
    h_tag, h_canonical = _h_tag(tuple(names))
    return _Layout(tuple(names), tuple(template), reorder, h_tag, h_canonical)


def _sign_one(key: DKIMKey, when: int, layout: _Layout, body_hash: bytes,
              canonical_headers: bytes) -> bytes:
    # The field: the key's tags (folded once, in the key), the h= tag, "t= bh=" on one
    # line, b= last.
    start, signed_start = key._header_start
    stamp = b" t=%d; bh=%s;" % (when, body_hash)
    # What is signed: the canonical fields, then this field with b= empty and no CRLF.
    data = b"".join((canonical_headers, signed_start, layout.h_canonical, stamp, b" b="))
    if key.algorithm == RSA_SHA256:
        signature = key.private_key.sign(data, _PKCS1, _SHA256)  # type: ignore[call-arg]
    else:
        signature = key.private_key.sign(hashlib.sha256(data).digest())  # type: ignore[call-arg]
    # " b=" and 75 characters, then lines of a space and 77: chunks of "b=..." by 77.
    text = b"b=" + binascii.b2a_base64(signature, newline=False)
    lines = [text[i:i + _WIDTH - 1] for i in range(0, len(text), _WIDTH - 1)]
    return b"".join((start, layout.h_tag, stamp, b"\r\n ", b"\r\n ".join(lines), b"\r\n"))


def _header_start(domain: str, selector: str, algorithm: str) -> tuple[bytes, bytes]:
    """The folded first line(s) of a key's DKIM-Signature field with their CRLF, and the
    start of the field's canonical form ("dkim-signature:" and its tags, and a space)."""
    tokens = [f"v=1; a={algorithm}; c=relaxed/relaxed;", f"d={domain};", f"s={selector};"]
    text = _fold("DKIM-Signature:", [" " + token for token in tokens])
    canonical = " ".join(text[len("DKIM-Signature:"):].split())
    return (text + "\r\n").encode("ascii"), f"dkim-signature:{canonical} ".encode("ascii")


def _h_tag(names: tuple[bytes, ...]) -> tuple[bytes, bytes]:
    """The folded h= tag (continuation lines, CRLF-terminated) and its canonical form."""
    last = len(names) - 1
    tokens = [("h=" if i == 0 else "") + name.decode("ascii") + (";" if i == last else ":")
              for i, name in enumerate(names)]
    text = _fold("", tokens)
    return (text + "\r\n").encode("ascii"), " ".join(text.split()).encode("ascii")


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
