"""What a filter knows of a transaction, what it decides, and applying that to the message.

The hooks (:mod:`.hooks`) and rspamd (:mod:`.rspamd`) both answer with a :class:`Verdict`:
accept (possibly with header fields to add, fields to remove and a new Subject), reject
(a 5xx reply) or tempfail (a 4xx reply). :func:`apply_verdict` makes the accepted message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from ..headers import split_message

Action = Literal["accept", "reject", "tempfail"]

_FIELD_START = re.compile(rb"[!-9;-~]+:")  # RFC 5322 2.2: printable ASCII except ":"
_ENHANCED = re.compile(r"([245])\.\d{1,3}\.\d{1,3}(?: +|$)")
# A reply code the filter put in front of its text ("550 5.7.1 spam"): ours replaces it.
_REPLY_CODE = re.compile(r"[2-5][0-9][0-9](?:[ -]|$)")
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]")
_MAX_REPLY_TEXT = 400
_VALUE_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # all but HT, CR, LF
# A raw field: a line (cut at LF only, with its end) and the continuation lines after it.
# Possessive: no backtracking state per line, so a field of a million lines costs no more
# than its bytes.
_RAW_FIELD = re.compile(rb"(?:[^\n]*+\n|[^\n]++$)(?:[ \t][^\n]*+(?:\n|$))*+")


@dataclass(frozen=True)
class FilterInput:
    """What a filter knows of the SMTP transaction of the message it checks."""

    remote_addr: str  # the client's IP address, without port ("192.0.2.1", "2001:db8::1")
    remote_port: int
    helo: str  # as the client gave it (EHLO/HELO)
    mail_from: str  # the envelope sender; "" for the null sender <>
    rcpt_to: tuple[str, ...]
    auth_as: str | None  # the authenticated user (user@domain); None when not authenticated
    on_tls: bool
    from_local_domain: bool  # the envelope sender's domain is one of ours
    spf_pass: bool
    queue_id: str = ""  # for rspamd's log (Queue-Id); "" when not known yet
    client_hostname: str | None = None  # the client's verified reverse DNS name, if any


@dataclass
class Verdict:
    """A filter's decision on one message."""

    action: Action
    reply: str | None = None  # the whole SMTP reply for reject/tempfail, "554 5.7.1 ..."
    headers: list[bytes] = field(default_factory=list)  # CRLF-terminated fields to prepend
    subject: str | None = None  # a new Subject: value (rspamd's "rewrite subject")
    # Fields to take out first: (name, n), n as rspamd's milter block means it: 0 all of
    # them, n > 0 the n-th from the top, n < 0 the n-th from the bottom.
    remove_headers: list[tuple[str, int]] = field(default_factory=list)
    # Why the filter could not give a real answer ("timeout", "connect", "bad-json"...),
    # also when it then accepts (rspamd failing open): a label for /metrics.
    error: str | None = None

    @property
    def accepted(self) -> bool:
        return self.action == "accept"


def smtp_reply(code: int, enhanced: str, text: str, fallback: str) -> str:
    """``code`` and a filter's text, with an enhanced status code of the right class.

    chasquid sends a hook's line as it is, which is whatever the hook printed, e.g.
    "554 spam detected" with no enhanced code although it announced ENHANCEDSTATUSCODES.
    Here a reply code in front of the text goes (ours is the one sent); a text that
    starts with an enhanced code of the reply's class keeps it; any other gets
    ``enhanced`` (replacing a code of the wrong class). Only printable ASCII is kept
    (RFC 5321 textstring), at most 400 characters; ``fallback`` when nothing is left.
    """
    text = _NOT_PRINTABLE.sub("?", text.replace("\t", " ")).strip()[:_MAX_REPLY_TEXT]
    if (code_match := _REPLY_CODE.match(text)) is not None:
        text = text[code_match.end():].lstrip()
    match = _ENHANCED.match(text)
    if match:
        if match.group(1) == str(code)[0]:
            return f"{code} {text.rstrip()}"
        text = text[match.end():]
    return f"{code} {enhanced} {text or fallback}"


def fold_value(value: str, limit: int = 4096) -> str:
    """A header value made safe to write: its line breaks become folds, controls go.

    Lines are joined with CRLF and each continuation starts with white space, so the
    value can never end the header section or start a field of its own; empty lines
    are dropped; at most ``limit`` characters are kept.
    """
    lines = []
    for line in _VALUE_CONTROL.sub("", value[:limit]).splitlines():
        if not line.strip():
            continue
        if lines and line[:1] not in (" ", "\t"):
            line = "\t" + line
        lines.append(line)
    return "\r\n".join(lines).strip()


def _fields(section: bytes) -> list[bytes]:
    """The header section cut into raw fields, each with its continuation lines and ends.
    One regex match per field: linear however many continuation lines a field has."""
    return _RAW_FIELD.findall(section)


def _field_name(raw: bytes) -> bytes | None:
    match = _FIELD_START.match(raw)
    return match.group()[:-1].lower() if match else None


def apply_verdict(message: bytes, verdict: Verdict) -> bytes:
    """The message as the verdict wants it: fields removed, Subject replaced, fields added.

    One pass over the header section; the body is not touched (it is copied once when a
    field is removed or the Subject replaced, and only prepended to otherwise).
    """
    if verdict.remove_headers or verdict.subject is not None:
        section, rest = split_message(message)
        fields = _fields(section)
        names = [_field_name(raw) for raw in fields]
        drop: set[int] = set()
        if verdict.remove_headers:
            where: dict[bytes, list[int]] = {}
            for index, name in enumerate(names):
                if name is not None:
                    where.setdefault(name, []).append(index)
            for name, order in verdict.remove_headers:
                found = where.get(name.lower().encode("ascii", "replace"), [])
                if order == 0:
                    drop.update(found)
                elif 0 < order <= len(found):
                    drop.add(found[order - 1])
                elif order < 0 and -order <= len(found):
                    drop.add(found[order])
        added = list(verdict.headers)
        if verdict.subject is not None:
            value = fold_value(verdict.subject).encode("utf-8")
            for index, name in enumerate(names):
                if name == b"subject" and index not in drop:
                    raw = fields[index]
                    ending = raw[len(raw.rstrip(b"\r\n")):]
                    fields[index] = b"Subject: " + value + ending
                    break
            else:
                added.append(b"Subject: " + value + b"\r\n")
        kept = b"".join(raw for index, raw in enumerate(fields) if index not in drop)
        return b"".join(added) + kept + rest
    if verdict.headers:
        return b"".join(verdict.headers) + message
    return message


def subject_of(message: bytes, limit: int = 64 * 1024) -> str | None:
    """The first Subject: value (unfolded, as written) in the first ``limit`` bytes."""
    section, _ = split_message(message[:limit])
    for raw in _fields(section):
        if _field_name(raw) == b"subject":
            value = raw.split(b":", 1)[1]
            value = re.sub(rb"\r?\n(?=[ \t])", b"", value).strip()
            return value.decode("utf-8", "replace")
    return None
