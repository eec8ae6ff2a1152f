"""Steps applied to a message's bytes on its way into the queue."""

from __future__ import annotations

import email.utils
import re

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_UNSAFE = re.compile(r"[^\x21-\x7e]")


def _clean(text: str, limit: int = 100) -> str:
    """Client-supplied text made safe for a header comment: printable ASCII, no parens."""
    return _UNSAFE.sub("?", text)[:limit].replace("(", "?").replace(")", "?")


def received_header(
    *, helo: str, peer_ip: str, hostname: str, queue_id: str, protocol: str,
    recipient: str | None, tls: str | None = None, now: float | None = None,
) -> bytes:
    """A RFC 5321 4.4 trace header, folded at 78 columns the way MTAs do."""
    lines = [f"Received: from {_clean(helo)} ([{peer_ip}])",
             f"\tby {hostname} (mailrelay) with {protocol} id {queue_id}"]
    if tls:
        lines.append(f"\t({_clean(tls, 200)})")
    date = email.utils.formatdate(now, localtime=False, usegmt=False)
    if recipient and "\r" not in recipient and "\n" not in recipient:
        lines.append(f"\tfor <{recipient}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")


def protocol_name(esmtp: bool, tls: bool, authenticated: bool) -> str:
    """RFC 3848 "with" keywords."""
    if not esmtp:
        return "SMTP"
    return "ESMTP" + ("S" if tls else "") + ("A" if authenticated else "")


def header_block(data: bytes) -> bytes:
    """The header section (without the blank line), tolerant of LF-only input."""
    match = _HEADER_END.search(data)
    return data[: match.start()] if match else data
