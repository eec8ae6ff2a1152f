"""Delivery status notifications: RFC 3464 reports in an RFC 3462 multipart/report.

The MIME is assembled by hand as bytes rather than with ``email.generator``: the generator
re-folds headers and can re-encode 8-bit content, and the returned original (or its header
section) must reach the sender exactly as we received it.

Everything a remote server or a client gave us (diagnostics, addresses, ENVID) is put
through ``_clean`` before it lands in a header-like field, so a hostile reply cannot inject
header lines into the report.
"""

from __future__ import annotations

import re
import secrets
import textwrap
import time
from dataclasses import dataclass

from ..message.headers import parse_headers, split_message, to_crlf
from ..message.received import rfc5322_date

ACTIONS = frozenset({"failed", "delayed", "delivered", "relayed", "expanded"})

SUBJECT_FAILED = "Undelivered Mail Returned to Sender"
SUBJECT_DELAYED = "Delayed Mail (still being retried)"

_STATUS_RE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
# "smtp; ...", "x-mailrelay; ...": the caller already chose a diagnostic-type.
_TYPED_RE = re.compile(r"^[A-Za-z][A-Za-z0-9-]*;")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]+")
# A msg-id as a DSN may repeat it (RFC 5322 3.6.4): no spaces, brackets or controls.
_MSG_ID = re.compile(r"<[^<>\s\x00-\x1f\x7f]{1,250}>")

# Keep folded field lines comfortably below the 998-octet limit of RFC 5322.
_FOLD_WIDTH = 78
_MAX_VALUE = 900


@dataclass(frozen=True)
class FailedRecipient:
    address: str  # final recipient (rfc822;addr)
    status: str  # enhanced status code, "5.1.1" or "4.4.7"
    diagnostic: str  # "smtp; 550 5.1.1 no such user", or just the remote reply
    action: str = "failed"  # "failed" or "delayed"
    remote_mta: str | None = None  # "mx1.remote.test" -> "dns; mx1.remote.test"
    original_recipient: str | None = None  # ORCPT, "rfc822;addr" or a bare address
    relay: bool = False  # remote_mta is our smarthost (delivery.relay), not the recipient's MX


def returned_headers(message: bytes) -> bytes:
    """What a DSN with RET=HDRS returns: the header section and the empty line after it
    (a message without one is all header, returned whole)."""
    head, rest = split_message(message)
    return head + rest[:2 if rest.startswith(b"\r\n") else 1]


def _unfolded_headers(message: bytes) -> list[tuple[str, str]]:
    """(lower-cased name, unfolded value) pairs of the header section; tolerant of junk.
    Header splitting is defined once, in message.headers (linear in the header's size)."""
    return [(name.lower(), value) for name, value in parse_headers(message)]


def _original_message_id(message: bytes) -> str | None:
    """The returned message's Message-ID, for In-Reply-To and References (so mail
    programs show the bounce with the message it is about); None without a sound one."""
    for name, value in _unfolded_headers(returned_headers(message)):
        if name == "message-id":
            match = _MSG_ID.search(value)
            return match.group() if match else None
    return None


def _first_token(value: str) -> str:
    """The leading token of a structured value, ignoring comments and parameters."""
    value = re.sub(r"\([^)]*\)", " ", value)
    return value.split(";", 1)[0].strip().lower()


def is_auto_generated(message: bytes) -> bool:
    """True for machine-generated mail that must never be bounced (RFC 3834, RFC 3464 §6.2).

    That is ``Auto-Submitted`` with any value but ``no``, or a ``multipart/report``.
    """
    for name, value in _unfolded_headers(message):
        if name == "auto-submitted" and _first_token(value) not in ("", "no"):
            return True
        if name == "content-type" and _first_token(value) == "multipart/report":
            return True
    return False


def _clean(value: str) -> str:
    """One line of text: CR, LF and other controls become single spaces; capped in length."""
    value = _CONTROL_RE.sub(" ", value).strip()
    if len(value) > _MAX_VALUE:
        value = value[: _MAX_VALUE - 3] + "..."
    return value


def _fold(name: str, value: str) -> str:
    """``Name: value`` folded at spaces so lines stay short; parsers unfold it back."""
    lines: list[str] = []
    current = f"{name}:"
    for i, word in enumerate(value.split()):
        if i and len(current) + 1 + len(word) > _FOLD_WIDTH:
            lines.append(current)
            current = f" {word}"
        else:
            current = f"{current} {word}"
    lines.append(current)
    return "\r\n".join(lines)


