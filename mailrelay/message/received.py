"""Steps applied to a message's bytes on its way into the queue."""

from __future__ import annotations

import email.utils
import re
import time
from datetime import UTC, datetime

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
        lines.append(f"\t({' '.join(_clean(part, 100) for part in tls.split())})")
    date = rfc5322_date(time.time() if now is None else now)
    if recipient and "\r" not in recipient and "\n" not in recipient:
        lines.append(f"\tfor <{recipient}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")


def rfc5322_date(when: float | None = None) -> str:
    """``Sat, 28 Nov 2026 10:47:00 +0000`` (RFC 5322 3.3), now or at ``when``."""
    moment = datetime.fromtimestamp(time.time() if when is None else int(when), UTC)
    return email.utils.format_datetime(moment)


def protocol_name(esmtp: bool, tls: bool, authenticated: bool) -> str:
    """RFC 3848 "with" keywords."""
    if not esmtp:
        return "SMTP"
    return "ESMTP" + ("S" if tls else "") + ("A" if authenticated else "")


def submission_fixups(
    fields: list[tuple[str, str]], domain: str, now: float | None = None
) -> bytes:
    """Headers a submitted message lacks and receivers insist on (Gmail rejects mail
    without Message-ID): RFC 6409 8.2 and 8.3 let a submission server add them. Not to
    a message that is DKIM-signed already: its signature may cover their absence (h=
    lists a field once more than it occurs), and adding one would break it."""
    present = {name.lower() for name, _ in fields}
    if "dkim-signature" in present:
        return b""
    added = b""
    if "message-id" not in present:
        added += f"Message-ID: {email.utils.make_msgid(domain=domain)}\r\n".encode()
    if "date" not in present:
        added += f"Date: {rfc5322_date(time.time() if now is None else now)}\r\n".encode()
    return added
