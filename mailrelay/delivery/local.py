"""Delivery to local mailboxes: one Maildir per user under ``data_dir/mail``."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from ..address import normalize_domain, normalize_local, split
from ..fsutil import fsync_dir, write_all

_counter = 0


def mailbox_name(local: str) -> str:
    """A file-system-safe directory name for a (normalised) local part."""
    safe = []
    for ch in normalize_local(local):
        if ch.isalnum() or ch in "-_+=.":
            safe.append(ch)
        else:
            safe.append(f"%{ord(ch):02X}" if ord(ch) < 256 else f"%u{ord(ch):04X}")
    name = "".join(safe)
    return "%2E" + name[1:] if name.startswith(".") else name


class Maildirs:
    def __init__(self, root: Path):
        self.root = Path(root)

    def path_for(self, address: str) -> Path:
        local, domain = split(address)
        return self.root / normalize_domain(domain) / mailbox_name(local)

    def deliver(self, address: str, sender: str, data: bytes,
                delivered_to: str | None = None) -> Path:
        """Store durably in ``new/`` (Maildir protocol: write to tmp, fsync, rename)."""
        global _counter
        maildir = self.path_for(address)
        for sub in ("tmp", "new", "cur"):
            (maildir / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        _counter += 1
        unique = f"{time.time_ns()}.P{os.getpid()}Q{_counter}.{socket.gethostname()}"
        tmp = maildir / "tmp" / unique
        headers = (f"Return-Path: <{sender}>\r\n"
                   f"Delivered-To: {delivered_to or address}\r\n").encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                write_all(fd, headers)
                write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        final = maildir / "new" / unique
        os.rename(tmp, final)
        fsync_dir(maildir / "new")
        return final