def _address_field(address: str) -> str:
    """Address with its RFC 3464 address-type; RFC 6533 "utf-8" when it is not ASCII."""
    address = _clean(address)
    kind = "rfc822" if address.isascii() else "utf-8"
    return f"{kind}; {address}"


def _diagnostic_field(diagnostic: str) -> str:
    diagnostic = _clean(diagnostic)
    if _TYPED_RE.match(diagnostic):
        kind, _, rest = diagnostic.partition(";")
        return f"{kind.strip()}; {rest.strip()}"
    return f"smtp; {diagnostic}"


def _diagnostic_text(diagnostic: str) -> str:
    """The diagnostic without its type prefix, for the human-readable part."""
    diagnostic = _clean(diagnostic)
    if _TYPED_RE.match(diagnostic):
        return diagnostic.partition(";")[2].strip()
    return diagnostic


def _status(recipient: FailedRecipient) -> str:
    status = _clean(recipient.status)
    if _STATUS_RE.match(status):
        return status
    # A malformed code would make the whole report unparseable for some clients.
    return "4.0.0" if recipient.action == "delayed" else "5.0.0"


def _delivery_status(
    *,
    reporting_mta: str,
    recipients: list[FailedRecipient],
    arrival_date: float | None,
    envid: str | None,
    now: float,
) -> str:
    per_message = [_fold("Reporting-MTA", f"dns; {_clean(reporting_mta)}")]
    if envid:
        per_message.append(_fold("Original-Envelope-Id", _clean(envid)))
    if arrival_date is not None:
        per_message.append(f"Arrival-Date: {rfc5322_date(arrival_date)}")
    blocks = ["\r\n".join(per_message)]
    for rcpt in recipients:
        fields: list[str] = []
        if rcpt.original_recipient:
            orcpt = _clean(rcpt.original_recipient)
            if not _TYPED_RE.match(orcpt):
                orcpt = _address_field(orcpt)
            fields.append(_fold("Original-Recipient", orcpt))
        fields.append(_fold("Final-Recipient", _address_field(rcpt.address)))
        fields.append(f"Action: {rcpt.action}")
        fields.append(f"Status: {_status(rcpt)}")
        if rcpt.remote_mta:
            fields.append(_fold("Remote-MTA", f"dns; {_clean(rcpt.remote_mta)}"))
        if _clean(rcpt.diagnostic):
            fields.append(_fold("Diagnostic-Code", _diagnostic_field(rcpt.diagnostic)))
        fields.append(f"Last-Attempt-Date: {rfc5322_date(now)}")
        blocks.append("\r\n".join(fields))
    # Blocks are separated by one blank line; the part ends with a line break.
    return "\r\n\r\n".join(blocks) + "\r\n"


def _wrap(text: str, indent: str = "") -> list[str]:
    return textwrap.wrap(
        text, width=76, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False
    ) or [indent.rstrip()]


def _human_text(
    *, reporting_mta: str, recipients: list[FailedRecipient], headers_only_fallback: bool,
    note: str | None = None,
) -> str:
    failed = [r for r in recipients if r.action != "delayed"]
    delayed = [r for r in recipients if r.action == "delayed"]
    lines = [f"This is the mail system at host {_clean(reporting_mta)}.", ""]
    sections = [
        (
            failed,
            "Your message could not be delivered to one or more recipients. "
            "It will not be retried; the details are below.",
        ),
        (
            delayed,
            "Your message has not yet been delivered to the recipients below. "
            "The mail system will keep retrying; you do not need to send it again.",
        ),
    ]
    for group, intro in sections:
        if not group:
            continue
        lines += [*_wrap(intro), ""]
        for rcpt in group:
            reply = _diagnostic_text(rcpt.diagnostic) or f"status {_status(rcpt)}"
            if rcpt.remote_mta:
                said = "our relay" if rcpt.relay else "host"
                reply = f"{said} {_clean(rcpt.remote_mta)} said: {reply}"
            lines += [f"<{_clean(rcpt.address)}>:", *_wrap(reply, "    "), ""]
    if headers_only_fallback:
        lines += _wrap(
            "The original message was too large to return in full; only its headers are attached."
        )
    if note:
        lines += _wrap(_clean(note))
    while lines and not lines[-1]:
        lines.pop()
    return "\r\n".join(lines) + "\r\n"


def _part_headers(content_type: str, body: bytes, description: str) -> str:
    cte = "7bit" if body.isascii() else "8bit"
    return (
        f"Content-Type: {content_type}\r\nContent-Transfer-Encoding: {cte}\r\n"
        f"Content-Description: {description}"
    )


def build_dsn(
    *,
    reporting_mta: str,
    original_sender: str,
    original_message: bytes,
    recipients: list[FailedRecipient],
    arrival_date: float | None = None,
    envid: str | None = None,
    return_full: bool = False,
    max_returned_bytes: int = 256 * 1024,
    from_domain: str | None = None,
    now: float | None = None,
    note: str | None = None,
) -> bytes:
    """The complete DSN message (CRLF line endings), to be queued from ``<>`` to the sender.

    ``note``: one more paragraph for the human-readable part (e.g. why only the headers
    are returned although RET=FULL asked for the whole message)."""
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    if not _clean(original_sender):
        raise ValueError("never send a DSN to the null sender")
    for rcpt in recipients:
        if rcpt.action not in ACTIONS:
            raise ValueError(f"unknown DSN action {rcpt.action!r}")
    now = time.time() if now is None else now
    mta = _clean(reporting_mta)
    if not mta:
        raise ValueError("reporting_mta is required")

    # SMTP requires CRLF; a message with bare LFs is the only case where we alter bytes.
    original = to_crlf(original_message)
    full = return_full and len(original) <= max_returned_bytes
    returned = original if full else returned_headers(original)
    # RFC 6533 message/global(-headers) would claim the headers are UTF-8, which raw 8-bit
    # headers from non-SMTPUTF8 clients often are not; the 8bit CTE is the honest label.
    returned_type = "message/rfc822" if full else "text/rfc822-headers"

    status_text = _delivery_status(
        reporting_mta=mta, recipients=recipients, arrival_date=arrival_date, envid=envid, now=now
    )
    status_bytes = status_text.encode("utf-8")
    status_type = (
        "message/delivery-status" if status_text.isascii() else "message/global-delivery-status"
    )
    text_bytes = _human_text(
        reporting_mta=mta,
        recipients=recipients,
        headers_only_fallback=return_full and not full,
        note=note,
    ).encode("utf-8")

    returned_what = "Undelivered message" if full else "Undelivered message headers"
    parts = [
        (_part_headers("text/plain; charset=utf-8", text_bytes, "Notification"), text_bytes),
        (_part_headers(status_type, status_bytes, "Delivery report"), status_bytes),
        (_part_headers(returned_type, returned, returned_what), returned),
    ]

    while True:  # a random boundary colliding with content is unlikely, but check anyway
        boundary = f"=_mailrelay_{secrets.token_hex(16)}"
        marker = b"--" + boundary.encode("ascii")
        if not any(marker in body for _, body in parts):
            break

    body = bytearray(b"This is a MIME-encapsulated message.\r\n")
    for part_headers, part_body in parts:
        body += b"\r\n" + marker + b"\r\n" + part_headers.encode("ascii") + b"\r\n\r\n"
        body += part_body
    # The CRLF before a delimiter belongs to the delimiter, so every part body is exact.
    body += b"\r\n" + marker + b"--\r\n"

    eight_bit = any(not part_body.isascii() for _, part_body in parts)
    sender = _clean(original_sender)
    headers = [
        f"From: Mail Delivery System <MAILER-DAEMON@{_clean(from_domain or '') or mta}>",
        f"To: <{sender}>",
        "Subject: "
        + (SUBJECT_DELAYED if all(r.action == "delayed" for r in recipients) else SUBJECT_FAILED),
        f"Date: {rfc5322_date(now)}",
        f"Message-ID: <{secrets.token_hex(16)}@{mta}>",
        *([f"In-Reply-To: {about}", f"References: {about}"]
          if (about := _original_message_id(original)) else []),
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f' boundary="{boundary}"',
        f"Content-Transfer-Encoding: {'8bit' if eight_bit else '7bit'}",
    ]
    return "\r\n".join(headers).encode("utf-8") + b"\r\n\r\n" + bytes(body)
